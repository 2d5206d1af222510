//! The thread-per-core substrate Epoxi runs on. It knows nothing of SMTP.
//!
//! - [`hash`]: the stable map from a destination domain to the shard that owns it.
//! - [`runtime`]: one glommio executor per shard, pinned one per core, joined by a full channel
//!   mesh so shards hand work to each other through bounded channels, never through a lock.
//! - [`mesh`]: request/reply, one-way messages and ask-every-shard over that channel mesh.
//! - [`stop`]: a process-wide stop signal that tasks on any shard await without polling.
//! - [`notify`]: a shard-local wake-all notification.
//!
//! Invariant: a shard's id is its index in `0..count` and the mesh peer id; the id owns the
//! same spool directory and the same slice of domains on every start with the same shard count.

pub mod hash;
pub mod mesh;
pub mod notify;
pub mod runtime;
pub mod stop;

pub use hash::shard_of;
pub use mesh::{CallError, Handler, Mesh, MeshConfig, MeshError, Reply, Wire};
pub use notify::Notify;
pub use runtime::{run, Peers, RuntimeConfig, RuntimeError, SendError, Shard};
pub use stop::{LocalStop, Stop};

#[cfg(test)]
pub(crate) mod testing {
    use std::future::Future;
    use std::time::Duration;

    use crate::RuntimeConfig;

    /// Long enough for any test on a loaded 2-core machine, short enough that a hang fails.
    pub const TEST_TIMEOUT: Duration = Duration::from_secs(10);

    /// A runtime that fits in a test: unpinned, little locked memory, small channels.
    pub fn small(shards: usize, mesh_capacity: usize) -> RuntimeConfig {
        RuntimeConfig {
            shards,
            pin: false,
            io_memory_bytes: 256 << 10,
            ring_depth: 32,
            spin_before_park_us: 0,
            mesh_capacity,
        }
    }

    /// `fut`, or None after [`TEST_TIMEOUT`]: a bug fails the test instead of hanging it.
    pub async fn bounded<T>(fut: impl Future<Output = T>) -> Option<T> {
        futures_lite::future::or(async { Some(fut.await) }, async {
            glommio::timer::sleep(TEST_TIMEOUT).await;
            None
        })
        .await
    }
}
