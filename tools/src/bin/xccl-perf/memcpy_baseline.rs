//! The in-process `memcpy` baseline of `--baseline`: the same bytes copied once between two
//! page-aligned buffers of this rank, timed right after the measurement it is compared with.

use std::time::Instant;

/// Two page-aligned, pre-touched buffers of at least `max` bytes.
pub struct Memcpy {
    src: Vec<u8>,
    dst: Vec<u8>,
    max: usize,
}

const PAGE: usize = 4096;

impl Memcpy {
    pub fn new(max: usize) -> Self {
        // Touched here (filled), so first-touch faults are not timed.
        let src = vec![0x5Au8; max + PAGE];
        let dst = vec![0xA5u8; max + PAGE];
        Memcpy { src, dst, max }
    }

    /// Median time (µs) of one copy of `bytes` over `reps` copies (after one untimed).
    pub fn time_us(&mut self, bytes: usize, reps: usize) -> f64 {
        let bytes = bytes.min(self.max);
        let s_at = self.src.as_ptr().align_offset(PAGE);
        let d_at = self.dst.as_ptr().align_offset(PAGE);
        let mut times = Vec::with_capacity(reps);
        for i in 0..=reps.max(1) {
            let t = Instant::now();
            self.dst[d_at..d_at + bytes].copy_from_slice(&self.src[s_at..s_at + bytes]);
            std::hint::black_box(&self.dst);
            if i > 0 {
                times.push(t.elapsed().as_secs_f64() * 1e6);
            }
        }
        crate::report::stats(&times).p50
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_a_real_copy() {
        let mut m = Memcpy::new(1 << 20);
        let small = m.time_us(4096, 5);
        let large = m.time_us(1 << 20, 5);
        assert!(small > 0.0 && large > small, "{small} {large}");
    }
}
