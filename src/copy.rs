//! Byte copies that avoid the 4 KiB aliasing collapse of `rep movsb`.
//!
//! On the machines xccl targets (AMD Zen 3 with glibc), `memcpy` between 2 KiB and about
//! 1 MiB uses `rep movsb`, which slows down up to 20× when `(dst − src) mod 4096` is a few
//! bytes (two heap buffers are typically 16 bytes apart in that sense). A user buffer
//! copied into a page-aligned ring slot hits exactly that. For such copies this module uses
//! a plain vector loop, which does not care about the relative offset; all others go to
//! `memcpy`.

/// Relative page offsets (`(dst − src) mod 4096`) that take the vector loop.
const ALIAS_WINDOW: usize = 64;
/// Sizes that take the vector loop when aliased (where glibc uses `rep movsb`).
const ALIAS_SIZES: std::ops::RangeInclusive<usize> = 2048..=(1 << 20);

/// Copies `len` bytes from `src` to `dst`.
///
/// # Safety
/// `src` must be valid for reads and `dst` for writes of `len` bytes, and the ranges must not
/// overlap.
pub unsafe fn copy_bytes(dst: *mut u8, src: *const u8, len: usize) {
    let d = (dst as usize).wrapping_sub(src as usize) % 4096;
    #[cfg(target_arch = "x86_64")]
    if d != 0 && d < ALIAS_WINDOW && ALIAS_SIZES.contains(&len) {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 is present; the caller's contract covers the ranges.
            unsafe { copy_avx2(dst, src, len) };
        } else {
            // SAFETY: SSE2 is part of x86_64; the caller's contract covers the ranges.
            unsafe { copy_sse2(dst, src, len) };
        }
        return;
    }
    let _ = d;
    // SAFETY: the caller's contract.
    unsafe { std::ptr::copy_nonoverlapping(src, dst, len) };
}

/// Copies `len` bytes from `src` to `dst`, which may overlap (a rank putting a slice of its
/// own window into the same window).
///
/// # Safety
/// `src` must be valid for reads and `dst` for writes of `len` bytes.
pub unsafe fn copy_any(dst: *mut u8, src: *const u8, len: usize) {
    let (d, s) = (dst as usize, src as usize);
    if d < s.saturating_add(len) && s < d.saturating_add(len) {
        // SAFETY: the caller's contract; `copy` handles the overlap.
        unsafe { std::ptr::copy(src, dst, len) };
    } else {
        // SAFETY: the caller's contract, and the ranges were just found disjoint.
        unsafe { copy_bytes(dst, src, len) };
    }
}

/// Safe wrapper: copies `src` into `dst` (equal lengths).
pub fn copy_slice(dst: &mut [u8], src: &[u8]) {
    assert_eq!(dst.len(), src.len(), "copy_slice needs equal lengths");
    // SAFETY: two distinct borrows of the given lengths cannot overlap.
    unsafe { copy_bytes(dst.as_mut_ptr(), src.as_ptr(), src.len()) }
}

/// Copies `len` bytes from `src` to `dst` with non-temporal stores where the CPU has them:
/// for bulk data the writer will not read again and that another core reads next, the stores
/// skip this core's caches (no read for ownership, no eviction of the writer's working set).
///
/// Non-temporal stores are not ordered by `Release`: call [`store_fence`] after the last
/// such copy and before the store that publishes the data.
///
/// # Safety
/// As [`copy_bytes`].
pub unsafe fn copy_streaming(dst: *mut u8, src: *const u8, len: usize) {
    #[cfg(target_arch = "x86_64")]
    if len >= 256 && std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 is present; the caller's contract covers the ranges.
        unsafe { copy_stream_avx2(dst, src, len) };
        return;
    }
    // SAFETY: the caller's contract.
    unsafe { copy_bytes(dst, src, len) };
}

/// Orders every earlier store, non-temporal ones included, before every later one: the
/// partner of [`copy_streaming`] before a publishing `Release` store.
pub fn store_fence() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `sfence` has no preconditions (SSE is baseline on x86_64).
    unsafe {
        std::arch::x86_64::_mm_sfence()
    };
    #[cfg(not(target_arch = "x86_64"))]
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn copy_stream_avx2(dst: *mut u8, src: *const u8, len: usize) {
    // Head up to a cache-line boundary of `dst` with ordinary stores: the streamed part then
    // fills whole lines (a line written partly each way costs more than either).
    let head = (64 - (dst as usize) % 64) % 64;
    // SAFETY: `head < 64 < 256 <= len`, inside both ranges; the rest starts 64-byte aligned
    // at `dst + head`, as the streaming stores need.
    unsafe {
        std::ptr::copy_nonoverlapping(src, dst, head);
        copy_loop_avx2::<true>(dst.add(head), src.add(head), len - head);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn copy_avx2(dst: *mut u8, src: *const u8, len: usize) {
    // SAFETY: the caller's contract; unaligned stores need no alignment.
    unsafe { copy_loop_avx2::<false>(dst, src, len) }
}

/// 128 bytes per step with AVX2 loads, and streaming stores (`STREAM`, `dst` 32-byte aligned)
/// or ordinary unaligned ones; the tail with `memcpy` (under 128 bytes it does not use
/// `rep movsb`).
///
/// # Safety
/// As [`copy_bytes`], the CPU has AVX2, and with `STREAM` `dst` is 32-byte aligned.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn copy_loop_avx2<const STREAM: bool>(dst: *mut u8, src: *const u8, len: usize) {
    use std::arch::x86_64::{
        __m256i, _mm256_loadu_si256, _mm256_storeu_si256, _mm256_stream_si256,
    };
    let mut i = 0;
    while i + 128 <= len {
        // SAFETY: `i + 128 <= len`, inside both ranges; `dst + i` keeps the alignment of
        // `dst` (`i` advances by 128), which the streaming store needs.
        unsafe {
            let s = src.add(i) as *const __m256i;
            let d = dst.add(i) as *mut __m256i;
            let v = [
                _mm256_loadu_si256(s),
                _mm256_loadu_si256(s.add(1)),
                _mm256_loadu_si256(s.add(2)),
                _mm256_loadu_si256(s.add(3)),
            ];
            for (k, v) in v.into_iter().enumerate() {
                if STREAM {
                    _mm256_stream_si256(d.add(k), v);
                } else {
                    _mm256_storeu_si256(d.add(k), v);
                }
            }
        }
        i += 128;
    }
    // SAFETY: the tail lies inside both ranges.
    unsafe { std::ptr::copy_nonoverlapping(src.add(i), dst.add(i), len - i) };
}

#[cfg(target_arch = "x86_64")]
unsafe fn copy_sse2(dst: *mut u8, src: *const u8, len: usize) {
    use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_storeu_si128};
    let mut i = 0;
    while i + 64 <= len {
        // SAFETY: `i + 64 <= len`, inside both ranges; SSE2 is baseline on x86_64.
        unsafe {
            let s = src.add(i) as *const __m128i;
            let d = dst.add(i) as *mut __m128i;
            let (a, b, c, e) = (
                _mm_loadu_si128(s),
                _mm_loadu_si128(s.add(1)),
                _mm_loadu_si128(s.add(2)),
                _mm_loadu_si128(s.add(3)),
            );
            _mm_storeu_si128(d, a);
            _mm_storeu_si128(d.add(1), b);
            _mm_storeu_si128(d.add(2), c);
            _mm_storeu_si128(d.add(3), e);
        }
        i += 64;
    }
    // SAFETY: the tail lies inside both ranges.
    unsafe { std::ptr::copy_nonoverlapping(src.add(i), dst.add(i), len - i) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_path_copies_exactly() {
        let src: Vec<u8> = (0..300_000u32).map(|i| (i * 7 + 3) as u8).collect();
        for (len, shift) in [
            (0, 0),
            (5, 3),
            (2048, 16),
            (4099, 1),
            (70_001, 63),
            (200_000, 64),
            (300_000 - 40, 17),
        ] {
            let mut dst = vec![0u8; len + 128];
            // Pick a destination offset giving the wanted relative page offset.
            let base = dst.as_ptr() as usize;
            let want = (src.as_ptr() as usize + shift) % 4096;
            let off = (want + 4096 - base % 4096) % 4096 % 64;
            let off = if off + len <= dst.len() { off } else { 0 };
            copy_slice(&mut dst[off..off + len], &src[..len]);
            assert_eq!(&dst[off..off + len], &src[..len], "len {len} shift {shift}");
            assert!(dst[..off].iter().all(|&b| b == 0));
            assert!(dst[off + len..].iter().all(|&b| b == 0));
        }
    }

    /// Streaming copies: every destination alignment (head), multiples of the 128-byte step
    /// and odd tails, and sizes under the streaming threshold.
    #[test]
    fn streaming_copies_exactly() {
        let src: Vec<u8> = (0..70_000u32).map(|i| (i * 13 + 5) as u8).collect();
        for len in [0, 1, 255, 256, 257, 4096, 4096 + 127, 69_000] {
            for off in [0, 1, 17, 31, 32, 63] {
                let mut dst = vec![0u8; len + 128];
                // SAFETY: `off + len <= dst.len()`; distinct vectors cannot overlap.
                unsafe { copy_streaming(dst.as_mut_ptr().add(off), src.as_ptr(), len) };
                store_fence();
                assert_eq!(&dst[off..off + len], &src[..len], "len {len} off {off}");
                assert!(dst[..off].iter().all(|&b| b == 0));
                assert!(dst[off + len..].iter().all(|&b| b == 0));
            }
        }
    }
}
