//! The shard's queues: what is waiting to be delivered, where, and when.
//!
//! - `messages`: compact metadata of every message not yet final (spool location, age, each
//!   recipient's address and state). Bodies stay on disk.
//! - per-destination ready queues of [`Job`]s: one job is one message's recipients for one
//!   destination, delivered in one SMTP transaction.
//! - the retry schedule: jobs waiting for their next attempt, ordered by due time.
//!
//! No I/O here; the delivery adapter pops jobs and reports outcomes.

pub mod retry;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};

use crate::route::Hop;
use crate::spool::Location;

/// Where a job goes and through which egress pool. Ready queues key on it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Dest {
    pub hop: Hop,
    pub pool: usize,
}

/// A job's destination, or none yet (scheduled jobs are routed again when due).
pub type Target = Option<Dest>;

#[derive(Clone, Debug)]
pub struct Rcpt {
    pub address: Box<str>,
    pub attempts: u32,
    pub done: bool,
}

impl Rcpt {
    pub fn domain(&self) -> &str {
        self.address.rsplit_once('@').map_or("", |(_, d)| d)
    }
}

#[derive(Clone, Debug)]
pub struct MessageMeta {
    pub id: u64,
    pub loc: Location,
    pub received_ms: u64,
    /// For the log: the id the client was given, the sender and the body size.
    pub reception_id: Box<str>,
    pub mail_from: Box<str>,
    pub size: usize,
    /// `spool::record::FLAG_*`: what the message needs from the next hop.
    pub flags: u8,
    /// Some recipient asked for a notice of successful delivery (DSN NOTIFY=SUCCESS).
    pub success_notices: bool,
    /// The tenant header's value, for egress pool rules.
    pub tenant: Option<Box<str>>,
    pub rcpts: Vec<Rcpt>,
    /// Recipients not final yet.
    pub remaining: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Job {
    pub message: u64,
    pub rcpts: Vec<u32>,
    pub target: Target,
}

#[derive(Default)]
pub struct DestQueue {
    pub ready: VecDeque<Job>,
    /// Connections open (or opening) to this destination.
    pub connections: usize,
    /// Of those, connections waiting for work: new jobs go to them before a new connection opens.
    pub idle: usize,
}

#[derive(Default)]
pub struct Queue {
    messages: HashMap<u64, MessageMeta>,
    dests: HashMap<Target, DestQueue>,
    scheduled: BinaryHeap<Reverse<(u64, u64)>>,
    scheduled_jobs: HashMap<u64, Job>,
    schedule_seq: u64,
}

impl Queue {
    pub fn insert(&mut self, meta: MessageMeta) {
        self.messages.insert(meta.id, meta);
    }

    pub fn message(&self, id: u64) -> Option<&MessageMeta> {
        self.messages.get(&id)
    }

    pub fn message_mut(&mut self, id: u64) -> Option<&mut MessageMeta> {
        self.messages.get_mut(&id)
    }

    pub fn remove(&mut self, id: u64) -> Option<MessageMeta> {
        self.messages.remove(&id)
    }

    pub fn len(&self) -> usize {
        self.messages.len()
    }

    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    /// Put a job on its destination's ready queue; returns that queue.
    pub fn push_ready(&mut self, job: Job) -> &mut DestQueue {
        let dq = self.dests.entry(job.target.clone()).or_default();
        dq.ready.push_back(job);
        dq
    }

    pub fn dest(&mut self, target: &Target) -> &mut DestQueue {
        self.dests.entry(target.clone()).or_default()
    }

    pub fn pop_ready(&mut self, target: &Target) -> Option<Job> {
        self.dests
            .get_mut(target)
            .and_then(|dq| dq.ready.pop_front())
    }

    /// Take every ready job of a destination (e.g. when it cannot be reached at all).
    pub fn drain_ready(&mut self, target: &Target) -> Vec<Job> {
        self.dests
            .get_mut(target)
            .map(|dq| dq.ready.drain(..).collect())
            .unwrap_or_default()
    }

    /// Schedule a job for `due_ms`.
    pub fn schedule(&mut self, due_ms: u64, job: Job) {
        self.schedule_seq += 1;
        self.scheduled.push(Reverse((due_ms, self.schedule_seq)));
        self.scheduled_jobs.insert(self.schedule_seq, job);
    }

    /// Jobs due at `now_ms`, in due order.
    pub fn take_due(&mut self, now_ms: u64) -> Vec<Job> {
        let mut due = Vec::new();
        while let Some(Reverse((at, seq))) = self.scheduled.peek().copied() {
            if at > now_ms {
                break;
            }
            self.scheduled.pop();
            if let Some(job) = self.scheduled_jobs.remove(&seq) {
                due.push(job);
            }
        }
        due
    }

    pub fn next_due_ms(&self) -> Option<u64> {
        self.scheduled.peek().map(|Reverse((at, _))| *at)
    }

    pub fn scheduled_len(&self) -> usize {
        self.scheduled_jobs.len()
    }

    pub fn ready_len(&self) -> usize {
        self.dests.values().map(|d| d.ready.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(message: u64) -> Job {
        Job {
            message,
            rcpts: vec![0],
            target: None,
        }
    }

    #[test]
    fn schedule_releases_in_due_order() {
        let mut q = Queue::default();
        q.schedule(30, job(3));
        q.schedule(10, job(1));
        q.schedule(20, job(2));
        q.schedule(10, job(4));
        assert_eq!(q.next_due_ms(), Some(10));
        let due: Vec<u64> = q.take_due(20).iter().map(|j| j.message).collect();
        assert_eq!(due, vec![1, 4, 2]);
        assert_eq!(q.scheduled_len(), 1);
        assert!(q.take_due(29).is_empty());
        assert_eq!(q.take_due(30)[0].message, 3);
    }

    #[test]
    fn ready_queues_are_per_destination() {
        let mut q = Queue::default();
        let d: Target = Some(Dest {
            hop: Hop::Route(crate::route::Destination {
                addr: "127.0.0.1:25".parse().expect("addr"),
                host: "127.0.0.1".into(),
                tls: Default::default(),
            }),
            pool: 0,
        });
        q.push_ready(Job {
            message: 1,
            rcpts: vec![0],
            target: d.clone(),
        });
        q.push_ready(job(2));
        assert_eq!(q.ready_len(), 2);
        assert_eq!(q.pop_ready(&d).map(|j| j.message), Some(1));
        assert_eq!(q.pop_ready(&d), None);
        assert_eq!(q.drain_ready(&None).len(), 1);
    }
}
