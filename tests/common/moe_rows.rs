//! MoE test rows: f32 values encoded in a row dtype and back, and the experts the tests use
//! (expert e multiplies its input by c_e), reduced per received row with the gate weights.

use xccl::moe::{Dtype, RecvRow};

/// Expert e multiplies its input by c_e.
pub fn c(e: usize) -> f32 {
    (e % 3 + 1) as f32
}

/// `vals` as a row of `dtype` (rounded to nearest even).
pub fn encode(dtype: Dtype, vals: &[f32]) -> Vec<u8> {
    let mut out = vec![0u8; vals.len() * dtype.size()];
    for (i, &v) in vals.iter().enumerate() {
        dtype.store(&mut out, i, v);
    }
    out
}

/// A row of `dtype` as f32 values.
pub fn decode(dtype: Dtype, bytes: &[u8]) -> Vec<f32> {
    (0..bytes.len() / dtype.size())
        .map(|i| dtype.load(bytes, i))
        .collect()
}

/// Per received row, Σ over its experts of w_e · c_e · x, element by element, in `dtype`,
/// rows in order: what a normal-mode rank hands combine.
pub fn scaled_outputs(rows: &[RecvRow<'_>], dtype: Dtype) -> Vec<u8> {
    let mut reduced = Vec::new();
    for row in rows {
        let y: Vec<f32> = decode(dtype, row.data)
            .iter()
            .map(|&v| row.experts.iter().map(|&(e, w)| w * c(e) * v).sum())
            .collect();
        reduced.extend(encode(dtype, &y));
    }
    reduced
}
