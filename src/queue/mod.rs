//! The queue stage: every message of the shard not yet final, and what waits when.
//!
//! - **Messages** live in a slab. A message's id is its slot (low 24 bits) and the slot's
//!   generation (the bits above), so lookups by id are an index, and an id is never reused
//!   while a record with it may be on disk (the generation only grows; recovery starts it above
//!   every id it saw). Per message the queue keeps what delivery and the log need and nothing
//!   else, packed: one allocation for the sender and recipient addresses, eight bytes of state
//!   per recipient, the tenant and campaign as indices, the priority class. Bodies stay on
//!   disk.
//! - **Ready queues**, one per destination (site or route, and egress pool): [`Job`]s, each one
//!   message's recipients for one destination, delivered in one SMTP transaction. Within a
//!   destination, jobs wait in lanes (see [`lanes`]): per priority class, taken by weight, and
//!   within a class per tenant, taking turns, so neither a bulk backlog nor one tenant's
//!   backlog holds up the rest. Pushes and pops are O(1) (amortized), never a walk over jobs.
//! - **The schedule**: recipients waiting for their next attempt, by due time. Nothing scans
//!   it: the owner asks [`Queue::next_due_ms`] and sleeps until then.
//! - **The limit**: at most `messages_max` messages (queued or being spooled); beyond it
//!   [`Queue::reserve`] says no and reception answers `452 4.3.1`.
//!
//! No I/O here.

mod campaigns;
pub mod lanes;
mod pages;
mod replay;
pub mod retry;

use std::collections::HashMap;

use smallvec::SmallVec;

use crate::envelope::{Body, Envelope, Priority};
use crate::route::Hop;
use crate::spool::engine::{LiveMessage, RcptSnapshot};
use crate::spool::record::OutcomeKind;
use crate::spool::{Location, RcptState as RecoveredState, RecoveredMessage};

use crate::ids::SLOT_MASK;
pub use crate::ids::{slot_of, SLOT_BITS};
pub use campaigns::CAMPAIGNS_MAX;
pub use lanes::{DestQueue, PRIORITY_WEIGHTS_DEFAULT, PRIORITY_WEIGHT_MAX};
/// Most messages one shard's queue can hold: the slot space. `queue.messages_max` is checked
/// against it.
pub const MESSAGES_CEILING: usize = SLOT_MASK as usize;
/// Recipients of one message: the state of each is indexed by `u16`.
pub const RCPTS_PER_MESSAGE_MAX: usize = u16::MAX as usize;
/// Distinct tenant names a shard remembers; more are treated as no tenant (and logged once).
pub const TENANTS_MAX: usize = u16::MAX as usize - 1;
/// Retries are stored relative to reception in 32 bits of milliseconds: a message's life
/// (`queue.max_age_s`) must fit.
pub const AGE_MAX_MS: u64 = u32::MAX as u64;

/// Where a job goes and through which egress pool. Ready queues key on it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Dest {
    pub hop: Hop,
    pub pool: usize,
}

/// One message's recipients (indices into its envelope) for one transaction.
pub type JobRcpts = SmallVec<[u16; 4]>;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Job {
    pub id: u64,
    pub rcpts: JobRcpts,
}

/// What the queue keeps of an envelope, borrowed from an owned envelope or read in place from a
/// spooled one.
struct Facts<'a> {
    reception: crate::envelope::ReceptionId,
    sender: &'a str,
    rcpts: &'a [&'a str],
    success_notices: bool,
    notices: crate::envelope::NoticeSwitches,
    tenant: Option<&'a str>,
    priority: Priority,
    campaign: Option<&'a str>,
    smtputf8: bool,
    body: Body,
    size: u64,
}

/// What became of a recipient so far.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Status {
    Pending = 0,
    Delivered = 1,
    Bounced = 2,
    Expired = 3,
    /// Bounced or expired, its notice not spooled yet: no more attempts, but on disk (and to
    /// compaction) still what it was before.
    FinishingBounce = 4,
    FinishingExpiry = 5,
}

/// One recipient's state, eight bytes.
#[derive(Clone, Copy, Debug)]
struct Rcpt {
    attempts: u16,
    status: Status,
    /// Its delay notice was asked for (and, once spooled, recorded as `OutcomeKind::Delayed`):
    /// never a second one.
    delay_notified: bool,
    /// Next attempt, in ms after reception (0: none scheduled / at once).
    due_rel_ms: u32,
}

const _: () = assert!(
    std::mem::size_of::<Rcpt>() == 8,
    "a recipient's state is 8 bytes"
);

impl Rcpt {
    const FRESH: Rcpt = Rcpt {
        attempts: 0,
        status: Status::Pending,
        delay_notified: false,
        due_rel_ms: 0,
    };
}

#[derive(Debug)]
enum Rcpts {
    One(Rcpt),
    Many(Box<[Rcpt]>),
}

impl Rcpts {
    fn new(n: usize) -> Rcpts {
        match n {
            1 => Rcpts::One(Rcpt::FRESH),
            n => Rcpts::Many(vec![Rcpt::FRESH; n].into_boxed_slice()),
        }
    }

    fn as_slice(&self) -> &[Rcpt] {
        match self {
            Rcpts::One(r) => std::slice::from_ref(r),
            Rcpts::Many(rs) => rs,
        }
    }

    fn as_mut_slice(&mut self) -> &mut [Rcpt] {
        match self {
            Rcpts::One(r) => std::slice::from_mut(r),
            Rcpts::Many(rs) => rs,
        }
    }
}

/// A queued message: what delivery, routing and the log need of it, packed into 80 bytes plus
/// one allocation for the addresses (see `a_single_recipient_message_is_compact`).
#[derive(Debug)]
pub struct Message {
    pub id: u64,
    /// The record's segment; the spool never numbers one past `u32::MAX` (see
    /// `spool::SEGMENT_SEQ_MAX`).
    seq: u32,
    offset: u32,
    len: u32,
    /// `received_ms << 16 | reception shard`.
    received: u64,
    /// `reception n << 40 | remaining << 24 | tenant << 8 | flags` (see [`Word`]).
    word: u64,
    size: u32,
    /// The campaign's index in the queue's table (0: none).
    campaign: u16,
    priority: Priority,
    /// `sender \n rcpt0 \n rcpt1 ...`: one allocation (addresses cannot hold a line feed).
    addrs: Box<str>,
    rcpts: Rcpts,
}

/// The fields packed into [`Message::word`].
struct Word;

impl Word {
    const FLAG_SMTPUTF8: u64 = 1 << 2;
    const FLAG_SUCCESS_NOTICES: u64 = 1 << 3;
    /// Bits 4 to 7: the listener's notice switches (`NoticeSwitches::to_byte`'s low nibble).
    const NOTICES_SHIFT: u32 = 4;

    fn pack(n: u64, remaining: u16, tenant: u16, body: Body, smtputf8: bool, success: bool) -> u64 {
        let body = match body {
            Body::SevenBit => 0,
            Body::EightBitMime => 1,
            Body::BinaryMime => 2,
        };
        (n.min(RECEPTION_N_MAX) << 40)
            | u64::from(remaining) << 24
            | u64::from(tenant) << 8
            | body
            | if smtputf8 { Word::FLAG_SMTPUTF8 } else { 0 }
            | if success {
                Word::FLAG_SUCCESS_NOTICES
            } else {
                0
            }
    }
}

/// A reception id's counter (per shard and millisecond) kept in 24 bits.
pub const RECEPTION_N_MAX: u64 = (1 << 24) - 1;

impl Message {
    pub fn loc(&self) -> Location {
        Location {
            seq: u64::from(self.seq),
            offset: u64::from(self.offset),
            len: self.len,
        }
    }

    pub fn reception(&self) -> crate::envelope::ReceptionId {
        crate::envelope::ReceptionId {
            ms: self.received_ms(),
            shard: (self.received & 0xffff) as u16,
            n: self.word >> 40,
        }
    }

    /// Unix time of reception, in ms (the message's age counts from here).
    pub fn received_ms(&self) -> u64 {
        self.received >> 16
    }

    pub fn size(&self) -> u64 {
        u64::from(self.size)
    }

    pub fn body(&self) -> Body {
        match self.word & 3 {
            1 => Body::EightBitMime,
            2 => Body::BinaryMime,
            _ => Body::SevenBit,
        }
    }

    pub fn smtputf8(&self) -> bool {
        self.word & Word::FLAG_SMTPUTF8 != 0
    }

    /// Some recipient asked for a notice of successful delivery (DSN NOTIFY=SUCCESS).
    pub fn success_notices(&self) -> bool {
        self.word & Word::FLAG_SUCCESS_NOTICES != 0
    }

    /// The notices its listener allowed.
    pub fn notice_switches(&self) -> crate::envelope::NoticeSwitches {
        let nibble = (self.word >> Word::NOTICES_SHIFT) & 0xf;
        crate::envelope::NoticeSwitches::from_byte(0x80 | nibble as u8)
    }

    /// Whether recipient `i`'s delay notice was asked for already.
    pub fn delay_notified(&self, i: u16) -> bool {
        self.rcpts
            .as_slice()
            .get(usize::from(i))
            .is_some_and(|r| r.delay_notified)
    }

    /// Recipient `i` gets its delay notice now: never another.
    pub fn set_delay_notified(&mut self, i: u16) {
        if let Some(r) = self.rcpts.as_mut_slice().get_mut(usize::from(i)) {
            r.delay_notified = true;
        }
    }

    /// The tenant's index in the queue's table (0: none; see [`Queue::tenant_name`]).
    pub fn tenant_id(&self) -> u16 {
        ((self.word >> 8) & 0xffff) as u16
    }

    /// The priority class: which ready lanes its jobs wait in.
    pub fn priority(&self) -> Priority {
        self.priority
    }

    fn remaining_count(&self) -> u16 {
        ((self.word >> 24) & 0xffff) as u16
    }

    fn set_remaining(&mut self, remaining: u16) {
        self.word = (self.word & !(0xffff << 24)) | u64::from(remaining) << 24;
    }

    pub fn sender(&self) -> &str {
        self.addrs.split('\n').next().unwrap_or("")
    }

    /// Recipient `i`'s address ("" if out of range).
    pub fn rcpt(&self, i: u16) -> &str {
        self.addrs.split('\n').nth(1 + usize::from(i)).unwrap_or("")
    }

    pub fn rcpt_count(&self) -> usize {
        self.rcpts.as_slice().len()
    }

    pub fn remaining(&self) -> usize {
        usize::from(self.remaining_count())
    }

    pub fn attempts(&self, i: u16) -> u32 {
        self.rcpts
            .as_slice()
            .get(usize::from(i))
            .map_or(0, |r| u32::from(r.attempts))
    }

    /// Whether recipient `i` takes no more attempts (final, or waiting for its notice).
    pub fn is_done(&self, i: u16) -> bool {
        self.rcpts
            .as_slice()
            .get(usize::from(i))
            .is_none_or(|r| r.status != Status::Pending)
    }

    /// Recipient `i` bounced or expired; its record waits for its notice (see
    /// [`Message::finish`], which follows once the notice is spooled).
    pub fn finishing(&mut self, i: u16, kind: OutcomeKind) {
        if let Some(r) = self.rcpts.as_mut_slice().get_mut(usize::from(i)) {
            if r.status == Status::Pending {
                r.status = match kind {
                    OutcomeKind::Bounced => Status::FinishingBounce,
                    _ => Status::FinishingExpiry,
                };
            }
        }
    }

    /// Count one more attempt of recipient `i`; returns the new count.
    pub fn attempted(&mut self, i: u16) -> u32 {
        match self.rcpts.as_mut_slice().get_mut(usize::from(i)) {
            Some(r) => {
                r.attempts = r.attempts.saturating_add(1);
                u32::from(r.attempts)
            }
            None => 0,
        }
    }

    /// Recipient `i` reached a final outcome. Returns whether the whole message is now final.
    pub fn finish(&mut self, i: u16, kind: OutcomeKind) -> bool {
        if let Some(r) = self.rcpts.as_mut_slice().get_mut(usize::from(i)) {
            if matches!(
                r.status,
                Status::Pending | Status::FinishingBounce | Status::FinishingExpiry
            ) {
                r.status = match kind {
                    OutcomeKind::Delivered => Status::Delivered,
                    OutcomeKind::Bounced => Status::Bounced,
                    // A deferral is not final; callers never pass it.
                    OutcomeKind::Expired | OutcomeKind::Deferred | OutcomeKind::Delayed => {
                        Status::Expired
                    }
                };
                self.set_remaining(self.remaining_count().saturating_sub(1));
            }
        }
        self.remaining_count() == 0
    }

    /// Recipient `i` is due again at `due_ms` (kept for compaction's restatement, and to tell
    /// the schedule's current entry from stale ones); 0: not scheduled. A due time is stored
    /// as at least 1 ms after reception, so 0 keeps its meaning.
    fn set_due(&mut self, i: u16, due_ms: u64) {
        let rel = match due_ms {
            0 => 0,
            due => Message::rel_of(due, self.received_ms()),
        };
        if let Some(r) = self.rcpts.as_mut_slice().get_mut(usize::from(i)) {
            r.due_rel_ms = rel;
        }
    }

    fn rel_of(due_ms: u64, received_ms: u64) -> u32 {
        due_ms.saturating_sub(received_ms).clamp(1, AGE_MAX_MS) as u32
    }

    /// Whether a schedule entry for recipient `i` due at `due_ms` is its current one.
    fn is_due_entry(&self, i: u16, due_ms: u64) -> bool {
        self.rcpts.as_slice().get(usize::from(i)).is_some_and(|r| {
            r.due_rel_ms != 0 && r.due_rel_ms == Message::rel_of(due_ms, self.received_ms())
        })
    }

    /// When recipient `i` is scheduled (None: ready, in flight, or final).
    pub fn due_ms(&self, i: u16) -> Option<u64> {
        let r = self.rcpts.as_slice().get(usize::from(i))?;
        (r.status == Status::Pending && r.due_rel_ms != 0)
            .then(|| self.received_ms() + u64::from(r.due_rel_ms))
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    /// What compaction restates about each recipient.
    fn snapshot(&self) -> Vec<RcptSnapshot> {
        self.rcpts
            .as_slice()
            .iter()
            .map(|r| match r.status {
                Status::Pending if r.attempts == 0 => RcptSnapshot::Fresh,
                Status::Pending => RcptSnapshot::Deferred {
                    attempts: u32::from(r.attempts),
                    next_attempt_ms: match r.due_rel_ms {
                        0 => 0,
                        rel => self.received_ms() + u64::from(rel),
                    },
                    delay_notified: r.delay_notified,
                },
                // On disk it is still as it was before the attempt that failed it.
                Status::FinishingBounce | Status::FinishingExpiry if r.attempts <= 1 => {
                    RcptSnapshot::Fresh
                }
                Status::FinishingBounce | Status::FinishingExpiry => RcptSnapshot::Deferred {
                    attempts: u32::from(r.attempts) - 1,
                    next_attempt_ms: 0,
                    delay_notified: r.delay_notified,
                },
                Status::Delivered => RcptSnapshot::Final(OutcomeKind::Delivered),
                Status::Bounced => RcptSnapshot::Final(OutcomeKind::Bounced),
                Status::Expired => RcptSnapshot::Final(OutcomeKind::Expired),
            })
            .collect()
    }
}

#[derive(Debug)]
enum Slot {
    /// Free; the next message here gets this generation.
    Vacant {
        gen: u64,
    },
    /// Taken by a message being spooled.
    Reserved {
        gen: u64,
    },
    Occupied(Message),
}

/// The queue is full: reception answers `452 4.3.1`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("queue full ({0} messages)")]
pub struct QueueFull(pub usize);

/// Why a recovered message could not be queued.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RestoreError {
    #[error("message id {0:#x} is not one this queue assigns")]
    BadId(u64),
    #[error("message id {0:#x} was recovered twice")]
    Duplicate(u64),
    #[error("message {0:#x} has {1} recipients, more than a message may have")]
    TooManyRcpts(u64, usize),
}

/// A schedule entry: due time and recipient packed in one word, and the message id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Due {
    /// `due_ms << 16 | rcpt`.
    at: u64,
    id: u64,
}

/// Due times are kept in 48 bits of milliseconds (until the year 10889).
const DUE_MS_MAX: u64 = (1 << 48) - 1;

pub struct Queue {
    slots: pages::Pages<Slot>,
    /// Vacant slots, most recently freed last (reused first: warm in cache).
    free: Vec<u32>,
    /// Generations start here for slots never used in this run (above every id on disk).
    gen_floor: u64,
    occupied: usize,
    reserved: usize,
    messages_max: usize,
    tenants: Vec<Box<str>>,
    tenant_ids: HashMap<Box<str>, u16>,
    campaigns: campaigns::Campaigns,
    dests: HashMap<Dest, DestQueue>,
    /// `queue.priority_weights`: transactional, normal, bulk.
    priority_weights: [u32; 3],
    schedule: pages::MinHeap<Due>,
    /// Recovered messages another message of their slot superseded (see `replay`), and the
    /// segment of each one's latest record: outcomes about them still depend on it.
    superseded: HashMap<u64, u64>,
}

impl Queue {
    /// An empty queue holding at most `messages_max` messages (capped at [`MESSAGES_CEILING`]).
    pub fn new(messages_max: usize) -> Queue {
        Queue {
            slots: pages::Pages::default(),
            free: Vec::new(),
            gen_floor: 1,
            occupied: 0,
            reserved: 0,
            messages_max: messages_max.min(MESSAGES_CEILING),
            tenants: Vec::new(),
            tenant_ids: HashMap::new(),
            campaigns: campaigns::Campaigns::default(),
            dests: HashMap::new(),
            priority_weights: PRIORITY_WEIGHTS_DEFAULT,
            schedule: pages::MinHeap::default(),
            superseded: HashMap::new(),
        }
    }

    /// Messages queued (not counting those being spooled).
    pub fn len(&self) -> usize {
        self.occupied
    }

    pub fn is_empty(&self) -> bool {
        self.occupied == 0
    }

    pub fn messages_max(&self) -> usize {
        self.messages_max
    }

    /// Whether another message fits.
    pub fn has_room(&self) -> bool {
        self.occupied + self.reserved < self.messages_max
    }

    /// Take an id for a message about to be spooled, or say the queue is full.
    pub fn reserve(&mut self) -> Result<u64, QueueFull> {
        if !self.has_room() {
            return Err(QueueFull(self.messages_max));
        }
        self.take_slot()
    }

    /// Take an id for a notice (a delivery status notification) about to be spooled. Notices
    /// may go past `messages_max`, up to twice it: each reports on a message already queued, so
    /// they are bounded by the queue itself, and refusing them at the limit would deadlock a
    /// full queue whose messages wait for their bounce notices to be spooled.
    pub fn reserve_notice(&mut self) -> Result<u64, QueueFull> {
        let ceiling = self.messages_max.saturating_mul(2).min(MESSAGES_CEILING);
        if self.occupied + self.reserved >= ceiling {
            return Err(QueueFull(ceiling));
        }
        self.take_slot()
    }

    fn take_slot(&mut self) -> Result<u64, QueueFull> {
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None => {
                self.slots.push(Slot::Vacant {
                    gen: self.gen_floor,
                });
                (self.slots.len() - 1) as u32
            }
        };
        let Some(entry) = self.slots.get_mut(slot as usize) else {
            return Err(QueueFull(self.messages_max));
        };
        let gen = match *entry {
            Slot::Vacant { gen } => gen,
            // The free list only holds vacant slots.
            _ => return Err(QueueFull(self.messages_max)),
        };
        *entry = Slot::Reserved { gen };
        self.reserved += 1;
        Ok(gen << SLOT_BITS | u64::from(slot))
    }

    /// The spool did not take the message: give its id back.
    pub fn cancel(&mut self, id: u64) {
        let slot = (id & SLOT_MASK) as usize;
        if let Some(entry @ Slot::Reserved { .. }) = self.slots.get_mut(slot) {
            if let Slot::Reserved { gen } = *entry {
                if gen == id >> SLOT_BITS {
                    *entry = Slot::Vacant {
                        gen: (gen + 1).max(self.gen_floor),
                    };
                    self.reserved -= 1;
                    self.free.push(slot as u32);
                }
            }
        }
    }

    /// Queue the message reserved as `id`, now durable at `loc`.
    pub fn insert(&mut self, id: u64, envelope: &Envelope, loc: Location) -> Option<&Message> {
        let slot = (id & SLOT_MASK) as usize;
        match self.slots.get(slot) {
            Some(Slot::Reserved { gen }) if *gen == id >> SLOT_BITS => {}
            _ => return None,
        }
        let message = self.build(id, envelope, loc);
        self.reserved -= 1;
        self.occupied += 1;
        let entry = self.slots.get_mut(slot)?;
        *entry = Slot::Occupied(message);
        match entry {
            Slot::Occupied(m) => Some(m),
            _ => None,
        }
    }

    fn build(&mut self, id: u64, envelope: &Envelope, loc: Location) -> Message {
        let rcpts: Vec<&str> = envelope.rcpts.iter().map(|r| r.address.as_str()).collect();
        self.build_parts(
            id,
            loc,
            &Facts {
                reception: envelope.reception,
                sender: &envelope.sender,
                rcpts: &rcpts,
                success_notices: envelope.rcpts.iter().any(|r| r.notify.on_success()),
                notices: envelope.notices,
                tenant: envelope.tenant.as_deref(),
                priority: envelope.priority,
                campaign: envelope.campaign.as_deref(),
                smtputf8: envelope.smtputf8,
                body: envelope.body,
                size: envelope.size,
            },
        )
    }

    fn build_parts(&mut self, id: u64, loc: Location, f: &Facts<'_>) -> Message {
        let mut addrs = String::with_capacity(
            f.sender.len() + f.rcpts.iter().map(|r| r.len() + 1).sum::<usize>(),
        );
        addrs.push_str(f.sender);
        for r in f.rcpts {
            addrs.push('\n');
            addrs.push_str(r);
        }
        let n = f.rcpts.len().clamp(1, RCPTS_PER_MESSAGE_MAX);
        let tenant = self.tenant_id(f.tenant);
        let campaign = self.campaigns.acquire(f.campaign);
        Message {
            id,
            seq: loc.seq as u32,
            offset: loc.offset as u32,
            len: loc.len,
            received: f.reception.ms << 16 | u64::from(f.reception.shard),
            word: Word::pack(
                f.reception.n,
                n as u16,
                tenant,
                f.body,
                f.smtputf8,
                f.success_notices,
            ) | u64::from(f.notices.to_byte() & 0xf) << Word::NOTICES_SHIFT,
            size: f.size.min(u64::from(u32::MAX)) as u32,
            campaign,
            priority: f.priority,
            addrs: addrs.into_boxed_str(),
            rcpts: Rcpts::new(n),
        }
    }

    fn tenant_id(&mut self, tenant: Option<&str>) -> u16 {
        let Some(name) = tenant else { return 0 };
        if let Some(&id) = self.tenant_ids.get(name) {
            return id;
        }
        if self.tenants.len() >= TENANTS_MAX {
            return 0;
        }
        self.tenants.push(name.into());
        let id = self.tenants.len() as u16;
        self.tenant_ids.insert(name.into(), id);
        id
    }

    /// The tenant of `message`, if it has one.
    pub fn tenant(&self, message: &Message) -> Option<&str> {
        self.tenant_name(message.tenant_id())
    }

    /// The name of tenant id `id` (`Message::tenant_id`, the ids `pop_ready_where` is asked
    /// about); None for 0 or an id not given out.
    pub fn tenant_name(&self, id: u16) -> Option<&str> {
        tenant_in(&self.tenants, id)
    }

    /// The id of tenant `name`, if a message of it was ever queued here (no interning).
    pub fn tenant_key(&self, name: &str) -> Option<u16> {
        self.tenant_ids.get(name).copied()
    }

    /// The campaign of `message`, if it has one.
    pub fn campaign(&self, message: &Message) -> Option<&str> {
        self.campaigns.name(message.campaign)
    }

    /// The tenant and campaign of `message`, by name.
    pub fn names(&self, message: &Message) -> Names<'_> {
        names_of(&self.tenants, &self.campaigns, message)
    }

    /// Campaigns of the messages queued now (at most [`CAMPAIGNS_MAX`]).
    pub fn campaigns_len(&self) -> usize {
        self.campaigns.len()
    }

    /// Queue a message recovery found, under its own id. Recipients already final stay so.
    pub fn restore(&mut self, msg: &RecoveredMessage) -> Result<&Message, RestoreError> {
        let slot = (msg.id & SLOT_MASK) as usize;
        let gen = msg.id >> SLOT_BITS;
        if gen == 0 {
            return Err(RestoreError::BadId(msg.id));
        }
        if msg.envelope.rcpts.len() > RCPTS_PER_MESSAGE_MAX || msg.envelope.rcpts.is_empty() {
            return Err(RestoreError::TooManyRcpts(msg.id, msg.envelope.rcpts.len()));
        }
        self.slots.grow_to(slot + 1, || Slot::Vacant { gen: 0 });
        if matches!(
            self.slots.get(slot),
            Some(Slot::Occupied(_) | Slot::Reserved { .. })
        ) {
            return Err(RestoreError::Duplicate(msg.id));
        }
        let mut message = self.build(msg.id, &msg.envelope, msg.loc);
        for (i, state) in msg.states.iter().enumerate() {
            let i = i as u16;
            match *state {
                RecoveredState::Pending {
                    attempts,
                    next_attempt_ms,
                    delay_notified,
                } => {
                    if let Some(r) = message.rcpts.as_mut_slice().get_mut(usize::from(i)) {
                        r.attempts = attempts.min(u32::from(u16::MAX)) as u16;
                        r.delay_notified = delay_notified;
                    }
                    if next_attempt_ms > 0 {
                        message.set_due(i, next_attempt_ms);
                    }
                }
                RecoveredState::Final(kind) => {
                    message.finish(i, kind);
                }
            }
        }
        self.occupied += 1;
        let Some(entry) = self.slots.get_mut(slot) else {
            return Err(RestoreError::BadId(msg.id));
        };
        *entry = Slot::Occupied(message);
        match entry {
            Slot::Occupied(m) => Ok(m),
            _ => Err(RestoreError::BadId(msg.id)),
        }
    }

    /// Recovery is done: every id seen on disk is at most `id_max`. Free slots start above its
    /// generation, so no new id can equal one still written somewhere.
    pub fn restored(&mut self, id_max: u64) {
        self.gen_floor = self.gen_floor.max((id_max >> SLOT_BITS) + 1);
        self.free.clear();
        let n = self.slots.len();
        for (back, entry) in self.slots.iter_mut().rev().enumerate() {
            let slot = n - 1 - back;
            if let Slot::Vacant { gen } = entry {
                *gen = (*gen).max(self.gen_floor);
                self.free.push(slot as u32);
            }
        }
    }

    pub fn get(&self, id: u64) -> Option<&Message> {
        message_in(&self.slots, id)
    }

    pub fn get_mut(&mut self, id: u64) -> Option<&mut Message> {
        match self.slots.get_mut((id & SLOT_MASK) as usize) {
            Some(Slot::Occupied(m)) if m.id == id => Some(m),
            _ => None,
        }
    }

    /// Drop a final message; returns its location for the spool.
    pub fn remove(&mut self, id: u64) -> Option<Location> {
        let slot = (id & SLOT_MASK) as usize;
        let entry = self.slots.get_mut(slot)?;
        let (loc, campaign) = match entry {
            Slot::Occupied(m) if m.id == id => (m.loc(), m.campaign),
            _ => return None,
        };
        *entry = Slot::Vacant {
            gen: ((id >> SLOT_BITS) + 1).max(self.gen_floor),
        };
        self.campaigns.release(campaign);
        self.occupied -= 1;
        self.free.push(slot as u32);
        Some(loc)
    }

    /// Compaction moved the record of `id` to `loc`.
    pub fn relocate(&mut self, id: u64, loc: Location) {
        if let Some(m) = self.get_mut(id) {
            m.seq = loc.seq as u32;
            m.offset = loc.offset as u32;
            m.len = loc.len;
        }
    }

    /// What compaction needs of a live message.
    pub fn live(&self, id: u64) -> Option<LiveMessage> {
        let m = self.get(id)?;
        Some(LiveMessage {
            loc: m.loc(),
            rcpts: m.snapshot(),
        })
    }

    /// Schedule recipient `rcpt` of `id` for `due_ms`.
    pub fn schedule(&mut self, id: u64, rcpt: u16, due_ms: u64) {
        if let Some(m) = self.get_mut(id) {
            m.set_due(rcpt, due_ms);
        }
        let at = due_ms.min(DUE_MS_MAX) << 16 | u64::from(rcpt);
        self.schedule.push(Due { at, id });
    }

    /// When the earliest scheduled recipient is due.
    pub fn next_due_ms(&self) -> Option<u64> {
        self.schedule.peek().map(|d| d.at >> 16)
    }

    /// Recipients due at `now_ms`, grouped per message (those of one message that share a due
    /// time come together), in due order. Entries of messages gone meanwhile are dropped.
    pub fn take_due(&mut self, now_ms: u64) -> Vec<Job> {
        let mut due: Vec<Job> = Vec::new();
        while let Some(d) = self.schedule.peek() {
            if d.at >> 16 > now_ms {
                break;
            }
            self.schedule.pop();
            let rcpt = (d.at & 0xffff) as u16;
            let Some(m) = self.get_mut(d.id) else {
                continue;
            };
            // Done, or rescheduled since (a flush, a resume, a hold): a stale entry.
            if m.is_done(rcpt) || !m.is_due_entry(rcpt, d.at >> 16) {
                continue;
            }
            m.set_due(rcpt, 0);
            match due.last_mut() {
                Some(last) if last.id == d.id => last.rcpts.push(rcpt),
                _ => due.push(Job {
                    id: d.id,
                    rcpts: smallvec::smallvec![rcpt],
                }),
            }
        }
        due
    }

    /// Every message, in slot order (operations: summaries, inspection, mass operations).
    pub fn messages(&self) -> impl Iterator<Item = &Message> {
        self.slots.iter().filter_map(|s| match s {
            Slot::Occupied(m) => Some(m),
            _ => None,
        })
    }

    /// Slots in the slab (a cursor over [`Queue::messages_from`] ends here).
    pub fn slots_len(&self) -> usize {
        self.slots.len()
    }

    /// Ids of messages in slots `from..from + n` that `keep` selects: a mass operation walks
    /// the queue a bounded step at a time.
    pub fn messages_from(
        &self,
        from: usize,
        n: usize,
        mut keep: impl FnMut(&Message) -> bool,
    ) -> Vec<u64> {
        (from..from.saturating_add(n).min(self.slots.len()))
            .filter_map(|i| match self.slots.get(i) {
                Some(Slot::Occupied(m)) if keep(m) => Some(m.id),
                _ => None,
            })
            .collect()
    }

    /// Recipients of message `id` that are scheduled (not ready, in flight or final).
    pub fn scheduled_rcpts(&self, id: u64) -> JobRcpts {
        let Some(m) = self.get(id) else {
            return JobRcpts::new();
        };
        (0..m.rcpt_count() as u16)
            .filter(|&r| m.due_ms(r).is_some())
            .collect()
    }

    pub fn scheduled_len(&self) -> usize {
        self.schedule.len()
    }

    /// `queue.priority_weights` (transactional, normal, bulk), for the pops from now on.
    pub fn set_priority_weights(&mut self, weights: [u32; 3]) {
        self.priority_weights = weights.map(|w| w.clamp(1, PRIORITY_WEIGHT_MAX));
    }

    /// Put a job on its destination's ready queue, in the lane of its message's class and
    /// tenant. O(1).
    pub fn push_ready(&mut self, dest: &Dest, job: Job) {
        let (priority, tenant) = self
            .get(job.id)
            .map_or((Priority::Normal, 0), |m| (m.priority(), m.tenant_id()));
        match self.dests.get_mut(dest) {
            Some(dq) => dq.push(priority, tenant, job),
            None => {
                let mut dq = DestQueue::default();
                dq.push(priority, tenant, job);
                self.dests.insert(dest.clone(), dq);
            }
        }
    }

    /// The next job for `dest`: its class by weight, then the next tenant of that class in
    /// turn (see [`lanes`]). O(1).
    pub fn pop_ready(&mut self, dest: &Dest) -> Option<Job> {
        self.pop_ready_where(dest, |_| true)
    }

    /// [`Queue::pop_ready`] among the lanes whose tenant `allowed` takes now (its tenant id,
    /// see [`Queue::tenant_key`]; None for mail without a tenant). Skipped lanes keep their
    /// turn. None when no allowed lane has work. Costs one call of `allowed` per lane skipped.
    pub fn pop_ready_where(
        &mut self,
        dest: &Dest,
        allowed: impl FnMut(Option<u16>) -> bool,
    ) -> Option<Job> {
        let dq = self.dests.get_mut(dest)?;
        let job = dq.pop(&self.priority_weights, allowed);
        if dq.is_empty() {
            // Destinations come and go (sites of every domain ever mailed): drop empty queues.
            self.dests.remove(dest);
        }
        job
    }

    /// Recipients in the jobs waiting for `dest`.
    pub fn ready_rcpts(&self, dest: &Dest) -> usize {
        self.dests.get(dest).map_or(0, DestQueue::rcpts)
    }

    /// Whether jobs of class `priority` wait for `dest`.
    pub fn ready_has_class(&self, dest: &Dest, priority: crate::envelope::Priority) -> bool {
        self.dests
            .get(dest)
            .is_some_and(|dq| dq.has_class(priority))
    }

    /// Jobs waiting for `dest`.
    pub fn ready_for(&self, dest: &Dest) -> usize {
        self.dests.get(dest).map_or(0, DestQueue::len)
    }

    /// Take out the ready jobs of `dest` that `keep` refuses (given the job and its message
    /// with its names, None when the message is gone) and return them; the others keep their
    /// lanes, turns and class credits, as a drain and push back would not. One pass over the
    /// destination's jobs.
    pub fn retain_ready(
        &mut self,
        dest: &Dest,
        mut keep: impl FnMut(&Job, Option<(&Message, Names<'_>)>) -> bool,
    ) -> Vec<Job> {
        let Queue {
            dests,
            slots,
            tenants,
            campaigns,
            ..
        } = self;
        let Some(dq) = dests.get_mut(dest) else {
            return Vec::new();
        };
        let removed = dq.retain(|job| {
            let queued = message_in(slots, job.id).map(|m| (m, names_of(tenants, campaigns, m)));
            keep(job, queued)
        });
        if dq.is_empty() {
            dests.remove(dest);
        }
        removed
    }

    /// Take every ready job of a destination (e.g. when it cannot be reached at all), class by
    /// class and lane by lane; pushed back in this order they wait as they did.
    pub fn drain_ready(&mut self, dest: &Dest) -> Vec<Job> {
        self.dests
            .remove(dest)
            .map(DestQueue::into_jobs)
            .unwrap_or_default()
    }

    /// Whether any job waits in a ready queue (empty queues are dropped: no scan).
    pub fn has_ready(&self) -> bool {
        !self.dests.is_empty()
    }

    pub fn ready_len(&self) -> usize {
        self.dests.values().map(DestQueue::len).sum()
    }

    /// Destinations with ready work.
    pub fn ready_dests(&self) -> impl Iterator<Item = &Dest> {
        self.dests.keys()
    }
}

/// A queued message's tenant and campaign, by name (see [`Queue::names`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Names<'a> {
    pub tenant: Option<&'a str>,
    pub campaign: Option<&'a str>,
}

fn message_in(slots: &pages::Pages<Slot>, id: u64) -> Option<&Message> {
    match slots.get((id & SLOT_MASK) as usize) {
        Some(Slot::Occupied(m)) if m.id == id => Some(m),
        _ => None,
    }
}

fn names_of<'a>(
    tenants: &'a [Box<str>],
    campaigns: &'a campaigns::Campaigns,
    m: &Message,
) -> Names<'a> {
    Names {
        tenant: tenant_in(tenants, m.tenant_id()),
        campaign: campaigns.name(m.campaign),
    }
}

fn tenant_in(tenants: &[Box<str>], id: u16) -> Option<&str> {
    let i = usize::from(id).checked_sub(1)?;
    tenants.get(i).map(|t| &**t)
}

#[cfg(test)]
mod tests;
