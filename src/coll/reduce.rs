//! Element types and operations of the small all-reduce.

/// Reduction of the all-reduce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    /// Element-wise sum (wrapping for integers).
    Sum,
    /// Element-wise maximum.
    Max,
}

/// An element type the all-reduce supports.
pub trait Reducible: bytemuck::Pod {
    /// Combines two elements.
    fn reduce(self, other: Self, op: ReduceOp) -> Self;
}

impl Reducible for u64 {
    fn reduce(self, other: Self, op: ReduceOp) -> Self {
        match op {
            ReduceOp::Sum => self.wrapping_add(other),
            ReduceOp::Max => self.max(other),
        }
    }
}

impl Reducible for i64 {
    fn reduce(self, other: Self, op: ReduceOp) -> Self {
        match op {
            ReduceOp::Sum => self.wrapping_add(other),
            ReduceOp::Max => self.max(other),
        }
    }
}

impl Reducible for f32 {
    fn reduce(self, other: Self, op: ReduceOp) -> Self {
        match op {
            ReduceOp::Sum => self + other,
            ReduceOp::Max => self.max(other),
        }
    }
}

impl Reducible for f64 {
    fn reduce(self, other: Self, op: ReduceOp) -> Self {
        match op {
            ReduceOp::Sum => self + other,
            ReduceOp::Max => self.max(other),
        }
    }
}
