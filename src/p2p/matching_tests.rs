//! Message matching checked without a transport: chunks offered by hand.

use super::*;

/// A chunk of message `tag` (`total` bytes) at `offset`, `len` bytes, `seq`-th on its
/// channel.
fn chunk(seq: u64, tag: u64, total: u64, offset: u64, len: u64) -> ChunkHeader {
    ChunkHeader {
        seq,
        tag,
        total,
        offset,
        len,
    }
}

fn recv_into(st: &mut State, src: usize, tag: u64, buf: &mut [u8], exact: bool) -> OpId {
    let segs: RecvSegs = smallvec::smallvec![(buf.as_mut_ptr(), buf.len())];
    st.add_recv(src, tag, segs, exact)
}

#[test]
fn a_posted_receive_takes_its_chunks_in_order() {
    let mut st = State::new(2);
    let mut buf = [0u8; 6];
    let id = recv_into(&mut st, 1, 7, &mut buf, false);
    assert_eq!(
        st.take_chunk(1, &chunk(0, 7, 6, 0, 4), b"abcd", false)
            .unwrap(),
        Taken::Yes
    );
    assert_eq!(
        st.collect(id).unwrap(),
        None,
        "half a message is not a receive"
    );
    assert_eq!(
        st.take_chunk(1, &chunk(1, 7, 6, 4, 2), b"ef", false)
            .unwrap(),
        Taken::Yes
    );
    assert_eq!(st.collect(id).unwrap(), Some(6));
    assert_eq!(&buf, b"abcdef");
    assert!(!st.busy());
    assert!(matches!(st.collect(id), Err(Error::InvalidUsage(_))));
}

#[test]
fn an_unposted_message_waits_in_the_ring_until_drained() {
    let mut st = State::new(2);
    let h = chunk(0, 3, 2, 0, 2);
    assert_eq!(st.take_chunk(0, &h, b"hi", false).unwrap(), Taken::Parked);
    assert!(st.undrained);
    assert_eq!(st.ch[0].consumed, 0, "a parked chunk is not consumed");
    assert_eq!(st.take_chunk(0, &h, b"hi", true).unwrap(), Taken::Yes);
    // A receive posted later finds it set aside, whole.
    let mut buf = [0u8; 2];
    let id = recv_into(&mut st, 0, 3, &mut buf, false);
    assert_eq!(st.collect(id).unwrap(), Some(2));
    assert_eq!(&buf, b"hi");
}

#[test]
fn tags_pick_their_receive_and_exact_receives_take_the_next_message() {
    let mut st = State::new(1);
    let (mut a, mut b) = ([0u8; 1], [0u8; 1]);
    let ia = recv_into(&mut st, 0, 1, &mut a, false);
    let ib = recv_into(&mut st, 0, 2, &mut b, false);
    st.take_chunk(0, &chunk(0, 2, 1, 0, 1), b"B", false)
        .unwrap();
    st.take_chunk(0, &chunk(1, 1, 1, 0, 1), b"A", false)
        .unwrap();
    assert_eq!(
        (st.collect(ia).unwrap(), st.collect(ib).unwrap()),
        (Some(1), Some(1))
    );
    assert_eq!((a, b), (*b"A", *b"B"));
    // Collective mode: another tag or another length is an error naming both.
    let mut c = [0u8; 4];
    let ic = recv_into(&mut st, 0, 9, &mut c, true);
    st.take_chunk(0, &chunk(2, 8, 4, 0, 4), b"xxxx", false)
        .unwrap();
    assert!(matches!(st.collect(ic), Err(Error::ConfigMismatch(_))));
    let id = recv_into(&mut st, 0, 9, &mut c, true);
    st.take_chunk(0, &chunk(3, 9, 3, 0, 3), b"yyy", false)
        .unwrap();
    assert!(matches!(st.collect(id), Err(Error::InvalidArgument(_))));
}

#[test]
fn a_message_too_long_fails_its_receive_and_the_channel_goes_on() {
    let mut st = State::new(1);
    let mut small = [0u8; 2];
    let id = recv_into(&mut st, 0, 5, &mut small, false);
    st.take_chunk(0, &chunk(0, 5, 4, 0, 2), b"ab", false)
        .unwrap();
    st.take_chunk(0, &chunk(1, 5, 4, 2, 2), b"cd", false)
        .unwrap();
    assert!(matches!(st.collect(id), Err(Error::InvalidArgument(_))));
    assert_eq!(small, [0, 0], "nothing of a refused message is written");
    let mut next = [0u8; 1];
    let id = recv_into(&mut st, 0, 5, &mut next, false);
    st.take_chunk(0, &chunk(2, 5, 1, 0, 1), b"z", false)
        .unwrap();
    assert_eq!(st.collect(id).unwrap(), Some(1));
}

#[test]
fn chunks_out_of_place_are_protocol_violations() {
    let mut st = State::new(1);
    assert!(matches!(
        st.take_chunk(0, &chunk(0, 1, 4, 2, 2), b"ab", true),
        Err(Error::ProtocolViolation(_))
    ));
    let mut st = State::new(1);
    st.take_chunk(0, &chunk(0, 1, 4, 0, 2), b"ab", true)
        .unwrap();
    assert!(matches!(
        st.take_chunk(0, &chunk(1, 2, 4, 2, 2), b"cd", true),
        Err(Error::ProtocolViolation(_))
    ));
}

#[test]
fn cancelling_a_half_received_message_discards_its_rest() {
    let mut st = State::new(1);
    let mut buf = [0u8; 4];
    let id = recv_into(&mut st, 0, 1, &mut buf, false);
    st.take_chunk(0, &chunk(0, 1, 4, 0, 2), b"ab", false)
        .unwrap();
    assert!(!st.cancel(&[id]), "a receive is never half sent");
    st.take_chunk(0, &chunk(1, 1, 4, 2, 2), b"cd", false)
        .unwrap();
    assert_eq!(&buf, b"ab\0\0", "the rest went nowhere");
    assert!(!st.busy());
    // A send cancelled after its first chunk left is half sent.
    let data = [1u8; 8];
    let segs: SendSegs = smallvec::smallvec![(data.as_ptr(), data.len())];
    let s = st.add_send(0, 1, segs);
    if let Kind::Send(op) = &mut st.ops.get_mut(&s).unwrap().kind {
        op.started = true;
        op.sent = 4;
    }
    assert!(st.cancel(&[s]));
}
