//! Mixed precision: the precision policy (compute, master and reduce dtypes) and the dynamic loss
//! scaler that keeps f16 gradients inside f16's range.
//!
//! Pure Rust over f32 slices; the scaler's only communication is one tiny all-reduce through a
//! [`ProcessGroup`](crate::comm::ProcessGroup) so that every rank skips the same steps.

mod error;
mod policy;
mod scaler;

pub use error::PrecisionError;
pub use policy::{FloatDtype, PrecisionPolicy};
pub use scaler::{
    DynamicLossScaler, LossScalerOptions, ParamSpan, ScaleEvent, ScaleEventKind, StepDecision, HISTORY_CAPACITY,
};
