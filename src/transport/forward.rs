//! Forwarding for wrapper transports (test backends that change one behaviour of another):
//! [`crate::forward_transport!`] writes the methods that only pass the call on.

/// Inside an `impl Transport for Wrapper`, implements each named [`super::Transport`] method
/// by calling it on `self.<field>` (any transport, boxed or not); the wrapper writes the
/// methods it changes itself.
///
/// ```
/// use xccl::transport::{loopback::Loopback, Caps, Transport};
///
/// /// Loopback under another name.
/// struct Renamed(Loopback);
/// impl Transport for Renamed {
///     fn caps(&self) -> Caps {
///         Caps { backend: "renamed", ..self.0.caps() }
///     }
///     xccl::forward_transport!(0; rank, world_size, register, deregister, put, get, signal,
///         wait, signal_value, flush, abort, close, local_mem);
/// }
/// let t = Renamed(Loopback::create(1).unwrap().pop().unwrap());
/// assert_eq!((t.caps().backend, t.world_size()), ("renamed", 1));
/// ```
#[macro_export]
macro_rules! forward_transport {
    ($field:tt; $($method:ident),* $(,)?) => {
        $( $crate::forward_transport!(@one $field $method); )*
    };
    (@one $f:tt rank) => {
        fn rank(&self) -> usize { self.$f.rank() }
    };
    (@one $f:tt world_size) => {
        fn world_size(&self) -> usize { self.$f.world_size() }
    };
    (@one $f:tt caps) => {
        fn caps(&self) -> $crate::transport::Caps { self.$f.caps() }
    };
    (@one $f:tt register) => {
        fn register(&self, len: usize) -> $crate::Result<$crate::transport::Window> {
            self.$f.register(len)
        }
    };
    (@one $f:tt deregister) => {
        fn deregister(&self, win: $crate::transport::Window) -> $crate::Result<()> {
            self.$f.deregister(win)
        }
    };
    (@one $f:tt put) => {
        fn put(
            &self,
            peer: usize,
            win: &$crate::transport::Window,
            offset: usize,
            data: &[u8],
        ) -> $crate::Result<()> {
            self.$f.put(peer, win, offset, data)
        }
    };
    (@one $f:tt put_vectored) => {
        fn put_vectored(
            &self,
            peer: usize,
            win: &$crate::transport::Window,
            offset: usize,
            parts: &[&[u8]],
        ) -> $crate::Result<()> {
            self.$f.put_vectored(peer, win, offset, parts)
        }
    };
    (@one $f:tt get) => {
        fn get(
            &self,
            peer: usize,
            win: &$crate::transport::Window,
            offset: usize,
            out: &mut [u8],
        ) -> $crate::Result<()> {
            self.$f.get(peer, win, offset, out)
        }
    };
    (@one $f:tt signal) => {
        fn signal(
            &self,
            peer: usize,
            index: usize,
            op: $crate::transport::SignalOp,
            value: u64,
        ) -> $crate::Result<()> {
            self.$f.signal(peer, index, op, value)
        }
    };
    (@one $f:tt put_signal) => {
        fn put_signal(
            &self,
            peer: usize,
            win: &$crate::transport::Window,
            offset: usize,
            data: &[u8],
            index: usize,
            op: $crate::transport::SignalOp,
            value: u64,
        ) -> $crate::Result<()> {
            self.$f.put_signal(peer, win, offset, data, index, op, value)
        }
    };
    (@one $f:tt put_signal_then) => {
        fn put_signal_then(
            &self,
            peer: usize,
            win: &$crate::transport::Window,
            offset: usize,
            data: &[u8],
            index: usize,
            op: $crate::transport::SignalOp,
            value: u64,
        ) -> $crate::Result<()> {
            self.$f.put_signal_then(peer, win, offset, data, index, op, value)
        }
    };
    (@one $f:tt wait) => {
        fn wait(
            &self,
            index: usize,
            cmp: $crate::transport::Cmp,
            value: u64,
            deadline: std::time::Instant,
        ) -> $crate::Result<u64> {
            self.$f.wait(index, cmp, value, deadline)
        }
    };
    (@one $f:tt signal_value) => {
        fn signal_value(&self, index: usize) -> $crate::Result<u64> {
            self.$f.signal_value(index)
        }
    };
    (@one $f:tt flush) => {
        fn flush(&self, peer: usize) -> $crate::Result<()> { self.$f.flush(peer) }
    };
    (@one $f:tt abort) => {
        fn abort(&self) { self.$f.abort() }
    };
    (@one $f:tt close) => {
        fn close(&self, deadline: std::time::Instant) -> $crate::Result<()> {
            self.$f.close(deadline)
        }
    };
    (@one $f:tt local_mem) => {
        fn local_mem(
            &self,
            win: &$crate::transport::Window,
        ) -> $crate::Result<$crate::transport::MappedMem> {
            self.$f.local_mem(win)
        }
    };
    (@one $f:tt path_kind) => {
        fn path_kind(&self, peer: usize) -> $crate::Result<$crate::transport::PathKind> {
            self.$f.path_kind(peer)
        }
    };
    (@one $f:tt map_peer) => {
        fn map_peer(
            &self,
            peer: usize,
            win: &$crate::transport::Window,
        ) -> $crate::Result<Option<$crate::transport::MappedMem>> {
            self.$f.map_peer(peer, win)
        }
    };
    (@one $f:tt arrivals) => {
        fn arrivals(&self) -> Option<u64> { self.$f.arrivals() }
    };
    (@one $f:tt wait_arrivals) => {
        fn wait_arrivals(&self, seen: u64, deadline: std::time::Instant) -> $crate::Result<u64> {
            self.$f.wait_arrivals(seen, deadline)
        }
    };
}
