//! One glommio executor per shard, pinned one per core, joined by a full channel mesh.
//!
//! Each shard runs the caller's future on its own thread and owns everything that future creates:
//! sockets, files, queues. The only path between shards is the mesh: bounded single-producer,
//! single-consumer channels with an eventfd wake-up, one per ordered pair of shards.

use std::future::Future;
use std::time::Duration;

use glommio::channels::channel_mesh::{MeshBuilder, Senders};
use glommio::{CpuSet, GlommioError, LocalExecutorBuilder, Placement};

/// Largest shard count accepted. A full mesh has count² channels; past a few hundred cores the
/// mesh itself would dominate memory, and no machine we target has more cores than this.
pub const SHARDS_MAX: usize = 256;

/// How one shard's executor is built. Every field is a per-core tuning knob (see tuning.md).
#[derive(Clone, Debug)]
pub struct RuntimeConfig {
    /// Number of shards; one executor thread each.
    pub shards: usize,
    /// Pin shard i to the i-th online CPU (wrapping). Off only for debugging on busy machines.
    pub pin: bool,
    /// Locked memory for io_uring registered buffers, per shard. The sum over shards must fit
    /// under `ulimit -l`.
    pub io_memory_bytes: usize,
    /// Submission queue depth of each io_uring.
    pub ring_depth: usize,
    /// Busy-poll this long before parking the thread when idle: trades CPU for wake-up latency.
    pub spin_before_park_us: u64,
    /// Capacity of each cross-shard channel, in messages. A full channel makes the sender wait,
    /// which is the backpressure from a slow shard to the shards feeding it.
    pub mesh_capacity: usize,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            shards: online_cpus(),
            pin: true,
            io_memory_bytes: 2 << 20,
            ring_depth: 256,
            spin_before_park_us: 0,
            mesh_capacity: 1024,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("shards must be between 1 and {SHARDS_MAX}, got {0}")]
    ShardCount(usize),
    #[error("cannot read the online CPUs: {0}")]
    Cpus(String),
    #[error("cannot start shard {shard}: {reason}")]
    Spawn { shard: usize, reason: String },
    #[error("shard {shard} panicked or failed to join: {reason}")]
    Join { shard: usize, reason: String },
    #[error("shard {0} could not join the channel mesh")]
    Mesh(usize),
}

/// The number of CPUs this process may run on (at least 1).
pub fn online_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// A shard's view of the other shards: send a message to any shard by id.
pub struct Peers<M: Send> {
    id: usize,
    count: usize,
    senders: Option<Senders<M>>,
}

impl<M: Send + 'static> Peers<M> {
    pub fn id(&self) -> usize {
        self.id
    }

    pub fn count(&self) -> usize {
        self.count
    }

    /// Send `msg` to shard `to` (not this shard: the caller handles local work directly).
    /// Waits while the channel is full. On failure the message comes back to the caller.
    pub async fn send_to(&self, to: usize, msg: M) -> Result<(), M> {
        let Some(senders) = self.senders_to(to) else {
            return Err(msg);
        };
        senders.send_to(to, msg).await.map_err(take_back)
    }

    /// Send `msg` to shard `to` without waiting: a full channel hands the message back at once,
    /// so the caller can answer "try later" instead of stalling behind a slow shard.
    pub fn try_send_to(&self, to: usize, msg: M) -> Result<(), SendError<M>> {
        let Some(senders) = self.senders_to(to) else {
            return Err(SendError::NoShard(msg));
        };
        senders.try_send_to(to, msg).map_err(|err| match err {
            GlommioError::WouldBlock(glommio::ResourceType::Channel(msg)) => SendError::Full(msg),
            other => SendError::Closed(take_back(other)),
        })
    }

    /// The senders, if `to` is another shard of this mesh. glommio answers a bad index with an
    /// I/O error that does not carry the message, so it must never see one.
    fn senders_to(&self, to: usize) -> Option<&Senders<M>> {
        if to == self.id || to >= self.count {
            return None;
        }
        self.senders.as_ref()
    }

    /// Close the channels from this shard, so peers' receive loops end.
    pub fn close(&self) {
        if let Some(senders) = &self.senders {
            senders.close();
        }
    }
}

/// Why a message could not be handed to another shard. Every case gives the message back.
#[derive(Debug, thiserror::Error)]
pub enum SendError<M> {
    /// The channel to that shard is full: it is slow or busy; try later.
    #[error("the channel to that shard is full")]
    Full(M),
    /// That shard has stopped receiving, or this one has closed its side.
    #[error("the channel to that shard is closed")]
    Closed(M),
    /// No such shard on the mesh (or it is this shard, which has no channel to itself).
    #[error("no such shard on the mesh")]
    NoShard(M),
}

impl<M> SendError<M> {
    /// The message that could not be sent.
    pub fn into_inner(self) -> M {
        match self {
            SendError::Full(msg) | SendError::Closed(msg) | SendError::NoShard(msg) => msg,
        }
    }

    /// The same failure, carrying `f(message)`.
    pub fn map<N>(self, f: impl FnOnce(M) -> N) -> SendError<N> {
        match self {
            SendError::Full(msg) => SendError::Full(f(msg)),
            SendError::Closed(msg) => SendError::Closed(f(msg)),
            SendError::NoShard(msg) => SendError::NoShard(f(msg)),
        }
    }
}

fn take_back<M>(err: GlommioError<M>) -> M
where
    M: Send,
{
    match err {
        GlommioError::Closed(glommio::ResourceType::Channel(msg))
        | GlommioError::WouldBlock(glommio::ResourceType::Channel(msg)) => msg,
        // send_to only fails with the message inside; anything else is a glommio bug we can't
        // recover the message from, so stop loudly rather than drop it silently.
        other => panic!("channel mesh send failed without returning the message: {other}"),
    }
}

/// Everything a shard starts with.
pub struct Shard<M: Send> {
    pub id: usize,
    pub count: usize,
    pub peers: Peers<M>,
    /// One receiver per other shard, as (sender shard id, receiver).
    pub inbox: Vec<(
        usize,
        glommio::channels::shared_channel::ConnectedReceiver<M>,
    )>,
}

/// Start `cfg.shards` executors, run `main(shard)` on each and wait for all of them to return.
/// Results come back in shard-id order.
pub fn run<M, F, Fut, R>(cfg: &RuntimeConfig, main: F) -> Result<Vec<R>, RuntimeError>
where
    M: Send + 'static,
    F: Fn(Shard<M>) -> Fut + Send + Clone + 'static,
    Fut: Future<Output = R> + 'static,
    R: Send + 'static,
{
    if cfg.shards == 0 || cfg.shards > SHARDS_MAX {
        return Err(RuntimeError::ShardCount(cfg.shards));
    }
    let cpus: Vec<usize> = if cfg.pin {
        let set = CpuSet::online().map_err(|e| RuntimeError::Cpus(e.to_string()))?;
        let mut cpus: Vec<usize> = set.iter().map(|loc| loc.cpu).collect();
        cpus.sort_unstable();
        if cpus.is_empty() {
            return Err(RuntimeError::Cpus("no online CPU".into()));
        }
        cpus
    } else {
        Vec::new()
    };
    let mesh = (cfg.shards > 1).then(|| MeshBuilder::<M, _>::full(cfg.shards, cfg.mesh_capacity));

    let mut handles = Vec::with_capacity(cfg.shards);
    for index in 0..cfg.shards {
        let placement = if cpus.is_empty() {
            Placement::Unbound
        } else {
            Placement::Fixed(cpus[index % cpus.len()])
        };
        let builder = LocalExecutorBuilder::new(placement)
            .name(&format!("shard-{index}"))
            .io_memory(cfg.io_memory_bytes)
            .ring_depth(cfg.ring_depth)
            .spin_before_park(Duration::from_micros(cfg.spin_before_park_us));
        let mesh = mesh.clone();
        let main = main.clone();
        let count = cfg.shards;
        let handle = builder
            .spawn(move || async move {
                let (id, peers, inbox) = match mesh {
                    Some(mesh) => {
                        let (senders, mut receivers) =
                            mesh.join().await.map_err(|_| RuntimeError::Mesh(index))?;
                        // Peer ids follow executor creation order, so they equal `index`; we
                        // still take the mesh's word for it, since it routes the messages.
                        let id = senders.peer_id();
                        let inbox = receivers.streams();
                        let peers = Peers {
                            id,
                            count,
                            senders: Some(senders),
                        };
                        (id, peers, inbox)
                    }
                    None => (
                        0,
                        Peers {
                            id: 0,
                            count: 1,
                            senders: None,
                        },
                        Vec::new(),
                    ),
                };
                Ok::<R, RuntimeError>(
                    main(Shard {
                        id,
                        count,
                        peers,
                        inbox,
                    })
                    .await,
                )
            })
            .map_err(|e| RuntimeError::Spawn {
                shard: index,
                reason: e.to_string(),
            })?;
        handles.push(handle);
    }

    let mut results = Vec::with_capacity(handles.len());
    for (shard, handle) in handles.into_iter().enumerate() {
        match handle.join() {
            Ok(Ok(result)) => results.push(result),
            Ok(Err(e)) => return Err(e),
            Err(e) => {
                return Err(RuntimeError::Join {
                    shard,
                    reason: e.to_string(),
                })
            }
        }
    }
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small(shards: usize) -> RuntimeConfig {
        RuntimeConfig {
            shards,
            pin: false,
            io_memory_bytes: 256 << 10,
            ring_depth: 32,
            spin_before_park_us: 0,
            mesh_capacity: 8,
        }
    }

    #[test]
    fn single_shard_runs_without_a_mesh() -> Result<(), RuntimeError> {
        let ids = run::<u32, _, _, _>(&small(1), |shard| async move { (shard.id, shard.count) })?;
        assert_eq!(ids, vec![(0, 1)]);
        Ok(())
    }

    #[test]
    fn every_shard_reaches_every_other() -> Result<(), RuntimeError> {
        let sums = run::<usize, _, _, _>(&small(3), |shard| async move {
            for to in (0..shard.count).filter(|&to| to != shard.id) {
                assert!(shard.peers.send_to(to, shard.id + 1).await.is_ok());
            }
            let mut sum = 0;
            for (_, rx) in &shard.inbox {
                sum += rx.recv().await.unwrap_or(0);
            }
            (shard.id, sum)
        })?;
        // Shard i receives (j + 1) from every j != i: total 6 minus its own (i + 1).
        assert_eq!(sums, vec![(0, 5), (1, 4), (2, 3)]);
        Ok(())
    }
}
