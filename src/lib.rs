//! burnrun: distributed training for burn.
//!
//! The crate is layered (see `DESIGN.md` in the project's shared notes):
//! `launcher` spawns ranks and hosts the `rendezvous` store; `transport` moves tagged bytes between
//! two ranks; `comm` builds the collectives on top of it and is the only communication API the
//! upper layers see; `train`, `parallel`, `models` and `data` (feature `train`) run burn models on
//! top of `comm`; `compress` (gradient codecs) and `precision` (policy, loss scaler) are pure Rust.
#![warn(missing_docs, missing_debug_implementations, unreachable_pub, rust_2018_idioms)]
#![deny(unsafe_op_in_unsafe_fn, unused_must_use)]

pub mod auth;
pub mod bench;
pub mod comm;
pub mod compress;
pub mod config;
#[cfg(feature = "train")]
pub mod data;
#[cfg(feature = "train")]
pub mod device;
pub mod env;
pub mod error;
pub mod launcher;
#[cfg(feature = "train")]
pub mod models;
pub mod names;
pub mod parallel;
pub mod precision;
pub mod rendezvous;
pub mod rng;
pub mod telemetry;
#[cfg(feature = "train")]
pub mod train;
pub mod transport;

pub use comm::{init, DType, ProcessGroup, ReduceOp};
#[cfg(feature = "train")]
pub use device::device;
pub use error::Error;
#[cfg(feature = "train")]
pub use parallel::{BufferSync, Ddp, DdpError, DdpOptions};
