//! The suppression list: recipients that hard-bounced or complained, refused from then on.
//!
//! - One list per tenant (the `egress.tenant_header` value, `X-Tenant`, as the queue keeps
//!   it) and a default list for mail without one. The default list is checked at RCPT for
//!   every message (no tenant is known before the message's header arrives); a tenant's list
//!   after DATA, for that tenant's messages only.
//! - Ownership: an entry is owned by the shard that owns the recipient's domain
//!   (`shards::shard_of(domain, n)`), as every other recipient-keyed fact is. Each shard keeps
//!   its entries in a [`Store`]: an in-memory map that answers every check (a hash lookup, no
//!   I/O, no lock), written through to a redb file in the shard's spool directory
//!   (`SPOOL/shard-N/suppression.redb`), so the list survives restarts. Other shards ask the
//!   owner over the mesh ([`Request`], [`Response`]); [`Suppression`] routes.
//! - Addresses are compared lower-cased (local part included: a list that told `Bob@` from
//!   `bob@` would let a complainant's mail through on a capital letter).
//! - A check that cannot reach the owner (a busy or stopping peer) answers "not suppressed":
//!   suppression is a courtesy to mailbox providers, and refusing mail on a mesh hiccup
//!   would be worse.
//!
//! Admin operations (`admin::SuppressionOp`) call [`Suppression::admin`] on any shard: add
//! and remove go to the owner of the address's domain, list gathers every shard's entries.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::clock::Clock;
use crate::events::{Event, Observers, SuppressionChange};
/// A future on this shard (the suppression stage's own name for reception's).
pub type LocalFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + 'a>>;

/// The redb table: key `tenant \n recipient` (tenant empty for the default list), value the
/// entry's JSON ([`Stored`]).
const TABLE: redb::TableDefinition<&str, &str> = redb::TableDefinition::new("suppression");
/// The store's file in each shard's spool directory.
pub const FILE_NAME: &str = "suppression.redb";
/// Longest address kept (RFC 5321 §4.5.3.1.3: a path is at most 256 octets).
pub const ADDRESS_LEN_MAX: usize = 256;
/// Longest tenant name kept: the header value, one line.
pub const TENANT_LEN_MAX: usize = 256;
/// Longest note an operator may attach to an entry.
pub const NOTE_LEN_MAX: usize = 1000;
/// Most entries one list answer carries when the caller names no limit: a listing is for an
/// operator's screen, and the answer crosses the mesh in one message.
pub const LIST_DEFAULT_MAX: usize = 1000;
/// The most a caller may ask for in one listing, across all shards.
pub const LIST_MAX: usize = 100_000;

/// Why an entry is on the list, and how a list changed (defined with the events that carry
/// them, so the event types need nothing from here).
pub use crate::events::{ListChange as Change, SuppressionReason as Reason};

/// One entry, as listed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// None: the default list.
    pub tenant: Option<String>,
    /// Lower case.
    pub rcpt: String,
    pub reason: Reason,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    pub added_ms: u64,
}

/// What the store keeps per entry, besides its key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Stored {
    reason: Reason,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    note: Option<String>,
    added_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SuppressionError {
    #[error("suppression store {path}: {why}")]
    Store { path: PathBuf, why: String },
    #[error("`{0}` is not an address (local@domain, at most {ADDRESS_LEN_MAX} bytes)")]
    BadAddress(String),
    #[error("bad tenant name (one line, at most {TENANT_LEN_MAX} bytes)")]
    BadTenant,
    #[error("shard {0} did not answer")]
    Peer(usize),
    #[error("suppression lists are not available: suppression.enabled is off")]
    Disabled,
}

/// The recipient as the list keys it: trimmed, angle brackets dropped, lower case. Errors
/// when it is no `local@domain`.
pub fn normalize(rcpt: &str) -> Result<String, SuppressionError> {
    let r = rcpt.trim();
    let r = r
        .strip_prefix('<')
        .and_then(|r| r.strip_suffix('>'))
        .unwrap_or(r);
    let ok = r.len() <= ADDRESS_LEN_MAX
        && r.rsplit_once('@')
            .is_some_and(|(l, d)| !l.is_empty() && !d.is_empty())
        && !r.contains(['\n', '\r', ' ']);
    if !ok {
        return Err(SuppressionError::BadAddress(
            rcpt.chars().take(80).collect(),
        ));
    }
    Ok(r.to_lowercase())
}

fn check_tenant(tenant: Option<&str>) -> Result<(), SuppressionError> {
    match tenant {
        Some(t) if t.is_empty() || t.len() > TENANT_LEN_MAX || t.contains(['\n', '\r']) => {
            Err(SuppressionError::BadTenant)
        }
        _ => Ok(()),
    }
}

/// The shard that owns the entries of recipient `rcpt` among `shards`: its domain's owner.
pub fn owner_of(rcpt: &str, shards: usize) -> usize {
    shards::shard_of(crate::envelope::domain_of(rcpt), shards.max(1))
}

fn key_of(tenant: Option<&str>, rcpt: &str) -> String {
    format!("{}\n{rcpt}", tenant.unwrap_or(""))
}

/// One shard's entries: in memory for checks, in redb for restarts.
pub struct Store {
    path: PathBuf,
    db: Arc<redb::Database>,
    /// Tenant ("" for the default list) → recipient → entry.
    lists: RefCell<HashMap<String, HashMap<String, Stored>>>,
    /// Writes go to disk one at a time, in the order asked, so the file and the map agree.
    writes: glommio::sync::Semaphore,
}

impl Store {
    /// Open (or create) the store in `dir` and load its entries. Blocking: call at start.
    pub fn open(dir: &Path) -> Result<Store, SuppressionError> {
        let path = dir.join(FILE_NAME);
        let fail = |why: String| SuppressionError::Store {
            path: path.clone(),
            why,
        };
        std::fs::create_dir_all(dir).map_err(|e| fail(e.to_string()))?;
        let db = redb::Database::create(&path).map_err(|e| fail(e.to_string()))?;
        let mut lists: HashMap<String, HashMap<String, Stored>> = HashMap::new();
        {
            let tx = db.begin_write().map_err(|e| fail(e.to_string()))?;
            // Opening the table in a write transaction creates it on first use.
            {
                use redb::ReadableTable as _;
                let table = tx.open_table(TABLE).map_err(|e| fail(e.to_string()))?;
                for row in table.iter().map_err(|e| fail(e.to_string()))? {
                    let (k, v) = row.map_err(|e| fail(e.to_string()))?;
                    let Some((tenant, rcpt)) = k.value().split_once('\n') else {
                        continue;
                    };
                    // An entry that does not read back is skipped, not fatal: the rest of
                    // the list still protects the recipients it names.
                    match serde_json::from_str::<Stored>(v.value()) {
                        Ok(stored) => {
                            lists
                                .entry(tenant.to_owned())
                                .or_default()
                                .insert(rcpt.to_owned(), stored);
                        }
                        Err(e) => tracing::warn!(
                            "{}: entry {rcpt:?} unreadable, skipped: {e}",
                            path.display()
                        ),
                    }
                }
            }
            tx.commit().map_err(|e| fail(e.to_string()))?;
        }
        Ok(Store {
            path,
            db: Arc::new(db),
            lists: RefCell::new(lists),
            writes: glommio::sync::Semaphore::new(1),
        })
    }

    /// Entries in memory, all lists.
    pub fn len(&self) -> usize {
        self.lists.borrow().values().map(HashMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Is `rcpt` (normalized) on `tenant`'s list (None: the default list)? Hot path: two
    /// hash lookups, no I/O, no allocation.
    pub fn contains(&self, tenant: Option<&str>, rcpt: &str) -> bool {
        self.lists
            .borrow()
            .get(tenant.unwrap_or(""))
            .is_some_and(|l| l.contains_key(rcpt))
    }

    /// Put an entry on its list, durably (true), or say it was there already (false; the
    /// first reason and time stay).
    pub async fn add(&self, entry: &Entry) -> Result<bool, SuppressionError> {
        check_tenant(entry.tenant.as_deref())?;
        let _turn = self.writes.acquire_permit(1).await.ok();
        if self.contains(entry.tenant.as_deref(), &entry.rcpt) {
            return Ok(false);
        }
        let (key, value, stored) = self.record_of(entry)?;
        self.write(move |table| table.insert(key.as_str(), value.as_str()).map(|_| ()))
            .await?;
        self.remember(entry, stored);
        Ok(true)
    }

    /// Take `rcpt` off `tenant`'s list, durably: true when it was there.
    pub async fn remove(&self, tenant: Option<&str>, rcpt: &str) -> Result<bool, SuppressionError> {
        check_tenant(tenant)?;
        let _turn = self.writes.acquire_permit(1).await.ok();
        if !self.contains(tenant, rcpt) {
            return Ok(false);
        }
        let key = key_of(tenant, rcpt);
        self.write(move |table| table.remove(key.as_str()).map(|_| ()))
            .await?;
        self.forget(tenant, rcpt);
        Ok(true)
    }

    /// Up to `limit` entries of `tenant`'s list (None: the default list; `Some("*")`: every
    /// list), sorted by tenant and address so a listing is stable. No I/O.
    pub fn list(&self, tenant: Option<&str>, limit: usize) -> Vec<Entry> {
        let lists = self.lists.borrow();
        let mut out: Vec<Entry> = Vec::new();
        for (name, list) in lists.iter() {
            let wanted = match tenant {
                Some("*") => true,
                Some(t) => name == t,
                None => name.is_empty(),
            };
            if !wanted {
                continue;
            }
            out.extend(list.iter().map(|(rcpt, s)| Entry {
                tenant: (!name.is_empty()).then(|| name.clone()),
                rcpt: rcpt.clone(),
                reason: s.reason,
                note: s.note.clone(),
                added_ms: s.added_ms,
            }));
        }
        out.sort_by(|a, b| (&a.tenant, &a.rcpt).cmp(&(&b.tenant, &b.rcpt)));
        out.truncate(limit);
        out
    }

    /// [`Store::add`] in place: the commit blocks the shard (an fsync, milliseconds). For the
    /// admin socket's operations, which are rare, answered synchronously, and whose answer
    /// must mean the change is durable.
    pub fn add_blocking(&self, entry: &Entry) -> Result<bool, SuppressionError> {
        check_tenant(entry.tenant.as_deref())?;
        if self.contains(entry.tenant.as_deref(), &entry.rcpt) {
            return Ok(false);
        }
        let (key, value, stored) = self.record_of(entry)?;
        commit(&self.db, |table| {
            table.insert(key.as_str(), value.as_str()).map(|_| ())
        })
        .map_err(|why| self.fail(why))?;
        self.remember(entry, stored);
        Ok(true)
    }

    /// [`Store::remove`] in place, blocking for the commit (see [`Store::add_blocking`]).
    pub fn remove_blocking(
        &self,
        tenant: Option<&str>,
        rcpt: &str,
    ) -> Result<bool, SuppressionError> {
        check_tenant(tenant)?;
        if !self.contains(tenant, rcpt) {
            return Ok(false);
        }
        let key = key_of(tenant, rcpt);
        commit(&self.db, |table| table.remove(key.as_str()).map(|_| ()))
            .map_err(|why| self.fail(why))?;
        self.forget(tenant, rcpt);
        Ok(true)
    }

    /// An entry as stored: its key, its value, and what the in-memory list keeps.
    fn record_of(&self, entry: &Entry) -> Result<(String, String, Stored), SuppressionError> {
        let stored = Stored {
            reason: entry.reason,
            note: entry.note.clone(),
            added_ms: entry.added_ms,
        };
        let value = serde_json::to_string(&stored).map_err(|e| self.fail(e.to_string()))?;
        Ok((key_of(entry.tenant.as_deref(), &entry.rcpt), value, stored))
    }

    fn remember(&self, entry: &Entry, stored: Stored) {
        self.lists
            .borrow_mut()
            .entry(entry.tenant.clone().unwrap_or_default())
            .or_default()
            .insert(entry.rcpt.clone(), stored);
    }

    fn forget(&self, tenant: Option<&str>, rcpt: &str) {
        let mut lists = self.lists.borrow_mut();
        let name = tenant.unwrap_or("");
        if let Some(list) = lists.get_mut(name) {
            list.remove(rcpt);
            if list.is_empty() {
                lists.remove(name);
            }
        }
    }

    fn fail(&self, why: String) -> SuppressionError {
        SuppressionError::Store {
            path: self.path.clone(),
            why,
        }
    }

    /// One write transaction, committed (fsync'd) on the executor's blocking thread so the
    /// shard's other work goes on meanwhile.
    async fn write<F>(&self, change: F) -> Result<(), SuppressionError>
    where
        F: FnOnce(
                &mut redb::Table<'_, &'static str, &'static str>,
            ) -> Result<(), redb::StorageError>
            + Send
            + 'static,
    {
        let db = self.db.clone();
        let done = glommio::executor()
            .spawn_blocking(move || commit(&db, change))
            .await;
        done.map_err(|why| self.fail(why))
    }
}

/// One write transaction on `db`, committed (durable when it returns). Blocking.
fn commit<F>(db: &redb::Database, change: F) -> Result<(), String>
where
    F: FnOnce(&mut redb::Table<'_, &'static str, &'static str>) -> Result<(), redb::StorageError>,
{
    let tx = db.begin_write().map_err(|e| e.to_string())?;
    {
        let mut table = tx.open_table(TABLE).map_err(|e| e.to_string())?;
        change(&mut table).map_err(|e| e.to_string())?;
    }
    tx.commit().map_err(|e| e.to_string())
}

/// What shards ask the owner of an entry.
#[derive(Clone, Debug)]
pub enum Request {
    /// Which of `rcpts` (normalized) are on `tenant`'s list? Answered with `Checked`.
    Check {
        tenant: Option<String>,
        rcpts: Vec<String>,
    },
    /// Answered with `Changed`.
    Add(Entry),
    Remove {
        tenant: Option<String>,
        rcpt: String,
    },
    /// This shard's entries; answered with `Listed`.
    List {
        tenant: Option<String>,
        limit: usize,
    },
}

#[derive(Clone, Debug)]
pub enum Response {
    Checked(Vec<bool>),
    Changed(bool),
    Listed(Vec<Entry>),
}

/// How [`Suppression`] reaches the other shards (the shard driver implements it over the
/// mesh).
pub trait Remote {
    fn ask(&self, to: usize, q: Request) -> LocalFuture<'_, Result<Response, SuppressionError>>;
}

/// One shard's view of the whole suppression list: its own [`Store`], and the owners of the
/// other entries over the mesh.
pub struct Suppression {
    shard: usize,
    shards: usize,
    store: Rc<Store>,
    remote: RefCell<Option<Rc<dyn Remote>>>,
    observers: Observers,
    clock: Rc<dyn Clock>,
}

impl Suppression {
    pub fn new(
        shard: usize,
        shards: usize,
        store: Rc<Store>,
        observers: Observers,
        clock: Rc<dyn Clock>,
    ) -> Suppression {
        Suppression {
            shard,
            shards: shards.max(1),
            store,
            remote: RefCell::new(None),
            observers,
            clock,
        }
    }

    /// The mesh, once it exists (the store opens before it, with the core).
    pub fn set_remote(&self, remote: Rc<dyn Remote>) {
        *self.remote.borrow_mut() = Some(remote);
    }

    pub fn store(&self) -> &Rc<Store> {
        &self.store
    }

    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    async fn ask(&self, to: usize, q: Request) -> Result<Response, SuppressionError> {
        if to == self.shard {
            return self.serve(q).await;
        }
        let remote = self.remote.borrow().clone();
        match remote {
            Some(r) => r.ask(to, q).await,
            None => Err(SuppressionError::Peer(to)),
        }
    }

    /// The per-shard handler: what this shard answers about its own entries (from the mesh,
    /// or from itself).
    pub async fn serve(&self, q: Request) -> Result<Response, SuppressionError> {
        match q {
            Request::Check { tenant, rcpts } => Ok(Response::Checked(
                rcpts
                    .iter()
                    .map(|r| self.store.contains(tenant.as_deref(), r))
                    .collect(),
            )),
            Request::Add(entry) => {
                let added = self.store.add(&entry).await?;
                if added {
                    self.changed(Change::Add, &entry.tenant, &entry.rcpt, Some(entry.reason));
                }
                Ok(Response::Changed(added))
            }
            Request::Remove { tenant, rcpt } => {
                let removed = self.store.remove(tenant.as_deref(), &rcpt).await?;
                if removed {
                    self.changed(Change::Remove, &tenant, &rcpt, None);
                }
                Ok(Response::Changed(removed))
            }
            Request::List { tenant, limit } => {
                Ok(Response::Listed(self.store.list(tenant.as_deref(), limit)))
            }
        }
    }

    fn changed(&self, action: Change, tenant: &Option<String>, rcpt: &str, reason: Option<Reason>) {
        self.observers.emit(&Event::Suppression(&SuppressionChange {
            ts_ms: self.clock.now_ms(),
            shard: self.shard,
            action,
            recipient: rcpt.to_owned(),
            tenant: tenant.clone(),
            reason,
        }));
    }

    /// Is `rcpt` on `tenant`'s list (None: the default list)? Answered here when this shard
    /// owns it (no I/O), else by the owner; "no" when the owner cannot be asked.
    pub async fn check(&self, tenant: Option<&str>, rcpt: &str) -> bool {
        let Ok(rcpt) = normalize(rcpt) else {
            return false;
        };
        let owner = owner_of(&rcpt, self.shards);
        if owner == self.shard {
            return self.store.contains(tenant, &rcpt);
        }
        let q = Request::Check {
            tenant: tenant.map(str::to_owned),
            rcpts: vec![rcpt],
        };
        matches!(self.ask(owner, q).await, Ok(Response::Checked(v)) if v.first() == Some(&true))
    }

    /// [`Suppression::check`] for several recipients: one question per owner shard.
    pub async fn check_all(&self, tenant: Option<&str>, rcpts: &[&str]) -> Vec<bool> {
        let mut out = vec![false; rcpts.len()];
        let mut by_owner: std::collections::BTreeMap<usize, Vec<(usize, String)>> =
            Default::default();
        for (i, r) in rcpts.iter().enumerate() {
            if let Ok(r) = normalize(r) {
                by_owner
                    .entry(owner_of(&r, self.shards))
                    .or_default()
                    .push((i, r));
            }
        }
        for (owner, list) in by_owner {
            let (index, names): (Vec<usize>, Vec<String>) = list.into_iter().unzip();
            let q = Request::Check {
                tenant: tenant.map(str::to_owned),
                rcpts: names,
            };
            if let Ok(Response::Checked(found)) = self.ask(owner, q).await {
                for (i, hit) in index.into_iter().zip(found) {
                    if let Some(slot) = out.get_mut(i) {
                        *slot = hit;
                    }
                }
            }
        }
        out
    }

    /// Put `rcpt` on `tenant`'s list at its owner; true when it was not there yet.
    pub async fn add(
        &self,
        tenant: Option<&str>,
        rcpt: &str,
        reason: Reason,
        note: Option<&str>,
    ) -> Result<bool, SuppressionError> {
        check_tenant(tenant)?;
        let rcpt = normalize(rcpt)?;
        let entry = Entry {
            tenant: tenant.map(str::to_owned),
            rcpt,
            reason,
            note: note.map(|n| n.chars().take(NOTE_LEN_MAX).collect()),
            added_ms: self.clock.now_ms(),
        };
        let owner = owner_of(&entry.rcpt, self.shards);
        match self.ask(owner, Request::Add(entry)).await? {
            Response::Changed(added) => Ok(added),
            _ => Err(SuppressionError::Peer(owner)),
        }
    }

    /// Take `rcpt` off `tenant`'s list at its owner; true when it was there.
    pub async fn remove(&self, tenant: Option<&str>, rcpt: &str) -> Result<bool, SuppressionError> {
        check_tenant(tenant)?;
        let rcpt = normalize(rcpt)?;
        let owner = owner_of(&rcpt, self.shards);
        let q = Request::Remove {
            tenant: tenant.map(str::to_owned),
            rcpt,
        };
        match self.ask(owner, q).await? {
            Response::Changed(removed) => Ok(removed),
            _ => Err(SuppressionError::Peer(owner)),
        }
    }

    /// Up to `limit` entries of `tenant`'s list (None: the default list, `Some("*")`: every
    /// list) from every shard, sorted by tenant and address.
    pub async fn list(
        &self,
        tenant: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Entry>, SuppressionError> {
        let limit = limit.min(LIST_MAX);
        let mut all = Vec::new();
        for shard in 0..self.shards {
            let q = Request::List {
                tenant: tenant.map(str::to_owned),
                limit,
            };
            match self.ask(shard, q).await? {
                Response::Listed(entries) => all.extend(entries),
                _ => return Err(SuppressionError::Peer(shard)),
            }
        }
        all.sort_by(|a, b| (&a.tenant, &a.rcpt).cmp(&(&b.tenant, &b.rcpt)));
        all.truncate(limit);
        Ok(all)
    }

    /// An admin operation, from any shard: the JSON answer for the admin socket.
    ///
    /// - `list`: `{"entries": [{"tenant", "rcpt", "reason", "note", "added_ms"}, ...]}`,
    ///   gathered from every shard.
    /// - `add`: `{"added": bool}` (false: it was there); `remove`: `{"removed": bool}`, done
    ///   at the owner of the address's domain.
    pub async fn admin(
        &self,
        op: &crate::admin::SuppressionOp,
    ) -> Result<serde_json::Value, SuppressionError> {
        use crate::admin::SuppressionOp;
        match op {
            SuppressionOp::List { tenant, limit } => {
                let entries = self
                    .list(tenant.as_deref(), limit.unwrap_or(LIST_DEFAULT_MAX))
                    .await?;
                Ok(serde_json::json!({ "entries": entries }))
            }
            SuppressionOp::Add {
                tenant,
                rcpt,
                reason,
            } => {
                let added = self
                    .add(tenant.as_deref(), rcpt, Reason::Admin, reason.as_deref())
                    .await?;
                Ok(serde_json::json!({ "added": added }))
            }
            SuppressionOp::Remove { tenant, rcpt } => {
                let removed = self.remove(tenant.as_deref(), rcpt).await?;
                Ok(serde_json::json!({ "removed": removed }))
            }
        }
    }
}

impl Suppression {
    /// This shard's part of an admin operation, for the admin socket's `admin::Hooks`
    /// (called on every shard, the answers merged: lists concatenated, counts summed). `list`
    /// answers this shard's entries; `add` and `remove` act on the shard that owns the
    /// address's domain, durably before the answer, and count 0 elsewhere.
    pub fn admin_here(&self, op: &crate::admin::SuppressionOp) -> serde_json::Value {
        use crate::admin::SuppressionOp;
        let mine = |rcpt: &str| -> Result<Option<String>, SuppressionError> {
            let rcpt = normalize(rcpt)?;
            Ok((owner_of(&rcpt, self.shards) == self.shard).then_some(rcpt))
        };
        let answer = match op {
            SuppressionOp::List { tenant, limit } => {
                let limit = limit.unwrap_or(LIST_DEFAULT_MAX).min(LIST_MAX);
                Ok(serde_json::json!({ "entries": self.store.list(tenant.as_deref(), limit) }))
            }
            SuppressionOp::Add {
                tenant,
                rcpt,
                reason,
            } => mine(rcpt).and_then(|owned| {
                let Some(rcpt) = owned else {
                    return Ok(serde_json::json!({ "added": 0 }));
                };
                let entry = Entry {
                    tenant: tenant.clone(),
                    rcpt,
                    reason: Reason::Admin,
                    note: reason
                        .as_deref()
                        .map(|n| n.chars().take(NOTE_LEN_MAX).collect()),
                    added_ms: self.clock.now_ms(),
                };
                let added = self.store.add_blocking(&entry)?;
                if added {
                    self.changed(Change::Add, &entry.tenant, &entry.rcpt, Some(entry.reason));
                }
                Ok(serde_json::json!({ "added": u64::from(added) }))
            }),
            SuppressionOp::Remove { tenant, rcpt } => mine(rcpt).and_then(|owned| {
                let Some(rcpt) = owned else {
                    return Ok(serde_json::json!({ "removed": 0 }));
                };
                let removed = self.store.remove_blocking(tenant.as_deref(), &rcpt)?;
                if removed {
                    self.changed(Change::Remove, tenant, &rcpt, None);
                }
                Ok(serde_json::json!({ "removed": u64::from(removed) }))
            }),
        };
        answer.unwrap_or_else(crate::admin::error)
    }
}

/// The admin socket's way to the suppression list (`admin::Hooks`); `reinject` is not this
/// stage's and stays unwired.
pub struct AdminHooks {
    pub suppression: Option<Rc<Suppression>>,
}

impl crate::admin::Hooks for AdminHooks {
    fn suppression(&self, op: &crate::admin::SuppressionOp, _now_ms: u64) -> serde_json::Value {
        match &self.suppression {
            Some(s) => s.admin_here(op),
            None => crate::admin::error(SuppressionError::Disabled),
        }
    }

    fn reinject(&self, id: Option<&str>, now_ms: u64) -> serde_json::Value {
        crate::admin::Unwired.reinject(id, now_ms)
    }
}

/// Feeds hard bounces into the list: an observer of the core's `Attempt` events. A Bounced
/// outcome whose category is a hard bounce puts its recipient on its tenant's list (the
/// default list without one), at the owner, in a task of its own (an observer must not
/// block).
pub struct BounceFeed {
    pub suppression: Rc<Suppression>,
}

impl crate::events::Observer for BounceFeed {
    fn observe(&self, event: &Event<'_>) {
        let Event::Attempt(a) = event else { return };
        let hard = a.outcome == crate::events::AttemptOutcome::Bounced
            && a.bounce_category
                .is_some_and(crate::bounce::Category::is_hard_bounce);
        if !hard {
            return;
        }
        let suppression = self.suppression.clone();
        let tenant = a.tenant.map(str::to_owned);
        let rcpt = a.rcpt.to_owned();
        glommio::spawn_local(async move {
            if let Err(e) = suppression
                .add(tenant.as_deref(), &rcpt, Reason::Bounce, None)
                .await
            {
                tracing::warn!("cannot suppress {rcpt} after a hard bounce: {e}");
            }
        })
        .detach();
    }
}

#[cfg(test)]
mod tests;
