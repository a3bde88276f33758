//! The MoE harness's workload: seeded token rows, routing (uniform or Zipf, top-k distinct
//! experts per token) and weights; the experts (identity or copy); and the check of the
//! combined output, `out[t] ≈ g_t · x[t]` within the dtype's rounding, where the gain `g_t`
//! is the sum of the token's gate weights (identity experts) or the number of ranks it went
//! to (copy experts).

use crate::options::{MoeArgs, Routing};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use xccl::copy::{copy_streaming, store_fence};
use xccl::moe::{scale_row, Dispatched, Dtype, MoeConfig};
use xccl::Result;

/// Top-k distinct experts for each of `tokens` tokens, drawn without replacement from the
/// routing's distribution over experts (weighted sampling without replacement).
pub fn route(
    routing: Routing,
    rng: &mut StdRng,
    tokens: usize,
    k: usize,
    experts: usize,
) -> Vec<i64> {
    let weight: Vec<f64> = (0..experts)
        .map(|e| match routing {
            Routing::Uniform => 1.0,
            Routing::Zipf(s) => 1.0 / ((e + 1) as f64).powf(s),
        })
        .collect();
    let mut idx = Vec::with_capacity(tokens * k);
    for _ in 0..tokens {
        let picked = rand::seq::index::sample_weighted(rng, experts, |e| weight[e], k)
            .expect("positive weights and top-k at most the number of experts");
        idx.extend(picked.iter().map(|e| e as i64));
    }
    idx
}

/// One routing of a rank's tokens: top-k experts and their weights per token.
pub struct Draw {
    pub idx: Vec<i64>,
    pub w: Vec<f32>,
}

/// One rank's inputs: seeded rows, and several routings (the steps of a run cycle through
/// them, so a map built from the warm-up steps meets other draws of the same distribution).
pub struct Workload {
    pub cfg: MoeConfig,
    pub x: Vec<u8>,
    draws: Vec<Draw>,
    warm: usize,
}

/// Distinct routings the timed repetitions cycle through.
const TIMED_DRAWS: usize = 16;

impl Workload {
    /// Rank `me`'s inputs for `tokens` tokens of `dtype`, with one routing per warm-up step
    /// and up to `TIMED_DRAWS` for the timed ones.
    pub fn new(a: &MoeArgs, tokens: usize, dtype: Dtype, me: usize) -> Self {
        let mut cfg = MoeConfig::new(a.experts, a.hidden, a.topk, tokens.max(1), dtype);
        cfg.int8_dispatch = a.dtype == "int8";
        let (t_count, h, k) = (tokens, a.hidden, a.topk);
        let mut rng = StdRng::seed_from_u64(a.seed ^ (me as u64).wrapping_mul(0x1234_5678_9abc));
        let mut x = vec![0u8; t_count * cfg.row_bytes()];
        for i in 0..t_count * h {
            dtype.store(&mut x, i, rng.random::<f32>() * 2.0 - 1.0);
        }
        let warm = a.warmup();
        let draws = (0..warm + a.reps().clamp(1, TIMED_DRAWS))
            .map(|_| {
                let idx = route(a.routing, &mut rng, t_count, k, a.experts);
                let w = (0..t_count * k)
                    .map(|_| 0.1 + 0.9 * rng.random::<f32>())
                    .collect();
                Draw { idx, w }
            })
            .collect();
        Workload {
            cfg,
            x,
            draws,
            warm,
        }
    }

    /// The routing of repetition `rep` (warm-up ones first): each warm-up step its own, the
    /// timed ones cycling through the rest.
    pub fn draw(&self, rep: usize) -> &Draw {
        let timed = self.draws.len() - self.warm;
        match rep < self.warm {
            true => &self.draws[rep],
            false => &self.draws[self.warm + (rep - self.warm) % timed],
        }
    }

    /// What `out[t]` is `x[t]` times under `draw`: the sum of the token's weights (identity
    /// experts) or the number of ranks holding one of its experts (copy experts).
    pub fn gain(&self, draw: &Draw, t: usize, placement: &[usize], expert: Expert) -> f32 {
        let k = self.cfg.topk;
        match expert {
            Expert::Identity => draw.w[t * k..(t + 1) * k].iter().sum(),
            Expert::Copy => {
                let mut ranks: Vec<usize> = draw.idx[t * k..(t + 1) * k]
                    .iter()
                    .map(|&e| placement[e as usize])
                    .collect();
                ranks.sort_unstable();
                ranks.dedup();
                ranks.len() as f32
            }
        }
    }

    /// Rows this rank sends to other ranks in the first timed step: one per (token,
    /// destination rank), in both modes, experts placed by `placement`.
    pub fn rows_out(&self, placement: &[usize], me: usize) -> u64 {
        let k = self.cfg.topk;
        self.draw(self.warm)
            .idx
            .chunks(k)
            .map(|choice| {
                let mut ranks: Vec<usize> = choice.iter().map(|&e| placement[e as usize]).collect();
                ranks.sort_unstable();
                ranks.dedup();
                ranks.iter().filter(|&&r| r != me).count() as u64
            })
            .sum()
    }
}

/// What the experts of the harness do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expert {
    /// Each rank returns each token's row times the sum of its experts' weights there.
    Identity,
    /// Each rank reads each row it received once and writes it as its output row.
    Copy,
}

/// Runs the experts: each received token's output row written into the window (`in_window`)
/// or into `reduced`. Identity experts scale each received row once by the sum of its
/// experts' weights there (in f32); copy experts copy each received row once. Returns the
/// (token, expert) rows received (the experts' work).
pub fn run_experts(
    view: &mut Dispatched<'_>,
    expert: Expert,
    in_window: bool,
    reduced: &mut Vec<u8>,
) -> Result<usize> {
    reduced.clear();
    let rb = view.config().row_bytes();
    if !in_window {
        reduced.resize(view.len() * rb, 0);
    }
    match expert {
        Expert::Identity => identity(view, in_window, reduced),
        Expert::Copy => copy(view, in_window, reduced),
    }
}

/// The rows the experts write: the window's or `reduced`.
fn output<'v>(
    view: &'v mut Dispatched<'_>,
    in_window: bool,
    reduced: &'v mut [u8],
) -> Result<&'v mut [u8]> {
    match (in_window, view) {
        (true, Dispatched::LowLatency(v)) => v.output(),
        (true, Dispatched::Normal(v)) => v.expert_output(),
        (false, _) => Ok(reduced),
    }
}

/// Identity experts: each received token's row times the sum of its experts' weights here,
/// written straight into the output in one pass (`scale_row`).
fn identity<'a>(view: &mut Dispatched<'a>, in_window: bool, reduced: &mut [u8]) -> Result<usize> {
    let mut pairs = 0;
    let (dtype, rb) = (view.config().dtype, view.config().row_bytes());
    // Per received token: the sum of its weights here and its row (rows live as long as the
    // dispatch, not the view borrow, and never overlap the output rows).
    let tokens: Vec<(f32, &'a [u8])> = match view {
        Dispatched::LowLatency(view) => {
            // The rows grouped by expert give each weight once.
            let mut tokens: Vec<(f32, &'a [u8])> = vec![(0.0, &[]); view.len()];
            for row in view.rows_by_expert()?.into_iter().flatten() {
                tokens[row.index].0 += row.weight;
                tokens[row.index].1 = row.data;
                pairs += 1;
            }
            tokens
        }
        Dispatched::Normal(view) => (view.rows()?.into_iter())
            .map(|row| {
                pairs += row.experts.len();
                (row.experts.iter().map(|&(_, wt)| wt).sum(), row.data)
            })
            .collect(),
    };
    let out = output(view, in_window, reduced)?;
    for ((ws, data), dst) in tokens.into_iter().zip(out.chunks_exact_mut(rb)) {
        scale_row(dtype, dst, data, ws);
    }
    Ok(pairs)
}

fn copy<'a>(view: &mut Dispatched<'a>, in_window: bool, reduced: &mut [u8]) -> Result<usize> {
    let rb = view.config().row_bytes();
    let mut pairs = 0;
    // Each received token's row, once (rows live as long as the dispatch, not the view
    // borrow, and never overlap the output rows).
    let rows: Vec<(usize, &'a [u8])> = match view {
        Dispatched::LowLatency(v) => {
            let mut seen = vec![false; v.len()];
            let mut rows = Vec::with_capacity(v.len());
            for row in v.rows_by_expert()?.into_iter().flatten() {
                pairs += 1;
                if !std::mem::replace(&mut seen[row.index], true) {
                    rows.push((row.index, row.data));
                }
            }
            rows
        }
        Dispatched::Normal(v) => {
            let rows = v.rows()?;
            pairs = rows.iter().map(|r| r.experts.len()).sum();
            rows.into_iter().map(|r| r.data).enumerate().collect()
        }
    };
    let out = output(view, in_window, reduced)?;
    // Large outputs bypass this core's caches: another core (the home) reads them next.
    let streaming = rows.len() * rb >= STREAM_OUTPUT;
    for (i, src) in rows {
        let dst = &mut out[i * rb..(i + 1) * rb];
        match streaming {
            // SAFETY: `dst` and `src` are `rb` bytes each and do not overlap (an output row
            // and a received row); the fence below completes the stores before combine
            // publishes them.
            true => unsafe { copy_streaming(dst.as_mut_ptr(), src.as_ptr(), rb) },
            false => dst.copy_from_slice(src),
        }
    }
    if streaming {
        store_fence();
    }
    Ok(pairs)
}

/// Copy experts write outputs of at least this many bytes with non-temporal stores.
const STREAM_OUTPUT: usize = 1 << 20;

/// Elements of `out` off `g_t · x[t]` (`gain(t)`) by more than the dtype's rounding (twice:
/// expert row, output) and, with INT8 dispatch, up to max|x| / 254 per element and unit of
/// gain (see `xccl::moe::quant`).
pub fn count_wrong(work: &Workload, out: &[u8], gain: impl Fn(usize) -> f32) -> u64 {
    let (cfg, h) = (&work.cfg, work.cfg.hidden);
    let dtype = cfg.dtype;
    let tol = match dtype {
        Dtype::F32 => 1e-5,
        Dtype::Bf16 => 2.0f32.powi(-6),
        Dtype::F16 => 2.0f32.powi(-9),
    };
    let mut wrong = 0;
    for (t, row) in work.x.chunks(cfg.row_bytes()).enumerate() {
        let ws = gain(t);
        let int8_err = match cfg.int8_dispatch {
            true => {
                ws * (0..h)
                    .map(|i| dtype.load(row, i).abs())
                    .fold(0f32, f32::max)
                    / 254.0
            }
            false => 0.0,
        };
        for i in 0..h {
            let want = ws * dtype.load(row, i);
            let got = dtype.load(&out[t * cfg.row_bytes()..], i);
            if (got - want).abs() > tol * 4.0 * want.abs().max(1e-3) + int8_err {
                wrong += 1;
            }
        }
    }
    wrong
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(routing: Routing) -> Vec<usize> {
        let (tokens, k, experts) = (2000, 4, 16);
        let idx = route(routing, &mut StdRng::seed_from_u64(7), tokens, k, experts);
        assert_eq!(idx.len(), tokens * k);
        let mut c = vec![0; experts];
        for row in idx.chunks(k) {
            for (j, &e) in row.iter().enumerate() {
                assert!(!row[..j].contains(&e), "expert {e} twice in {row:?}");
                c[e as usize] += 1;
            }
        }
        c
    }

    /// Uniform routing spreads tokens evenly; zipf favours low ids, more so for larger S, and
    /// a huge S always picks the first k experts.
    #[test]
    fn routing_follows_its_distribution() {
        let u = counts(Routing::Uniform);
        assert!(u.iter().all(|&c| (400..600).contains(&c)), "{u:?}");
        let z1 = counts(Routing::Zipf(1.0));
        let z2 = counts(Routing::Zipf(2.0));
        assert!(z1[0] > 3 * z1[15] && z1.windows(2).filter(|w| w[0] < w[1]).count() < 6);
        assert!(z2[15] < z1[15], "{z1:?} {z2:?}");
        let z = counts(Routing::Zipf(100.0));
        assert_eq!(&z[..4], &[2000; 4]);
        assert!(z[4..].iter().all(|&c| c == 0));
    }
}
