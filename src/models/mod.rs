//! The built-in burn models: an MLP, a small CNN and a small character-level GPT, each built as a
//! sequence of blocks ([`BlockStack`]) so a pipeline can give each rank a contiguous slice.
//!
//! Conventions every user of this module relies on:
//! - activations between blocks are `Tensor<2>` `[batch, features]`; the GPT's token ids enter as
//!   float ids `[batch, seq]`;
//! - targets are `Tensor<2, Int>` `[batch, t]` (`t = 1` for classification, `seq` for the GPT) and
//!   [`BlockStack::loss`] is the mean cross-entropy over all `batch * t` targets;
//! - initialisation is deterministic per `(seed, block index)`: same arguments, same replica, on
//!   any rank and in any slice;
//! - parameters are named by module path (`blocks.<i>.…`) and flattened in a fixed order by
//!   `burnrun::parallel::params`.

mod block;
mod conv;
mod dense;
mod error;
mod gpt;
mod init;
mod loss;
mod spec;
mod stack;

pub use block::Block;
pub use conv::ConvBlock;
pub use dense::DenseBlock;
pub use error::ModelError;
pub use gpt::{EmbeddingBlock, LmHeadBlock, TpTransformerBlock, TransformerBlock};
pub use loss::{accuracy, cross_entropy};
pub use spec::ModelSpec;
pub use stack::BlockStack;
