//! MoE configuration: experts, hidden size, element type, top-k, capacity, expert placement.

use super::eplb::{ExpertMap, ReplicaPolicy};
use crate::error::{Error, Result};

/// f32 → bf16 bits, rounding to nearest even; NaN stays NaN. Branch-free, so loops over
/// rows vectorize (the same result as `half::bf16::from_f32`).
#[inline]
pub(crate) fn bf16_bits(v: f32) -> u16 {
    let u = v.to_bits();
    let rounded = (u.wrapping_add(0x7FFF + ((u >> 16) & 1)) >> 16) as u16;
    let nan = ((u >> 16) as u16) | 0x40;
    let mask = 0u16.wrapping_sub(((u & 0x7FFF_FFFF) > 0x7F80_0000) as u16);
    (rounded & !mask) | (nan & mask)
}

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

    /// Adds the elements of `row` (this dtype) to `acc`, element by element, in f32.
    #[inline]
    pub fn accumulate(self, acc: &mut [f32], row: &[u8]) {
        match self {
            Dtype::F32 => {
                for (a, b) in acc.iter_mut().zip(row.chunks_exact(4)) {
                    *a += f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            Dtype::Bf16 => match bytemuck::try_cast_slice::<u8, u16>(row) {
                // Aligned rows (window rows always are): a loop the compiler vectorizes.
                Ok(words) => {
                    for (a, &w) in acc.iter_mut().zip(words) {
                        *a += f32::from_bits((u16::from_le(w) as u32) << 16);
                    }
                }
                Err(_) => {
                    for (a, b) in acc.iter_mut().zip(row.chunks_exact(2)) {
                        *a += f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
                    }
                }
            },
            Dtype::F16 => {
                for (a, b) in acc.iter_mut().zip(row.chunks_exact(2)) {
                    *a += half::f16::from_le_bytes([b[0], b[1]]).to_f32();
                }
            }
        }
    }

    /// Adds `w` times the elements of `row` (this dtype) to `acc`, in f32.
    #[inline]
    pub fn accumulate_scaled(self, acc: &mut [f32], row: &[u8], w: f32) {
        match self {
            Dtype::F32 => {
                for (a, b) in acc.iter_mut().zip(row.chunks_exact(4)) {
                    *a += w * f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            Dtype::Bf16 => match bytemuck::try_cast_slice::<u8, u16>(row) {
                // Aligned rows (window rows always are): a loop the compiler vectorizes.
                Ok(words) => {
                    for (a, &v) in acc.iter_mut().zip(words) {
                        *a += w * f32::from_bits((u16::from_le(v) as u32) << 16);
                    }
                }
                Err(_) => {
                    for (a, b) in acc.iter_mut().zip(row.chunks_exact(2)) {
                        *a += w * f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
                    }
                }
            },
            Dtype::F16 => {
                for (a, b) in acc.iter_mut().zip(row.chunks_exact(2)) {
                    *a += w * half::f16::from_le_bytes([b[0], b[1]]).to_f32();
                }
            }
        }
    }

    /// Writes `vals` into `row` in this dtype (rounding to nearest even).
    #[inline]
    pub fn store_row(self, row: &mut [u8], vals: &[f32]) {
        match self {
            Dtype::F32 => {
                for (b, v) in row.chunks_exact_mut(4).zip(vals) {
                    b.copy_from_slice(&v.to_le_bytes());
                }
            }
            Dtype::Bf16 => match bytemuck::try_cast_slice_mut::<u8, u16>(row) {
                // Aligned rows: a loop the compiler vectorizes.
                Ok(words) => {
                    for (o, v) in words.iter_mut().zip(vals) {
                        *o = bf16_bits(*v).to_le();
                    }
                }
                Err(_) => {
                    for (b, v) in row.chunks_exact_mut(2).zip(vals) {
                        b.copy_from_slice(&bf16_bits(*v).to_le_bytes());
                    }
                }
            },
            Dtype::F16 => {
                for (b, v) in row.chunks_exact_mut(2).zip(vals) {
                    b.copy_from_slice(&half::f16::from_f32(*v).to_le_bytes());
                }
            }
        }
    }

    /// Reads element `i` of `row` as f32.
    #[inline]
    pub fn load(self, row: &[u8], i: usize) -> f32 {
        match self {
            Dtype::F32 => f32::from_le_bytes(row[4 * i..4 * i + 4].try_into().expect("4 bytes")),
            Dtype::Bf16 => half::bf16::from_le_bytes([row[2 * i], row[2 * i + 1]]).to_f32(),
            Dtype::F16 => half::f16::from_le_bytes([row[2 * i], row[2 * i + 1]]).to_f32(),
        }
    }

    /// Writes `v` as element `i` of `row` (rounding to nearest even).
    #[inline]
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

/// Most experts a configuration may name (a million: far past any model, and small enough
/// that per-expert tables are cheap).
pub const MAX_EXPERTS: usize = 1 << 20;

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
    /// Ignored when `map` is given.
    pub placement: Option<Vec<usize>>,
    /// Expert slots with replicas ([`ExpertMap`], EPLB): dispatch still takes logical expert
    /// ids and sends each (token, expert) to one replica, chosen by `replica_policy`.
    /// `None` = the map of `placement` (one replica per expert).
    pub map: Option<ExpertMap>,
    /// How dispatch picks a replica when an expert has several.
    pub replica_policy: ReplicaPolicy,
    /// Consecutive ranks per host, when the caller knows it ([`ReplicaPolicy::LocalFirst`]
    /// needs it).
    pub ranks_per_host: Option<usize>,
    /// Dispatch bf16/f16 rows as INT8 with a per-row scale, rebuilt on arrival (half the
    /// bytes; error bound in [`crate::moe::quant`]).
    pub int8_dispatch: bool,
    /// Normal mode: the window also holds `max_tokens` input rows of this rank
    /// ([`crate::moe::MoeBuffer::input`]); [`crate::moe::MoeBuffer::dispatch_in_place`] then
    /// sends mapped ranks only the metadata and their experts read each row where its source
    /// wrote it (over a network the rows still travel). Not with INT8 dispatch.
    pub zero_copy_dispatch: bool,
    /// Normal mode across hosts: whether a token crosses the network once per remote host
    /// (to a gateway rank there, which forwards it over shared memory) or once per remote
    /// rank ([`TwoLevel`]).
    pub two_level: TwoLevel,
}

/// How normal-mode dispatch and combine reach ranks on other hosts.
///
/// Two-level: a token goes over the network at most once per remote host, to the rank there
/// with this rank's index among its host's ranks (the gateway), which forwards it to the
/// ranks holding its experts through shared memory; combine sums each host's rows on that
/// host first, so one row per (token, host) crosses back. The receiving experts see the same
/// rows either way, and combine's result is the same bits (the sum's order is per host
/// first, in [`crate::moe::MoeBuffer::combine`]).
///
/// ```no_run
/// # fn main() -> xccl::Result<()> {
/// use xccl::moe::{Dtype, MoeBuffer, MoeConfig, TwoLevel};
/// let comm = xccl::Communicator::from_env()?;
/// let mut cfg = MoeConfig::new(64, 7168, 8, 4096, Dtype::Bf16);
/// cfg.two_level = TwoLevel::Off; // one network row per (token, remote rank)
/// let buf = MoeBuffer::new(&comm, cfg)?;
/// # drop(buf);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TwoLevel {
    /// Two-level when every rank sees the same hosts, more than one of them and one with
    /// several ranks, with every peer on its own host mapped (the hybrid backend); flat
    /// otherwise.
    #[default]
    Auto,
    /// Flat: each rank sends to and hears from every rank itself.
    Off,
    /// Two-level across more than one host (one host: nothing crosses, flat), refused
    /// (`InvalidArgument`) where it cannot run: a peer on the same host that is not mapped,
    /// ranks that see the hosts differently, or more than 64 ranks on one host.
    On,
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
            map: None,
            replica_policy: ReplicaPolicy::Rotate,
            ranks_per_host: None,
            int8_dispatch: false,
            zero_copy_dispatch: false,
            two_level: TwoLevel::Auto,
        }
    }

    /// The rank of every expert for a world of `ranks`, checked (with the sizes: at most
    /// `MAX_EXPERTS` experts, rows that fit the address space).
    pub fn placement_for(&self, ranks: usize) -> Result<Vec<usize>> {
        self.check_sizes()?;
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

    /// The sizes: 1 <= top-k <= experts <= `MAX_EXPERTS`, rows that fit the address space.
    fn check_sizes(&self) -> Result<()> {
        if self.experts == 0 || self.hidden == 0 || self.topk == 0 || self.topk > self.experts {
            return Err(Error::InvalidArgument(format!(
                "MoE config: experts {}, hidden {}, top-k {} (need 1 <= top-k <= experts, hidden >= 1)",
                self.experts, self.hidden, self.topk
            )));
        }
        if self.experts > MAX_EXPERTS {
            return Err(Error::InvalidArgument(format!(
                "MoE config: {} experts (at most {MAX_EXPERTS})",
                self.experts
            )));
        }
        if self
            .hidden
            .checked_mul(Dtype::F32.size())
            .is_none_or(|b| b > isize::MAX as usize / 2)
        {
            return Err(Error::InvalidArgument(format!(
                "MoE config: hidden size {} is larger than the address space",
                self.hidden
            )));
        }
        Ok(())
    }

    /// The expert map for a world of `ranks`: `map` checked against the configuration, or
    /// the map of [`MoeConfig::placement_for`]; with the replica policy's needs checked.
    pub fn map_for(&self, ranks: usize) -> Result<ExpertMap> {
        if let Some(h) = self.ranks_per_host {
            if h == 0 || ranks % h != 0 {
                return Err(Error::InvalidArgument(format!(
                    "{h} ranks per host for {ranks} ranks"
                )));
            }
        }
        if self.replica_policy == ReplicaPolicy::LocalFirst && self.ranks_per_host.is_none() {
            return Err(Error::InvalidArgument(
                "the local-first replica policy needs the hosts (MoeConfig::ranks_per_host)".into(),
            ));
        }
        match &self.map {
            Some(map) => {
                self.check_sizes()?;
                if map.experts() != self.experts || map.ranks() != ranks {
                    return Err(Error::InvalidArgument(format!(
                        "expert map of {} experts on {} ranks for {} experts on {ranks} ranks",
                        map.experts(),
                        map.ranks(),
                        self.experts
                    )));
                }
                Ok(map.clone())
            }
            None => ExpertMap::from_placement(&self.placement_for(ranks)?, ranks),
        }
    }

    /// Refuses what INT8 dispatch cannot do (it quantizes bf16 or f16 rows, not f32, and
    /// rows read in place by their experts are not sent, so not quantized either).
    pub(crate) fn check_int8(&self) -> Result<()> {
        if self.int8_dispatch && self.dtype == Dtype::F32 {
            return Err(Error::InvalidArgument(
                "INT8 dispatch quantizes bf16 or f16 rows, not f32".into(),
            ));
        }
        if self.int8_dispatch && self.zero_copy_dispatch {
            return Err(Error::InvalidArgument(
                "zero-copy dispatch leaves rows where they are written; INT8 dispatch \
                 quantizes rows as they are sent: choose one"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Bytes of one token row.
    pub fn row_bytes(&self) -> usize {
        self.hidden * self.dtype.size()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounding_matches_half() {
        for v in [
            0.0f32,
            -0.0,
            1.0,
            1.0078125,
            1.0039063,
            3.140625,
            -2.5e-39,
            65504.0,
            3.4e38,
            f32::INFINITY,
            f32::NEG_INFINITY,
            1e-45,
        ] {
            assert_eq!(bf16_bits(v), half::bf16::from_f32(v).to_bits(), "{v}");
        }
        assert!(half::bf16::from_bits(bf16_bits(f32::NAN)).is_nan());
        let mut row = vec![0u8; 6];
        Dtype::Bf16.store_row(&mut row, &[1.5, -2.0, 0.1]);
        let mut acc = vec![1.0f32; 3];
        Dtype::Bf16.accumulate(&mut acc, &row);
        assert_eq!(
            acc,
            vec![2.5, -1.0, 1.0 + half::bf16::from_f32(0.1).to_f32()]
        );
    }
}
