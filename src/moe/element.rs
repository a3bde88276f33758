//! Typed rows: the element types MoE rows hold (`f32`, `half::bf16`, `half::f16`), so the
//! buffers take and give typed slices beside their byte API.

use super::config::{Dtype, MoeConfig};
use crate::error::{Error, Result};

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::bf16 {}
    impl Sealed for half::f16 {}
}

/// An element type of token rows, with the [`Dtype`] it stands for.
///
/// ```
/// use xccl::moe::{Dtype, Element};
/// assert_eq!(<half::bf16 as Element>::DTYPE, Dtype::Bf16);
/// ```
pub trait Element: bytemuck::Pod + sealed::Sealed {
    /// The dtype a buffer must be configured with to take these elements.
    const DTYPE: Dtype;
}

impl Element for f32 {
    const DTYPE: Dtype = Dtype::F32;
}

impl Element for half::bf16 {
    const DTYPE: Dtype = Dtype::Bf16;
}

impl Element for half::f16 {
    const DTYPE: Dtype = Dtype::F16;
}

/// Checks `T` is the configured dtype.
fn check<T: Element>(cfg: &MoeConfig) -> Result<()> {
    if T::DTYPE == cfg.dtype {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "{:?} elements for a buffer configured for {:?} rows",
            T::DTYPE,
            cfg.dtype
        )))
    }
}

/// `x` as bytes, once `T` is checked to be the configured dtype.
pub(super) fn bytes<'x, T: Element>(cfg: &MoeConfig, x: &'x [T]) -> Result<&'x [u8]> {
    check::<T>(cfg)?;
    Ok(bytemuck::cast_slice(x))
}

/// `x` as mutable bytes, once `T` is checked to be the configured dtype.
pub(super) fn bytes_mut<'x, T: Element>(cfg: &MoeConfig, x: &'x mut [T]) -> Result<&'x mut [u8]> {
    check::<T>(cfg)?;
    Ok(bytemuck::cast_slice_mut(x))
}
