//! Tensor parallelism (`parallel.tensor = T`, Megatron-LM's split): which slice of a full
//! parameter a tensor-parallel rank holds ([`TensorSplit`], defined beside the mesh in
//! `crate::config` so that the built-in models, which may not use this layer, can describe their
//! splits). The trainer runs the communication (`crate::train`).

pub use crate::config::TensorSplit;
