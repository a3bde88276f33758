//! INT8 quantization of token rows for dispatch: one f32 scale per row, symmetric.
//!
//! A row `x` (bf16 or f16) travels as `q = round(x / s)` with `s = max|x| / 127` (`s = 1` for
//! an all-zero row) and is rebuilt as `s · q` in the row's own dtype on arrival. Error bound
//! per element: `|x − ŝq| ≤ s / 2 = max|x| / 254` from the quantization, plus the rounding of
//! the result to the dtype (relative 2^-8 for bf16, 2^-11 for f16). Half the bytes of a bf16
//! row cross the wire.

use super::config::Dtype;
use crate::error::{Error, Result};

/// The scale of `row` (`hidden` elements of `dtype`); `None` if a value is not finite.
pub fn row_scale(dtype: Dtype, row: &[u8], hidden: usize) -> Option<f32> {
    let max = match (
        dtype,
        bytemuck::try_cast_slice::<u8, u16>(&row[..2 * hidden]),
    ) {
        // bf16: the largest magnitude is the largest value of the 15 low bits (non-finite
        // values have all exponent bits set, so they compare above every finite one).
        (Dtype::Bf16, Ok(words)) => {
            let bits = max_magnitude_bits(words);
            if bits >= 0x7F80 {
                return None;
            }
            f32::from_bits((bits as u32) << 16)
        }
        _ => {
            let mut max = 0f32;
            for i in 0..hidden {
                let v = dtype.load(row, i);
                if !v.is_finite() {
                    return None;
                }
                max = max.max(v.abs());
            }
            max
        }
    };
    Some(if max > 0.0 { max / 127.0 } else { 1.0 })
}

/// Rounds to the nearest integer (ties to even) within ±127, as the i8's byte: adding
/// 1.5 · 2^23 leaves the rounded integer in the low mantissa bits (two's complement in the
/// low byte for |c| ≤ 127), with plain float arithmetic that vectorizes.
#[inline(always)]
fn to_i8(v: f32) -> u8 {
    const MAGIC: f32 = 12_582_912.0;
    let c = v.clamp(-127.0, 127.0);
    (c + MAGIC).to_bits() as u8
}

/// The scale of every row of `x` (rows of `hidden` elements of `dtype`) into `scales`;
/// `InvalidArgument` naming the first row with a value that is not finite.
pub fn row_scales(dtype: Dtype, x: &[u8], hidden: usize, scales: &mut Vec<f32>) -> Result<()> {
    scales.clear();
    for (tok, row) in x.chunks_exact(hidden * dtype.size()).enumerate() {
        let s = row_scale(dtype, row, hidden).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "token {tok} has a value that is not finite (INT8 dispatch)"
            ))
        })?;
        scales.push(s);
    }
    Ok(())
}

/// The scale a peer sent with its row `row` (little-endian f32 bytes), checked: a scale that
/// is not finite and positive cannot have come from [`row_scale`].
pub fn landed_scale(bytes: &[u8], src: usize, row: usize) -> Result<f32> {
    let scale = f32::from_le_bytes(bytes.try_into().map_err(|_| {
        Error::ProtocolViolation(format!("row {row} from rank {src}: no INT8 scale"))
    })?);
    if !(scale.is_finite() && scale > 0.0) {
        return Err(Error::ProtocolViolation(format!(
            "row {row} from rank {src} has INT8 scale {scale}"
        )));
    }
    Ok(scale)
}

/// Quantizes `row` with `scale` into `out` (`hidden` bytes of i8).
pub fn quantize(dtype: Dtype, row: &[u8], hidden: usize, scale: f32, out: &mut [u8]) {
    let inv = 1.0 / scale;
    match (
        dtype,
        bytemuck::try_cast_slice::<u8, u16>(&row[..2 * hidden]),
    ) {
        (Dtype::Bf16, Ok(words)) => quantize_bf16(words, inv, &mut out[..hidden]),
        _ => {
            for (i, o) in out.iter_mut().enumerate().take(hidden) {
                *o = to_i8(dtype.load(row, i) * inv);
            }
        }
    }
}

/// Rebuilds a row: `q` (`hidden` quantized bytes) times `scale`, written to `out` in `dtype`.
pub fn dequantize(dtype: Dtype, q: &[u8], scale: f32, out: &mut [u8]) {
    match (dtype, bytemuck::try_cast_slice_mut::<u8, u16>(out)) {
        (Dtype::Bf16, Ok(words)) => dequantize_bf16(q, scale, words),
        _ => {
            for (i, &b) in q.iter().enumerate() {
                dtype.store(out, i, b as i8 as f32 * scale);
            }
        }
    }
}

// The bf16 loops below are written so the compiler vectorizes them; where the CPU has AVX2
// they are compiled a second time with it enabled (the same arithmetic, so the same bits).

#[inline(always)]
fn max_magnitude_bits_body(words: &[u16]) -> u16 {
    words
        .iter()
        .fold(0u16, |m, &w| m.max(u16::from_le(w) & 0x7FFF))
}

#[inline(always)]
fn quantize_bf16_body(words: &[u16], inv: f32, out: &mut [u8]) {
    for (o, &w) in out.iter_mut().zip(words) {
        *o = to_i8(f32::from_bits((u16::from_le(w) as u32) << 16) * inv);
    }
}

#[inline(always)]
fn dequantize_bf16_body(q: &[u8], scale: f32, out: &mut [u16]) {
    for (o, &b) in out.iter_mut().zip(q) {
        *o = super::config::bf16_bits(b as i8 as f32 * scale).to_le();
    }
}

fn max_magnitude_bits(words: &[u16]) -> u16 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked on the line above).
        return unsafe { max_magnitude_bits_avx2(words) };
    }
    max_magnitude_bits_body(words)
}

fn quantize_bf16(words: &[u16], inv: f32, out: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked on the line above).
        unsafe { quantize_bf16_avx2(words, inv, out) };
        return;
    }
    quantize_bf16_body(words, inv, out)
}

fn dequantize_bf16(q: &[u8], scale: f32, out: &mut [u16]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked on the line above).
        unsafe { dequantize_bf16_avx2(q, scale, out) };
        return;
    }
    dequantize_bf16_body(q, scale, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn max_magnitude_bits_avx2(words: &[u16]) -> u16 {
    max_magnitude_bits_body(words)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_bf16_avx2(words: &[u16], inv: f32, out: &mut [u8]) {
    quantize_bf16_body(words, inv, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dequantize_bf16_avx2(q: &[u8], scale: f32, out: &mut [u16]) {
    dequantize_bf16_body(q, scale, out)
}

/// Rebuilds, in place, a row whose first `hidden` bytes hold the quantized values, using
/// `scratch` (at least `hidden` bytes) for the quantized copy.
pub fn dequantize_in_place(
    dtype: Dtype,
    row: &mut [u8],
    hidden: usize,
    scale: f32,
    scratch: &mut [u8],
) {
    scratch[..hidden].copy_from_slice(&row[..hidden]);
    dequantize(
        dtype,
        &scratch[..hidden],
        scale,
        &mut row[..hidden * dtype.size()],
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_stays_within_the_documented_bound() {
        for dtype in [Dtype::Bf16, Dtype::F16] {
            let hidden = 257;
            let vals: Vec<f32> = (0..hidden)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.173)
                .collect();
            let mut row = vec![0u8; hidden * dtype.size()];
            dtype.store_row(&mut row, &vals);
            let orig: Vec<f32> = (0..hidden).map(|i| dtype.load(&row, i)).collect();
            let s = row_scale(dtype, &row, hidden).unwrap();
            let mut q = vec![0u8; hidden];
            quantize(dtype, &row, hidden, s, &mut q);
            let mut back = vec![0u8; hidden * dtype.size()];
            back[..hidden].copy_from_slice(&q);
            let mut scratch = vec![0u8; hidden];
            dequantize_in_place(dtype, &mut back, hidden, s, &mut scratch);
            let rel = if dtype == Dtype::Bf16 {
                2f32.powi(-8)
            } else {
                2f32.powi(-11)
            };
            let max = orig.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (i, &o) in orig.iter().enumerate() {
                let r = dtype.load(&back, i);
                assert!(
                    (r - o).abs() <= max / 254.0 + r.abs() * rel + 1e-6,
                    "{dtype:?} {i}: {r} vs {o}"
                );
            }
        }
        // Rounding: to nearest, ties to even, clamped to ±127.
        for (v, q) in [
            (0.49f32, 0i8),
            (0.5, 0),
            (1.5, 2),
            (-2.5, -2),
            (-0.51, -1),
            (126.6, 127),
            (300.0, 127),
            (-300.0, -127),
        ] {
            assert_eq!(to_i8(v) as i8, q, "{v}");
        }
        let mut nan = vec![0u8; 4];
        Dtype::Bf16.store_row(&mut nan, &[1.0, f32::NAN]);
        assert!(row_scale(Dtype::Bf16, &nan, 2).is_none());
        assert_eq!(row_scale(Dtype::Bf16, &[0u8; 4], 2), Some(1.0));
    }
}
