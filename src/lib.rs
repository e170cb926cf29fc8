//! burnrun: distributed training for burn.
//!
//! The public API, what a user's own training program needs:
//! - [`init`] joins the job the launcher (`burnrun --nproc-per-node N -- PROGRAM`) started and
//!   returns the world [`ProcessGroup`]: every collective ([`ReduceOp`], run-time typed buffers of
//!   [`DType`]), `split`/`new_group` for sub-groups, a deadline on every call;
//! - [`device()`] is this rank's burn device (`BURNRUN_DEVICE`: `cpu`, `wgpu`, ...);
//! - [`Ddp`] makes any burn `Module` data parallel in a hand-written loop ([`DdpOptions`],
//!   [`BufferSync`], errors in [`DdpError`]);
//! - [`Task`] is a user's model, data and loss for the trainer: [`train::train_task`] (or
//!   [`train::main`], a whole command line) gives it everything `burnrun train` has, from a
//!   [`config::RunConfig`] (TOML, with a `[user]` section of the program's own); `burnrun train`
//!   is the built-in models ([`train::BuiltIn`]) through the same path;
//! - [`Error`] gathers every layer's error.
//!
//! The other modules are the layers underneath, public for the integration tests and benchmarks
//! and hidden from the documentation: `launcher` spawns ranks and hosts the `rendezvous` store;
//! `transport` moves tagged bytes between two ranks; `comm` builds the collectives on top of it
//! and is the only communication API the upper layers see; `parallel`, `models`, `data` run burn
//! models on top of `comm`; `compress` (gradient codecs) and `precision` (the loss scaler) are
//! comm hooks. Who may use whom is checked by `tests/layers.rs`.
#![warn(missing_docs, missing_debug_implementations, unreachable_pub, rust_2018_idioms)]
#![deny(unsafe_op_in_unsafe_fn, unused_must_use)]

#[doc(hidden)]
pub mod auth;
#[doc(hidden)]
pub mod bench;
pub mod comm;
#[doc(hidden)]
pub mod compress;
pub mod config;
#[cfg(feature = "train")]
#[doc(hidden)]
pub mod data;
#[cfg(feature = "train")]
pub mod device;
#[doc(hidden)]
pub mod env;
pub mod error;
pub mod fault;
#[doc(hidden)]
pub mod flight;
#[doc(hidden)]
pub mod kernels;
#[doc(hidden)]
pub mod launcher;
#[cfg(feature = "train")]
#[doc(hidden)]
pub mod models;
#[doc(hidden)]
pub mod names;
pub mod parallel;
#[doc(hidden)]
pub mod precision;
#[doc(hidden)]
pub mod rendezvous;
#[doc(hidden)]
pub mod rng;
#[doc(hidden)]
pub mod telemetry;
#[cfg(feature = "train")]
pub mod train;
#[doc(hidden)]
pub mod transport;

pub use comm::{init, DType, ProcessGroup, ReduceOp};
#[cfg(feature = "train")]
pub use device::device;
pub use error::Error;
#[cfg(feature = "train")]
pub use parallel::{BufferSync, Ddp, DdpError, DdpOptions};
#[cfg(feature = "train")]
pub use train::{BlockChain, Task, TaskError};
