//! Reception and notices, as `reception::Reception` and `shard::perform::Driver::notice` do: a
//! message is split by the shards owning its recipients, each part reserved, appended and
//! acknowledged once durable; the client's 250 waits for every part. A notice is built from
//! the original record with `notices::compose` and spooled the same way, for the sender.

use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;

use epoxi::core::NoticeRequest;
use epoxi::envelope::{Body, Envelope, ReceptionId, Recipient};
use epoxi::spool::record::OutcomeKind;

use super::storage::ReadError;
use super::{Inbound, Local, NoticeJob, Part, World};
use crate::ledger::{rec_key, Entry, EntryKey, Violation};

impl World {
    fn next_reception(&mut self, shard: usize) -> ReceptionId {
        // One counter for the whole run (not per incarnation): a restart within the same
        // virtual millisecond must not reuse an id the ledger keys on.
        self.reception_n += 1;
        ReceptionId {
            ms: self.now,
            shard: shard as u16,
            n: self.reception_n,
        }
    }

    /// A client submits message `k` of the scenario.
    pub(super) fn inject(&mut self, k: usize) -> Result<(), Violation> {
        if !self.up {
            self.held.push(k);
            return Ok(());
        }
        self.injected += 1;
        let m = self.sc.messages[k].clone();
        let origin = m.origin % self.sc.shards;
        let reception = self.next_reception(origin);
        let body = Rc::new(make_body(k, m.body_len));
        let envelope = Envelope {
            reception,
            sender: m.sender.clone(),
            rcpts: m
                .rcpts
                .iter()
                .map(|(a, notify)| Recipient {
                    address: a.clone(),
                    notify: *notify,
                    orcpt: None,
                })
                .collect(),
            ret: m.ret,
            envid: None,
            tenant: None,
            smtputf8: false,
            body: Body::SevenBit,
            size: body.len() as u64,
            peer: "sim".into(),
            notices: m.notices,
            priority: m.priority,
            campaign: None,
        };
        let rk = rec_key(&reception);
        let mut keys = Vec::new();
        for (a, notify) in &m.rcpts {
            let key: EntryKey = (rk, a.clone());
            self.ledger.add(
                key.clone(),
                Entry {
                    received_ms: self.now,
                    sender_set: !m.sender.is_empty(),
                    notify: *notify,
                    acked_at: None,
                    is_notice: false,
                    terminal: Vec::new(),
                    delivered: 0,
                    notices: Vec::new(),
                    delays: Vec::new(),
                    switches: m.notices,
                    exempt: false,
                    durable_final: false,
                },
            );
            keys.push(key);
        }
        self.note(|| {
            format!(
                "s{origin} inject #{k} {rk:?} from <{}> to {:?}",
                m.sender,
                m.rcpts.iter().map(|(a, _)| a.as_str()).collect::<Vec<_>>()
            )
        });
        self.accept(origin, envelope, body, keys, None)
    }

    /// Spool a message on the shards that own its recipients, from shard `origin`.
    fn accept(
        &mut self,
        origin: usize,
        envelope: Envelope,
        body: Rc<Vec<u8>>,
        keys: Vec<EntryKey>,
        notice: Option<NoticeJob>,
    ) -> Result<(), Violation> {
        let spread = HashMap::new();
        let mut split: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for (i, r) in envelope.rcpts.iter().enumerate() {
            let shard = epoxi::reception::shard_for(&r.address, self.sc.shards, &spread);
            split.entry(shard).or_default().push(i);
        }
        let ib = self.next_inbound;
        self.next_inbound += 1;
        self.inbound.insert(
            ib,
            Inbound {
                origin,
                left: split.len(),
                error: None,
                keys,
                notice,
            },
        );
        for (shard, rcpts) in split {
            let mut part_env = envelope.part(&rcpts);
            part_env.size = body.len() as u64;
            let p = self.next_part;
            self.next_part += 1;
            self.parts.insert(
                p,
                Part {
                    inbound: ib,
                    shard,
                    envelope: part_env,
                    body: body.clone(),
                    id: None,
                },
            );
            if shard == origin {
                self.spool_part(p)?;
            } else {
                let delay = self.rng_net.range(0, 3);
                self.local(delay, Local::Submit(p));
            }
        }
        Ok(())
    }

    /// Spool one part on its shard: reserve an id, append, wait for the commit.
    pub(super) fn spool_part(&mut self, p: u64) -> Result<(), Violation> {
        let Some(shard) = self.parts.get(&p).map(|part| part.shard) else {
            return Ok(());
        };
        // Notices go past the queue limit, as `Reception::spool_part` takes them.
        let notice = self
            .parts
            .get(&p)
            .and_then(|part| self.inbound.get(&part.inbound))
            .is_some_and(|inb| inb.notice.is_some());
        let reserved = self.core_step(shard, |c, _| {
            if notice {
                c.reserve_notice()
            } else {
                c.reserve()
            }
        })?;
        match reserved {
            Some(Ok(id)) => {
                if let Some(part) = self.parts.get_mut(&p) {
                    part.id = Some(id);
                }
                self.append(p)
            }
            Some(Err(full)) => {
                self.stats.queue_full += 1;
                self.part_done(p, Err(full.to_string()))
            }
            None => Ok(()),
        }
    }

    /// Append a reserved part to its shard's open batch (or wait for room).
    pub(super) fn append(&mut self, p: u64) -> Result<(), Violation> {
        let Some(part) = self.parts.get(&p) else {
            return Ok(());
        };
        let (s, Some(id)) = (part.shard, part.id) else {
            return Ok(());
        };
        let Some(sh) = self.shards[s].as_mut() else {
            return Ok(());
        };
        if !sh.engine.has_room() {
            sh.room_wait.push_back(p);
            return Ok(());
        }
        let body: &[u8] = &part.body;
        match sh.engine.append_message(id, &part.envelope, &[body]) {
            Ok((no, offset, len)) => {
                sh.waiting.entry(no).or_default().push(super::Waiter {
                    part: p,
                    offset,
                    len,
                });
                self.schedule_commit(s);
                Ok(())
            }
            Err(e) => {
                self.core_step(s, |c, _| c.cancel(id))?;
                self.part_done(p, Err(e.to_string()))
            }
        }
    }

    /// A part is spooled (or not): tell the shard that received the message.
    pub(super) fn part_done(
        &mut self,
        p: u64,
        result: Result<(), String>,
    ) -> Result<(), Violation> {
        let Some(part) = self.parts.remove(&p) else {
            return Ok(());
        };
        if result.is_err() {
            self.stats.parts_failed += 1;
        }
        let Some(origin) = self.inbound.get(&part.inbound).map(|ib| ib.origin) else {
            return Ok(());
        };
        if part.shard == origin {
            self.inbound_result(part.inbound, result)
        } else {
            let delay = self.rng_net.range(0, 3);
            self.local(delay, Local::Answer(part.inbound, result));
            Ok(())
        }
    }

    /// One part's result reached the receiving shard; the last one decides the reply.
    pub(super) fn inbound_result(
        &mut self,
        ib: u64,
        result: Result<(), String>,
    ) -> Result<(), Violation> {
        let Some(inb) = self.inbound.get_mut(&ib) else {
            return Ok(());
        };
        inb.left -= 1;
        if let Err(e) = result {
            inb.error.get_or_insert(e);
        }
        if inb.left > 0 {
            return Ok(());
        }
        let Some(inb) = self.inbound.remove(&ib) else {
            return Ok(());
        };
        let now = self.now;
        let ok = inb.error.is_none();
        if ok {
            for key in &inb.keys {
                self.ledger.ack(key, now);
            }
        }
        self.note(|| format!("s{} reply for {:?}: {:?}", inb.origin, inb.keys, inb.error));
        let Some(job) = inb.notice else {
            return Ok(());
        };
        if ok {
            let crashed = self.crashed();
            for key in &job.covers {
                if job.delay {
                    self.ledger.delay_notice(key, now, crashed)?;
                } else {
                    self.ledger.notice(key, now, crashed)?;
                }
            }
            let notice = job.notice;
            self.core_step(inb.origin, |c, now| {
                c.notice_spooled(job.token, Some(notice), now)
            })?;
        } else {
            self.stats.notices_failed += 1;
            let why = inb.error.unwrap_or_default();
            self.core_step(inb.origin, |c, now| c.notice_failed(job.token, &why, now))?;
        }
        Ok(())
    }

    /// Build the notice of `request` from the original record and spool it for the sender.
    pub(super) fn notice(&mut self, s: usize, request: NoticeRequest) -> Result<(), Violation> {
        let token = request.token;
        // As the adapter: where the record is now (compaction may have moved it since).
        let loc = self.shards[s]
            .as_ref()
            .and_then(|sh| sh.core.live(request.id))
            .map_or(request.loc, |live| live.loc);
        let original = match self.read_message(s, loc) {
            Ok(original) => original,
            Err(ReadError::Missing) => {
                // The adapter records the failures anyway rather than retry forever: a notice
                // lost. The ledger's notice check says whether it mattered.
                self.stats.notice_read_failures += 1;
                self.note(|| {
                    format!(
                        "s{s} notice {token}: original {:#x} at {loc:?} is gone",
                        request.id
                    )
                });
                self.core_step(s, |c, now| c.notice_spooled(token, None, now))?;
                return Ok(());
            }
            Err(ReadError::Corrupt(e)) => {
                return Err(Violation::new(
                    "wrong-record",
                    format!(
                        "s{s}: notice {token} for {:#x} reads {loc:?}: {e}",
                        request.id
                    ),
                ));
            }
        };
        if original.id != request.id {
            return Err(Violation::new(
                "wrong-record",
                format!(
                    "s{s}: notice {token} for {:#x} read message {:#x} at {loc:?}",
                    request.id, original.id
                ),
            ));
        }
        let now = self.now;
        let notice_id = self.next_reception(s);
        let outcomes: Vec<epoxi::notices::Outcome<'_>> = request
            .rcpts
            .iter()
            .map(|r| epoxi::notices::Outcome {
                rcpt: r.rcpt,
                kind: r.kind,
                response: &r.response,
            })
            .collect();
        let composed = epoxi::notices::compose(
            &self.settings.hostname,
            &original.envelope,
            &original.body,
            &outcomes,
            notice_id,
            now,
            &epoxi::notices::Policy::of(&self.settings.config),
        );
        let Some((envelope, body)) = composed else {
            self.core_step(s, |c, now| c.notice_spooled(token, None, now))?;
            return Ok(());
        };
        // The recipients it reports on, as `compose` picks them (NOTIFY).
        let rk = rec_key(&original.envelope.reception);
        let policy = epoxi::notices::Policy::of(&self.settings.config);
        let delay = request.is_delay();
        let covers: Vec<EntryKey> = request
            .rcpts
            .iter()
            .filter_map(|r| {
                let rcpt = original.envelope.rcpts.get(usize::from(r.rcpt))?;
                let wanted = match r.kind {
                    OutcomeKind::Delivered => rcpt.notify.on_success(),
                    _ if delay => epoxi::notices::wants_delay(rcpt.notify, &policy),
                    _ => rcpt.notify.on_failure(),
                };
                wanted.then(|| (rk, rcpt.address.clone()))
            })
            .collect();
        let mut keys = Vec::new();
        for r in &envelope.rcpts {
            let key: EntryKey = (rec_key(&notice_id), r.address.clone());
            self.ledger.add(
                key.clone(),
                Entry {
                    received_ms: notice_id.ms,
                    sender_set: false,
                    notify: r.notify,
                    acked_at: None,
                    is_notice: true,
                    terminal: Vec::new(),
                    delivered: 0,
                    notices: Vec::new(),
                    delays: Vec::new(),
                    switches: envelope.notices,
                    exempt: false,
                    durable_final: false,
                },
            );
            keys.push(key);
        }
        self.note(|| {
            format!(
                "s{s} notice {token} about {:#x} covers {covers:?}",
                request.id
            )
        });
        self.accept(
            s,
            envelope,
            Rc::new(body),
            keys,
            Some(NoticeJob {
                token,
                notice: notice_id,
                covers,
                delay,
            }),
        )
    }
}

/// A small message: headers that name it, then lines of filler up to about `len` bytes.
fn make_body(k: usize, len: usize) -> Vec<u8> {
    let mut b =
        format!("From: <client@sim.test>\r\nSubject: simulated message {k}\r\nX-Sim: {k}\r\n\r\n")
            .into_bytes();
    let mut line = 0usize;
    while b.len() < len {
        b.extend_from_slice(format!("line {line} of message {k}: lorem ipsum\r\n").as_bytes());
        line += 1;
    }
    b
}
