//! The thread-per-core substrate Epoxi runs on. It knows nothing of SMTP.
//!
//! - [`hash`]: the stable map from a destination domain to the shard that owns it.
//! - [`runtime`]: one glommio executor per shard, pinned one per core, joined by a full channel
//!   mesh so shards hand work to each other through bounded channels, never through a lock.
//!
//! Invariant: a shard's id is its index in `0..count` and the mesh peer id; the id owns the
//! same spool directory and the same slice of domains on every start with the same shard count.

pub mod hash;
pub mod notify;
pub mod runtime;

pub use hash::shard_of;
pub use notify::Notify;
pub use runtime::{run, Peers, RuntimeConfig, RuntimeError, Shard};
