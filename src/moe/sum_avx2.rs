//! The combine sum in AVX2 for bf16 and f32 rows: 32 elements per step in four independent
//! accumulators, bf16 widened by an in-lane unpack (the matching in-lane pack puts the
//! elements back in order), rounded to nearest even with integer operations. The same IEEE
//! multiplies and adds in the same order as the portable sum (no fused multiply-add), so the
//! same bits; a step whose sum holds a NaN, and the tail shorter than a step, are left to the
//! portable code. Each step prefetches the line it will need `PREFETCH_BYTES` on.

use super::sum::{prefetch, PREFETCH_BYTES};
use smallvec::SmallVec;
use std::arch::x86_64::*;

/// Elements per step.
pub(super) const STEP: usize = 32;

/// Sums `rows` (each scaled by its weight when given) into `out`, step by step, for as many
/// whole steps as fit; returns how many elements it wrote (a multiple of [`STEP`]) and, for
/// the steps it left, their first element: the caller sums those and the tail. With
/// `stream`, the steps are written with non-temporal stores.
///
/// # Safety
/// The CPU has AVX2; every row is at least `out.len()` `u16`s long; `weights` (when given)
/// holds at least `rows.len()` weights; with `stream`, `out` is 16-byte aligned.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn sum_bf16(
    out: &mut [u16],
    rows: &[&[u16]],
    weights: Option<&[f32]>,
    stream: bool,
    left: &mut SmallVec<[usize; 4]>,
) -> usize {
    let n = out.len() - out.len() % STEP;
    let zero = _mm256_setzero_si256();
    let bias = _mm256_set1_epi32(0x7FFF);
    let one = _mm256_set1_epi32(1);
    let mut at = 0;
    while at < n {
        let mut acc = [_mm256_setzero_ps(); 4];
        for (j, row) in rows.iter().enumerate() {
            // A step is one line of each row: ask for the line the sum reaches next across
            // page boundaries, where the hardware prefetcher starts over (as the portable
            // sum does).
            prefetch(row.as_ptr().wrapping_add(at + PREFETCH_BYTES / 2) as *const u8);
            // SAFETY: `at + STEP <= n <= row.len()` (the caller's promise on row lengths), so
            // both 32-byte loads lie inside the row; `loadu` needs no alignment.
            let (v0, v1) = unsafe {
                let p = row.as_ptr().add(at) as *const __m256i;
                (_mm256_loadu_si256(p), _mm256_loadu_si256(p.add(1)))
            };
            // bf16 bits in the high half of each 32-bit lane are that f32.
            let x = [
                _mm256_unpacklo_epi16(zero, v0),
                _mm256_unpackhi_epi16(zero, v0),
                _mm256_unpacklo_epi16(zero, v1),
                _mm256_unpackhi_epi16(zero, v1),
            ]
            .map(|v| _mm256_castsi256_ps(v));
            add_row(&mut acc, x, weights.map(|w| w[j]));
        }
        if has_nan(&acc) {
            left.push(at);
            at += STEP;
            continue;
        }
        let r = [
            round_bf16(acc[0], bias, one),
            round_bf16(acc[1], bias, one),
            round_bf16(acc[2], bias, one),
            round_bf16(acc[3], bias, one),
        ];
        // SAFETY: `at + STEP <= n <= out.len()`: both 32-byte stores lie inside `out`; with
        // `stream`, `out` (the caller's promise) and so `p` (64-byte steps on) are 16-byte
        // aligned.
        unsafe {
            let p = out.as_mut_ptr().add(at) as *mut __m256i;
            store(p, _mm256_packus_epi32(r[0], r[1]), stream);
            store(p.add(1), _mm256_packus_epi32(r[2], r[3]), stream);
        }
        at += STEP;
    }
    n
}

/// Rounds each f32 lane to bf16, to nearest even: adds 0x7FFF plus the lowest kept bit and
/// keeps the high half (in the low half of the lane, for the pack).
#[target_feature(enable = "avx2")]
fn round_bf16(a: __m256, bias: __m256i, one: __m256i) -> __m256i {
    let u = _mm256_castps_si256(a);
    let lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), one);
    _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, bias), lsb), 16)
}

/// As [`sum_bf16`], for f32 rows; every whole step is summed here (an f32 NaN needs no
/// rounding), so it returns only how many elements it wrote.
///
/// # Safety
/// As for [`sum_bf16`], with rows of `u32`s.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn sum_f32(
    out: &mut [u32],
    rows: &[&[u32]],
    weights: Option<&[f32]>,
    stream: bool,
) -> usize {
    let n = out.len() - out.len() % STEP;
    let mut at = 0;
    while at < n {
        let mut acc = [_mm256_setzero_ps(); 4];
        for (j, row) in rows.iter().enumerate() {
            // Two lines of each row per step, prefetched as in `sum_bf16`.
            let ahead = row.as_ptr().wrapping_add(at + PREFETCH_BYTES / 4) as *const u8;
            prefetch(ahead);
            prefetch(ahead.wrapping_add(64));
            // SAFETY: `at + STEP <= n <= row.len()`: the four 32-byte loads lie inside the row.
            let x = unsafe {
                let p = row.as_ptr().add(at) as *const f32;
                [
                    _mm256_loadu_ps(p),
                    _mm256_loadu_ps(p.add(8)),
                    _mm256_loadu_ps(p.add(16)),
                    _mm256_loadu_ps(p.add(24)),
                ]
            };
            add_row(&mut acc, x, weights.map(|w| w[j]));
        }
        // SAFETY: `at + STEP <= n <= out.len()`: the four 32-byte stores lie inside `out`;
        // with `stream`, 16-byte aligned as in `sum_bf16`.
        unsafe {
            let p = out.as_mut_ptr().add(at) as *mut __m256i;
            for (o, a) in acc.into_iter().enumerate() {
                store(p.add(o), _mm256_castps_si256(a), stream);
            }
        }
        at += STEP;
    }
    n
}

/// Stores 32 bytes at `p`: two non-temporal 16-byte stores with `stream`, else one
/// unaligned store.
///
/// # Safety
/// `p` is valid for 32 bytes of writes; with `stream`, 16-byte aligned.
#[target_feature(enable = "avx2")]
unsafe fn store(p: *mut __m256i, v: __m256i, stream: bool) {
    // SAFETY: the caller's promise: 32 writable bytes at `p`, 16-byte aligned with `stream`.
    unsafe {
        if stream {
            let q = p as *mut __m128i;
            _mm_stream_si128(q, _mm256_castsi256_si128(v));
            _mm_stream_si128(q.add(1), _mm256_extracti128_si256::<1>(v));
        } else {
            _mm256_storeu_si256(p, v);
        }
    }
}

/// Adds one row's step (`x`, times `weight` when given) to the accumulators: a multiply
/// then an add, as the portable sum does.
#[target_feature(enable = "avx2")]
fn add_row(acc: &mut [__m256; 4], x: [__m256; 4], weight: Option<f32>) {
    match weight {
        Some(w) => {
            let w = _mm256_set1_ps(w);
            for (a, x) in acc.iter_mut().zip(x) {
                *a = _mm256_add_ps(*a, _mm256_mul_ps(w, x));
            }
        }
        None => {
            for (a, x) in acc.iter_mut().zip(x) {
                *a = _mm256_add_ps(*a, x);
            }
        }
    }
}

/// Whether any lane of the four accumulators is a NaN (bf16 rounding must keep it one).
#[target_feature(enable = "avx2")]
fn has_nan(acc: &[__m256; 4]) -> bool {
    let any = _mm256_or_ps(
        _mm256_or_ps(
            _mm256_cmp_ps::<_CMP_UNORD_Q>(acc[0], acc[0]),
            _mm256_cmp_ps::<_CMP_UNORD_Q>(acc[1], acc[1]),
        ),
        _mm256_or_ps(
            _mm256_cmp_ps::<_CMP_UNORD_Q>(acc[2], acc[2]),
            _mm256_cmp_ps::<_CMP_UNORD_Q>(acc[3], acc[3]),
        ),
    );
    _mm256_movemask_ps(any) != 0
}
