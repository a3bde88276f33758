//! Typed entry points of both MoE buffers: `f32`, `half::bf16` or `half::f16` slices in and
//! out, checked against the configured dtype, beside the byte API.

use super::element::{bytes, bytes_mut, Element};
use super::{DispatchView, LowLatencyBuffer, LowLatencyView, MoeBuffer};
use crate::error::Result;

impl<'c> MoeBuffer<'c> {
    /// [`MoeBuffer::dispatch`] of typed rows (`T` must be the configured dtype).
    ///
    /// ```no_run
    /// # fn main() -> xccl::Result<()> {
    /// use half::bf16;
    /// use xccl::moe::{Dtype, MoeBuffer, MoeConfig};
    /// let comm = xccl::Communicator::from_env()?;
    /// let mut buf = MoeBuffer::new(&comm, MoeConfig::new(8, 64, 2, 16, Dtype::Bf16))?;
    /// let x = vec![bf16::from_f32(1.0); 4 * 64];
    /// let (idx, w) = (vec![0i64, 1, 2, 3, 4, 5, 6, 7], vec![0.5f32; 8]);
    /// let view = buf.dispatch_typed(&x, &idx, &w)?;
    /// # drop(view);
    /// let mut out = vec![bf16::ZERO; 4 * 64];
    /// buf.combine_in_place_typed(&mut out)?;
    /// # Ok(()) }
    /// ```
    pub fn dispatch_typed<'a, T: Element>(
        &'a mut self,
        x: &'a [T],
        topk_idx: &[i64],
        topk_weights: &[f32],
    ) -> Result<DispatchView<'a>> {
        let x = bytes(self.config(), x)?;
        self.dispatch(x, topk_idx, topk_weights)
    }

    /// [`MoeBuffer::combine`] of typed rows.
    pub fn combine_typed<T: Element>(&mut self, reduced: &[T], out: &mut [T]) -> Result<()> {
        let cfg = self.config();
        self.combine(bytes(cfg, reduced)?, bytes_mut(cfg, out)?)
    }

    /// [`MoeBuffer::combine_in_place`] into typed rows.
    pub fn combine_in_place_typed<T: Element>(&mut self, out: &mut [T]) -> Result<()> {
        let out = bytes_mut(self.config(), out)?;
        self.combine_in_place(out)
    }
}

impl<'c> LowLatencyBuffer<'c> {
    /// [`LowLatencyBuffer::dispatch`] of typed rows (`T` must be the configured dtype).
    pub fn dispatch_typed<'a, T: Element>(
        &'a mut self,
        x: &'a [T],
        topk_idx: &[i64],
        topk_weights: &[f32],
    ) -> Result<LowLatencyView<'a>> {
        let x = bytes(self.config(), x)?;
        self.dispatch(x, topk_idx, topk_weights)
    }

    /// [`LowLatencyBuffer::combine`] of typed rows.
    pub fn combine_typed<T: Element>(&mut self, outputs: &[T], out: &mut [T]) -> Result<()> {
        let cfg = self.config();
        self.combine(bytes(cfg, outputs)?, bytes_mut(cfg, out)?)
    }

    /// [`LowLatencyBuffer::combine_in_place`] into typed rows.
    pub fn combine_in_place_typed<T: Element>(&mut self, out: &mut [T]) -> Result<()> {
        let out = bytes_mut(self.config(), out)?;
        self.combine_in_place(out)
    }
}
