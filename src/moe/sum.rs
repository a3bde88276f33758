//! The combine's arithmetic: one output row as the f32 sum (optionally weighted) of several
//! rows, added in the order given and rounded once to the output dtype.
//!
//! The sum runs over blocks of the row with the accumulator on the stack, so each input and
//! the output are streamed once. The additions are the same IEEE operations in the same order
//! whatever instructions carry them (no fused multiply-add, no reassociation), so the result
//! is the same bits with or without AVX2.

use super::config::{bf16_bits, Dtype};

/// Elements summed per block (the accumulator lives on the stack).
const BLOCK: usize = 512;

/// Writes into `out` (one row of `dtype`) the f32 sum of `rows`, each scaled by its weight
/// when `weights` is given, added in order starting from 0, rounded to nearest even.
///
/// Rows and `out` must hold the same number of bytes (a multiple of the dtype's size);
/// weights, when given, one per row.
pub(crate) fn sum_rows(dtype: Dtype, out: &mut [u8], rows: &[&[u8]], weights: Option<&[f32]>) {
    debug_assert!(rows.iter().all(|r| r.len() == out.len()));
    debug_assert!(weights.is_none_or(|w| w.len() == rows.len()));
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked on the line above), all `sum_rows_avx2` needs.
        unsafe { sum_rows_avx2(dtype, out, rows, weights) };
        return;
    }
    sum_rows_generic(dtype, out, rows, weights);
}

/// [`sum_rows_generic`] compiled with AVX2 enabled, so its loops vectorize 8 lanes wide.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn sum_rows_avx2(dtype: Dtype, out: &mut [u8], rows: &[&[u8]], weights: Option<&[f32]>) {
    sum_rows_generic(dtype, out, rows, weights);
}

#[inline(always)]
fn sum_rows_generic(dtype: Dtype, out: &mut [u8], rows: &[&[u8]], weights: Option<&[f32]>) {
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
                Some(w) => add_block(dtype, acc, src, Some(w[j])),
                None => add_block(dtype, acc, src, None),
            }
        }
        store_block(dtype, &mut out[at * elem..(at + len) * elem], acc);
        at += len;
    }
}

#[inline(always)]
fn add_block(dtype: Dtype, acc: &mut [f32], src: &[u8], w: Option<f32>) {
    match dtype {
        Dtype::Bf16 => match bytemuck::try_cast_slice::<u8, u16>(src) {
            Ok(words) => match w {
                Some(w) => {
                    for (a, &x) in acc.iter_mut().zip(words) {
                        *a += w * bf16_to_f32(u16::from_le(x));
                    }
                }
                None => {
                    for (a, &x) in acc.iter_mut().zip(words) {
                        *a += bf16_to_f32(u16::from_le(x));
                    }
                }
            },
            Err(_) => add_slow(dtype, acc, src, w),
        },
        Dtype::F32 => match bytemuck::try_cast_slice::<u8, f32>(src) {
            Ok(vals) => match w {
                Some(w) => {
                    for (a, &x) in acc.iter_mut().zip(vals) {
                        *a += w * f32::from_bits(u32::from_le(x.to_bits()));
                    }
                }
                None => {
                    for (a, &x) in acc.iter_mut().zip(vals) {
                        *a += f32::from_bits(u32::from_le(x.to_bits()));
                    }
                }
            },
            Err(_) => add_slow(dtype, acc, src, w),
        },
        Dtype::F16 => add_slow(dtype, acc, src, w),
    }
}

/// Any alignment, any dtype: element by element.
fn add_slow(dtype: Dtype, acc: &mut [f32], src: &[u8], w: Option<f32>) {
    match w {
        Some(w) => dtype.accumulate_scaled(acc, src, w),
        None => dtype.accumulate(acc, src),
    }
}

#[inline(always)]
fn store_block(dtype: Dtype, out: &mut [u8], acc: &[f32]) {
    match dtype {
        Dtype::Bf16 => match bytemuck::try_cast_slice_mut::<u8, u16>(out) {
            Ok(words) => {
                for (o, &a) in words.iter_mut().zip(acc) {
                    *o = bf16_bits(a).to_le();
                }
            }
            Err(_) => dtype.store_row(out, acc),
        },
        _ => dtype.store_row(out, acc),
    }
}

#[inline(always)]
fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
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
    /// and for unaligned buffers.
    #[test]
    fn matches_the_plain_sum_bit_for_bit() {
        let n = BLOCK * 2 + 37;
        for dtype in [Dtype::Bf16, Dtype::F16, Dtype::F32] {
            let inputs: Vec<Vec<u8>> = (0..3)
                .map(|j| {
                    let vals: Vec<f32> = (0..n)
                        .map(|i| ((i * 7 + j * 13) % 101) as f32 * 0.37 - 17.0)
                        .collect();
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
