//! The rebalancing function against exhaustive search on small cases and the lower bound on
//! large ones, over 1,000 random skewed load vectors.

use super::*;

/// SplitMix64: a small seeded generator (the cases are the same on every run).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Zipf-like loads with exponent in [0, 2], shuffled, each scaled by a random factor in
/// [0.5, 1.5), some zero.
fn skewed(rng: &mut Rng, experts: usize) -> Vec<f64> {
    let s = 2.0 * rng.unit();
    let mut load: Vec<f64> = (0..experts)
        .map(|e| 1000.0 / ((e + 1) as f64).powf(s) * (0.5 + rng.unit()))
        .collect();
    for e in (1..experts).rev() {
        load.swap(e, rng.below(e + 1));
    }
    if rng.below(4) == 0 {
        let e = rng.below(experts);
        load[e] = 0.0;
    }
    load
}

fn busiest(map: &ExpertMap, load: &[f64]) -> f64 {
    map.rank_loads(load).into_iter().fold(0.0, f64::max)
}

/// The least busiest-rank load over every map of the shape (every slot any expert or empty).
fn brute_force(load: &[f64], ranks: usize, spr: usize) -> f64 {
    let (experts, slots) = (load.len(), ranks * spr);
    let mut best = f64::INFINITY;
    let mut code = vec![0usize; slots]; // 0 = empty, e + 1 = expert e
    loop {
        let table = code.iter().map(|&c| c.checked_sub(1)).collect();
        if let Ok(map) = ExpertMap::new(experts, ranks, table, 0) {
            best = best.min(busiest(&map, load));
        }
        let mut i = 0;
        while i < slots && code[i] == experts {
            code[i] = 0;
            i += 1;
        }
        if i == slots {
            return best;
        }
        code[i] += 1;
    }
}

fn check_map(map: &ExpertMap, load: &[f64], shape: &MapShape) {
    assert_eq!(map.slots_per_rank(), shape.slots_per_rank);
    for e in 0..load.len() {
        let reps = map.replicas(e);
        assert!(!reps.is_empty(), "expert {e} without replica");
        let mut ranks: Vec<usize> = reps.iter().map(|&s| map.rank_of_slot(s as usize)).collect();
        ranks.dedup();
        assert_eq!(
            ranks.len(),
            reps.len(),
            "expert {e}: two replicas on one rank"
        );
    }
}

#[test]
fn rebalanced_loads_are_near_the_bound() {
    let mut rng = Rng(0x5EED);
    let (mut small, mut large) = (Vec::new(), Vec::new());
    for case in 0..1000 {
        let (ranks, spr, experts) = if case % 4 == 0 {
            let ranks = 1 + rng.below(3);
            let spr = 1 + rng.below(if ranks == 3 { 2 } else { 3 });
            let experts = 1 + rng.below((ranks * spr).min(4));
            (ranks, spr, experts)
        } else {
            let ranks = [2, 4, 8, 16][rng.below(4)];
            let experts = ranks * [2, 4, 8, 16][rng.below(4)];
            let spr = experts / ranks + [0, 1, 2, 4, experts / ranks][rng.below(5)];
            (ranks, spr, experts)
        };
        let load = skewed(&mut rng, experts);
        let shape = MapShape {
            ranks,
            slots_per_rank: spr,
            ranks_per_host: None,
        };
        let map = rebalance(&load, &shape, None).unwrap();
        check_map(&map, &load, &shape);
        let got = busiest(&map, &load);
        let lower = load_bound(&load, ranks, spr);
        assert!(
            got >= lower * (1.0 - 1e-9),
            "below the lower bound: {got} < {lower}"
        );
        if ranks * spr <= 6 && experts <= 4 {
            let best = brute_force(&load, ranks, spr);
            assert!(best >= lower * (1.0 - 1e-9));
            small.push(if best > 0.0 { got / best } else { 1.0 });
        } else {
            large.push(if lower > 0.0 { got / lower } else { 1.0 });
        }
    }
    let stats = |v: &[f64]| {
        let max = v.iter().cloned().fold(0.0, f64::max);
        (max, v.iter().sum::<f64>() / v.len() as f64)
    };
    let ((smax, smean), (lmax, lmean)) = (stats(&small), stats(&large));
    println!(
        "busiest rank / best: {} small cases (at most 6 slots, vs exhaustive search) max {smax:.4} mean {smean:.4}; \
         {} large cases (vs the lower bound `load_bound`) max {lmax:.4} mean {lmean:.4}",
        small.len(),
        large.len()
    );
    assert!(
        smax <= 1.10 && lmax <= 1.10,
        "small max {smax}, large max {lmax}"
    );
}

#[test]
fn a_new_map_keeps_experts_where_they_were() {
    let mut rng = Rng(7);
    let shape = MapShape {
        ranks: 8,
        slots_per_rank: 10,
        ranks_per_host: Some(2),
    };
    let load = skewed(&mut rng, 64);
    let first = rebalance(&load, &shape, None).unwrap();
    assert_eq!(first.version(), 1);
    // The same load again: nothing moves.
    let same = rebalance(&load, &shape, Some(&first)).unwrap();
    assert!(
        same.changed_slots(&first).is_empty(),
        "{:?}",
        same.changed_slots(&first)
    );
    assert_eq!(same.version(), 2);
    // A slightly different load moves few slots.
    let drift: Vec<f64> = load.iter().map(|v| v * (0.95 + 0.1 * rng.unit())).collect();
    let next = rebalance(&drift, &shape, Some(&first)).unwrap();
    let fresh = rebalance(&drift, &shape, None).unwrap();
    let moved = next.changed_slots(&first).len();
    println!(
        "slots moved: {moved} of 80 (from scratch {})",
        fresh.changed_slots(&first).len()
    );
    assert!(moved <= fresh.changed_slots(&first).len());
    assert!(busiest(&next, &drift) <= 1.10 * load_bound(&drift, 8, 10));
}

#[test]
fn replicas_spread_over_hosts_first() {
    // One very hot expert, 2 hosts of 2 ranks: its 2 replicas land on different hosts.
    let mut load = vec![1.0; 8];
    load[3] = 10.0;
    let shape = MapShape {
        ranks: 4,
        slots_per_rank: 3,
        ranks_per_host: Some(2),
    };
    let map = rebalance(&load, &shape, None).unwrap();
    let hosts: Vec<usize> = map
        .replicas(3)
        .iter()
        .map(|&s| map.rank_of_slot(s as usize) / 2)
        .collect();
    assert!(hosts.len() >= 2);
    assert!(hosts.contains(&0) && hosts.contains(&1), "{hosts:?}");
}

#[test]
fn bad_input_is_refused() {
    let shape = MapShape {
        ranks: 2,
        slots_per_rank: 2,
        ranks_per_host: None,
    };
    assert!(rebalance(&[1.0, 2.0, 3.0, 4.0, 5.0], &shape, None).is_err()); // too few slots
    assert!(rebalance(&[1.0, f64::NAN], &shape, None).is_err());
    assert!(rebalance(&[1.0, -1.0], &shape, None).is_err());
    let hosts = MapShape {
        ranks_per_host: Some(3),
        ..shape
    };
    assert!(rebalance(&[1.0, 1.0], &hosts, None).is_err());
    assert!(rebalance(&[], &shape, None).is_err());
}
