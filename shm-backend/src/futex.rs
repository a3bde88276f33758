//! Shared (cross-process) futex wait and wake on a 32-bit word in shared memory.

use rustix::thread::futex;
use std::sync::atomic::AtomicU32;
use std::time::Duration;

/// Sleeps while `*word == expected`, for at most `timeout`. Spurious returns are allowed;
/// callers re-check their condition. Uses the shared futex (no `FUTEX_PRIVATE_FLAG`), so a
/// waker in another process that maps the same memory reaches it.
pub(crate) fn wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = futex::Timespec {
        tv_sec: timeout.as_secs().min(i64::MAX as u64) as i64,
        tv_nsec: timeout.subsec_nanos().into(),
    };
    // A changed word (EAGAIN), a signal (EINTR) or the timeout all mean: re-check.
    let _ = futex::wait(word, futex::Flags::empty(), expected, Some(&ts));
}

/// Wakes every waiter parked on `word`, in any process.
pub(crate) fn wake_all(word: &AtomicU32) {
    let _ = futex::wake(word, futex::Flags::empty(), i32::MAX as u32);
}
