//! DKIM signing in reception: the adapter side of `dkim::MessageSigner`.
//!
//! While DATA (or BDAT) streams in, `follow` shows the signer the body buffer as it grows, so
//! the body hash is done as the bytes arrive and no second pass is made over a big message.
//! When the message is complete, `sign` builds each signature: Ed25519 right here (tens of
//! microseconds), RSA on glommio's blocking thread pool, because a 2048-bit RSA signature is
//! about a millisecond of CPU and a 4096-bit one several, long enough to stall every other
//! session on the shard if done on the executor. The signatures go on top of the headers
//! reception adds and are spooled with the message: a retry or a restart delivers the same
//! bytes and never signs again.

use std::sync::Arc;

use crate::dkim::{KeyError, MessageSigner, Pending, Signers};
use crate::egress::Egress;
use crate::smtp::server::Session;

/// Follows one session's message bodies for the signer.
pub(super) struct Follower {
    signers: Arc<Signers>,
    egress: Arc<Egress>,
    /// The body number (`Session::body_so_far`) `signer` is following.
    seq: u64,
    signer: MessageSigner,
}

impl Follower {
    pub(super) fn new(signers: Arc<Signers>, egress: Arc<Egress>) -> Follower {
        Follower {
            signers,
            egress,
            seq: u64::MAX,
            signer: MessageSigner::new(),
        }
    }

    /// Hashes what the session's body has grown by since the last call.
    ///
    /// Hot path: no I/O; each body byte is canonicalised and hashed once.
    pub(super) fn follow(&mut self, session: &Session) {
        if self.signers.is_empty() || !session.in_data() {
            return;
        }
        let (seq, so_far) = session.body_so_far();
        if seq != self.seq {
            self.seq = seq;
            self.signer = MessageSigner::new();
        }
        if !self.signer.is_unsigned() {
            let egress = &self.egress;
            self.signer
                .advance(&self.signers, so_far, &|s| egress.tenant_of(s));
        }
    }

    /// The DKIM-Signature headers for the message just handed out (`message`, below `head`),
    /// in `[[dkim]]` order, CRLF-terminated; empty when no table matches.
    pub(super) async fn sign(
        &mut self,
        session: &Session,
        head: &str,
        message: &[u8],
        timestamp: u64,
    ) -> Result<String, KeyError> {
        if self.signers.is_empty() {
            return Ok(String::new());
        }
        let (seq, _) = session.body_so_far();
        // A message that came whole within one read was never followed: start now (one pass).
        let signer = if seq == self.seq {
            std::mem::take(&mut self.signer)
        } else {
            MessageSigner::new()
        };
        self.seq = u64::MAX;
        let egress = &self.egress;
        let pending = signer.finish(&self.signers, head.as_bytes(), message, timestamp, &|s| {
            egress.tenant_of(s)
        });
        let mut out = String::new();
        for p in pending {
            out.push_str(&sign_one(p).await?);
        }
        Ok(out)
    }
}

/// The DKIM-Signature headers for a message Epoxi writes itself (a TLS report), whole in
/// `message`: one pass, the same tables and choice by From domain as for received mail.
pub async fn sign_message(
    signers: &Signers,
    egress: &Egress,
    message: &[u8],
    timestamp: u64,
) -> Result<String, KeyError> {
    sign_whole(signers, egress, "", message, timestamp).await
}

/// The DKIM-Signature headers for a message received whole (HTTP injection): `head`, the
/// headers reception adds, on top of `message`; one pass, as [`sign_message`].
pub async fn sign_whole(
    signers: &Signers,
    egress: &Egress,
    head: &str,
    message: &[u8],
    timestamp: u64,
) -> Result<String, KeyError> {
    if signers.is_empty() {
        return Ok(String::new());
    }
    let pending = MessageSigner::new().finish(signers, head.as_bytes(), message, timestamp, &|s| {
        egress.tenant_of(s)
    });
    let mut out = String::new();
    for p in pending {
        out.push_str(&sign_one(p).await?);
    }
    Ok(out)
}

async fn sign_one(p: Pending) -> Result<String, KeyError> {
    let Pending {
        key,
        data,
        unsigned,
    } = p;
    let signature = if key.is_slow() {
        glommio::executor()
            .spawn_blocking(move || key.sign(&data))
            .await?
    } else {
        key.sign(&data)?
    };
    Ok(crate::dkim::sign::signed_header(&unsigned, &signature))
}
