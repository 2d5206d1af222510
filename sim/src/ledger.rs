//! What the world knows of every recipient it handed in, kept outside the simulated process so
//! it survives crashes: when it was received, whether the client was acknowledged, every final
//! outcome the core reported for it and the notices spooled about it. The invariants about
//! messages are checked against it, as they happen where that is cheap and once at the end.

use std::collections::BTreeMap;

use epoxi::envelope::{NoticeSwitches, Notify, ReceptionId};
use epoxi::events::AttemptOutcome;

/// A reception id as a sortable key.
pub type RecKey = (u64, u16, u64);

pub fn rec_key(r: &ReceptionId) -> RecKey {
    (r.ms, r.shard, r.n)
}

/// One recipient of one message (or notice).
pub type EntryKey = (RecKey, String);

/// A broken invariant, named for the report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    pub invariant: &'static str,
    pub detail: String,
}

impl Violation {
    pub fn new(invariant: &'static str, detail: impl Into<String>) -> Violation {
        Violation {
            invariant,
            detail: detail.into(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Entry {
    pub received_ms: u64,
    /// The message has a sender a notice can go to.
    pub sender_set: bool,
    pub notify: Notify,
    /// When the client got its 250 (every part durable); None: never acknowledged.
    pub acked_at: Option<u64>,
    pub is_notice: bool,
    /// Final outcomes reported (time, outcome), in order.
    pub terminal: Vec<(u64, AttemptOutcome)>,
    pub delivered: u32,
    /// When notices about this recipient's failure (or success) were spooled.
    pub notices: Vec<u64>,
    /// When delay notices about it were spooled.
    pub delays: Vec<u64>,
    /// The notices its message's listener allowed.
    pub switches: NoticeSwitches,
    /// Its record was set aside by recovery as unreadable (media corruption): losing it is
    /// reported, not a bug.
    pub exempt: bool,
    /// A final outcome for it was durably committed: it must never be pending again.
    pub durable_final: bool,
}

/// Counters the report prints.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LedgerStats {
    pub acked: u64,
    pub delivered: u64,
    pub bounced: u64,
    pub expired: u64,
    pub deferred: u64,
    /// Recipients delivered more than once (only allowed after a crash).
    pub duplicates: u64,
    pub notices: u64,
    pub delay_notices: u64,
    pub exempt: u64,
    /// Recipients whose final outcome changed after a crash undid the first one (its record
    /// was lost with a failed batch): e.g. delivered, then expired and a failure notice.
    pub changed_after_crash: u64,
}

impl LedgerStats {
    pub fn add(&mut self, o: &LedgerStats) {
        self.acked += o.acked;
        self.delivered += o.delivered;
        self.bounced += o.bounced;
        self.expired += o.expired;
        self.deferred += o.deferred;
        self.duplicates += o.duplicates;
        self.notices += o.notices;
        self.delay_notices += o.delay_notices;
        self.exempt += o.exempt;
        self.changed_after_crash += o.changed_after_crash;
    }
}

#[derive(Debug, Default)]
pub struct Ledger {
    pub entries: BTreeMap<EntryKey, Entry>,
    pub max_age_ms: u64,
}

impl Ledger {
    pub fn new(max_age_ms: u64) -> Ledger {
        Ledger {
            entries: BTreeMap::new(),
            max_age_ms,
        }
    }

    pub fn add(&mut self, key: EntryKey, entry: Entry) {
        self.entries.entry(key).or_insert(entry);
    }

    pub fn ack(&mut self, key: &EntryKey, now_ms: u64) {
        if let Some(e) = self.entries.get_mut(key) {
            e.acked_at.get_or_insert(now_ms);
        }
    }

    /// The core reported an attempt. `crashed`: the run has had a crash so far (after one,
    /// outcomes may repeat: SMTP is at least once).
    pub fn attempt(
        &mut self,
        key: &EntryKey,
        outcome: AttemptOutcome,
        ts_ms: u64,
        crashed: bool,
    ) -> Result<(), Violation> {
        let max_age_ms = self.max_age_ms;
        let Some(e) = self.entries.get_mut(key) else {
            return Err(Violation::new(
                "ledger",
                format!("attempt for a recipient never handed in: {key:?}"),
            ));
        };
        let deadline = e.received_ms + max_age_ms;
        if !crashed && !e.terminal.is_empty() {
            return Err(Violation::new(
                "duplicate",
                format!(
                    "{key:?}: {outcome:?} at {ts_ms} after final {:?} without a crash",
                    e.terminal
                ),
            ));
        }
        match outcome {
            AttemptOutcome::Deferred { next_attempt_ms } => {
                if next_attempt_ms > deadline {
                    return Err(Violation::new(
                        "max-age",
                        format!(
                            "{key:?}: retry at {next_attempt_ms}, past its deadline {deadline}"
                        ),
                    ));
                }
                if ts_ms >= deadline {
                    return Err(Violation::new(
                        "max-age",
                        format!("{key:?}: deferred at {ts_ms}, at or past its deadline {deadline}"),
                    ));
                }
            }
            final_outcome => {
                e.terminal.push((ts_ms, final_outcome));
                if final_outcome == AttemptOutcome::Delivered {
                    e.delivered += 1;
                }
            }
        }
        Ok(())
    }

    pub fn notice(&mut self, key: &EntryKey, now_ms: u64, crashed: bool) -> Result<(), Violation> {
        let Some(e) = self.entries.get_mut(key) else {
            return Err(Violation::new(
                "ledger",
                format!("notice about a recipient never handed in: {key:?}"),
            ));
        };
        e.notices.push(now_ms);
        if !crashed && e.notices.len() > 1 {
            return Err(Violation::new(
                "notice",
                format!("{key:?}: a second notice without a crash ({:?})", e.notices),
            ));
        }
        Ok(())
    }

    /// A delay notice about `key` was spooled: at most one per recipient (more only after a
    /// crash: its record may have been lost with the notice spooled, at least once).
    pub fn delay_notice(
        &mut self,
        key: &EntryKey,
        now_ms: u64,
        crashed: bool,
    ) -> Result<(), Violation> {
        let Some(e) = self.entries.get_mut(key) else {
            return Err(Violation::new(
                "ledger",
                format!("delay notice about a recipient never handed in: {key:?}"),
            ));
        };
        e.delays.push(now_ms);
        if !crashed && e.delays.len() > 1 {
            return Err(Violation::new(
                "delay-notice",
                format!(
                    "{key:?}: a second delay notice without a crash ({:?})",
                    e.delays
                ),
            ));
        }
        Ok(())
    }

    /// The checks at the end of a drained run. `slack_ms`: how long past its deadline (and
    /// one retry interval) a final outcome may come: the last attempt's own time, queueing
    /// behind other mail and the process being down.
    pub fn check_end(&self, crashed: bool, retry_cap_ms: u64, slack_ms: u64) -> Vec<Violation> {
        let mut out = Vec::new();
        for (key, e) in &self.entries {
            if e.acked_at.is_none() || e.exempt {
                continue;
            }
            let Some(&(last_ts, last)) = e.terminal.last() else {
                let invariant = if crashed { "no-loss" } else { "acked-final" };
                out.push(Violation::new(
                    invariant,
                    format!(
                        "{key:?} acknowledged at {:?} never reached a final outcome",
                        e.acked_at
                    ),
                ));
                continue;
            };
            let bound = e.received_ms + self.max_age_ms + retry_cap_ms + slack_ms;
            // The first final outcome counts: a later one comes from a crash that lost the
            // record of the first (the batch carrying it failed), at any time after.
            if let Some((ts, o)) = e.terminal.first().filter(|(ts, _)| *ts > bound) {
                out.push(Violation::new(
                    "max-age",
                    format!(
                        "{key:?} received {} reached {o:?} at {ts}, past {bound}",
                        e.received_ms
                    ),
                ));
            }
            let failed = matches!(last, AttemptOutcome::Bounced | AttemptOutcome::Expired);
            let switched_on = match last {
                AttemptOutcome::Bounced => e.switches.bounce,
                AttemptOutcome::Expired => e.switches.expiry,
                AttemptOutcome::Delivered => e.switches.success,
                AttemptOutcome::Deferred { .. } => e.switches.delay,
            };
            // Switched off: no notice about its outcome at all (a crash may have changed the
            // outcome, and so the notice it had).
            if !switched_on && !crashed && !e.notices.is_empty() {
                out.push(Violation::new(
                    "notice-switch",
                    format!(
                        "{key:?}: {last:?} with its notices switched off, notices {:?}",
                        e.notices
                    ),
                ));
            }
            if failed
                && switched_on
                && e.sender_set
                && e.notify.on_failure()
                && !e.notices.iter().any(|&n| n >= last_ts)
            {
                out.push(Violation::new(
                    "notice",
                    format!(
                        "{key:?}: {last:?} at {last_ts} without a notice after it (notices {:?})",
                        e.notices
                    ),
                ));
            }
            if !crashed && e.delivered > 1 {
                out.push(Violation::new(
                    "duplicate",
                    format!("{key:?} delivered {} times without a crash", e.delivered),
                ));
            }
        }
        out
    }

    pub fn stats(&self) -> LedgerStats {
        let mut s = LedgerStats::default();
        for e in self.entries.values() {
            if e.acked_at.is_some() {
                s.acked += 1;
            }
            if e.exempt {
                s.exempt += 1;
            }
            for (_, o) in &e.terminal {
                match o {
                    AttemptOutcome::Delivered => s.delivered += 1,
                    AttemptOutcome::Bounced => s.bounced += 1,
                    AttemptOutcome::Expired => s.expired += 1,
                    AttemptOutcome::Deferred { .. } => s.deferred += 1,
                }
            }
            if e.delivered > 1 {
                s.duplicates += 1;
            }
            if e.terminal.windows(2).any(|w| w[0].1 != w[1].1) {
                s.changed_after_crash += 1;
            }
            s.notices += e.notices.len() as u64;
            s.delay_notices += e.delays.len() as u64;
        }
        s
    }
}
