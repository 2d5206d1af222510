//! Leases across two shards.

use super::connections::TWO_SOURCES;
use super::*;

/// Two cores wired back to back: lease messages go straight to the other's `lease_in`.
struct Pair {
    cores: Vec<Core>,
    /// Connections asked for and not closed yet: (shard, connection) → egress source.
    open: BTreeMap<(usize, ConnId), usize>,
    /// Connections per (site, source).
    limit: usize,
}

impl Pair {
    fn new(toml: &str) -> Pair {
        let s = settings(toml);
        let limit = s.config.delivery.connections_per_destination_max;
        Pair {
            cores: vec![core_of(&s, 0, 2, true).0, core_of(&s, 1, 2, true).0],
            open: BTreeMap::new(),
            limit,
        }
    }

    /// Carry lease messages until none are left; the other actions, per shard. Checks that
    /// the limit of every source holds across shards at every step (all mail here goes to
    /// one site).
    fn pump(&mut self, now_ms: u64) -> [Vec<Action>; 2] {
        let mut out: [Vec<Action>; 2] = [Vec::new(), Vec::new()];
        loop {
            let mut mail = Vec::new();
            for (shard, core) in self.cores.iter_mut().enumerate() {
                for action in core.take_actions() {
                    match action {
                        Action::Lease { to, msg } => {
                            assert_ne!(to, shard, "a shard handles its own lease messages");
                            mail.push((shard, to, msg));
                        }
                        Action::Connect { conn, source, .. } => {
                            self.open.insert((shard, conn), source);
                            out[shard].push(action);
                        }
                        other => out[shard].push(other),
                    }
                }
            }
            let mut per_source: BTreeMap<usize, usize> = BTreeMap::new();
            for source in self.open.values() {
                *per_source.entry(*source).or_default() += 1;
            }
            assert!(
                per_source.values().all(|&n| n <= self.limit),
                "connections {:?} over the limit {}",
                self.open,
                self.limit
            );
            if mail.is_empty() {
                return out;
            }
            for (from, to, msg) in mail {
                self.cores[to].lease_in(from, msg, now_ms);
            }
        }
    }

    fn closed(&mut self, shard: usize, conn: ConnId, now_ms: u64) {
        self.cores[shard].conn_closed(conn, now_ms);
        self.open.remove(&(shard, conn));
    }

    /// Permits out at the keys' owners, over the (at most two) sources.
    fn permits_out(&self) -> u32 {
        (0..2)
            .map(|source| {
                let key = LeaseKey {
                    site: route_hop().site_key(),
                    source,
                };
                self.cores[owner_of(&key, 2)].budgets().open(&key)
            })
            .sum()
    }
}

fn accept_many(core: &mut Core, n: usize, now_ms: u64) {
    for i in 0..n {
        let rcpt = format!("r{i}@d.test");
        accept(core, &envelope("s@x.test", &[&rcpt], now_ms), now_ms);
    }
}

#[test]
fn the_limit_holds_across_shards_and_a_busy_holder_yields_after_a_fair_run() {
    let mut p = Pair::new("[delivery]\nconnections_per_destination_max = 1\n");
    let extra = 8;
    accept_many(&mut p.cores[0], YIELD_AFTER_MESSAGES as usize + extra, T0);
    let out = p.pump(T0);
    let (conn0, _, _) = the_connect(&out[0]);
    assert!(connects(&out[1]).is_empty());
    assert_eq!(p.permits_out(), 1);

    // Shard 1 wants the site too: it waits, and shard 0 is asked to yield.
    accept_many(&mut p.cores[1], 1, T0);
    let out = p.pump(T0);
    assert!(connects(&out[1]).is_empty(), "shard 1 waits: {:?}", out[1]);
    assert!(has(&out[0], &Action::WakeIdle), "{:?}", out[0]);

    // Shard 0 finishes a fair run first, then closes.
    p.cores[0].conn_opened(conn0, ROUTE, T0);
    for n in 0..YIELD_AFTER_MESSAGES {
        let ticket = job_for(&mut p.cores[0], conn0, T0);
        p.cores[0].txn_done(conn0, &ticket.job, &all(&ticket.job, ok()), T0);
        let out = p.pump(T0);
        assert!(connects(&out[1]).is_empty(), "shard 1 still waits ({n})");
    }
    assert_eq!(p.cores[0].next_job(conn0, T0), NextJob::Close);
    p.closed(0, conn0, T0);
    let out = p.pump(T0);
    // The permit goes to shard 1; shard 0, with work left, waits its turn.
    let (conn1, _, _) = the_connect(&out[1]);
    assert!(connects(&out[0]).is_empty());
    assert_eq!(p.permits_out(), 1);

    // Shard 1 is asked to yield in turn: after its one job, idle, it closes at once.
    p.cores[1].conn_opened(conn1, ROUTE, T0);
    let ticket = job_for(&mut p.cores[1], conn1, T0);
    p.cores[1].txn_done(conn1, &ticket.job, &all(&ticket.job, ok()), T0);
    p.pump(T0);
    assert_eq!(p.cores[1].next_job(conn1, T0), NextJob::Close);
    p.closed(1, conn1, T0);
    let out = p.pump(T0);
    let (conn0, _, _) = the_connect(&out[0]);
    assert!(connects(&out[1]).is_empty());

    // Shard 0 carries the rest, and keeps its connection while nobody waits.
    p.cores[0].conn_opened(conn0, ROUTE, T0);
    for _ in 0..extra {
        let ticket = job_for(&mut p.cores[0], conn0, T0);
        p.cores[0].txn_done(conn0, &ticket.job, &all(&ticket.job, ok()), T0);
    }
    assert!(matches!(
        p.cores[0].next_job(conn0, T0),
        NextJob::Wait { .. }
    ));
    assert!(p.cores[0].queue().is_empty() && p.cores[1].queue().is_empty());
    p.closed(0, conn0, T0);
    p.pump(T0);
    assert_eq!(p.permits_out(), 0);
}

#[test]
fn an_idle_holder_gives_its_permit_up_at_once() {
    for holder in [0, 1] {
        let waiter = 1 - holder;
        let mut p = Pair::new("[delivery]\nconnections_per_destination_max = 1\n");
        accept_many(&mut p.cores[holder], 1, T0);
        let out = p.pump(T0);
        let (conn, _, _) = the_connect(&out[holder]);
        p.cores[holder].conn_opened(conn, ROUTE, T0);
        let ticket = job_for(&mut p.cores[holder], conn, T0);
        p.cores[holder].txn_done(conn, &ticket.job, &all(&ticket.job, ok()), T0);
        assert!(matches!(
            p.cores[holder].next_job(conn, T0),
            NextJob::Wait { .. }
        ));
        p.pump(T0);

        accept_many(&mut p.cores[waiter], 1, T0 + 10);
        let out = p.pump(T0 + 10);
        assert!(connects(&out[waiter]).is_empty());
        assert!(has(&out[holder], &Action::WakeIdle), "holder {holder}");
        assert_eq!(p.cores[holder].next_job(conn, T0 + 10), NextJob::Close);
        p.closed(holder, conn, T0 + 10);
        let out = p.pump(T0 + 10);
        let (conn, _, _) = the_connect(&out[waiter]);
        p.cores[waiter].conn_opened(conn, ROUTE, T0 + 10);
        job_for(&mut p.cores[waiter], conn, T0 + 10);
    }
}

#[test]
fn two_shards_sharing_two_sources_deliver_everything_within_each_sources_limit() {
    let mut p = Pair::new(&format!(
        "{TWO_SOURCES}\n[delivery]\nconnections_per_destination_max = 1\n\
         messages_per_connection_max = 5\nidle_timeout_ms = 1000\n"
    ));
    let per_shard = 30;
    accept_many(&mut p.cores[0], per_shard, T0);
    accept_many(&mut p.cores[1], per_shard, T0);
    let mut now = T0;
    let mut opened: BTreeSet<(usize, ConnId)> = BTreeSet::new();
    let mut delivered = 0;
    let mut sources_used = BTreeSet::new();
    for _ in 0..10_000 {
        let out = p.pump(now);
        for (shard, actions) in out.iter().enumerate() {
            delivered += outcomes(actions)
                .iter()
                .filter(|r| r.kind == OutcomeKind::Delivered)
                .count();
            for (conn, _, source) in connects(actions) {
                p.cores[shard].conn_opened(conn, ROUTE, now);
                opened.insert((shard, conn));
                sources_used.insert(source);
            }
        }
        if opened.is_empty() && p.cores.iter().all(|c| c.queue().is_empty()) {
            break;
        }
        // Every open connection takes one step; when none can, time moves on.
        let mut progress = false;
        let mut wake: Option<u64> = None;
        for (shard, conn) in opened.clone() {
            match p.cores[shard].next_job(conn, now) {
                NextJob::Job(ticket) => {
                    let results = all(&ticket.job, ok());
                    p.cores[shard].txn_done(conn, &ticket.job, &results, now);
                    progress = true;
                }
                NextJob::Close => {
                    p.closed(shard, conn, now);
                    opened.remove(&(shard, conn));
                    progress = true;
                }
                NextJob::Wait { until_ms } => {
                    wake = Some(wake.map_or(until_ms, |w| w.min(until_ms)));
                }
            }
        }
        if !progress {
            now = wake.expect("work left and nothing to wait for: stuck");
        }
    }
    assert_eq!(delivered, 2 * per_shard);
    assert!(opened.is_empty() && p.open.is_empty());
    assert_eq!(sources_used.len(), 2, "both sources carried mail");
    assert_eq!(p.permits_out(), 0, "every permit came back");
}

/// A yield is answered by whichever of the holder's connections closes first: the owner counts
/// any release against it. The holder's own count (`Permits`, `egress/lease.rs`) is only
/// lowered by a connection that closes *for* the yield (`take_yield`), so when another one
/// closes for another reason (here `messages_per_connection_max`), a stale yield stays behind
/// and a later idle connection closes at once, although nobody waits for its permit.
#[test]
fn a_yield_answered_by_another_close_is_not_answered_twice() {
    let mut p = Pair::new(
        "[delivery]\nconnections_per_destination_max = 2\nmessages_per_connection_max = 3\n",
    );
    accept_many(&mut p.cores[0], 5, T0);
    let out = p.pump(T0);
    let conns: Vec<ConnId> = connects(&out[0]).iter().map(|c| c.0).collect();
    assert_eq!(conns.len(), 2, "{:?}", out[0]);
    let (a, b) = (conns[0], conns[1]);
    accept_many(&mut p.cores[1], 1, T0);
    let out = p.pump(T0);
    assert!(
        has(&out[0], &Action::WakeIdle),
        "shard 0 is asked to yield one"
    );
    p.cores[0].conn_opened(a, ROUTE, T0);
    p.cores[0].conn_opened(b, ROUTE, T0);
    for _ in 0..3 {
        let ticket = job_for(&mut p.cores[0], a, T0);
        p.cores[0].txn_done(a, &ticket.job, &all(&ticket.job, ok()), T0);
    }
    assert_eq!(
        p.cores[0].next_job(a, T0),
        NextJob::Close,
        "carried its three"
    );
    p.closed(0, a, T0);
    let out = p.pump(T0);
    the_connect(&out[1]);
    // Each shard holds one permit of two now: its fair share. Nobody waits for b's.
    for _ in 0..2 {
        let ticket = job_for(&mut p.cores[0], b, T0);
        p.cores[0].txn_done(b, &ticket.job, &all(&ticket.job, ok()), T0);
    }
    p.pump(T0);
    assert!(
        matches!(p.cores[0].next_job(b, T0), NextJob::Wait { .. }),
        "b should idle until its timeout, not answer the yield a already answered"
    );
}
