//! Ready lanes: the jobs waiting for one destination, in the order a connection should take
//! them when there are more than it can carry at once.
//!
//! - **Classes**: each priority class (transactional, normal, bulk) has its own jobs. A pop
//!   picks the class by smooth weighted round robin (nginx's) among the classes with work,
//!   weights `queue.priority_weights` (16:4:1 by default): with all three busy, 21 pops give
//!   16, 4 and 1 in an interleaved order, so bulk mail slows down behind transactional mail
//!   but never stops, and an idle class takes nothing from the others.
//! - **Tenants**: within a class, each tenant's jobs are a FIFO lane of its own (mail without a
//!   tenant is one more lane), and the lanes with work take turns: a tenant with a backlog of
//!   a million waits its turn like one with ten jobs, so it cannot hold the destination.
//! - **Skipping**: [`DestQueue::pop`] takes a predicate on the tenant; a lane whose tenant it
//!   refuses (a tenant over its rate, say) keeps its place in the turn order and is passed
//!   over, and a class with no allowed lane is left out of the round robin for that pop.
//!
//! Cost: a push is a hash lookup and two deque pushes; a pop is a choice among three classes
//! and a deque pop and push, plus one call of the predicate per lane it skips (never a walk
//! over jobs). A lane that empties is dropped, so memory follows the jobs waiting. No I/O.

use std::collections::{HashMap, VecDeque};

use super::Job;
use crate::envelope::Priority;

/// `queue.priority_weights` by default: transactional, normal, bulk. 16:4:1 lets a
/// password reset overtake a newsletter backlog at once while the backlog keeps a twentieth of
/// the destination's deliveries.
pub const PRIORITY_WEIGHTS_DEFAULT: [u32; 3] = [16, 4, 1];
/// Largest weight of a class: beyond 1000:1 a class is starved in all but name, and the round
/// robin's credits stay far from overflowing.
pub const PRIORITY_WEIGHT_MAX: u32 = 1000;

/// `queue.priority_weights` as the lanes take them (the config checks there are three, each 1
/// to [`PRIORITY_WEIGHT_MAX`]; a missing one is its default).
pub fn weights(list: &[u32]) -> [u32; 3] {
    std::array::from_fn(|i| list.get(i).copied().unwrap_or(PRIORITY_WEIGHTS_DEFAULT[i]))
}

/// The lane key of a tenant id (0: the lane of mail without a tenant).
fn tenant_of(key: u16) -> Option<u16> {
    (key != 0).then_some(key)
}

/// One class's jobs: a FIFO per tenant, and the lanes with work in turn order.
#[derive(Debug, Default)]
struct Class {
    lanes: HashMap<u16, VecDeque<Job>>,
    /// Every key of `lanes`, once, in turn order.
    turn: VecDeque<u16>,
    /// Smooth weighted round robin credit.
    credit: i64,
}

impl Class {
    fn push(&mut self, key: u16, job: Job) {
        let lane = self.lanes.entry(key).or_default();
        if lane.is_empty() {
            self.turn.push_back(key);
        }
        lane.push_back(job);
    }

    fn has_work(&self) -> bool {
        !self.turn.is_empty()
    }

    /// The first lane in turn whose tenant `allowed` takes (asked at most once per lane).
    fn allowed_lane(&self, allowed: &mut impl FnMut(Option<u16>) -> bool) -> Option<usize> {
        self.turn.iter().position(|&key| allowed(tenant_of(key)))
    }

    /// The next job of the lane at `pos` in the turn; the lane goes to the back of the turn
    /// (or away, when that was its last job).
    fn take(&mut self, pos: usize) -> Option<Job> {
        let key = self.turn.remove(pos)?;
        let lane = self.lanes.get_mut(&key)?;
        let job = lane.pop_front();
        if lane.is_empty() {
            self.lanes.remove(&key);
        } else {
            self.turn.push_back(key);
        }
        job
    }
}

/// The ready jobs of one destination (see the module doc).
#[derive(Debug, Default)]
pub struct DestQueue {
    classes: [Class; 3],
    jobs: usize,
    rcpts: usize,
}

impl DestQueue {
    /// Queue `job` of a message of class `priority` and tenant id `tenant` (0: none).
    pub fn push(&mut self, priority: Priority, tenant: u16, job: Job) {
        self.jobs += 1;
        self.rcpts += job.rcpts.len();
        if let Some(class) = self.classes.get_mut(priority.index()) {
            class.push(tenant, job);
        }
    }

    /// The next job by class weight and tenant turn, among the lanes whose tenant `allowed`
    /// takes (`None`: mail without a tenant). None when no allowed lane has work.
    pub fn pop(
        &mut self,
        weights: &[u32; 3],
        mut allowed: impl FnMut(Option<u16>) -> bool,
    ) -> Option<Job> {
        let mut candidates = self.classes.each_ref().map(Class::has_work);
        loop {
            let weight = |c: usize| i64::from(weights[c].max(1));
            let best = (0..3)
                .filter(|&c| candidates[c])
                // Ties go to the higher class (the lower index): `max_by_key` keeps the last.
                .rev()
                .max_by_key(|&c| self.classes[c].credit + weight(c))?;
            let Some(pos) = self.classes[best].allowed_lane(&mut allowed) else {
                candidates[best] = false;
                continue;
            };
            let total: i64 = (0..3).filter(|&c| candidates[c]).map(weight).sum();
            for c in (0..3).filter(|&c| candidates[c]) {
                self.classes[c].credit += weight(c);
            }
            self.classes[best].credit -= total;
            let job = self.classes[best].take(pos)?;
            self.jobs -= 1;
            self.rcpts -= job.rcpts.len();
            return Some(job);
        }
    }

    /// Jobs waiting.
    pub fn len(&self) -> usize {
        self.jobs
    }

    /// Whether class `priority` has jobs waiting.
    pub fn has_class(&self, priority: Priority) -> bool {
        self.classes
            .get(priority.index())
            .is_some_and(Class::has_work)
    }

    pub fn is_empty(&self) -> bool {
        self.jobs == 0
    }

    /// Recipients in the jobs waiting.
    pub fn rcpts(&self) -> usize {
        self.rcpts
    }

    /// Take out the jobs `keep` refuses (returned, class by class and lane by lane), leaving
    /// the others where they wait: lanes, turns and the classes' credits stay as they were.
    /// One pass over the jobs.
    pub fn retain(&mut self, mut keep: impl FnMut(&Job) -> bool) -> Vec<Job> {
        let mut removed = Vec::new();
        for class in &mut self.classes {
            let turns = class.turn.len();
            for _ in 0..turns {
                let Some(key) = class.turn.pop_front() else {
                    break;
                };
                let Some(lane) = class.lanes.get_mut(&key) else {
                    continue;
                };
                for job in std::mem::take(lane) {
                    match keep(&job) {
                        true => lane.push_back(job),
                        false => removed.push(job),
                    }
                }
                if lane.is_empty() {
                    class.lanes.remove(&key);
                } else {
                    class.turn.push_back(key);
                }
            }
        }
        self.jobs -= removed.len();
        self.rcpts -= removed.iter().map(|j| j.rcpts.len()).sum::<usize>();
        removed
    }

    /// Every job: class by class, lane by lane in turn order, each lane oldest first. Pushed
    /// back in this order, they make the same lanes in the same turns.
    pub fn into_jobs(self) -> Vec<Job> {
        let mut out = Vec::with_capacity(self.jobs);
        for mut class in self.classes {
            for key in class.turn {
                if let Some(lane) = class.lanes.remove(&key) {
                    out.extend(lane);
                }
            }
        }
        out
    }
}
