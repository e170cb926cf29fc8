//! Mixed precision: the dynamic loss scaler that keeps f16 gradients inside f16's range.
//!
//! The compute dtype is the config's choice ([`ComputeDtype`](crate::config::ComputeDtype),
//! `precision.compute`); master weights and optimizer state stay in f32, and gradients are reduced
//! in f32 unless `compression.method` casts them to half on the wire.
//!
//! Pure Rust over f32 slices; the scaler's only communication is one tiny all-reduce through a
//! [`ProcessGroup`](crate::comm::ProcessGroup) so that every rank skips the same steps.

mod error;
mod scaler;

pub use error::PrecisionError;
pub use scaler::{
    DynamicLossScaler, LossScalerOptions, ParamSpan, ScaleEvent, ScaleEventKind, StepDecision, HISTORY_CAPACITY,
};
