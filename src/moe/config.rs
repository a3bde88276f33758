//! MoE configuration: experts, hidden size, element type, top-k, capacity, expert placement.

use crate::error::{Error, Result};

/// Element type of token rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    /// 32-bit float.
    F32,
    /// bfloat16 (`half::bf16`).
    Bf16,
    /// IEEE half (`half::f16`).
    F16,
}

impl Dtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::Bf16 | Dtype::F16 => 2,
        }
    }

    /// Reads element `i` of `row` as f32.
    pub fn load(self, row: &[u8], i: usize) -> f32 {
        match self {
            Dtype::F32 => f32::from_le_bytes(row[4 * i..4 * i + 4].try_into().expect("4 bytes")),
            Dtype::Bf16 => half::bf16::from_le_bytes([row[2 * i], row[2 * i + 1]]).to_f32(),
            Dtype::F16 => half::f16::from_le_bytes([row[2 * i], row[2 * i + 1]]).to_f32(),
        }
    }

    /// Writes `v` as element `i` of `row` (rounding to nearest even).
    pub fn store(self, row: &mut [u8], i: usize, v: f32) {
        match self {
            Dtype::F32 => row[4 * i..4 * i + 4].copy_from_slice(&v.to_le_bytes()),
            Dtype::Bf16 => {
                row[2 * i..2 * i + 2].copy_from_slice(&half::bf16::from_f32(v).to_le_bytes())
            }
            Dtype::F16 => {
                row[2 * i..2 * i + 2].copy_from_slice(&half::f16::from_f32(v).to_le_bytes())
            }
        }
    }
}

/// What a MoE layer looks like to the communication: set once, sizes every buffer.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    /// Number of (logical) experts.
    pub experts: usize,
    /// Hidden size (elements per token row).
    pub hidden: usize,
    /// Experts chosen per token.
    pub topk: usize,
    /// Most tokens any rank dispatches in one call.
    pub max_tokens: usize,
    /// Element type of the rows.
    pub dtype: Dtype,
    /// Rank holding each expert; `None` = contiguous blocks (expert e on rank e / (E / R)).
    pub placement: Option<Vec<usize>>,
}

impl MoeConfig {
    /// A configuration with contiguous placement.
    pub fn new(
        experts: usize,
        hidden: usize,
        topk: usize,
        max_tokens: usize,
        dtype: Dtype,
    ) -> Self {
        MoeConfig {
            experts,
            hidden,
            topk,
            max_tokens,
            dtype,
            placement: None,
        }
    }

    /// The rank of every expert for a world of `ranks`, checked.
    pub fn placement_for(&self, ranks: usize) -> Result<Vec<usize>> {
        if self.experts == 0 || self.hidden == 0 || self.topk == 0 || self.topk > self.experts {
            return Err(Error::InvalidArgument(format!(
                "MoE config: experts {}, hidden {}, top-k {} (need 1 <= top-k <= experts, hidden >= 1)",
                self.experts, self.hidden, self.topk
            )));
        }
        match &self.placement {
            Some(p) => {
                if p.len() != self.experts {
                    return Err(Error::InvalidArgument(format!(
                        "placement names {} ranks for {} experts",
                        p.len(),
                        self.experts
                    )));
                }
                if let Some((e, &r)) = p.iter().enumerate().find(|(_, &r)| r >= ranks) {
                    return Err(Error::InvalidArgument(format!(
                        "expert {e} placed on rank {r} of {ranks}"
                    )));
                }
                Ok(p.clone())
            }
            None => {
                if self.experts % ranks != 0 {
                    return Err(Error::InvalidArgument(format!(
                        "{} experts do not divide over {ranks} ranks; give a placement",
                        self.experts
                    )));
                }
                let per = self.experts / ranks;
                Ok((0..self.experts).map(|e| e / per).collect())
            }
        }
    }

    /// Bytes of one token row.
    pub fn row_bytes(&self) -> usize {
        self.hidden * self.dtype.size()
    }
}
