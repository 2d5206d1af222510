//! Recovery into the queue: the spool replays its records and the queue rebuilds its messages
//! from them as they come, reading each envelope in place (no owned copy of a million
//! envelopes on the way). Recipients' states follow the outcome records; a message whose
//! recipients are all final leaves at once. The campaign is a header of the spooled body, not
//! a field of the record: the caller reads it from the body (under the configured header name)
//! and hands it in.

use super::{Facts, Queue, Slot, Status, RCPTS_PER_MESSAGE_MAX, SLOT_BITS, SLOT_MASK};
use crate::envelope::{ArchivedBody, ArchivedNotify, Body, ReceptionId};
use crate::spool::engine::TOMBSTONE_RCPT;
use crate::spool::record::{MessageView, Outcome, OutcomeKind};
use crate::spool::Location;

impl Queue {
    /// A message record seen by recovery at `loc`: a new message (every recipient fresh), or a
    /// copy compaction made of one already known (it moves; its states stay, and the segment
    /// it moved from is returned). `campaign`: what the body's campaign header says.
    pub fn replay_message(
        &mut self,
        id: u64,
        loc: Location,
        view: &MessageView<'_>,
        campaign: Option<&str>,
    ) -> Result<Option<u64>, String> {
        if let Some(m) = self.get(id) {
            let from = m.loc().seq;
            self.relocate(id, loc);
            return Ok(Some(from));
        }
        if let Some(from) = self.superseded.get_mut(&id) {
            // A copy of a message already superseded: it is final; only where it is matters.
            let before = *from;
            *from = loc.seq;
            return Ok(Some(before));
        }
        let slot = (id & SLOT_MASK) as usize;
        if id >> SLOT_BITS == 0 {
            return Err(format!("message id {id:#x} is not one this queue assigns"));
        }
        if view.rcpt_count() == 0 || view.rcpt_count() > RCPTS_PER_MESSAGE_MAX {
            return Err(format!(
                "message {id:#x} has {} recipients",
                view.rcpt_count()
            ));
        }
        let message = match view {
            MessageView::V4 {
                envelope,
                notices,
                priority,
                ..
            } => {
                let rcpts: Vec<&str> = envelope.rcpts.iter().map(|r| r.address.as_str()).collect();
                let facts = Facts {
                    reception: ReceptionId {
                        ms: envelope.reception.ms.to_native(),
                        shard: envelope.reception.shard.to_native(),
                        n: envelope.reception.n.to_native(),
                    },
                    sender: envelope.sender.as_str(),
                    rcpts: &rcpts,
                    success_notices: envelope
                        .rcpts
                        .iter()
                        .any(|r| matches!(r.notify, ArchivedNotify::On { success: true, .. })),
                    notices: *notices,
                    tenant: envelope.tenant.as_ref().map(|t| t.as_str()),
                    priority: *priority,
                    campaign,
                    smtputf8: envelope.smtputf8,
                    body: match envelope.body {
                        ArchivedBody::SevenBit => Body::SevenBit,
                        ArchivedBody::EightBitMime => Body::EightBitMime,
                        ArchivedBody::BinaryMime => Body::BinaryMime,
                    },
                    size: envelope.size.to_native(),
                };
                self.build_parts(id, loc, &facts)
            }
            MessageView::V3(_) => {
                let mut envelope = view.envelope().map_err(|e| format!("envelope: {e}"))?;
                envelope.campaign = campaign.map(str::to_owned);
                self.build(id, &envelope, loc)
            }
        };
        self.slots.grow_to(slot + 1, || Slot::Vacant { gen: 0 });
        if let Some(entry) = self.slots.get_mut(slot) {
            match entry {
                // Of the messages sharing a slot only the newest can be pending (see `ids`):
                // an older one still here lost its final outcome; the newer takes its place.
                Slot::Occupied(older) if older.id < id => {
                    self.superseded.insert(older.id, older.loc().seq);
                    self.campaigns.release(older.campaign);
                    *entry = Slot::Occupied(message);
                }
                // An older record after a newer one: it is final for the same reason.
                Slot::Occupied(_) => {
                    self.superseded.insert(id, loc.seq);
                    self.campaigns.release(message.campaign);
                }
                _ => {
                    *entry = Slot::Occupied(message);
                    self.occupied += 1;
                }
            }
        }
        Ok(None)
    }

    /// An outcome record seen by recovery. Returns the segment of the message it is about
    /// (None: not known, its record is gone because it was final).
    pub fn replay_outcome(&mut self, o: &Outcome) -> Option<u64> {
        let Some(m) = self.get_mut(o.message) else {
            // Superseded, but its record is still on disk: the outcome (a tombstone, most
            // likely) must not go before that record does, or the message would come back
            // once the newer one of its slot is gone.
            return self.superseded.get(&o.message).copied();
        };
        let seq = m.loc().seq;
        let kind = o.kind?;
        let all_final = if o.rcpt == TOMBSTONE_RCPT {
            let n = m.rcpt_count() as u16;
            let mut last = false;
            for r in 0..n {
                last = m.finish(r, kind);
            }
            last
        } else {
            let r = o.rcpt.min(u32::from(u16::MAX)) as u16;
            match kind {
                OutcomeKind::Deferred | OutcomeKind::Delayed => {
                    if let Some(state) = m.rcpts.as_mut_slice().get_mut(usize::from(r)) {
                        if state.status == Status::Pending {
                            state.attempts = o.attempts.min(u32::from(u16::MAX)) as u16;
                            // The last record wins, and every record after a delay notice
                            // says `Delayed` (see `core::finish`).
                            state.delay_notified = kind == OutcomeKind::Delayed;
                        }
                    }
                    if o.next_attempt_ms > 0 {
                        m.set_due(r, o.next_attempt_ms);
                    } else {
                        m.set_due(r, 0);
                    }
                    false
                }
                kind => m.finish(r, kind),
            }
        };
        if all_final {
            self.remove(o.message);
        }
        Some(seq)
    }

    /// Messages recovery found pending whose slot a newer message took (final, see `ids`).
    pub fn superseded(&self) -> usize {
        self.superseded.len()
    }

    /// Every queued message's location (after replay: the pending ones).
    pub fn for_each_location(&self, f: &mut dyn FnMut(Location)) {
        for slot in self.slots.iter() {
            if let Slot::Occupied(m) = slot {
                f(m.loc());
            }
        }
    }

    /// Every pending recipient after replay, with its due time (0: now), for the core to
    /// dispatch or schedule.
    pub fn pending_rcpts(&self) -> Vec<(u64, u16, u64)> {
        let mut out = Vec::with_capacity(self.occupied);
        for slot in self.slots.iter() {
            let Slot::Occupied(m) = slot else { continue };
            for (i, r) in m.rcpts.as_slice().iter().enumerate() {
                if r.status == Status::Pending {
                    let due = match r.due_rel_ms {
                        0 => 0,
                        rel => m.received_ms() + u64::from(rel),
                    };
                    out.push((m.id, i as u16, due));
                }
            }
        }
        out
    }
}
