//! Applying one received frame: writes into regions, signals, reads and their answers,
//! flushes, heartbeats, aborts, goodbyes and region announcements, each checked first.

use super::*;

/// Applies one frame (a goodbye too: the link is read on to the end of its stream).
pub(super) fn apply(sh: &Shared, peer: usize, link: &mut RxLink, f: &Frame) -> Result<()> {
    match f.kind {
        Kind::Write => {
            apply_write(sh, link, f)?;
            if f.flags & FLAG_SIGNAL != 0 {
                apply_signal(sh, f)?;
            }
        }
        Kind::Signal => apply_signal(sh, f)?,
        Kind::ReadReq => answer_read(sh, peer, f)?,
        Kind::ReadResp => apply_read_answer(sh, link, f)?,
        Kind::Flush => {
            let mut ack = Frame::new(Kind::FlushAck);
            ack.a = f.a;
            sh.send(peer, &ack, &[])?;
        }
        Kind::FlushAck => {
            sh.flushed[peer].fetch_max(f.a, Ordering::SeqCst);
            sh.notify();
        }
        Kind::Heartbeat => {}
        Kind::Abort => {
            let _ =
                sh.aborted
                    .compare_exchange(0, peer as u64 + 1, Ordering::SeqCst, Ordering::SeqCst);
            sh.notify();
        }
        Kind::Reg => {
            sh.regs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert((peer, f.region), f.len);
            sh.notify();
        }
        Kind::Bye => sh.peer_said_bye(peer),
    }
    Ok(())
}

/// The signal a frame carries (`a`: index, `b`: value, SET flag), its index checked.
fn apply_signal(sh: &Shared, f: &Frame) -> Result<()> {
    if f.a >= sh.signals.len() as u64 {
        return Err(Error::Protocol(format!(
            "signal index {} of {}",
            f.a,
            sh.signals.len()
        )));
    }
    sh.signals.apply(f.a as usize, f.flags & FLAG_SET != 0, f.b);
    Ok(())
}

/// Reads `f.len` payload bytes into the link's scratch and drops them (the link stays).
fn discard_payload(sh: &Shared, link: &mut RxLink, f: &Frame) -> Result<()> {
    let mut scratch = std::mem::take(&mut link.scratch);
    scratch.resize(f.len as usize, 0);
    let r = link.read_into(&mut scratch, sh);
    link.scratch = scratch;
    r
}

/// A write: its payload straight into the region, range checked; into a region this rank
/// has deregistered, drained.
fn apply_write(sh: &Shared, link: &mut RxLink, f: &Frame) -> Result<()> {
    let Some(r) = sh.region(f.region) else {
        return discard_payload(sh, link, f);
    };
    r.check(f.offset, f.len)?;
    // SAFETY: the range was checked against the region, which the Arc keeps alive; peers
    // write a region only under the protocol's rules.
    let dst = unsafe {
        std::slice::from_raw_parts_mut(r.as_ptr().add(f.offset as usize), f.len as usize)
    };
    link.read_into(dst, sh)
}

/// A read request: the range, checked, goes back in one answer frame.
fn answer_read(sh: &Shared, peer: usize, f: &Frame) -> Result<()> {
    let r = sh
        .region(f.region)
        .ok_or_else(|| Error::Protocol(format!("read of unknown region {}", f.region)))?;
    r.check(f.offset, f.len)?;
    if f.len > sh.cfg.max_frame {
        return Err(Error::Protocol(format!(
            "read of {} bytes exceeds the frame cap",
            f.len
        )));
    }
    // SAFETY: range checked; a raw view of region memory for the duration of the send.
    let src =
        unsafe { std::slice::from_raw_parts(r.as_ptr().add(f.offset as usize), f.len as usize) };
    let mut resp = Frame::new(Kind::ReadResp);
    resp.len = f.len;
    resp.a = f.a;
    sh.send(peer, &resp, src)
}

/// A read's answer: into the waiting reader's buffer (its length checked), or drained when
/// the reader gave up.
fn apply_read_answer(sh: &Shared, link: &mut RxLink, f: &Frame) -> Result<()> {
    let mut pending = sh.pending.lock().unwrap_or_else(|p| p.into_inner());
    match pending.get_mut(&f.a) {
        Some(p) if p.len as u64 == f.len => {
            // SAFETY: the reader waits until `done` (or removes the entry, which it cannot
            // while we hold the lock), so the buffer is live and exclusive.
            let dst = unsafe { std::slice::from_raw_parts_mut(p.ptr, p.len) };
            link.read_into(dst, sh)?;
            p.done = true;
            sh.changed.notify_all();
            Ok(())
        }
        Some(p) => Err(Error::Protocol(format!(
            "read answer of {} bytes for a {}-byte read",
            f.len, p.len
        ))),
        None => {
            drop(pending);
            discard_payload(sh, link, f)
        }
    }
}
