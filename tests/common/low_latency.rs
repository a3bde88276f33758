//! Low-latency experts for tests, in f32: each expert's output per element, summed per
//! received token with the gate weights, as the experts of a rank hand them to combine.

use xccl::moe::LowLatencyView;

/// Per received token (row `index` of the view's output), the sum over this rank's experts
/// of weight × `expert(e, v)` element by element, as f32 bytes in index order: the
/// `outputs` of `LowLatencyBuffer::combine`. Experts are taken in id order.
pub fn weighted_sums(view: &LowLatencyView<'_>, expert: impl Fn(usize, f32) -> f32) -> Vec<u8> {
    let hidden = view.config().hidden;
    let mut sums = vec![0f32; view.len() * hidden];
    for (l, &e) in view.local_experts().iter().enumerate() {
        for r in view.expert_rows(l).expect("expert rows") {
            let acc = &mut sums[r.index * hidden..(r.index + 1) * hidden];
            for (a, v) in acc.iter_mut().zip(r.data.chunks_exact(4)) {
                *a += r.weight * expert(e, f32::from_le_bytes(v.try_into().expect("4 bytes")));
            }
        }
    }
    sums.iter().flat_map(|v| v.to_le_bytes()).collect()
}
