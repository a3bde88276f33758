//! The combine's arithmetic: one output row as the f32 sum (optionally weighted) of several
//! rows, added in the order given and rounded once to the output dtype.
//!
//! The sum runs over blocks of the row with the accumulator on the stack, so each input and
//! the output are streamed once. The additions are the same IEEE operations in the same order
//! whatever instructions carry them (no fused multiply-add, no reassociation), so the result
//! is the same bits with or without AVX2.

use super::config::{bf16_bits, Dtype};
use crate::transport::Stores;
use smallvec::SmallVec;

/// Elements summed per block (the accumulator lives on the stack).
const BLOCK: usize = 512;

/// Writes into `out` (one row of `dtype`) the f32 sum of `rows`, each scaled by its weight
/// when `weights` is given, added in order starting from 0, rounded to nearest even: what
/// combine computes per token.
///
/// # Panics
/// If a row's length differs from `out`'s, or `weights` does not hold one weight per row.
///
/// ```
/// use xccl::moe::{sum_rows, Dtype};
/// let (a, b) = (1.5f32.to_le_bytes(), 2.0f32.to_le_bytes());
/// let mut out = [0u8; 4];
/// sum_rows(Dtype::F32, &mut out, &[&a, &b], Some(&[2.0, 0.5]));
/// assert_eq!(f32::from_le_bytes(out), 4.0);
/// ```
pub fn sum_rows(dtype: Dtype, out: &mut [u8], rows: &[&[u8]], weights: Option<&[f32]>) {
    sum_rows_stored(dtype, out, rows, weights, Stores::Cached);
}

/// [`sum_rows`], writing `out` with `stores`: `Streaming` (non-temporal stores where the CPU
/// and `out`'s alignment allow) for outputs too large to stay in cache, which then cost no
/// read for ownership. The same bits either way; after streaming stores the caller runs
/// [`crate::copy::store_fence`] before it publishes or hands the output on.
pub(crate) fn sum_rows_stored(
    dtype: Dtype,
    out: &mut [u8],
    rows: &[&[u8]],
    weights: Option<&[f32]>,
    stores: Stores,
) {
    assert!(
        rows.iter().all(|r| r.len() == out.len()),
        "sum_rows: every row must be as long as the output"
    );
    assert!(
        weights.is_none_or(|w| w.len() == rows.len()),
        "sum_rows: one weight per row"
    );
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2")
        && sum_rows_avx2(dtype, out, rows, weights, stores)
    {
        return;
    }
    let _ = stores; // the portable sum stores through the caches
    sum_rows_generic(dtype, out, rows, weights);
}

/// Aligned bf16 and f32 rows with AVX2 (see [`super::sum_avx2`]); the steps it leaves (a
/// NaN in a bf16 sum) and the tail go to the portable code. False when the rows are of
/// another dtype or unaligned: nothing was written.
#[cfg(target_arch = "x86_64")]
fn sum_rows_avx2(
    dtype: Dtype,
    out: &mut [u8],
    rows: &[&[u8]],
    weights: Option<&[f32]>,
    stores: Stores,
) -> bool {
    use super::sum_avx2::{sum_bf16, sum_f32, STEP};
    let mut left: SmallVec<[usize; 4]> = SmallVec::new();
    // Non-temporal stores take 16-byte aligned addresses; every step starts a whole number
    // of 64-byte steps after `out`, so one check covers them all.
    let stream = stores == Stores::Streaming && out.as_ptr() as usize % 16 == 0;
    let (done, elem) = match dtype {
        Dtype::Bf16 => match cast_all::<u16>(out, rows) {
            Some((o, r)) => {
                // SAFETY: AVX2 was detected by the caller; `sum_rows` checked every row is as
                // long as `out` and that `weights` has one weight per row.
                // `stream` only with `out` 16-byte aligned.
                (unsafe { sum_bf16(o, &r, weights, stream, &mut left) }, 2)
            }
            None => return false,
        },
        Dtype::F32 => match cast_all::<u32>(out, rows) {
            // SAFETY: as above.
            Some((o, r)) => (unsafe { sum_f32(o, &r, weights, stream) }, 4),
            None => return false,
        },
        Dtype::F16 => return false,
    };
    let end = out.len() / elem;
    let mut part = |from: usize, to: usize| {
        let sub: SmallVec<[&[u8]; 8]> = rows.iter().map(|r| &r[from * elem..to * elem]).collect();
        sum_rows_generic(dtype, &mut out[from * elem..to * elem], &sub, weights);
    };
    for at in left {
        part(at, at + STEP);
    }
    part(done, end);
    true
}

#[inline(always)]
fn sum_rows_generic(dtype: Dtype, out: &mut [u8], rows: &[&[u8]], weights: Option<&[f32]>) {
    // Aligned bf16 and f32 rows (window rows always are): lanes summed in registers, each
    // input and the output touched once. Anything else: blocks through a stack accumulator.
    match dtype {
        Dtype::Bf16 => {
            if let Some((o, r)) = cast_all::<u16>(out, rows) {
                return sum_lanes(
                    o,
                    &r,
                    weights,
                    |x| f32::from_bits((u16::from_le(x) as u32) << 16),
                    |v| bf16_bits(v).to_le(),
                );
            }
        }
        Dtype::F32 => {
            if let Some((o, r)) = cast_all::<u32>(out, rows) {
                return sum_lanes(
                    o,
                    &r,
                    weights,
                    |x| f32::from_bits(u32::from_le(x)),
                    |v| v.to_bits().to_le(),
                );
            }
        }
        Dtype::F16 => {}
    }
    sum_blocked(dtype, out, rows, weights);
}

/// An output row and its input rows, as slices of one element type.
type Cast<'a, T> = (&'a mut [T], SmallVec<[&'a [T]; 8]>);

/// `out` and every row as slices of `T`, when all are aligned for it.
#[inline(always)]
fn cast_all<'a, T: bytemuck::Pod>(out: &'a mut [u8], rows: &[&'a [u8]]) -> Option<Cast<'a, T>> {
    let o = bytemuck::try_cast_slice_mut::<u8, T>(out).ok()?;
    let r = rows
        .iter()
        .map(|r| bytemuck::try_cast_slice::<u8, T>(r).ok())
        .collect::<Option<SmallVec<[&[T]; 8]>>>()?;
    Some((o, r))
}

/// How far ahead of the sum the input rows are prefetched.
pub(super) const PREFETCH_BYTES: usize = 1024;

/// A hint to load the cache line at `p` (any address: a prefetch never faults).
#[inline(always)]
pub(super) fn prefetch(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `prefetcht0` is a hint with no architectural effect and never faults, whatever
    // the address; SSE is baseline on x86_64.
    unsafe {
        std::arch::x86_64::_mm_prefetch(p as *const i8, std::arch::x86_64::_MM_HINT_T0)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Elements kept in registers at a time.
const LANES: usize = 16;

#[inline(always)]
fn sum_lanes<T: Copy>(
    out: &mut [T],
    rows: &[&[T]],
    weights: Option<&[f32]>,
    load: impl Fn(T) -> f32,
    store: impl Fn(f32) -> T,
) {
    let n = out.len();
    let body = n - n % LANES;
    let line = 64 / std::mem::size_of::<T>();
    let ahead = PREFETCH_BYTES / std::mem::size_of::<T>();
    for at in (0..body).step_by(LANES) {
        if at % line == 0 {
            // Rows are read once, in order: ask for what comes next across page boundaries,
            // where the hardware prefetcher starts over.
            for row in rows {
                prefetch(row.as_ptr().wrapping_add(at + ahead) as *const u8);
            }
        }
        let mut acc = [0f32; LANES];
        for (j, row) in rows.iter().enumerate() {
            let src: &[T; LANES] = row[at..at + LANES].try_into().expect("LANES elements");
            match weights {
                Some(w) => {
                    let w = w[j];
                    for (a, &x) in acc.iter_mut().zip(src) {
                        *a += w * load(x);
                    }
                }
                None => {
                    for (a, &x) in acc.iter_mut().zip(src) {
                        *a += load(x);
                    }
                }
            }
        }
        let dst: &mut [T; LANES] = (&mut out[at..at + LANES]).try_into().expect("LANES");
        for (o, &a) in dst.iter_mut().zip(&acc) {
            *o = store(a);
        }
    }
    for i in body..n {
        let mut acc = 0f32;
        for (j, row) in rows.iter().enumerate() {
            acc += match weights {
                Some(w) => w[j] * load(row[i]),
                None => load(row[i]),
            };
        }
        out[i] = store(acc);
    }
}

/// Any dtype, any alignment: blocks of the row summed into a stack accumulator.
fn sum_blocked(dtype: Dtype, out: &mut [u8], rows: &[&[u8]], weights: Option<&[f32]>) {
    let mut acc = [0f32; BLOCK];
    let elem = dtype.size();
    let n = out.len() / elem;
    let mut at = 0;
    while at < n {
        let len = BLOCK.min(n - at);
        let acc = &mut acc[..len];
        acc.fill(0.0);
        for (j, row) in rows.iter().enumerate() {
            let src = &row[at * elem..(at + len) * elem];
            match weights {
                Some(w) => dtype.accumulate_scaled(acc, src, w[j]),
                None => dtype.accumulate(acc, src),
            }
        }
        dtype.store_row(&mut out[at * elem..(at + len) * elem], acc);
        at += len;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(dtype: Dtype, vals: &[f32]) -> Vec<u8> {
        let mut r = vec![0u8; vals.len() * dtype.size()];
        dtype.store_row(&mut r, vals);
        r
    }

    /// The blocked, vectorized sum gives the bits of the plain element-by-element sum, for
    /// every dtype, weighted or not, over rows longer than a block and not a multiple of it,
    /// shorter than one vector step, exactly whole steps, and for unaligned buffers; with
    /// streaming stores too.
    #[test]
    fn matches_the_plain_sum_bit_for_bit() {
        for n in [BLOCK * 2 + 37, 31, 64, 96 + 5] {
            matches_the_plain_sum_for(n);
        }
    }

    fn matches_the_plain_sum_for(n: usize) {
        for dtype in [Dtype::Bf16, Dtype::F16, Dtype::F32] {
            let inputs: Vec<Vec<u8>> = (0..3)
                .map(|j| {
                    let mut vals: Vec<f32> = (0..n)
                        .map(|i| ((i * 7 + j * 13) % 101) as f32 * 0.37 - 17.0)
                        .collect();
                    // Non-finite inputs and sums that overflow take the NaN/inf paths.
                    if j == 1 && n > 40 {
                        vals[3] = f32::NAN;
                        vals[20] = f32::INFINITY;
                        vals[21] = f32::NEG_INFINITY;
                        vals[40] = 3.0e38;
                    }
                    if j == 2 && n > 40 {
                        vals[40] = 3.0e38;
                        vals[21] = f32::INFINITY;
                    }
                    row(dtype, &vals)
                })
                .collect();
            let weights = [0.3f32, 1.7, -0.45];
            for weighted in [false, true] {
                let mut want_acc = vec![0f32; n];
                for (j, r) in inputs.iter().enumerate() {
                    if weighted {
                        dtype.accumulate_scaled(&mut want_acc, r, weights[j]);
                    } else {
                        dtype.accumulate(&mut want_acc, r);
                    }
                }
                let want = row(dtype, &want_acc);
                let rows: Vec<&[u8]> = inputs.iter().map(|r| r.as_slice()).collect();
                let w = weighted.then_some(&weights[..]);
                let mut got = vec![0u8; want.len()];
                sum_rows(dtype, &mut got, &rows, w);
                assert_eq!(got, want, "{dtype:?} weighted={weighted}");
                // Streaming stores, into a 16-byte aligned output and into one 8 bytes off
                // (cached stores there): the same bits.
                let mut space = vec![0u128; want.len() / 16 + 2];
                let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut space);
                for off in [0, 8] {
                    let out = &mut bytes[off..off + want.len()];
                    out.fill(0xAA);
                    sum_rows_stored(dtype, out, &rows, w, Stores::Streaming);
                    crate::copy::store_fence();
                    assert_eq!(out, &want[..], "{dtype:?} streaming, {off} bytes off");
                }
                // Shifted by one byte: the element-by-element fallback, same bits.
                let mut shifted = vec![0u8; want.len() + 1];
                let copies: Vec<Vec<u8>> = inputs
                    .iter()
                    .map(|r| {
                        let mut v = vec![0u8; r.len() + 1];
                        v[1..].copy_from_slice(r);
                        v
                    })
                    .collect();
                let rows: Vec<&[u8]> = copies.iter().map(|r| &r[1..]).collect();
                sum_rows(dtype, &mut shifted[1..], &rows, w);
                assert_eq!(&shifted[1..], &want[..], "{dtype:?} unaligned");
            }
        }
    }
}
