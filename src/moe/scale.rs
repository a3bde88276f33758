//! One row scaled by a weight into another, in the row's dtype: what an identity expert (or a
//! test's reference) writes, in one pass and in AVX2 where the CPU has it.

use super::config::{bf16_bits, Dtype};

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
    if dtype == Dtype::Bf16 {
        if let (Ok(d), Ok(s)) = (
            bytemuck::try_cast_slice_mut::<u8, u16>(dst),
            bytemuck::try_cast_slice::<u8, u16>(src),
        ) {
            return scale_bf16(d, s, w);
        }
    }
    // Other dtypes and unaligned rows: a row at a time through f32, in slices of 1 KiB
    // elements (no allocation beyond the stack).
    let mut acc = [0f32; 1024];
    let n = src.len() / dtype.size();
    for start in (0..n).step_by(acc.len()) {
        let len = acc.len().min(n - start);
        let bytes = start * dtype.size()..(start + len) * dtype.size();
        let acc = &mut acc[..len];
        acc.fill(0.0);
        dtype.accumulate_scaled(acc, &src[bytes.clone()], w);
        dtype.store_row(&mut dst[bytes], acc);
    }
}

fn scale_bf16(dst: &mut [u16], src: &[u16], w: f32) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked on the line above).
        unsafe { scale_bf16_avx2(dst, src, w) };
        return;
    }
    scale_bf16_body(dst, src, w)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn scale_bf16_avx2(dst: &mut [u16], src: &[u16], w: f32) {
    scale_bf16_body(dst, src, w)
}

#[inline(always)]
fn scale_bf16_body(dst: &mut [u16], src: &[u16], w: f32) {
    for (o, &v) in dst.iter_mut().zip(src) {
        // `0.0 +` as the accumulation into zeros does: a product of -0 becomes +0.
        let x = f32::from_bits((u16::from_le(v) as u32) << 16);
        *o = bf16_bits(0.0 + w * x).to_le();
    }
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
