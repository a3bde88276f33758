//! One row scaled by a weight into another, in the row's dtype: what an identity expert (or a
//! test's reference) writes, in one pass: combine's weighted sum of a single row.

use super::config::Dtype;
use super::sum::sum_rows;

/// Writes `w` × `src` into `dst` (both rows of `dtype`, the same length), each element computed
/// in f32 and rounded to nearest even: the same bits as [`Dtype::accumulate_scaled`] into a
/// zeroed f32 row followed by [`Dtype::store_row`], without the f32 row in between.
///
/// ```
/// use xccl::moe::{scale_row, Dtype};
/// let src: Vec<u8> = [1.0f32, -2.5].iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect();
/// let mut dst = vec![0u8; 4];
/// scale_row(Dtype::Bf16, &mut dst, &src, 2.0);
/// assert_eq!(Dtype::Bf16.load(&dst, 0), 2.0);
/// assert_eq!(Dtype::Bf16.load(&dst, 1), -5.0);
/// ```
///
/// # Panics
/// When the lengths differ or are not a whole number of elements.
pub fn scale_row(dtype: Dtype, dst: &mut [u8], src: &[u8], w: f32) {
    assert!(
        dst.len() == src.len() && src.len() % dtype.size() == 0,
        "scale_row: rows of {} and {} bytes ({dtype:?})",
        dst.len(),
        src.len()
    );
    // One weighted row is combine's sum of one row: the same AVX2 kernel and the same bits.
    sum_rows(dtype, dst, &[src], Some(&[w]));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(dtype: Dtype, src: &[u8], w: f32) -> Vec<u8> {
        let mut acc = vec![0f32; src.len() / dtype.size()];
        dtype.accumulate_scaled(&mut acc, src, w);
        let mut out = vec![0u8; src.len()];
        dtype.store_row(&mut out, &acc);
        out
    }

    #[test]
    fn scaled_rows_have_the_bits_of_accumulate_then_store() {
        let specials = [
            0.0f32,
            -0.0,
            1.0,
            -1.5,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            3.0e38,
            1.0e-40,
        ];
        for dtype in [Dtype::Bf16, Dtype::F16, Dtype::F32] {
            for n in [1usize, 15, 31, 64, 1061, 7168] {
                let vals: Vec<f32> = (0..n)
                    .map(|i| {
                        specials
                            .get(i)
                            .copied()
                            .unwrap_or((i as f32 * 0.37).sin() * 100.0)
                    })
                    .collect();
                // One byte of slack so the row can start unaligned too.
                let mut src = vec![0u8; n * dtype.size() + 1];
                for off in [0usize, 1] {
                    let row = &mut src[off..off + n * dtype.size()];
                    dtype.store_row(row, &vals);
                    for w in [0.0f32, -0.0, 0.5, -3.25, 1.0e30] {
                        let want = reference(dtype, row, w);
                        let mut got = vec![0u8; n * dtype.size() + 1];
                        scale_row(dtype, &mut got[off..off + n * dtype.size()], row, w);
                        assert_eq!(
                            &got[off..off + n * dtype.size()],
                            &want[..],
                            "{dtype:?} n {n} off {off} w {w}"
                        );
                    }
                }
            }
        }
    }
}
