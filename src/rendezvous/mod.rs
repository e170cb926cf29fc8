//! The rendezvous store: a small key-value service hosted by the node-0 launcher, used by ranks
//! and by the other nodes' launchers to exchange addresses, agree on ids and report failures.

mod store;

pub use store::{Store, StoreError};
