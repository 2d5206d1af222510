//! Reception's side of HTTP injection (`POST /api/inject/v1`): every message the request
//! generates (`inject::Generator`) is received as an authenticated SMTP submission is, and
//! spooled like one.
//!
//! - Per message, what a submission gets: the default suppression list (checked at RCPT for
//!   SMTP), `Received:` (`with HTTP` or `HTTPS`), `Date:` and `Message-ID:` when missing
//!   (RFC 6409), DKIM signatures on top, the tenant, class and campaign its headers name, the
//!   tenant's suppression list (after DATA for SMTP), then [`Reception::accept`].
//! - Bulk is streamed: the next message is generated only while fewer than
//!   [`IN_FLIGHT_MAX`] messages (and [`IN_FLIGHT_BYTES_MAX`] bytes) are being spooled. Each
//!   is spooled in a task of its own, so the spool's group commit takes many per fdatasync
//!   while the next ones are generated.
//! - The answer is given once every task has finished: a message counted a success is
//!   durable on its owner shard (accept returned Ok). A message that failed is counted with
//!   its reason; the others go on. Messages already durable stay queued whatever happens to
//!   the rest of the request (as reception's parts do, see the module above).

use std::cell::RefCell;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;

use glommio::sync::Semaphore;

use super::{AcceptError, BodyParts, Intake, Reception};
use crate::envelope::{Body, Envelope, Notify, ReceptionId, Recipient, Ret};
use crate::inject::{
    Generator, InjectV1Request, InjectV1Response, Limits, RecipientError, RequestError, Stamp,
};
use crate::smtp::received::{received_header, submission_headers};
use crate::smtp::reply::Reply;

/// Messages of one request being spooled at once. Group commit takes whatever is waiting at
/// each fdatasync, so 64 keeps a commit well filled (the spool's own batches are of that
/// order) while a request of 10,000 holds at most 64 generated messages, not 10,000.
pub const IN_FLIGHT_MAX: usize = 64;

/// Bytes of one request's generated messages being spooled at once: 64 messages with a
/// megabyte of attachments each. A message bigger than this still goes, alone.
pub const IN_FLIGHT_BYTES_MAX: usize = 64 << 20;

/// The byte budget is counted in KiB, the unit of the semaphore's permits.
const IN_FLIGHT_KIB_MAX: u64 = (IN_FLIGHT_BYTES_MAX >> 10) as u64;

const _: () = assert!(IN_FLIGHT_MAX > 0 && IN_FLIGHT_KIB_MAX > 0);

/// Why one recipient's message was not spooled.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error(transparent)]
    Generate(#[from] RecipientError),
    #[error("suppressed: {}", reply_text(.0))]
    Suppressed(Reply),
    #[error("DKIM signing failed: {0}")]
    Dkim(String),
    /// The SMTP reply a client would have had, so the two ways in read alike.
    #[error("{}", reply_text(&.0.reply()))]
    Accept(AcceptError),
}

/// `452 4.3.1 Queue full, try again later`: a reply on one line, without CRLF.
fn reply_text(r: &Reply) -> String {
    match r.enhanced {
        Some((c, s, d)) => format!("{} {c}.{s}.{d} {}", r.code, r.text),
        None => format!("{} {}", r.code, r.text),
    }
}

/// Where a request came from.
#[derive(Clone, Copy, Debug)]
pub struct Origin {
    pub peer: SocketAddr,
    /// Over HTTPS (`http.tls`).
    pub tls: bool,
}

/// One generated message on its way to the spool.
struct Injected {
    id: ReceptionId,
    sender: String,
    rcpt: String,
    message: Vec<u8>,
    eight_bit: bool,
    origin: Origin,
}

/// What the spooling tasks report, by recipient index (the response lists failures in the
/// request's order, whatever order the tasks end in).
#[derive(Default)]
struct Tally {
    succeeded: usize,
    failed: Vec<(usize, Refusal)>,
}

/// Generate, stamp and spool every message of `request`; the answer once all are done. A
/// request refused as a whole spools nothing.
pub async fn inject(
    reception: &Rc<Reception>,
    request: &InjectV1Request,
    origin: Origin,
) -> Result<InjectV1Response, RequestError> {
    let settings = reception.settings();
    let limits = Limits {
        size_max: settings.config.server.size_max,
        line_len_max: settings.config.server.data_line_len_max,
    };
    let generator = Generator::new(request, limits)?;
    let hostname = settings.hostname.clone();
    drop(settings);
    let count = Rc::new(Semaphore::new(IN_FLIGHT_MAX as u64));
    let kib = Rc::new(Semaphore::new(IN_FLIGHT_KIB_MAX));
    let tally = Rc::new(RefCell::new(Tally::default()));
    for (index, rcpt) in request.recipients.iter().enumerate() {
        // Generating is CPU on this shard: let its SMTP sessions and deliveries run between
        // messages when the time slice is used up.
        glommio::yield_if_needed().await;
        // Closed semaphores are the only error, and these are never closed.
        let Ok(slot) = count.acquire_static_permit(1).await else {
            break;
        };
        let now_ms = reception.clock.now_ms();
        let id = reception.next_id(now_ms);
        let message_id = format!("{id}@{hostname}");
        let stamp = Stamp {
            message_id: &message_id,
            unix_s: now_ms / 1000,
        };
        let generated = match generator.message_for(rcpt, stamp) {
            Ok(g) => g,
            Err(why) => {
                tally.borrow_mut().failed.push((index, why.into()));
                continue;
            }
        };
        let units = ((generated.message.len() >> 10) as u64 + 1).min(IN_FLIGHT_KIB_MAX);
        let Ok(bytes) = kib.acquire_static_permit(units).await else {
            break;
        };
        let injected = Injected {
            id,
            sender: request.envelope_sender.clone(),
            rcpt: rcpt.email.clone(),
            message: generated.message,
            eight_bit: generated.eight_bit,
            origin,
        };
        let reception = reception.clone();
        let tally = tally.clone();
        glommio::spawn_local(async move {
            let result = reception.receive_injected(injected).await;
            let mut t = tally.borrow_mut();
            match result {
                Ok(()) => t.succeeded += 1,
                Err(why) => t.failed.push((index, why)),
            }
            drop((slot, bytes));
        })
        .detach();
    }
    // Every task holds a slot until it has its answer: all slots back means all answered.
    let _ = count.acquire(IN_FLIGHT_MAX as u64).await;
    let mut tally = tally.take();
    tally.failed.sort_by_key(|(i, _)| *i);
    let mut response = InjectV1Response {
        success_count: tally.succeeded,
        ..Default::default()
    };
    for (i, why) in &tally.failed {
        if let Some(r) = request.recipients.get(*i) {
            response.failed(&r.email, why);
        }
    }
    Ok(response)
}

impl Reception {
    /// One generated message, received as an SMTP submission (see the module doc); Ok once
    /// it is durable.
    async fn receive_injected(&self, m: Injected) -> Result<(), Refusal> {
        let settings = self.settings();
        let peer = m.origin.peer.to_string();
        if let Some(reply) = self.rcpt_refusal(&m.sender, &m.rcpt, &peer).await {
            return Err(Refusal::Suppressed(reply));
        }
        let unix_s = m.id.ms / 1000;
        let id = m.id.to_string();
        // No EHLO over HTTP: the client is named by its address literal.
        let literal = match m.origin.peer.ip() {
            IpAddr::V4(ip) => format!("[{ip}]"),
            IpAddr::V6(ip) => format!("[IPv6:{ip}]"),
        };
        let protocol = if m.origin.tls { "HTTPS" } else { "HTTP" };
        let hostname = &settings.hostname;
        let ip = m.origin.peer.ip();
        let mut head =
            received_header(hostname, &literal, ip, protocol, &id, Some(&m.rcpt), unix_s);
        head.push_str(&submission_headers(&m.message, &id, hostname, unix_s));
        let signatures =
            super::signing::sign_whole(&settings.dkim, &settings.egress, &head, &m.message, unix_s)
                .await
                .map_err(|e| Refusal::Dkim(e.to_string()))?;
        head.insert_str(0, &signatures);
        let mut envelope = Envelope {
            reception: m.id,
            smtputf8: !m.sender.is_ascii() || !m.rcpt.is_ascii(),
            sender: m.sender,
            rcpts: vec![Recipient {
                address: m.rcpt,
                notify: Notify::Default,
                orcpt: None,
            }],
            ret: Ret::Unspecified,
            envid: None,
            tenant: None,
            body: if m.eight_bit {
                Body::EightBitMime
            } else {
                Body::SevenBit
            },
            size: 0,
            peer,
            notices: crate::envelope::NoticeSwitches::ALL,
            priority: Default::default(),
            campaign: None,
        };
        let notices = settings.listener_notices(None);
        super::tag(
            &mut envelope,
            &settings,
            &m.message,
            Default::default(),
            notices,
        );
        if !self.tenant_refusals(&envelope).await.is_empty() {
            if let Some(reply) = settings.suppression_reply.clone() {
                return Err(Refusal::Suppressed(reply));
            }
        }
        let body = BodyParts {
            head,
            body: m.message,
        };
        let tls = m.origin.tls.then(|| "TLS (HTTPS)".to_owned());
        self.accept(envelope, body, tls, Intake::Client)
            .await
            .map_err(Refusal::Accept)
    }
}
