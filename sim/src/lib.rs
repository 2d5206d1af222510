//! epoxi-sim: Epoxi's orchestration under a seeded, deterministic simulation, in the manner of
//! TigerBeetle's VOPR and FoundationDB's simulator.
//!
//! One run is one seed. The seed draws a scenario (1 to 3 shards, limits, faults, a workload
//! of 20 to 200 messages) and every random decision of the run. The real decision code runs:
//! each shard's `core::Core` (queue, routing, leases, delivery decisions, outcomes, notices),
//! the spool's `engine::Engine` (batches, segments, collection, compaction) and
//! `recovery::replay`; around them the world plays clients, the mesh, an in-memory disk with
//! torn writes, failed fsyncs and full disks, scripted SMTP peers, DNS and process crashes, on
//! a manual clock. After a "heal" phase (faults off, every peer accepts) the run drains, and
//! the invariants are checked (see [`ledger`] and `world`): every acknowledged recipient ends
//! delivered, bounced or expired; nothing acknowledged is lost across crashes; no connection
//! limit is ever exceeded; no message outlives its maximum age; every failure of a message with
//! a sender produces its notice; no recipient is delivered twice without a crash; the spool
//! lets go of every segment once everything is final.
//!
//! A failing seed is run again with its trace on, and the report carries the last lines: the
//! run replays exactly, so the trace is the failing run's.
//!
//! Not simulated (the adapters' own logic, which the world stands in for): the SMTP client
//! and server state machines (a transaction is its per-recipient replies after a delay), TLS,
//! walking MX hosts and their addresses, the DNS resolver and its cache (the world answers
//! MX lookups), the event log, reception's mesh errors (busy or gone peers), spread domains
//! and pool rules, and a graceful stop (`Core::stop`, `Engine::close`): the process only ever
//! crashes. The adapters' choices that matter to the invariants are mirrored as they are in
//! `shard::perform`, `spool::Spool` and `delivery::connection` (for instance, a delivery
//! reads the body at the location its ticket carries).

pub mod disk;
pub mod ledger;
pub mod peer;
pub mod rng;
pub mod scenario;
pub mod trace;
pub mod world;

pub use scenario::Options;
pub use world::Summary;

/// Trace lines a failure report keeps by default: enough to see the last few deliveries,
/// commits and lease exchanges leading to it.
pub const TRACE_LINES_DEFAULT: usize = 80;

/// A seed whose run broke an invariant.
#[derive(Debug, thiserror::Error)]
#[error(
    "seed {seed}: invariant `{invariant}` broken at {at_ms} ms: {detail}\n{}\n  replay: cargo run -p epoxi-sim --release -- --seed {seed} --verbose",
    trace.join("\n")
)]
pub struct Failure {
    pub seed: u64,
    pub invariant: &'static str,
    pub detail: String,
    /// Virtual time of the failure, from the start of the run.
    pub at_ms: u64,
    /// The last lines of the failing run's trace.
    pub trace: Vec<String>,
}

/// Run one seed. On a violation the seed is run again with its trace kept, for the report.
pub fn run(seed: u64, opts: &Options) -> Result<Summary, Failure> {
    let quiet = trace::Trace::new(0, opts.verbose);
    let v = match world::World::new(seed, opts, quiet).and_then(|mut w| w.run()) {
        Ok(summary) => return Ok(summary),
        Err(v) => v,
    };
    let keep = opts.trace_lines.unwrap_or(TRACE_LINES_DEFAULT);
    let mut replay = match world::World::new(seed, opts, trace::Trace::new(keep, false)) {
        Ok(w) => w,
        Err(e) => {
            return Err(Failure {
                seed,
                invariant: e.invariant,
                detail: e.detail,
                at_ms: 0,
                trace: Vec::new(),
            })
        }
    };
    let again = replay.run();
    let mut trace = replay.take_trace();
    match again {
        Err(ref v2) if *v2 == v => {}
        other => trace.push(format!(
            "  (the replay did not fail the same way: {:?}; the run is not deterministic)",
            other.err()
        )),
    }
    Err(Failure {
        seed,
        invariant: v.invariant,
        detail: v.detail,
        at_ms: replay.now_ms(),
        trace,
    })
}
