//! Shared (cross-process) futex wait and wake on a 32-bit word in shared memory.

use std::sync::atomic::AtomicU32;
use std::time::Duration;

/// Sleeps while `*word == expected`, for at most `timeout`. Spurious returns are allowed;
/// callers re-check their condition. Uses the shared futex (no `FUTEX_PRIVATE_FLAG`), so a
/// waker in another process that maps the same memory reaches it.
pub(crate) fn wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `word` is a valid, aligned 32-bit location for the duration of the call; the
    // kernel only reads it. A relative timeout is passed by pointer to a live local.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
        );
    }
}

/// Wakes every waiter parked on `word`, in any process.
pub(crate) fn wake_all(word: &AtomicU32) {
    // SAFETY: `word` is a valid aligned 32-bit location; FUTEX_WAKE does not dereference more.
    unsafe {
        libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, i32::MAX);
    }
}
