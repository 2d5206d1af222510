//! The reception stage: an SMTP transaction (or a notice) becomes an envelope and a body, split
//! by the shards that own its recipients, spooled there, and acknowledged once every part is
//! durable.
//!
//! - Each recipient goes to the shard that owns it: the owner of its domain
//!   (`shards::shard_of`), or, for a domain configured with `[[domain]] shards = N`, one of N
//!   shards from that owner on, picked by a hash of the recipient (so a domain that carries a
//!   third of the traffic does not pin one core). Within a shard's part every recipient keeps
//!   its DSN parameters.
//! - The part this shard owns is spooled here; the others go to their shards over the mesh and
//!   are answered when durable there. The body is shared, never copied per shard: the record
//!   encoder copies it once, into each shard's batch.
//! - The reply follows the cause: a full queue or disk is `452 4.3.1` (try later), a spool
//!   I/O error `451 4.3.0`, shutting down `421 4.3.2`, a peer shard's channel full
//!   `451 4.3.0` (the part comes back to us, it is never dropped).
//!
//! Parts already durable on other shards when one part fails stay queued: the client will
//! retry after our 4xx and the recipients may get the message twice, which SMTP allows; losing
//! it is not.

pub mod inject;
pub mod listener;
mod reports;
mod session;
pub mod signing;

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;

use crate::clock::Clock;
use crate::core::CoreCell;
use crate::envelope::{Envelope, ReceptionId};
use crate::settings::Settings;
use crate::smtp::reply::Reply;
use crate::spool::{Spool, SpoolError};

pub use listener::{accept_loop, listen, Listener};

/// A message body as received: the headers we add (Received, and for submissions Date and
/// Message-ID), then the message as the client sent it. Shared, read-only, by every shard that
/// spools a part.
#[derive(Debug, Default)]
pub struct BodyParts {
    pub head: String,
    pub body: Vec<u8>,
}

impl BodyParts {
    pub fn len(&self) -> usize {
        self.head.len() + self.body.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Where a message comes from, for the queue limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Intake {
    /// A client's message: refused with `452 4.3.1` when the queue is full.
    Client,
    /// Our own delivery status notification: taken past the limit (see
    /// `Queue::reserve_notice`).
    Notice,
}

/// One shard's part of a message, handed to it over the mesh.
#[derive(Debug)]
pub struct Submission {
    pub envelope: Envelope,
    pub body: Arc<BodyParts>,
    /// TLS version and cipher of the client's session, for the log.
    pub tls: Option<String>,
    pub intake: Intake,
    /// Recipients of this part (indices into its envelope's) bounced at acceptance: a
    /// tenant's suppression list names them.
    pub refused: Vec<u16>,
}

/// Why a message (or one part of it) was not taken.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AcceptError {
    #[error("queue full on shard {0}")]
    QueueFull(usize),
    #[error("{0}")]
    NoSpace(String),
    #[error("{0}")]
    Io(String),
    #[error("shutting down")]
    ShuttingDown,
    #[error("shard {0} is busy")]
    PeerBusy(usize),
    #[error("shard {0} did not answer")]
    PeerGone(usize),
}

impl AcceptError {
    /// The SMTP reply for this cause.
    pub fn reply(&self) -> Reply {
        match self {
            AcceptError::QueueFull(_) => Reply::new(
                452,
                Some((4, 3, 1)),
                "Queue full, try again later".to_owned(),
            ),
            AcceptError::NoSpace(_) => Reply::new(
                452,
                Some((4, 3, 1)),
                "Insufficient system storage, try again later".to_owned(),
            ),
            AcceptError::ShuttingDown => Reply::new(
                421,
                Some((4, 3, 2)),
                "Shutting down, try again later".to_owned(),
            ),
            AcceptError::Io(why) => {
                Reply::new(451, Some((4, 3, 0)), format!("Message not queued: {why}"))
            }
            AcceptError::PeerBusy(_) | AcceptError::PeerGone(_) => Reply::new(
                451,
                Some((4, 3, 0)),
                format!("Message not queued: {self}, try again later"),
            ),
        }
    }

    /// Of several parts' errors, the one the client is told: the most telling (a full queue
    /// or disk over an I/O error over a busy peer).
    fn rank(&self) -> u8 {
        match self {
            AcceptError::ShuttingDown => 5,
            AcceptError::QueueFull(_) | AcceptError::NoSpace(_) => 4,
            AcceptError::Io(_) => 3,
            AcceptError::PeerBusy(_) | AcceptError::PeerGone(_) => 2,
        }
    }
}

impl From<SpoolError> for AcceptError {
    fn from(e: SpoolError) -> AcceptError {
        match e {
            SpoolError::NoSpace(why) => AcceptError::NoSpace(why),
            SpoolError::Closed => AcceptError::ShuttingDown,
            other => AcceptError::Io(other.to_string()),
        }
    }
}

/// A future on this shard.
pub type LocalFuture<'a, T> = Pin<Box<dyn Future<Output = T> + 'a>>;

/// What reception needs of the other shards (the shard driver implements it over the mesh).
pub trait Peers {
    /// Spool `sub` on shard `to` and answer when it is durable (or why not).
    fn submit(&self, to: usize, sub: Submission) -> LocalFuture<'_, Result<(), AcceptError>>;
    /// Count a connection from `ip` at its owner: false when over a limit.
    fn client_connect(
        &self,
        ip: std::net::IpAddr,
        limits: crate::clients::IpLimits,
    ) -> LocalFuture<'_, bool>;
    /// That connection closed (never lost: retried until the owner has it).
    fn client_disconnect(&self, ip: std::net::IpAddr, listener: u16);
    /// May `ip` try AUTH now?
    fn auth_allowed(&self, ip: std::net::IpAddr) -> LocalFuture<'_, bool>;
    /// An AUTH attempt from `ip` succeeded or failed.
    fn auth_result(&self, ip: std::net::IpAddr, ok: bool);
}

/// Counts inbound sessions, so shutdown can wait for them.
#[derive(Default)]
pub struct Sessions {
    open: Cell<usize>,
    changed: shards::Notify,
}

impl Sessions {
    pub fn open(&self) -> usize {
        self.open.get()
    }

    fn started(&self) {
        self.open.set(self.open.get() + 1);
    }

    fn ended(&self) {
        self.open.set(self.open.get().saturating_sub(1));
        self.changed.notify_all();
    }

    /// Until no session is open.
    pub async fn drained(&self) {
        while self.open.get() > 0 {
            self.changed.notified().await;
        }
    }
}

pub struct Reception {
    shard: usize,
    shards: usize,
    settings: Rc<crate::settings::Live>,
    spool: Rc<Spool>,
    core: Rc<CoreCell>,
    peers: Rc<dyn Peers>,
    pub clock: Rc<dyn Clock>,
    /// The millisecond of the last reception id, and the next counter within it.
    last_ms: Cell<u64>,
    next_n: Cell<u64>,
    /// Hot domains spread over several shards: lower-case name → shards.
    spread: HashMap<String, usize>,
    pub sessions: Sessions,
    pub stop: Rc<shards::LocalStop>,
    /// The suppression list, when `suppression.enabled`.
    pub suppression: Option<Rc<crate::suppression::Suppression>>,
    /// Where reception's own events go (reports, suppressed recipients): the event log.
    pub observers: crate::events::Observers,
    /// This shard's metrics: replies sent and the time to `250`.
    pub metrics: Rc<crate::metrics::Recorder>,
}

impl Reception {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        shard: usize,
        shards: usize,
        settings: Rc<crate::settings::Live>,
        spool: Rc<Spool>,
        core: Rc<CoreCell>,
        peers: Rc<dyn Peers>,
        clock: Rc<dyn Clock>,
        stop: Rc<shards::LocalStop>,
        suppression: Option<Rc<crate::suppression::Suppression>>,
        observers: crate::events::Observers,
        metrics: Rc<crate::metrics::Recorder>,
    ) -> Reception {
        let spread = settings
            .get()
            .config
            .domain
            .iter()
            .filter(|d| d.shards > 1)
            .map(|d| (d.name.trim().to_ascii_lowercase(), d.shards.min(shards)))
            .collect();
        Reception {
            shard,
            shards: shards.max(1),
            settings,
            spool,
            core,
            peers,
            clock,
            last_ms: Cell::new(0),
            next_n: Cell::new(0),
            spread,
            sessions: Sessions::default(),
            stop,
            suppression,
            observers,
            metrics,
        }
    }

    pub fn shard(&self) -> usize {
        self.shard
    }

    /// The settings in force now (a reload swaps them; a session keeps what it started with).
    pub fn settings(&self) -> Rc<Settings> {
        self.settings.get()
    }

    pub fn peers(&self) -> &Rc<dyn Peers> {
        &self.peers
    }

    /// A new reception id, received now: unique per shard by (millisecond, counter within it),
    /// so the counter stays small (the queue keeps it in 24 bits). A clock that steps back keeps
    /// counting in the last millisecond seen.
    pub fn next_id(&self, now_ms: u64) -> ReceptionId {
        let mut ms = now_ms.max(self.last_ms.get());
        let mut n = if ms == self.last_ms.get() {
            self.next_n.get()
        } else {
            0
        };
        if n > crate::queue::RECEPTION_N_MAX {
            ms += 1;
            n = 0;
        }
        self.last_ms.set(ms);
        self.next_n.set(n + 1);
        ReceptionId {
            ms,
            shard: self.shard as u16,
            n,
        }
    }

    /// The shard that owns recipient `address`. No I/O; allocates only for spread domains.
    pub fn shard_for(&self, address: &str) -> usize {
        shard_for(address, self.shards, &self.spread)
    }

    /// Spool a message on the shards that own its recipients; Ok once every part is durable.
    pub async fn accept(
        &self,
        envelope: Envelope,
        body: BodyParts,
        tls: Option<String>,
        intake: Intake,
    ) -> Result<(), AcceptError> {
        self.accept_refusing(envelope, body, tls, intake, &[]).await
    }

    /// [`Reception::accept`], with recipients `refused` (indices into the envelope's)
    /// bounced at acceptance with the suppression reply: spooled with the message, so the
    /// sender's notice follows the usual path, never delivered.
    pub async fn accept_refusing(
        &self,
        envelope: Envelope,
        body: BodyParts,
        tls: Option<String>,
        intake: Intake,
        refused: &[usize],
    ) -> Result<(), AcceptError> {
        let mut parts: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for (i, r) in envelope.rcpts.iter().enumerate() {
            parts.entry(self.shard_for(&r.address)).or_default().push(i);
        }
        // The common case, one part owned by this shard: nothing shared, nothing copied.
        if parts.len() == 1 && parts.contains_key(&self.shard) {
            let refused: Vec<u16> = refused.iter().map(|&r| r as u16).collect();
            return self
                .spool_part(envelope, &body, tls.as_deref(), intake, &refused)
                .await;
        }
        let body = Arc::new(body);
        let mut pending = Vec::with_capacity(parts.len());
        for (shard, rcpts) in parts {
            // The part's own indices of the refused recipients.
            let part_refused: Vec<u16> = rcpts
                .iter()
                .enumerate()
                .filter(|(_, r)| refused.contains(r))
                .map(|(i, _)| i as u16)
                .collect();
            let part = envelope.part(&rcpts);
            let body = body.clone();
            let tls = tls.clone();
            pending.push(async move {
                if shard == self.shard {
                    self.spool_part(part, &body, tls.as_deref(), intake, &part_refused)
                        .await
                } else {
                    let sub = Submission {
                        envelope: part,
                        body,
                        tls,
                        intake,
                        refused: part_refused,
                    };
                    self.peers.submit(shard, sub).await
                }
            });
        }
        let results = join_all(pending).await;
        let mut worst: Option<AcceptError> = None;
        for r in results {
            if let Err(e) = r {
                if worst.as_ref().is_none_or(|w| e.rank() > w.rank()) {
                    worst = Some(e);
                }
            }
        }
        match worst {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }

    /// Spool one part on this shard and queue it for delivery.
    pub async fn spool_part(
        &self,
        envelope: Envelope,
        body: &BodyParts,
        tls: Option<&str>,
        intake: Intake,
        refused: &[u16],
    ) -> Result<(), AcceptError> {
        let id = self
            .core
            .with(|c| match intake {
                Intake::Client => c.reserve(),
                Intake::Notice => c.reserve_notice(),
            })
            .map_err(|_| AcceptError::QueueFull(self.shard))?;
        let mut envelope = envelope;
        envelope.size = body.len() as u64;
        let parts: [&[u8]; 2] = [body.head.as_bytes(), &body.body];
        match self.spool.append_message(id, &envelope, &parts).await {
            Ok(loc) => {
                let now = self.clock.now_ms();
                let settings = self.settings();
                let reply = settings.suppression_reply.as_ref();
                self.core
                    .with(|c| c.accepted_refusing(id, &envelope, loc, tls, refused, reply, now));
                Ok(())
            }
            Err(e) => {
                self.core.with(|c| c.cancel(id));
                Err(e.into())
            }
        }
    }
}

/// Tags `envelope` with the tenant, priority class and campaign its message's headers name
/// (one pass over `body`'s header block; a class not named, or named wrongly, is `priority`)
/// and the `notices` its way in allows. Every way in (SMTP, HTTP) tags the same way.
pub fn tag(
    envelope: &mut Envelope,
    settings: &Settings,
    body: &[u8],
    priority: crate::envelope::Priority,
    notices: crate::envelope::NoticeSwitches,
) {
    let tags = settings.egress.tags_of(body);
    envelope.tenant = tags.tenant;
    envelope.priority = tags.priority.unwrap_or(priority);
    envelope.campaign = tags.campaign;
    envelope.notices = notices;
}

/// The shard that owns recipient `address`, among `shards`, with `spread` domains split over
/// several shards by a hash of the (lower-cased) recipient. No I/O.
pub fn shard_for(address: &str, shards: usize, spread: &HashMap<String, usize>) -> usize {
    let domain = crate::envelope::domain_of(address);
    let owner = shards::shard_of(domain, shards);
    if spread.is_empty() {
        return owner;
    }
    let Some(&n) = spread.get(&domain.to_ascii_lowercase()) else {
        return owner;
    };
    let slice = shards::hash::domain_hash(address) % n as u64;
    (owner + slice as usize) % shards
}

/// Await every future, in order, concurrently.
async fn join_all<F: Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut futures: Vec<Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, slot) in futures.iter_mut().zip(out.iter_mut()) {
            if slot.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *slot = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().flatten().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_domains_split_by_recipient_and_others_stay_with_their_owner() {
        let mut spread = HashMap::new();
        spread.insert("gmail.com".to_owned(), 2);
        let owner = shards::shard_of("gmail.com", 4);
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..200 {
            let s = shard_for(&format!("user{i}@gmail.com"), 4, &spread);
            assert!(s == owner || s == (owner + 1) % 4, "{s}");
            seen.insert(s);
            // Stable: the same recipient always lands on the same shard.
            assert_eq!(s, shard_for(&format!("user{i}@gmail.com"), 4, &spread));
        }
        assert_eq!(seen.len(), 2, "both slices used");
        assert_eq!(
            shard_for("a@example.com", 4, &spread),
            shards::shard_of("example.com", 4)
        );
        assert_eq!(
            shard_for("a@GMAIL.com", 4, &spread),
            shard_for("a@GMAIL.com", 4, &spread)
        );
    }

    #[test]
    fn replies_follow_the_cause() {
        let code = |e: AcceptError| {
            let r = e.reply();
            (r.code, r.enhanced)
        };
        assert_eq!(code(AcceptError::QueueFull(0)), (452, Some((4, 3, 1))));
        assert_eq!(
            code(AcceptError::NoSpace("x".into())),
            (452, Some((4, 3, 1)))
        );
        assert_eq!(code(AcceptError::Io("x".into())), (451, Some((4, 3, 0))));
        assert_eq!(code(AcceptError::ShuttingDown), (421, Some((4, 3, 2))));
        assert_eq!(code(AcceptError::PeerBusy(1)), (451, Some((4, 3, 0))));
        assert_eq!(
            AcceptError::from(SpoolError::NoSpace("disk".into())),
            AcceptError::NoSpace("disk".into())
        );
        assert_eq!(
            AcceptError::from(SpoolError::Closed),
            AcceptError::ShuttingDown
        );
    }
}
