//! The MoE type a user holds for either mode ([`Dispatcher`]) and the typed entry points:
//! the same expert code runs in both modes over loopback, shared memory and a job whose path
//! kinds differ by peer, and the combined output is exact; a slice of the wrong element type
//! is refused before anything is sent.

mod common;

use common::{run_comms, Fabric};
use half::{bf16, f16};
use xccl::moe::{Dispatcher, Dtype, Element, Mode, MoeConfig};
use xccl::{Communicator, Error};

const HIDDEN: usize = 16;
const EXPERTS: usize = 6;
const TOPK: usize = 2;

/// Rank `r`'s tokens: small integers (exact in bf16), two distinct experts or -1 each, and
/// weights 1 or 2, so every sum below is exact.
fn inputs(r: usize) -> (Vec<f32>, Vec<i64>, Vec<f32>) {
    let tokens = 5 + r;
    let x = (0..tokens * HIDDEN)
        .map(|i| ((i * 7 + r * 3) % 9) as f32 - 4.0)
        .collect();
    let idx = (0..tokens)
        .flat_map(|t| {
            let a = (t + r) % EXPERTS;
            let b = if t % 3 == 2 {
                -1
            } else {
                ((a + 1 + t % 4) % EXPERTS) as i64
            };
            [a as i64, b]
        })
        .collect();
    let w = (0..tokens * TOPK).map(|i| (1 + i % 2) as f32).collect();
    (x, idx, w)
}

/// Expert `e` multiplies its rows by `e + 1`.
fn scale_rows<T: Element>(
    e: usize,
    rows: &[&[u8]],
    out: &mut [u8],
    to: fn(f32) -> T,
    from: fn(T) -> f32,
) {
    let rb = HIDDEN * std::mem::size_of::<T>();
    for (row, dst) in rows.iter().zip(out.chunks_mut(rb)) {
        let row: &[T] = bytemuck::cast_slice(row);
        let dst: &mut [T] = bytemuck::cast_slice_mut(dst);
        for (d, &v) in dst.iter_mut().zip(row) {
            *d = to(from(v) * (e + 1) as f32);
        }
    }
}

fn run<T: Element>(
    comm: &Communicator,
    mode: Mode,
    dtype: Dtype,
    to: fn(f32) -> T,
    from: fn(T) -> f32,
) {
    let cfg = MoeConfig::new(EXPERTS, HIDDEN, TOPK, 16, dtype);
    let mut moe = Dispatcher::new(comm, cfg, mode).unwrap();
    assert_eq!(moe.mode(), mode);
    let (x, idx, w) = inputs(comm.rank());
    let xt: Vec<T> = x.iter().map(|&v| to(v)).collect();
    for _call in 0..3 {
        let mut view = moe.dispatch_typed(&xt, &idx, &w).unwrap();
        view.run_experts(|e, rows, out| {
            scale_rows(e, rows, out, to, from);
            Ok(())
        })
        .unwrap();
        let mut out = vec![to(0.0); xt.len()];
        moe.combine_in_place_typed(&mut out).unwrap();
        for (t, got) in out.chunks(HIDDEN).enumerate() {
            for (h, &g) in got.iter().enumerate() {
                let want: f32 = (0..TOPK)
                    .filter(|&j| idx[t * TOPK + j] >= 0)
                    .map(|j| w[t * TOPK + j] * (idx[t * TOPK + j] + 1) as f32 * x[t * HIDDEN + h])
                    .sum();
                assert_eq!(from(g), want, "{mode:?} {dtype:?} token {t} element {h}");
            }
        }
    }
    moe.close().unwrap();
}

fn both_modes(fabric: Fabric) {
    run_comms(fabric, 3, |comm| {
        for mode in [Mode::Normal, Mode::LowLatency] {
            run::<f32>(comm, mode, Dtype::F32, |v| v, |v| v);
            run::<bf16>(comm, mode, Dtype::Bf16, bf16::from_f32, bf16::to_f32);
        }
    });
}

#[test]
fn one_type_runs_both_modes_on_loopback() {
    both_modes(Fabric::Loopback);
}

#[test]
fn one_type_runs_both_modes_on_shm() {
    both_modes(Fabric::Shm);
}

#[test]
fn one_type_runs_both_modes_when_paths_differ() {
    both_modes(Fabric::Mixed);
}

#[test]
fn wrong_element_type_is_refused_before_anything_is_sent() {
    run_comms(Fabric::Loopback, 2, |comm| {
        for mode in [Mode::Normal, Mode::LowLatency] {
            let cfg = MoeConfig::new(EXPERTS, HIDDEN, TOPK, 16, Dtype::Bf16);
            let mut moe = Dispatcher::new(comm, cfg, mode).unwrap();
            let (x, idx, w) = inputs(comm.rank());
            let wrong: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
            match moe.dispatch_typed(&wrong, &idx, &w) {
                Err(Error::InvalidArgument(m)) => assert!(m.contains("F16"), "{m}"),
                Err(e) => panic!("{mode:?}: {e}"),
                Ok(_) => panic!("{mode:?}: f16 rows accepted by a bf16 buffer"),
            }
            // Nothing was sent: a right call still works on every rank.
            let right: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
            let mut view = moe.dispatch_typed(&right, &idx, &w).unwrap();
            view.run_experts(|_, rows, out| {
                for (r, o) in rows.iter().zip(out.chunks_mut(HIDDEN * 2)) {
                    o.copy_from_slice(r);
                }
                Ok(())
            })
            .unwrap();
            let mut out = vec![0f32; right.len()];
            assert!(matches!(
                moe.combine_in_place_typed(&mut out),
                Err(Error::InvalidArgument(_))
            ));
            let mut out = vec![bf16::ZERO; right.len()];
            moe.combine_in_place_typed(&mut out).unwrap();
            moe.close().unwrap();
        }
    });
}
