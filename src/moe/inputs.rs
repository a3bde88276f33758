//! The checks both MoE modes make on a dispatch's arguments before anything is sent, and the
//! INT8 scales they compute first.

use super::config::MoeConfig;
use super::layout::Layout;
use super::quant;
use crate::error::{Error, Result};

/// Checks a dispatch of `x` with `topk_idx` and `topk_weights` against `cfg` and the expert
/// `placement` over `world` ranks, fills `layout` and returns the token count; with INT8 dispatch
/// it also fills `scales` (a non-finite row is refused here, before anything is sent).
pub(super) fn check_dispatch(
    cfg: &MoeConfig,
    (placement, world): (&[usize], usize),
    (x, topk_idx, topk_weights): (&[u8], &[i64], &[f32]),
    scales: &mut Vec<f32>,
    layout: &mut Layout,
) -> Result<usize> {
    let k = cfg.topk;
    layout.fill(topk_idx, k, placement, world)?; // ids, duplicates
    let tokens = topk_idx.len() / k;
    if tokens > cfg.max_tokens {
        return Err(Error::InvalidArgument(format!(
            "{tokens} tokens exceed the configured maximum of {}",
            cfg.max_tokens
        )));
    }
    if x.len() != tokens * cfg.row_bytes() {
        return Err(Error::InvalidArgument(format!(
            "x has {} bytes; {tokens} tokens x hidden {} x {:?} need {}",
            x.len(),
            cfg.hidden,
            cfg.dtype,
            tokens * cfg.row_bytes()
        )));
    }
    if topk_weights.len() != topk_idx.len() {
        return Err(Error::InvalidArgument(format!(
            "{} weights for {} expert choices",
            topk_weights.len(),
            topk_idx.len()
        )));
    }
    if let Some(i) = (0..topk_idx.len()).find(|&i| topk_idx[i] >= 0 && !topk_weights[i].is_finite())
    {
        return Err(Error::InvalidArgument(format!(
            "token {} has weight {} for expert {}",
            i / k,
            topk_weights[i],
            topk_idx[i]
        )));
    }
    if cfg.int8_dispatch {
        quant::row_scales(cfg.dtype, x, cfg.hidden, scales)?;
    }
    Ok(tokens)
}
