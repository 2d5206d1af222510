//! Dead letters: messages that failed for good (every recipient left bounced or expired), kept
//! for inspection and re-injection when `dead_letter.enabled`.
//!
//! A dead letter is two files in `DIR/shard-N/`, named by the message's reception id (a
//! message split over shards leaves one per shard, each with that shard's recipients):
//! `ID.eml`, the body as spooled (our Received header on top), and `ID.json`, its envelope:
//! sender, the failed recipients with their last replies and bounce categories, tenant, times.
//! Each is written to a temporary name, fsync'd and renamed, the body first; the directory is
//! fsync'd after. The JSON file is what makes a dead letter: one without it is incomplete (a
//! crash mid-way) and ignored. The shard writes it before the message's spool record is let
//! go, so an acknowledged message is in the spool or here. (A crash after its last outcome
//! record and before the dead letter loses only the dead letter: its sender was notified.)
//!
//! Re-injection ([`reinject`]) submits a dead letter as a new message to its failed
//! recipients through the normal reception path, and removes its files only once every part
//! is durable in the owning shards' spools: a crash in between re-injects it twice, never
//! loses it.
//!
//! Each shard bounds its own directory (`dead_letter.messages_max`, `.bytes_max`), counted at
//! start and kept up to date as it writes; re-injection, which may remove another shard's
//! files, makes the count high, never low, and a shard that finds itself full counts again
//! before it gives up on a dead letter.

use std::cell::Cell;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::envelope::{Body, Envelope, NoticeSwitches, Notify, ReceptionId, Recipient, Ret};

/// The version of the JSON layout, in every file (readers refuse others).
pub const DEAD_LETTER_VERSION: u32 = 1;
/// Largest dead-letter JSON read back: an envelope of `RCPTS_PER_MESSAGE_MAX` recipients with
/// long replies is a few MiB; anything bigger is not one of ours.
pub const DEAD_LETTER_JSON_LEN_MAX: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    #[error("dead-letter directory {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("dead letter {path}: {reason}")]
    Bad { path: PathBuf, reason: String },
    #[error("no dead letter {0}")]
    NotFound(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DeadLetterError + '_ {
    move |source| DeadLetterError::Io {
        path: path.to_owned(),
        source,
    }
}

/// One failed recipient as kept.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadRcpt {
    pub address: String,
    /// DSN ORCPT as `type;address`, when given.
    #[serde(default)]
    pub orcpt: Option<String>,
    /// DSN NOTIFY: `default`, `never` or the conditions (`success,failure,delay`).
    pub notify: String,
    /// `bounced` or `expired`.
    pub outcome: String,
    pub code: u16,
    pub enhanced: String,
    pub text: String,
    #[serde(default)]
    pub bounce_category: Option<crate::bounce::Category>,
    pub failed_ms: u64,
}

/// A dead letter's envelope (the JSON file).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub version: u32,
    /// The reception id of the message (the id in its `250` reply).
    pub reception_id: String,
    /// The shard whose part this is, and its queue id there.
    pub shard: usize,
    pub queue_id: u64,
    pub sender: String,
    pub recipients: Vec<DeadRcpt>,
    #[serde(default)]
    pub tenant: Option<String>,
    pub received_ms: u64,
    /// When it was given up (its last recipient final).
    pub final_ms: u64,
    #[serde(default)]
    pub envid: Option<String>,
    /// `full`, `headers` or `unspecified`.
    pub ret: String,
    pub smtputf8: bool,
    /// `7bit`, `8bitmime` or `binarymime`.
    pub body: String,
    pub size: u64,
    pub peer: String,
    /// The notices its listener allowed (bounce, expiry, delay, success).
    pub notices: Vec<String>,
}

fn notify_text(n: Notify) -> String {
    match n {
        Notify::Default => "default".into(),
        Notify::Never => "never".into(),
        Notify::On {
            success,
            failure,
            delay,
        } => [(success, "success"), (failure, "failure"), (delay, "delay")]
            .iter()
            .filter(|(on, _)| *on)
            .map(|(_, name)| *name)
            .collect::<Vec<_>>()
            .join(","),
    }
}

fn notify_of(text: &str) -> Notify {
    match text {
        "default" => Notify::Default,
        "never" => Notify::Never,
        list => {
            let has = |w: &str| list.split(',').any(|x| x == w);
            Notify::On {
                success: has("success"),
                failure: has("failure"),
                delay: has("delay"),
            }
        }
    }
}

fn switches_text(s: NoticeSwitches) -> Vec<String> {
    [
        (s.bounce, "bounce"),
        (s.expiry, "expiry"),
        (s.delay, "delay"),
        (s.success, "success"),
    ]
    .iter()
    .filter(|(on, _)| *on)
    .map(|(_, n)| (*n).to_owned())
    .collect()
}

fn switches_of(list: &[String]) -> NoticeSwitches {
    let has = |w: &str| list.iter().any(|x| x == w);
    NoticeSwitches {
        bounce: has("bounce"),
        expiry: has("expiry"),
        delay: has("delay"),
        success: has("success"),
    }
}

impl DeadLetter {
    /// The dead letter of `envelope` (message `queue_id` of `shard`) whose recipients `failed`
    /// failed, given up at `final_ms`. Recipients out of range are skipped. No I/O.
    pub fn of(
        envelope: &Envelope,
        shard: usize,
        queue_id: u64,
        failed: &[crate::core::DeadRcpt],
        final_ms: u64,
    ) -> DeadLetter {
        use crate::spool::record::OutcomeKind;
        let recipients = failed
            .iter()
            .filter_map(|f| {
                let r = envelope.rcpts.get(usize::from(f.rcpt))?;
                Some(DeadRcpt {
                    address: r.address.clone(),
                    orcpt: r.orcpt.clone(),
                    notify: notify_text(r.notify),
                    outcome: match f.kind {
                        OutcomeKind::Expired => "expired".into(),
                        _ => "bounced".into(),
                    },
                    code: f.response.code,
                    enhanced: f.response.enhanced.clone(),
                    text: f.response.text.clone(),
                    bounce_category: f.category,
                    failed_ms: f.at_ms,
                })
            })
            .collect();
        DeadLetter {
            version: DEAD_LETTER_VERSION,
            reception_id: envelope.reception.to_string(),
            shard,
            queue_id,
            sender: envelope.sender.clone(),
            recipients,
            tenant: envelope.tenant.clone(),
            received_ms: envelope.received_ms(),
            final_ms,
            envid: envelope.envid.clone(),
            ret: match envelope.ret {
                Ret::Full => "full",
                Ret::Headers => "headers",
                Ret::Unspecified => "unspecified",
            }
            .into(),
            smtputf8: envelope.smtputf8,
            body: match envelope.body {
                Body::SevenBit => "7bit",
                Body::EightBitMime => "8bitmime",
                Body::BinaryMime => "binarymime",
            }
            .into(),
            size: envelope.size,
            peer: envelope.peer.clone(),
            notices: switches_text(envelope.notices),
        }
    }

    /// The envelope of its re-injection: a new message `reception` to the failed recipients,
    /// everything else as it was. No I/O.
    pub fn envelope(&self, reception: ReceptionId, size: u64) -> Envelope {
        Envelope {
            reception,
            sender: self.sender.clone(),
            rcpts: self
                .recipients
                .iter()
                .map(|r| Recipient {
                    address: r.address.clone(),
                    notify: notify_of(&r.notify),
                    orcpt: r.orcpt.clone(),
                })
                .collect(),
            ret: match self.ret.as_str() {
                "full" => Ret::Full,
                "headers" => Ret::Headers,
                _ => Ret::Unspecified,
            },
            envid: self.envid.clone(),
            tenant: self.tenant.clone(),
            smtputf8: self.smtputf8,
            body: match self.body.as_str() {
                "8bitmime" => Body::EightBitMime,
                "binarymime" => Body::BinaryMime,
                _ => Body::SevenBit,
            },
            size,
            peer: "reinject".into(),
            notices: switches_of(&self.notices),
            priority: Default::default(),
            campaign: None,
        }
    }
}

/// `DIR/shard-N`.
pub fn shard_dir(root: &Path, shard: usize) -> PathBuf {
    root.join(format!("shard-{shard}"))
}

/// Write `path` durably: a temporary name, fsync, rename.
fn write_durably(path: &Path, bytes: &[u8]) -> Result<(), DeadLetterError> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

fn sync_dir(dir: &Path) -> Result<(), DeadLetterError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}

/// Write dead letter `letter` with body `body` into `dir` (one shard's), durably. Blocking:
/// run it off the shard's executor.
pub fn write(dir: &Path, letter: &DeadLetter, body: &[u8]) -> Result<(), DeadLetterError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let json = serde_json::to_vec_pretty(letter).map_err(|e| DeadLetterError::Bad {
        path: dir.to_owned(),
        reason: e.to_string(),
    })?;
    let name = &letter.reception_id;
    write_durably(&dir.join(format!("{name}.eml")), body)?;
    write_durably(&dir.join(format!("{name}.json")), &json)?;
    sync_dir(dir)
}

/// A dead letter found on disk.
#[derive(Clone, Debug)]
pub struct Found {
    pub json: PathBuf,
    pub eml: PathBuf,
    pub letter: DeadLetter,
    /// Bytes of both files.
    pub bytes: u64,
}

/// Every complete dead letter under `root` (all shards' directories), oldest reception
/// first. Files that do not parse are reported as errors in the second list, not skipped
/// silently. Blocking.
pub fn list(root: &Path) -> Result<(Vec<Found>, Vec<DeadLetterError>), DeadLetterError> {
    let mut found = Vec::new();
    let mut bad = Vec::new();
    let shards = match std::fs::read_dir(root) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((found, bad)),
        Err(e) => return Err(io(root)(e)),
    };
    for shard in shards {
        let shard = shard.map_err(io(root))?.path();
        let is_shard = shard
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("shard-"));
        if !is_shard || !shard.is_dir() {
            continue;
        }
        let (f, b) = list_shard(&shard)?;
        found.extend(f);
        bad.extend(b);
    }
    found.sort_by_key(|f| (f.letter.received_ms, f.letter.reception_id.clone()));
    Ok((found, bad))
}

/// The complete dead letters of one shard's directory.
pub fn list_shard(dir: &Path) -> Result<(Vec<Found>, Vec<DeadLetterError>), DeadLetterError> {
    let mut found = Vec::new();
    let mut bad = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((found, bad)),
        Err(e) => return Err(io(dir)(e)),
    };
    for entry in entries {
        let json = entry.map_err(io(dir))?.path();
        if json.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        match read_one(&json) {
            Ok(f) => found.push(f),
            Err(e) => bad.push(e),
        }
    }
    Ok((found, bad))
}

fn read_one(json: &Path) -> Result<Found, DeadLetterError> {
    let meta = std::fs::metadata(json).map_err(io(json))?;
    if meta.len() > DEAD_LETTER_JSON_LEN_MAX {
        return Err(DeadLetterError::Bad {
            path: json.to_owned(),
            reason: format!("{} bytes, more than a dead letter", meta.len()),
        });
    }
    let bytes = std::fs::read(json).map_err(io(json))?;
    let letter: DeadLetter = serde_json::from_slice(&bytes).map_err(|e| DeadLetterError::Bad {
        path: json.to_owned(),
        reason: e.to_string(),
    })?;
    if letter.version != DEAD_LETTER_VERSION {
        return Err(DeadLetterError::Bad {
            path: json.to_owned(),
            reason: format!("version {}", letter.version),
        });
    }
    let eml = json.with_extension("eml");
    let eml_len = std::fs::metadata(&eml).map_err(io(&eml))?.len();
    Ok(Found {
        json: json.to_owned(),
        eml,
        letter,
        bytes: meta.len() + eml_len,
    })
}

/// Remove a re-injected dead letter: the JSON first (then it is no dead letter any more),
/// the body after. Blocking.
fn remove(found: &Found) -> Result<(), DeadLetterError> {
    std::fs::remove_file(&found.json).map_err(io(&found.json))?;
    std::fs::remove_file(&found.eml).map_err(io(&found.eml))?;
    if let Some(dir) = found.json.parent() {
        sync_dir(dir)?;
    }
    Ok(())
}

/// One shard's dead-letter directory and its bound.
pub struct Store {
    dir: PathBuf,
    messages_max: usize,
    bytes_max: u64,
    messages: Cell<usize>,
    bytes: Cell<u64>,
}

impl Store {
    /// Shard `shard`'s store under `root`, counting what is there. Blocking (at start).
    pub fn open(
        root: &Path,
        shard: usize,
        messages_max: usize,
        bytes_max: u64,
    ) -> Result<Store, DeadLetterError> {
        let store = Store {
            dir: shard_dir(root, shard),
            messages_max,
            bytes_max,
            messages: Cell::new(0),
            bytes: Cell::new(0),
        };
        std::fs::create_dir_all(&store.dir).map_err(io(&store.dir))?;
        store.recount()?;
        Ok(store)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn recount(&self) -> Result<(), DeadLetterError> {
        let (found, _) = list_shard(&self.dir)?;
        self.messages.set(found.len());
        self.bytes.set(found.iter().map(|f| f.bytes).sum());
        Ok(())
    }

    fn has_room(&self, bytes: u64) -> bool {
        self.messages.get() < self.messages_max
            && self.bytes.get().saturating_add(bytes) <= self.bytes_max
    }

    /// Keep `letter` with `body` if the bound allows: Ok(false) when it does not. Writes on
    /// the executor's blocking thread.
    pub async fn keep(&self, letter: DeadLetter, body: Vec<u8>) -> Result<bool, DeadLetterError> {
        let bytes = body.len() as u64 + 4096;
        if !self.has_room(bytes) {
            // Re-injection may have emptied it meanwhile (see the module doc).
            let dir = self.dir.clone();
            let (found, _) = glommio::executor()
                .spawn_blocking(move || list_shard(&dir))
                .await?;
            self.messages.set(found.len());
            self.bytes.set(found.iter().map(|f| f.bytes).sum());
            if !self.has_room(bytes) {
                return Ok(false);
            }
        }
        let dir = self.dir.clone();
        glommio::executor()
            .spawn_blocking(move || write(&dir, &letter, &body))
            .await?;
        self.messages.set(self.messages.get() + 1);
        self.bytes.set(self.bytes.get() + bytes);
        Ok(true)
    }
}

/// What [`reinject`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ReinjectReport {
    /// Dead letters submitted again: (old reception id, new reception id, recipients).
    pub reinjected: Vec<Reinjected>,
    /// Dead letters left in place, and why (e.g. the queue is full: try again later).
    pub failed: Vec<ReinjectFailure>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Reinjected {
    pub dead_letter: String,
    pub reception_id: String,
    pub recipients: usize,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ReinjectFailure {
    pub dead_letter: String,
    pub reason: String,
}

/// The dead letters a re-injection takes: the one named by `id`, or all; the unreadable ones
/// (`bad`) are logged and left in place.
fn choose(
    found: Vec<Found>,
    bad: &[DeadLetterError],
    id: Option<&str>,
) -> Result<Vec<Found>, DeadLetterError> {
    for e in bad {
        tracing::warn!("dead letter not re-injected: {e}");
    }
    let chosen: Vec<Found> = found
        .into_iter()
        .filter(|f| id.is_none_or(|id| f.letter.reception_id == id))
        .collect();
    if let (Some(id), true) = (id, chosen.is_empty()) {
        return Err(DeadLetterError::NotFound(id.to_owned()));
    }
    Ok(chosen)
}

/// Re-inject the dead letters under `root` (every shard's): the one whose reception id is
/// `id`, every part of it (a split message left one per shard), or all of them when `id` is
/// None. Each goes through `reception` as a new message to its failed recipients (the queue
/// limit applies: a full queue leaves it for later) and its files are removed only once every
/// part is durable in its owning shard's spool. `clock` gives the new reception ids' time.
/// An unknown `id` is `NotFound`.
pub async fn reinject(
    reception: &crate::reception::Reception,
    root: &Path,
    id: Option<&str>,
    clock: &dyn crate::clock::Clock,
) -> Result<ReinjectReport, DeadLetterError> {
    let dir = root.to_owned();
    let (found, bad) = glommio::executor()
        .spawn_blocking(move || list(&dir))
        .await?;
    let chosen = choose(found, &bad, id)?;
    let mut report = ReinjectReport::default();
    for f in chosen {
        let old = f.letter.reception_id.clone();
        let eml = f.eml.clone();
        let body = match glommio::executor()
            .spawn_blocking(move || std::fs::read(&eml).map_err(io(&eml)))
            .await
        {
            Ok(body) => body,
            Err(e) => {
                report.failed.push(ReinjectFailure {
                    dead_letter: old,
                    reason: e.to_string(),
                });
                continue;
            }
        };
        let new_id = reception.next_id(clock.now_ms());
        let mut envelope = f.letter.envelope(new_id, body.len() as u64);
        // The class and campaign are headers of the body, read again as at reception (the
        // listener it first came through is not known: its default class is not either).
        let tags = reception.settings().egress.tags_of(&body);
        envelope.priority = tags.priority.unwrap_or_default();
        envelope.campaign = tags.campaign;
        let recipients = envelope.rcpts.len();
        let parts = crate::reception::BodyParts {
            head: String::new(),
            body,
        };
        // `accept` answers once every part is durable in its shard's spool.
        if let Err(e) = reception
            .accept(envelope, parts, None, crate::reception::Intake::Client)
            .await
        {
            report.failed.push(ReinjectFailure {
                dead_letter: old,
                reason: e.to_string(),
            });
            continue;
        }
        let removed = f.clone();
        if let Err(e) = glommio::executor()
            .spawn_blocking(move || remove(&removed))
            .await
        {
            // Submitted, but still on disk: a second re-injection would send it twice.
            tracing::error!("dead letter {old} re-injected as {new_id} but not removed: {e}");
        }
        tracing::info!("dead letter {old} re-injected as {new_id} to {recipients} recipients");
        report.reinjected.push(Reinjected {
            dead_letter: old,
            reception_id: new_id.to_string(),
            recipients,
        });
    }
    Ok(report)
}

/// RFC 3461 xtext: `+` and `=`, controls, space and non-ASCII as `+XX`.
fn xtext(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if (b'!'..=b'~').contains(&b) && b != b'+' && b != b'=' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("+{b:02X}"));
        }
    }
    out
}

/// The SMTP commands that submit `letter` again: MAIL with its DSN parameters (those the
/// server offers), one RCPT per failed recipient. No I/O.
fn commands(letter: &DeadLetter, dsn: bool, smtputf8: bool, eightbit: bool) -> Vec<String> {
    let mut mail = format!("MAIL FROM:<{}>", letter.sender);
    if letter.body == "8bitmime" && eightbit {
        mail.push_str(" BODY=8BITMIME");
    }
    if letter.smtputf8 && smtputf8 {
        mail.push_str(" SMTPUTF8");
    }
    if dsn {
        match letter.ret.as_str() {
            "full" => mail.push_str(" RET=FULL"),
            "headers" => mail.push_str(" RET=HDRS"),
            _ => {}
        }
        if let Some(envid) = &letter.envid {
            mail.push_str(&format!(" ENVID={}", xtext(envid)));
        }
    }
    let mut out = vec![mail];
    for r in &letter.recipients {
        let mut rcpt = format!("RCPT TO:<{}>", r.address);
        if dsn {
            match r.notify.as_str() {
                "default" => {}
                "never" => rcpt.push_str(" NOTIFY=NEVER"),
                list => rcpt.push_str(&format!(" NOTIFY={}", list.to_ascii_uppercase())),
            }
            if let Some((kind, address)) = r.orcpt.as_deref().and_then(|o| o.split_once(';')) {
                rcpt.push_str(&format!(" ORCPT={kind};{}", xtext(address)));
            }
        }
        out.push(rcpt);
    }
    out
}

/// A blocking SMTP client just big enough to hand one message to Epoxi's own listener.
struct Submitter {
    reader: std::io::BufReader<std::net::TcpStream>,
    writer: std::net::TcpStream,
}

/// How long the submitting client waits for each reply: Epoxi answers the final dot once the
/// message is durable, which a busy spool may take seconds to be.
const SUBMIT_REPLY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);
/// Longest reply line read back; anything longer is not an SMTP server.
const SUBMIT_REPLY_LINE_MAX: usize = 4096;

impl Submitter {
    fn connect(addr: std::net::SocketAddr) -> std::io::Result<Submitter> {
        let stream = std::net::TcpStream::connect_timeout(&addr, SUBMIT_REPLY_TIMEOUT)?;
        stream.set_read_timeout(Some(SUBMIT_REPLY_TIMEOUT))?;
        stream.set_write_timeout(Some(SUBMIT_REPLY_TIMEOUT))?;
        Ok(Submitter {
            reader: std::io::BufReader::new(stream.try_clone()?),
            writer: stream,
        })
    }

    /// The next reply: its code and lines.
    fn reply(&mut self) -> std::io::Result<(u16, Vec<String>)> {
        use std::io::BufRead as _;
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            let n = std::io::Read::take(&mut self.reader, SUBMIT_REPLY_LINE_MAX as u64)
                .read_line(&mut line)?;
            if n == 0 || line.len() < 4 {
                return Err(std::io::Error::other(format!("bad reply line {line:?}")));
            }
            let code: u16 = line[..3]
                .parse()
                .map_err(|_| std::io::Error::other(format!("bad reply line {line:?}")))?;
            let last = line.as_bytes()[3] == b' ';
            lines.push(line.trim_end().to_owned());
            if last {
                return Ok((code, lines));
            }
        }
    }

    fn expect(&mut self, command: &str, code: u16) -> Result<Vec<String>, String> {
        if !command.is_empty() {
            self.writer
                .write_all(format!("{command}\r\n").as_bytes())
                .map_err(|e| e.to_string())?;
        }
        let (got, lines) = self.reply().map_err(|e| e.to_string())?;
        if got != code {
            return Err(format!("{command}: {}", lines.join(" ")));
        }
        Ok(lines)
    }

    /// Submit `letter` with `body`; Ok once the final dot is answered 250.
    fn submit(&mut self, letter: &DeadLetter, body: &[u8]) -> Result<(), String> {
        if letter.body == "binarymime" {
            return Err(
                "a BINARYMIME body needs BDAT: re-inject it with the admin operation".into(),
            );
        }
        self.expect("", 220)?;
        let ehlo = self.expect("EHLO epoxi-deadletter", 250)?;
        let has = |ext: &str| {
            ehlo.iter()
                .any(|l| l.get(4..).is_some_and(|e| e.eq_ignore_ascii_case(ext)))
        };
        let cmds = commands(letter, has("DSN"), has("SMTPUTF8"), has("8BITMIME"));
        for c in &cmds {
            self.expect(c, 250)?;
        }
        self.expect("DATA", 354)?;
        let mut data = Vec::with_capacity(body.len() + 64);
        for line in body.split_inclusive(|&b| b == b'\n') {
            if line.first() == Some(&b'.') {
                data.push(b'.');
            }
            data.extend_from_slice(line);
        }
        if !data.ends_with(b"\r\n") {
            data.extend_from_slice(b"\r\n");
        }
        data.extend_from_slice(b".\r\n");
        self.writer.write_all(&data).map_err(|e| e.to_string())?;
        self.expect("", 250)?;
        let _ = self.expect("QUIT", 221);
        Ok(())
    }
}

/// Re-inject dead letters through a running Epoxi's SMTP listener at `addr` (for the CLI,
/// when the admin operation is not at hand): each is submitted as a new message, from its
/// sender to its failed recipients with their DSN parameters, and its files removed once the
/// server answers 250 (Epoxi does once every part is durable in its shard's spool). `id`
/// picks one by reception id, None all. Blocking.
pub fn reinject_over_smtp(
    root: &Path,
    id: Option<&str>,
    addr: std::net::SocketAddr,
) -> Result<ReinjectReport, DeadLetterError> {
    let (found, bad) = list(root)?;
    let chosen = choose(found, &bad, id)?;
    let mut report = ReinjectReport::default();
    for f in chosen {
        let old = f.letter.reception_id.clone();
        let result = std::fs::read(&f.eml)
            .map_err(|e| e.to_string())
            .and_then(|body| {
                let mut s = Submitter::connect(addr).map_err(|e| format!("{addr}: {e}"))?;
                s.submit(&f.letter, &body)
            })
            .and_then(|()| remove(&f).map_err(|e| format!("submitted, not removed: {e}")));
        match result {
            Ok(()) => report.reinjected.push(Reinjected {
                dead_letter: old,
                // The server's id is in its 250 reply text; the event log has it too.
                reception_id: String::new(),
                recipients: f.letter.recipients.len(),
            }),
            Err(reason) => report.failed.push(ReinjectFailure {
                dead_letter: old,
                reason,
            }),
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::Response;
    use crate::spool::record::OutcomeKind;

    fn envelope() -> Envelope {
        let mut r = Recipient::new("a@x.test");
        r.notify = Notify::On {
            success: false,
            failure: true,
            delay: true,
        };
        r.orcpt = Some("rfc822;a@x.test".into());
        Envelope {
            reception: ReceptionId {
                ms: 1_700_000_000_000,
                shard: 1,
                n: 7,
            },
            sender: "s@y.test".into(),
            rcpts: vec![Recipient::new("ok@x.test"), r],
            ret: Ret::Full,
            envid: Some("e1".into()),
            tenant: Some("acme".into()),
            smtputf8: false,
            body: Body::EightBitMime,
            size: 12,
            peer: "127.0.0.1:5".into(),
            notices: NoticeSwitches {
                success: false,
                ..NoticeSwitches::ALL
            },
            priority: Default::default(),
            campaign: None,
        }
    }

    #[test]
    fn a_dead_letter_keeps_the_failed_recipients_and_comes_back_as_their_envelope() {
        let env = envelope();
        let failed = [crate::core::DeadRcpt {
            rcpt: 1,
            kind: OutcomeKind::Bounced,
            response: Response {
                code: 550,
                enhanced: "5.1.1".into(),
                text: "no such user".into(),
            },
            category: Some(crate::bounce::Category::InvalidRecipient),
            at_ms: 1_700_000_001_000,
        }];
        let letter = DeadLetter::of(&env, 1, 0x42, &failed, 1_700_000_002_000);
        assert_eq!(letter.recipients.len(), 1);
        assert_eq!(letter.recipients[0].notify, "failure,delay");
        assert_eq!(letter.reception_id, env.reception.to_string());
        let dir = tempfile::tempdir().expect("tmp");
        let shard = shard_dir(dir.path(), 1);
        write(&shard, &letter, b"Subject: x\r\n\r\nbody\r\n").expect("write");
        // An incomplete one (body only, a crash before its JSON) is not a dead letter.
        std::fs::write(shard.join("other.eml"), b"x").expect("write");
        let (found, bad) = list(dir.path()).expect("list");
        assert!(bad.is_empty(), "{bad:?}");
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].letter, letter);
        let new = ReceptionId {
            ms: 1_700_000_003_000,
            shard: 0,
            n: 1,
        };
        let back = found[0].letter.envelope(new, 20);
        assert_eq!(back.rcpts, vec![env.rcpts[1].clone()]);
        assert_eq!(
            (back.sender.as_str(), back.ret, back.body, back.notices),
            ("s@y.test", Ret::Full, Body::EightBitMime, env.notices)
        );
        assert_eq!(back.tenant.as_deref(), Some("acme"));
        let cmds = commands(&found[0].letter, true, true, true);
        assert_eq!(
            cmds,
            vec![
                "MAIL FROM:<s@y.test> BODY=8BITMIME RET=FULL ENVID=e1".to_owned(),
                "RCPT TO:<a@x.test> NOTIFY=FAILURE,DELAY ORCPT=rfc822;a@x.test".to_owned(),
            ]
        );
        assert_eq!(xtext("a+b=c d"), "a+2Bb+3Dc+20d");
        remove(&found[0]).expect("remove");
        assert!(list(dir.path()).expect("list").0.is_empty());
    }
}
