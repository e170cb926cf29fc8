//! The rendezvous store: a small key-value service hosted by the node-0 launcher, used by ranks
//! and by the other nodes' launchers to exchange addresses, agree on ids and report failures.

mod client;
mod memory;
mod prefix;
mod server;
mod store;
mod wire;

pub use client::TcpStore;
pub use memory::MemoryStore;
pub use prefix::PrefixStore;
pub use server::{TcpStoreServer, HANDSHAKE_TIMEOUT, MAX_PENDING_HANDSHAKES, REFUSAL_LOG_WINDOW};
pub use store::{Store, StoreError};
pub use wire::{MAX_KEY_BYTES, MAX_VALUE_BYTES, MAX_WAIT_KEYS};
