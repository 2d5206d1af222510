//! Reception's side of out-of-band reports and the suppression list: the adapter that
//! performs what `oob::decide` and the list say.
//!
//! - A transaction to the out-of-band domain is read (`oob::parse`), decided, logged (one
//!   `OOB` line per recipient block, one `Feedback` line per ARF report, `OobUnparsed` for
//!   anything else) and its hard bounces and complaints put on the list, all before the
//!   `250`: the client's retry after a crash gets it logged, never lost. A report that
//!   cannot be read is still answered `250` (a bounce is never bounced).
//! - At RCPT, the default list (the only one known before the message's header arrives);
//!   after DATA, the list of the tenant the message names.

use crate::envelope::Envelope;
use crate::events::{Event, OobUnparsed, Response, Suppressed, SuppressedAt};
use crate::smtp::reply::Reply;
use crate::smtp::server::Transaction;

use super::Reception;

impl Reception {
    /// Read, log and act on the report in `tx` (every recipient at the out-of-band domain).
    pub async fn take_report(&self, tx: &Transaction, peer: &str) {
        let settings = self.settings();
        let Some(domain) = settings.oob_domain.as_deref() else {
            return;
        };
        let now = self.clock.now_ms();
        let recipient = tx.rcpts.first().map(String::as_str).unwrap_or_default();
        let verp = tx.rcpts.iter().find_map(|r| crate::oob::verp_id(r, domain));
        let mut hostnames = vec![settings.hostname.clone()];
        hostnames.extend(
            settings
                .config
                .listener
                .iter()
                .filter_map(|l| l.hostname.clone()),
        );
        let tenant_header = settings.egress.tenant_header();
        let ours = crate::oob::Ours {
            hostnames: &hostnames,
            tenant_header,
        };
        let report = match crate::oob::parse(&tx.body, &ours) {
            Ok(report) => report,
            Err(why) => {
                tracing::warn!(
                    peer,
                    sender = %tx.mail_from,
                    "report to {recipient} not understood ({why}); accepted and logged as OobUnparsed"
                );
                self.observers.emit(&Event::OobUnparsed(&OobUnparsed {
                    ts_ms: now,
                    shard: self.shard,
                    peer: peer.to_owned(),
                    sender: tx.mail_from.clone(),
                    recipient: recipient.to_owned(),
                    message_id: verp.map(|v| v.to_string()),
                    size: tx.body.len() as u64,
                    reason: why.to_string(),
                }));
                return;
            }
        };
        let arrival = crate::oob::Arrival {
            ts_ms: now,
            shard: self.shard,
            peer,
            sender: &tx.mail_from,
            recipient,
            verp,
        };
        let decision = crate::oob::decide(&report, &arrival, settings.bounce.as_deref());
        for line in &decision.bounces {
            self.observers.emit(&Event::Oob(line));
        }
        if let Some(line) = &decision.feedback {
            self.observers.emit(&Event::Feedback(line));
        }
        let Some(suppression) = &self.suppression else {
            return;
        };
        for (tenant, rcpt, reason) in &decision.suppress {
            if let Err(e) = suppression
                .add(tenant.as_deref(), rcpt, *reason, None)
                .await
            {
                tracing::warn!("cannot suppress {rcpt} after an out-of-band report: {e}");
            }
        }
    }

    /// At RCPT: the configured reply when the default list names `rcpt` (logged as
    /// `Suppressed`), else None. Zero cost when the list is off (no call is made then: see
    /// `ServerConfig::rcpt_check`).
    pub async fn rcpt_refusal(&self, sender: &str, rcpt: &str, peer: &str) -> Option<Reply> {
        let suppression = self.suppression.as_ref()?;
        let settings = self.settings();
        let reply = settings.suppression_reply.as_ref()?;
        if !suppression.check(None, rcpt).await {
            return None;
        }
        self.log_suppressed(SuppressedAt::Rcpt, sender, rcpt, None, None, peer, reply);
        Some(reply.clone())
    }

    /// After DATA: which recipients (indices) the list of the message's tenant names. Each
    /// is logged as `Suppressed` (with `message_id` when some recipient is left to spool).
    pub async fn tenant_refusals(&self, envelope: &Envelope) -> Vec<usize> {
        let settings = self.settings();
        let (Some(suppression), Some(tenant), Some(reply)) = (
            &self.suppression,
            envelope.tenant.as_deref(),
            settings.suppression_reply.as_ref(),
        ) else {
            return Vec::new();
        };
        let rcpts: Vec<&str> = envelope.rcpts.iter().map(|r| r.address.as_str()).collect();
        let hits = suppression.check_all(Some(tenant), &rcpts).await;
        let refused: Vec<usize> = hits
            .iter()
            .enumerate()
            .filter(|(_, &hit)| hit)
            .map(|(i, _)| i)
            .collect();
        let spooled = refused.len() < rcpts.len();
        let id = spooled.then(|| envelope.reception.to_string());
        for rcpt in refused.iter().filter_map(|&i| rcpts.get(i)) {
            self.log_suppressed(
                SuppressedAt::Data,
                &envelope.sender,
                rcpt,
                Some(tenant),
                id.clone(),
                &envelope.peer,
                reply,
            );
        }
        refused
    }

    #[allow(clippy::too_many_arguments)]
    fn log_suppressed(
        &self,
        stage: SuppressedAt,
        sender: &str,
        rcpt: &str,
        tenant: Option<&str>,
        message_id: Option<String>,
        peer: &str,
        reply: &Reply,
    ) {
        self.observers.emit(&Event::Suppressed(&Suppressed {
            ts_ms: self.clock.now_ms(),
            shard: self.shard,
            stage,
            peer: peer.to_owned(),
            sender: sender.to_owned(),
            recipient: rcpt.to_owned(),
            tenant: tenant.map(str::to_owned),
            message_id,
            response: Response {
                code: reply.code,
                enhanced: reply
                    .enhanced
                    .map(|(a, b, c)| format!("{a}.{b}.{c}"))
                    .unwrap_or_default(),
                text: reply.text.clone(),
            },
        }));
    }
}
