//! burnrun: distributed training for burn.
//!
//! The crate is layered (see `DESIGN.md` in the project's shared notes):
//! `launcher` spawns ranks and hosts the `rendezvous` store; `transport` moves tagged bytes between
//! two ranks; `comm` builds the collectives on top of it and is the only communication API the
//! upper layers see; `train`, `parallel`, `models`, `data`, `compress` and `precision` (feature
//! `train`) run burn models on top of `comm`.
#![warn(missing_docs, missing_debug_implementations, unreachable_pub, rust_2018_idioms)]
#![deny(unsafe_op_in_unsafe_fn, unused_must_use)]

pub mod auth;
pub mod comm;
pub mod env;
pub mod error;
pub mod launcher;
pub mod parallel;
pub mod rendezvous;
pub mod telemetry;
pub mod transport;

pub use comm::{init, DType, ProcessGroup, ReduceOp};
pub use error::Error;
