//! Request/reply and one-way messages between shards, over the channel mesh.
//!
//! A [`Mesh`] wraps a shard's end of the channel mesh for one request type `Q` and one answer
//! type `A`. Any task may [`call`](Mesh::call) a shard (this one included) and await its answer,
//! [`cast`](Mesh::cast) a request whose answer nobody needs, or [`gather`](Mesh::gather) one
//! answer from every shard. Each shard installs one [`Handler`] with [`Mesh::serve`].
//!
//! How it runs: one receive task per peer drains that peer's channel and never waits on
//! anything else, so answers are never stuck behind requests and a peer's waiting send always
//! makes progress. A request is handed to the handler, whose future runs in a task of its own,
//! so a handler may wait (for a disk write, a timer) without holding up other requests. The
//! handler's answer goes back on this shard's channel to the caller.
//!
//! Invariants:
//! - Every request in flight from this shard holds one entry in a table bounded by
//!   `pending_max`; a call removes its entry when it completes or when its future is dropped,
//!   a cast when the handler finished (the peer says so with a small `Done` frame). So the
//!   handler tasks a shard runs for its peers are bounded too: at most `pending_max` per peer.
//! - A request that was not handed over comes back to the caller ([`CallError::Full`],
//!   [`CallError::Closed`]). One that was handed over and never answered ends in
//!   [`CallError::Dropped`], at the latest when the peer's channel closes: no call hangs on a
//!   shard that is gone.
//! - A frame does not say who sent it: the channel it arrived on does.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::rc::{Rc, Weak};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};

use glommio::channels::shared_channel::ConnectedReceiver;

use crate::notify::Notify;
use crate::runtime::{Peers, SendError, Shard};

/// Default bound on the requests one shard has in flight (calls awaiting an answer, casts
/// not yet handled). Thousands of SMTP sessions on a shard may each hand a message to its
/// owning shard at once; 4096 covers that with room, while capping what one shard can make a
/// peer run to 4096 handler tasks and 4096 small table entries here.
pub const PENDING_MAX_DEFAULT: usize = 4096;

/// How a shard's [`Mesh`] is bounded.
#[derive(Clone, Debug)]
pub struct MeshConfig {
    /// Requests this shard may have in flight to all shards together (see
    /// [`PENDING_MAX_DEFAULT`]). Past it `call`/`try_cast` answer Full, and `call_wait`/`cast`
    /// wait for a slot.
    pub pending_max: usize,
}

impl Default for MeshConfig {
    fn default() -> Self {
        MeshConfig {
            pending_max: PENDING_MAX_DEFAULT,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error("mesh pending_max must be at least 1, got {0}")]
    PendingMax(usize),
}

/// Why a call has no answer. Every case but `Dropped` hands the request back.
#[derive(Debug, thiserror::Error)]
pub enum CallError<Q> {
    /// The channel to that shard is full, or this shard already has `pending_max` requests in
    /// flight: try later (or use the waiting variant).
    #[error("the shard is busy: channel or pending-call table full")]
    Full(Q),
    /// That shard is gone, or this mesh is shutting down: the request was never handed over.
    #[error("the shard is gone or the mesh is closed")]
    Closed(Q),
    /// No shard with that id.
    #[error("no such shard on the mesh")]
    NoShard(Q),
    /// The shard took the request but ended without answering. The request went with it and
    /// cannot come back; whether it took effect is unknown.
    #[error("the shard took the request but ended without answering")]
    Dropped,
}

impl<Q> CallError<Q> {
    /// The request, when it never left this shard.
    pub fn into_request(self) -> Option<Q> {
        match self {
            CallError::Full(q) | CallError::Closed(q) | CallError::NoShard(q) => Some(q),
            CallError::Dropped => None,
        }
    }
}

impl<Q> From<SendError<Q>> for CallError<Q> {
    fn from(err: SendError<Q>) -> Self {
        match err {
            SendError::Full(q) => CallError::Full(q),
            SendError::Closed(q) => CallError::Closed(q),
            SendError::NoShard(q) => CallError::NoShard(q),
        }
    }
}

/// The future a handler returns.
pub type Reply<A> = Pin<Box<dyn Future<Output = A>>>;

/// Serves the requests that reach one shard.
pub trait Handler<Q, A> {
    /// Serve `q` from shard `from` (which may be this shard). Called on the receive path, so
    /// the synchronous part must be short; the returned future runs in a task of its own and
    /// may wait as long as the work needs. For a cast its answer is dropped.
    fn handle(&self, from: usize, q: Q) -> Reply<A>;
}

impl<Q, A, F, Fut> Handler<Q, A> for F
where
    F: Fn(usize, Q) -> Fut,
    Fut: Future<Output = A> + 'static,
{
    fn handle(&self, from: usize, q: Q) -> Reply<A> {
        Box::pin(self(from, q))
    }
}

/// What travels on the channel mesh for a [`Mesh`]. Opaque: only a `Mesh` makes and reads
/// them; name it in `run::<Wire<Q, A>, ..>`.
pub struct Wire<Q, A>(Frame<Q, A>);

enum Frame<Q, A> {
    Request(Request<Q>),
    Answer {
        id: u64,
        a: A,
    },
    /// A cast was handled: the caster may release its entry.
    Done {
        id: u64,
    },
    /// The sender will send no more requests (it is shutting down); it still answers.
    Bye,
    /// A frame that had to wait for room, kept where the sender can take it back if the peer
    /// goes away meanwhile (see `send_waiting`). Never nested.
    Parked(Parked<Q, A>),
}

type Parked<Q, A> = Arc<Mutex<Option<Frame<Q, A>>>>;

impl<Q, A> Wire<Q, A> {
    /// The query of a request that could not be sent.
    fn into_query(self) -> Q {
        match self.0 {
            Frame::Request(request) => request.q,
            // Only `launch` hands back a failed send as a query, and it only sends requests.
            _ => unreachable!("a failed request send returned a frame that is not a request"),
        }
    }
}

struct Request<Q> {
    id: u64,
    kind: Kind,
    q: Q,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Call,
    Cast,
}

/// Requests in flight from this shard, by id. Ids only grow, so a late answer can never match a
/// newer call.
struct Pending<A> {
    next_id: u64,
    entries: HashMap<u64, Entry<A>>,
}

struct Entry<A> {
    to: usize,
    slot: Slot<A>,
}

enum Slot<A> {
    Call {
        answer: Option<A>,
        waker: Option<Waker>,
    },
    Cast,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Open,
    /// `shutdown` began: no new requests from here; still serving peers.
    Closing,
    /// Channels from here are closed; nothing more is served.
    Ended,
}

#[derive(Clone, Copy, Default)]
struct Link {
    /// The peer said it sends no more requests.
    bye: bool,
    /// The peer's channel to us closed: it sends nothing more, answers included.
    gone: bool,
}

/// Why a request was refused before anything was sent.
enum Refusal {
    Full,
    Closed,
    NoShard,
}

impl Refusal {
    fn with<Q>(self, q: Q) -> SendError<Q> {
        match self {
            Refusal::Full => SendError::Full(q),
            Refusal::Closed => SendError::Closed(q),
            Refusal::NoShard => SendError::NoShard(q),
        }
    }
}

/// One shard's end of the request/reply mesh. Made with [`Mesh::new`] on the shard's executor;
/// share it as `Rc<Mesh>`.
///
/// Ending: every shard calls [`shutdown`](Mesh::shutdown) (graceful: serves until all shards
/// are done), or [`abort`](Mesh::abort) (at once: peers' calls in flight end in `Dropped`).
/// Dropping the last `Rc` also closes the channels, but a handler that holds the mesh keeps it
/// alive; `shutdown` and `abort` release the handler, so they end such cycles.
pub struct Mesh<Q: Send + 'static, A: Send + 'static> {
    me: Weak<Self>,
    id: usize,
    count: usize,
    peers: Peers<Wire<Q, A>>,
    pending_max: usize,
    pending: RefCell<Pending<A>>,
    /// A pending entry was released, or the mesh changed state: wakes waits for a slot.
    freed: Notify,
    /// A peer said bye, a peer went away, a handler finished or a waiting request got through:
    /// wakes `shutdown`.
    progress: Notify,
    /// A peer went away: wakes sends waiting for room in its channel.
    gone: Notify,
    handler: RefCell<Option<Rc<dyn Handler<Q, A>>>>,
    /// Requests that arrived before `serve`. Bounded by the peers' own `pending_max`.
    early: RefCell<VecDeque<(usize, Request<Q>)>>,
    /// Handler tasks running now.
    serving: Cell<usize>,
    /// Requests waiting for room in a peer's channel now.
    sending: Cell<usize>,
    state: Cell<State>,
    /// Per shard id; this shard's own entry starts as bye and gone, so "all peers" checks can
    /// look at every entry.
    links: RefCell<Vec<Link>>,
}

impl<Q: Send + 'static, A: Send + 'static> Mesh<Q, A> {
    /// Take over the shard's mesh and start draining it. Must run on the shard's executor.
    /// Requests that arrive before [`serve`](Mesh::serve) wait for it.
    pub fn new(shard: Shard<Wire<Q, A>>, cfg: &MeshConfig) -> Result<Rc<Self>, MeshError> {
        if cfg.pending_max == 0 {
            return Err(MeshError::PendingMax(cfg.pending_max));
        }
        let Shard {
            id,
            count,
            peers,
            inbox,
        } = shard;
        let mut links = vec![Link::default(); count];
        if let Some(own) = links.get_mut(id) {
            *own = Link {
                bye: true,
                gone: true,
            };
        }
        let mesh = Rc::new_cyclic(|me| Mesh {
            me: me.clone(),
            id,
            count,
            peers,
            pending_max: cfg.pending_max,
            pending: RefCell::new(Pending {
                next_id: 0,
                entries: HashMap::new(),
            }),
            freed: Notify::new(),
            progress: Notify::new(),
            gone: Notify::new(),
            handler: RefCell::new(None),
            early: RefCell::new(VecDeque::new()),
            serving: Cell::new(0),
            sending: Cell::new(0),
            state: Cell::new(State::Open),
            links: RefCell::new(links),
        });
        for (from, rx) in inbox {
            glommio::spawn_local(receive(Rc::downgrade(&mesh), from, rx)).detach();
        }
        Ok(mesh)
    }

    pub fn id(&self) -> usize {
        self.id
    }

    pub fn count(&self) -> usize {
        self.count
    }

    /// Requests from this shard in flight now (for metrics and tests).
    pub fn in_flight(&self) -> usize {
        self.pending.borrow().entries.len()
    }

    /// Serve requests to this shard with `handler`, from now on (and those that arrived
    /// earlier). Replaces a previous handler. Ignored once the mesh has ended.
    pub fn serve(&self, handler: Rc<dyn Handler<Q, A>>) {
        if self.state.get() == State::Ended {
            return;
        }
        *self.handler.borrow_mut() = Some(handler.clone());
        let early = std::mem::take(&mut *self.early.borrow_mut());
        for (from, request) in early {
            self.spawn_handler(&handler, from, request);
        }
    }

    /// [`serve`](Mesh::serve) with a closure `|from, q| async move { .. }`.
    pub fn serve_fn<F, Fut>(&self, handler: F)
    where
        F: Fn(usize, Q) -> Fut + 'static,
        Fut: Future<Output = A> + 'static,
    {
        self.serve(Rc::new(handler));
    }

    /// Ask shard `to` (this one included) and wait for its answer. Never waits to hand the
    /// request over: a full channel or pending table hands it back as `Full` at once.
    pub async fn call(&self, to: usize, q: Q) -> Result<A, CallError<Q>> {
        self.call_inner(to, q, false).await
    }

    /// [`call`](Mesh::call), but waits for room in the channel and the pending table.
    pub async fn call_wait(&self, to: usize, q: Q) -> Result<A, CallError<Q>> {
        self.call_inner(to, q, true).await
    }

    /// Hand `q` to shard `to` (this one included) and return once it is handed over; the
    /// handler's answer is dropped. Waits for room in the channel and the pending table.
    pub async fn cast(&self, to: usize, q: Q) -> Result<(), SendError<Q>> {
        let id = match self.reserve(to, Kind::Cast, true).await {
            Ok(id) => id,
            Err(refusal) => return Err(refusal.with(q)),
        };
        let sent = self
            .launch(
                to,
                Request {
                    id,
                    kind: Kind::Cast,
                    q,
                },
                true,
            )
            .await;
        if sent.is_err() {
            self.remove(id);
        }
        sent
    }

    /// [`cast`](Mesh::cast) without waiting: `Full` when the channel or pending table is full.
    pub fn try_cast(&self, to: usize, q: Q) -> Result<(), SendError<Q>> {
        let id = match self.try_reserve(to, Kind::Cast) {
            Ok(id) => id,
            Err(refusal) => return Err(refusal.with(q)),
        };
        let request = Request {
            id,
            kind: Kind::Cast,
            q,
        };
        let sent = if to == self.id {
            self.dispatch(to, request);
            Ok(())
        } else {
            self.peers
                .try_send_to(to, Wire(Frame::Request(request)))
                .map_err(|err| err.map(Wire::into_query))
        };
        if sent.is_err() {
            self.remove(id);
        }
        sent
    }

    /// Ask every shard, this one included, at once, and return all answers in shard order.
    /// Each call waits for room (as [`call_wait`](Mesh::call_wait)), so `Full` never appears.
    pub async fn gather(&self, make: impl Fn(usize) -> Q) -> Vec<(usize, Result<A, CallError<Q>>)> {
        let calls = (0..self.count)
            .map(|to| Box::pin(self.call_wait(to, make(to))))
            .collect();
        join_all(calls).await.into_iter().enumerate().collect()
    }

    /// Graceful end, for every shard together: send no more requests, keep serving until every
    /// peer said the same and every handler here has answered, close this shard's channels,
    /// then wait until every peer closed its own (by then all answers to our calls are in).
    ///
    /// Waits for handlers, however long they take: race it with a glommio timer and call
    /// [`abort`](Mesh::abort) when the grace period is over.
    pub async fn shutdown(&self) {
        if self.state.get() == State::Open {
            self.state.set(State::Closing);
            self.freed.notify_all();
            while self.sending.get() > 0 {
                self.progress.notified().await;
            }
            for to in (0..self.count).filter(|&to| to != self.id) {
                // A peer that is gone needs no goodbye.
                let _ = self.send_waiting(to, Wire(Frame::Bye)).await;
            }
        }
        while !(self.all_links(|link| link.bye || link.gone) && self.serving.get() == 0) {
            self.progress.notified().await;
        }
        self.end();
        while !self.all_links(|link| link.gone) {
            self.gone.notified().await;
        }
        self.fail_all();
    }

    /// End at once: close this shard's channels, stop serving, and fail every request in flight
    /// from here with `Dropped`. Peers' calls to this shard end in `Dropped` too.
    pub fn abort(&self) {
        self.end();
        self.fail_all();
    }

    async fn call_inner(&self, to: usize, q: Q, wait: bool) -> Result<A, CallError<Q>> {
        let id = match self.reserve(to, Kind::Call, wait).await {
            Ok(id) => id,
            Err(refusal) => return Err(refusal.with(q).into()),
        };
        // Removes the entry however this future ends, dropped by its caller included.
        let _entry = EntryGuard { mesh: self, id };
        self.launch(
            to,
            Request {
                id,
                kind: Kind::Call,
                q,
            },
            wait,
        )
        .await?;
        poll_fn(|cx| self.poll_answer(id, cx))
            .await
            .ok_or(CallError::Dropped)
    }

    /// Take a pending entry for a request to `to`, waiting for a free one if `wait`.
    async fn reserve(&self, to: usize, kind: Kind, wait: bool) -> Result<u64, Refusal> {
        loop {
            match self.try_reserve(to, kind) {
                Err(Refusal::Full) if wait => self.freed.notified().await,
                done => return done,
            }
        }
    }

    fn try_reserve(&self, to: usize, kind: Kind) -> Result<u64, Refusal> {
        if to >= self.count {
            return Err(Refusal::NoShard);
        }
        if self.state.get() != State::Open {
            return Err(Refusal::Closed);
        }
        // A peer whose channel to us closed will never answer; its receiver may still drain
        // ours, so a send would succeed and the request vanish.
        if to != self.id && self.link(to).gone {
            return Err(Refusal::Closed);
        }
        let mut pending = self.pending.borrow_mut();
        if pending.entries.len() >= self.pending_max {
            return Err(Refusal::Full);
        }
        let id = pending.next_id;
        pending.next_id += 1;
        let slot = match kind {
            Kind::Call => Slot::Call {
                answer: None,
                waker: None,
            },
            Kind::Cast => Slot::Cast,
        };
        pending.entries.insert(id, Entry { to, slot });
        Ok(id)
    }

    /// Hand a request whose entry is reserved to `to`: run it here, or send it.
    async fn launch(&self, to: usize, request: Request<Q>, wait: bool) -> Result<(), SendError<Q>> {
        if to == self.id {
            self.dispatch(to, request);
            return Ok(());
        }
        let msg = Wire(Frame::Request(request));
        let sent = if wait {
            // Counted so `shutdown` says bye only after it: a bye that overtook a waiting
            // request would have the peer stop serving before the request arrives.
            let _sending = Sending::start(self);
            self.send_waiting(to, msg).await
        } else {
            self.peers.try_send_to(to, msg)
        };
        sent.map_err(|err| err.map(Wire::into_query))
    }

    /// Send, waiting while the channel is full; gives up when the peer goes away.
    ///
    /// glommio's waiting send keeps the message inside its future, so cancelling it (when the
    /// peer ends while we wait) would lose the message; and it never completes when the peer's
    /// receiver is gone and the channel full. So a message that has to wait travels parked
    /// behind a shared cell: if we give up, the cell still holds it and it comes back. The lock
    /// is taken once on each side, and only when the channel was full.
    async fn send_waiting(&self, to: usize, msg: Wire<Q, A>) -> Result<(), SendError<Wire<Q, A>>> {
        let msg = match self.peers.try_send_to(to, msg) {
            Err(SendError::Full(back)) => back,
            done => return done,
        };
        let parked: Parked<Q, A> = Arc::new(Mutex::new(Some(msg.0)));
        let handed = futures_lite::future::or(
            async {
                let wire = Wire(Frame::Parked(parked.clone()));
                self.peers.send_to(to, wire).await.is_ok()
            },
            async {
                while !self.link(to).gone {
                    self.gone.notified().await;
                }
                false
            },
        )
        .await;
        if handed {
            return Ok(());
        }
        match take_parked(&parked) {
            Some(frame) => Err(SendError::Closed(Wire(frame))),
            // Empty only if the peer took it, i.e. it was handed over after all.
            None => Ok(()),
        }
    }

    fn poll_answer(&self, id: u64, cx: &mut Context<'_>) -> Poll<Option<A>> {
        let mut pending = self.pending.borrow_mut();
        // A missing entry was failed: its peer went away, or the mesh was aborted.
        let Some(entry) = pending.entries.get_mut(&id) else {
            return Poll::Ready(None);
        };
        match &mut entry.slot {
            Slot::Call { answer, waker } => {
                if let Some(a) = answer.take() {
                    return Poll::Ready(Some(a));
                }
                if !waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    *waker = Some(cx.waker().clone());
                }
                Poll::Pending
            }
            Slot::Cast => Poll::Ready(None),
        }
    }

    /// One frame from peer `from`. The receive path: no I/O, never waits.
    fn on_frame(&self, from: usize, frame: Frame<Q, A>) {
        match frame {
            Frame::Request(request) => self.dispatch(from, request),
            Frame::Answer { id, a } => self.complete(from, id, a),
            Frame::Done { id } => self.release(from, id),
            Frame::Bye => {
                if let Some(link) = self.links.borrow_mut().get_mut(from) {
                    link.bye = true;
                }
                self.progress.notify_all();
            }
            Frame::Parked(parked) => {
                if let Some(frame) = take_parked(&parked) {
                    self.on_frame(from, frame);
                }
            }
        }
    }

    /// The peer's channel to us closed: it will answer nothing more.
    fn on_gone(&self, from: usize) {
        if let Some(link) = self.links.borrow_mut().get_mut(from) {
            link.gone = true;
        }
        let lost: Vec<Entry<A>> = {
            let mut pending = self.pending.borrow_mut();
            let ids: Vec<u64> = pending
                .entries
                .iter()
                .filter(|(_, entry)| entry.to == from)
                .map(|(&id, _)| id)
                .collect();
            ids.iter()
                .filter_map(|id| pending.entries.remove(id))
                .collect()
        };
        wake_all(lost);
        self.freed.notify_all();
        self.gone.notify_all();
        self.progress.notify_all();
    }

    /// Run a request that reached this shard, or keep it until `serve`.
    fn dispatch(&self, from: usize, request: Request<Q>) {
        if self.state.get() == State::Ended {
            // Its caller learns when our closed channel reaches it (`Dropped`).
            return;
        }
        let handler = self.handler.borrow().clone();
        match handler {
            Some(handler) => self.spawn_handler(&handler, from, request),
            None => self.early.borrow_mut().push_back((from, request)),
        }
    }

    fn spawn_handler(&self, handler: &Rc<dyn Handler<Q, A>>, from: usize, request: Request<Q>) {
        let Request { id, kind, q } = request;
        let reply = handler.handle(from, q);
        self.serving.set(self.serving.get() + 1);
        let me = self.me.clone();
        glommio::spawn_local(async move {
            let a = reply.await;
            // Hold the mesh only from here: a handler that never finishes must not keep a
            // dropped mesh, and so its channels, alive.
            let Some(mesh) = me.upgrade() else {
                return;
            };
            mesh.respond(from, id, kind, a).await;
            mesh.serving.set(mesh.serving.get().saturating_sub(1));
            mesh.progress.notify_all();
        })
        .detach();
    }

    async fn respond(&self, to: usize, id: u64, kind: Kind, a: A) {
        if to == self.id {
            match kind {
                Kind::Call => self.complete(to, id, a),
                Kind::Cast => self.release(to, id),
            }
            return;
        }
        let frame = match kind {
            Kind::Call => Frame::Answer { id, a },
            Kind::Cast => Frame::Done { id },
        };
        // When the caller's shard is gone nobody is left to read the answer.
        let _ = self.send_waiting(to, Wire(frame)).await;
    }

    /// Deliver an answer to the call waiting for it, if it still waits. No I/O, never waits.
    fn complete(&self, from: usize, id: u64, a: A) {
        let unclaimed = {
            let mut pending = self.pending.borrow_mut();
            match pending.entries.get_mut(&id) {
                Some(Entry {
                    to,
                    slot: Slot::Call { answer, waker },
                }) if *to == from => {
                    *answer = Some(a);
                    if let Some(waker) = waker.take() {
                        waker.wake();
                    }
                    None
                }
                // The caller gave up (its future was dropped): nobody wants the answer.
                _ => Some(a),
            }
        };
        // Dropped outside the borrow: the answer's own drop may call back into the mesh.
        drop(unclaimed);
    }

    /// A cast was handled: free its entry.
    fn release(&self, from: usize, id: u64) {
        let released = {
            let mut pending = self.pending.borrow_mut();
            let is_cast = pending
                .entries
                .get(&id)
                .is_some_and(|entry| entry.to == from && matches!(entry.slot, Slot::Cast));
            is_cast && pending.entries.remove(&id).is_some()
        };
        if released {
            self.freed.notify_all();
        }
    }

    fn remove(&self, id: u64) {
        let removed = self.pending.borrow_mut().entries.remove(&id);
        if removed.is_some() {
            self.freed.notify_all();
        }
    }

    /// Close this shard's channels and stop serving.
    fn end(&self) {
        self.state.set(State::Ended);
        self.peers.close();
        // Taken out before dropping: a handler or request may own things whose drop calls
        // back into the mesh.
        let handler = self.handler.borrow_mut().take();
        let early = std::mem::take(&mut *self.early.borrow_mut());
        drop(handler);
        drop(early);
        self.freed.notify_all();
    }

    /// Fail every request in flight from this shard.
    fn fail_all(&self) {
        let lost: Vec<Entry<A>> = self
            .pending
            .borrow_mut()
            .entries
            .drain()
            .map(|(_, entry)| entry)
            .collect();
        wake_all(lost);
        self.freed.notify_all();
    }

    fn link(&self, to: usize) -> Link {
        self.links.borrow().get(to).copied().unwrap_or(Link {
            bye: true,
            gone: true,
        })
    }

    fn all_links(&self, f: impl Fn(&Link) -> bool) -> bool {
        self.links.borrow().iter().all(f)
    }
}

fn take_parked<Q, A>(parked: &Parked<Q, A>) -> Option<Frame<Q, A>> {
    // Nothing panics while the lock is held, so a poisoned lock still holds a sound value.
    parked.lock().unwrap_or_else(PoisonError::into_inner).take()
}

/// Wake the calls whose entries were removed: they see the missing entry and end in `Dropped`.
fn wake_all<A>(lost: Vec<Entry<A>>) {
    for entry in lost {
        if let Slot::Call {
            waker: Some(waker), ..
        } = entry.slot
        {
            waker.wake();
        }
    }
}

struct EntryGuard<'a, Q: Send + 'static, A: Send + 'static> {
    mesh: &'a Mesh<Q, A>,
    id: u64,
}

impl<Q: Send + 'static, A: Send + 'static> Drop for EntryGuard<'_, Q, A> {
    fn drop(&mut self) {
        self.mesh.remove(self.id);
    }
}

/// Counts a request waiting for room, however its future ends.
struct Sending<'a, Q: Send + 'static, A: Send + 'static> {
    mesh: &'a Mesh<Q, A>,
}

impl<'a, Q: Send + 'static, A: Send + 'static> Sending<'a, Q, A> {
    fn start(mesh: &'a Mesh<Q, A>) -> Self {
        mesh.sending.set(mesh.sending.get() + 1);
        Sending { mesh }
    }
}

impl<Q: Send + 'static, A: Send + 'static> Drop for Sending<'_, Q, A> {
    fn drop(&mut self) {
        let mesh = self.mesh;
        mesh.sending.set(mesh.sending.get().saturating_sub(1));
        mesh.progress.notify_all();
    }
}

/// Drain one peer's channel until the peer closes it.
async fn receive<Q: Send + 'static, A: Send + 'static>(
    mesh: Weak<Mesh<Q, A>>,
    from: usize,
    rx: ConnectedReceiver<Wire<Q, A>>,
) {
    // Keep draining even once the mesh is gone: a receiver that stops reading would leave the
    // peer's waiting sends hanging.
    while let Some(Wire(frame)) = rx.recv().await {
        if let Some(mesh) = mesh.upgrade() {
            mesh.on_frame(from, frame);
        }
    }
    if let Some(mesh) = mesh.upgrade() {
        mesh.on_gone(from);
    }
}

/// Poll all futures together; outputs in input order. Fine for a few hundred futures (one per
/// shard): each wake-up polls the ones not yet done.
async fn join_all<F: Future>(futures: Vec<Pin<Box<F>>>) -> Vec<F::Output> {
    let mut futures: Vec<Option<Pin<Box<F>>>> = futures.into_iter().map(Some).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    poll_fn(move |cx| {
        let mut waiting = false;
        for (slot, output) in futures.iter_mut().zip(outputs.iter_mut()) {
            if let Some(future) = slot {
                match future.as_mut().poll(cx) {
                    Poll::Ready(value) => {
                        *output = Some(value);
                        *slot = None;
                    }
                    Poll::Pending => waiting = true,
                }
            }
        }
        if waiting {
            Poll::Pending
        } else {
            Poll::Ready(outputs.drain(..).flatten().collect())
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::runtime::{run, RuntimeError};
    use crate::testing::{bounded, small};

    /// (server shard, caller shard, 2q).
    type Echoed = (usize, usize, u64);
    type Echo = Mesh<u64, Echoed>;

    /// A mesh whose handler answers [`Echoed`].
    fn echo(shard: Shard<Wire<u64, Echoed>>, cfg: &MeshConfig) -> Rc<Echo> {
        let mesh = Mesh::new(shard, cfg).expect("valid mesh config");
        let me = mesh.id();
        mesh.serve_fn(move |from, q: u64| async move { (me, from, q * 2) });
        mesh
    }

    #[test]
    fn call_between_shards_and_to_self() -> Result<(), RuntimeError> {
        let done = run(&small(3, 8), |shard| async move {
            bounded(async {
                let mesh = echo(shard, &MeshConfig::default());
                let me = mesh.id();
                for to in 0..mesh.count() {
                    let q = (me * 10 + to) as u64;
                    let answer = mesh.call_wait(to, q).await.ok();
                    assert_eq!(answer, Some((to, me, q * 2)));
                }
                assert!(matches!(mesh.call(7, 1).await, Err(CallError::NoShard(1))));
                mesh.shutdown().await;
                assert!(matches!(mesh.call(0, 2).await, Err(CallError::Closed(2))));
            })
            .await
        })?;
        assert_eq!(done, vec![Some(()); 3]);
        Ok(())
    }

    #[test]
    fn single_shard_serves_itself() -> Result<(), RuntimeError> {
        let done = run(&small(1, 8), |shard| async move {
            bounded(async {
                let mesh = echo(shard, &MeshConfig::default());
                assert_eq!(mesh.call(0, 4).await.ok(), Some((0, 0, 8)));
                let all = mesh.gather(|to| to as u64 + 1).await;
                assert!(matches!(all.as_slice(), [(0, Ok((0, 0, 2)))]));
                assert!(mesh.try_cast(0, 5).is_ok());
                mesh.shutdown().await;
            })
            .await
        })?;
        assert_eq!(done, vec![Some(())]);
        Ok(())
    }

    #[test]
    fn many_concurrent_calls_get_their_own_answers_out_of_order() -> Result<(), RuntimeError> {
        const CALLS: u64 = 64;
        // Channels of one slot: most sends wait for room, with many tasks waiting at once.
        let done = run(&small(3, 1), |shard| async move {
            bounded(async {
                let mesh: Rc<Echo> = Mesh::new(shard, &MeshConfig::default()).expect("config");
                let me = mesh.id();
                // Later requests finish first, so answers come back out of order.
                mesh.serve_fn(move |from, q: u64| async move {
                    glommio::timer::sleep(Duration::from_millis((CALLS - q % CALLS) % 7)).await;
                    (me, from, q * 2)
                });
                let mut tasks = Vec::new();
                for to in (0..mesh.count()).filter(|&to| to != me) {
                    for q in 0..CALLS {
                        let mesh = mesh.clone();
                        tasks.push(glommio::spawn_local(async move {
                            let answer = mesh.call_wait(to, q).await.ok();
                            assert_eq!(answer, Some((to, me, q * 2)));
                        }));
                    }
                }
                for task in tasks {
                    task.await;
                }
                assert_eq!(mesh.in_flight(), 0);
                mesh.shutdown().await;
            })
            .await
        })?;
        assert_eq!(done, vec![Some(()); 3]);
        Ok(())
    }

    #[test]
    fn full_channel_hands_the_request_back() -> Result<(), RuntimeError> {
        // Shard 1 does not read its channels until shard 0 has seen them full.
        let tried = Arc::new(AtomicBool::new(false));
        let done = run(&small(2, 1), move |shard| {
            let tried = tried.clone();
            async move {
                bounded(async {
                    if shard.id == 1 {
                        while !tried.load(Ordering::Acquire) {
                            glommio::timer::sleep(Duration::from_millis(1)).await;
                        }
                        let mesh = echo(shard, &MeshConfig::default());
                        mesh.shutdown().await;
                        return;
                    }
                    let mesh = echo(shard, &MeshConfig::default());
                    let (first, ()) = futures_lite::future::zip(mesh.call(1, 1), async {
                        // The first call took the channel's only slot.
                        assert!(matches!(mesh.call(1, 2).await, Err(CallError::Full(2))));
                        assert!(matches!(mesh.try_cast(1, 3), Err(SendError::Full(3))));
                        assert_eq!(mesh.in_flight(), 1);
                        tried.store(true, Ordering::Release);
                    })
                    .await;
                    assert_eq!(first.ok(), Some((1, 0, 2)));
                    // The waiting variant waits for room instead.
                    assert_eq!(mesh.call_wait(1, 4).await.ok(), Some((1, 0, 8)));
                    mesh.shutdown().await;
                })
                .await
            }
        })?;
        assert_eq!(done, vec![Some(()); 2]);
        Ok(())
    }

    #[test]
    fn request_waiting_for_room_comes_back_when_the_peer_goes() -> Result<(), RuntimeError> {
        let waiting = Arc::new(AtomicBool::new(false));
        let done = run(&small(2, 1), move |shard| {
            let waiting = waiting.clone();
            async move {
                bounded(async {
                    if shard.id == 1 {
                        // Never read; end once shard 0 waits for room, dropping the channels.
                        while !waiting.load(Ordering::Acquire) {
                            glommio::timer::sleep(Duration::from_millis(1)).await;
                        }
                        drop(shard);
                        return;
                    }
                    let mesh = echo(shard, &MeshConfig::default());
                    let (first, (second, ())) = futures_lite::future::zip(
                        mesh.call(1, 1),
                        futures_lite::future::zip(mesh.call_wait(1, 2), async {
                            glommio::timer::sleep(Duration::from_millis(20)).await;
                            waiting.store(true, Ordering::Release);
                        }),
                    )
                    .await;
                    // The first was in shard 1's channel when it went: gone with it.
                    assert!(matches!(first, Err(CallError::Dropped)));
                    // The second never got in, so it comes back.
                    assert!(matches!(second, Err(CallError::Closed(2))));
                    assert_eq!(mesh.in_flight(), 0);
                    mesh.shutdown().await;
                })
                .await
            }
        })?;
        assert_eq!(done, vec![Some(()); 2]);
        Ok(())
    }

    #[test]
    fn full_pending_table_hands_the_request_back() -> Result<(), RuntimeError> {
        let cfg = MeshConfig { pending_max: 1 };
        let done = run(&small(2, 8), move |shard| {
            let cfg = cfg.clone();
            async move {
                bounded(async {
                    let mesh = echo(shard, &cfg);
                    if mesh.id() == 0 {
                        let (first, (second, third)) = futures_lite::future::zip(
                            mesh.call(1, 1),
                            futures_lite::future::zip(mesh.call(1, 2), mesh.call_wait(1, 3)),
                        )
                        .await;
                        assert_eq!(first.ok(), Some((1, 0, 2)));
                        assert!(matches!(second, Err(CallError::Full(2))));
                        // call_wait waited for the first call's slot.
                        assert_eq!(third.ok(), Some((1, 0, 6)));
                    }
                    mesh.shutdown().await;
                })
                .await
            }
        })?;
        assert_eq!(done, vec![Some(()); 2]);
        Ok(())
    }

    #[test]
    fn gather_asks_every_shard() -> Result<(), RuntimeError> {
        let done = run(&small(3, 8), |shard| async move {
            bounded(async {
                let mesh = echo(shard, &MeshConfig::default());
                let all = mesh.gather(|to| to as u64 * 100).await;
                let me = mesh.id();
                let answers: Vec<(usize, Option<Echoed>)> =
                    all.into_iter().map(|(to, r)| (to, r.ok())).collect();
                assert_eq!(
                    answers,
                    vec![
                        (0, Some((0, me, 0))),
                        (1, Some((1, me, 200))),
                        (2, Some((2, me, 400)))
                    ]
                );
                mesh.shutdown().await;
            })
            .await
        })?;
        assert_eq!(done, vec![Some(()); 3]);
        Ok(())
    }

    #[test]
    fn casts_are_handled_and_release_their_entries() -> Result<(), RuntimeError> {
        const CASTS: u64 = 100;
        let handled = run(&small(2, 4), |shard| async move {
            bounded(async {
                let mesh: Rc<Mesh<u64, ()>> = Mesh::new(shard, &MeshConfig::default())?;
                let sum = Rc::new(Cell::new(0u64));
                let total = sum.clone();
                mesh.serve_fn(move |_, q: u64| {
                    let total = total.clone();
                    async move { total.set(total.get() + q) }
                });
                for q in 1..=CASTS {
                    for to in 0..mesh.count() {
                        mesh.cast(to, q)
                            .await
                            .map_err(|_| MeshError::PendingMax(0))?;
                    }
                }
                // Every cast ends with its `Done`, which frees the entry.
                while mesh.in_flight() > 0 {
                    glommio::timer::sleep(Duration::from_millis(1)).await;
                }
                mesh.shutdown().await;
                Ok::<u64, MeshError>(sum.get())
            })
            .await
        })?;
        let per_shard = 2 * CASTS * (CASTS + 1) / 2;
        for result in handled {
            assert!(
                matches!(result, Some(Ok(sum)) if sum == per_shard),
                "{result:?}"
            );
        }
        Ok(())
    }

    #[test]
    fn peer_that_ends_without_answering_gives_dropped() -> Result<(), RuntimeError> {
        for abort in [false, true] {
            let done = run(&small(2, 8), move |shard| async move {
                bounded(async {
                    let mesh: Rc<Mesh<u64, u64>> =
                        Mesh::new(shard, &MeshConfig::default()).expect("config");
                    if mesh.id() == 1 {
                        // The request may arrive before `serve` (then `serve` runs it), so
                        // wait on a flag, not on a single notification.
                        let got = Rc::new((Cell::new(false), Notify::new()));
                        let seen = got.clone();
                        mesh.serve_fn(move |_, _| {
                            seen.0.set(true);
                            seen.1.notify_all();
                            std::future::pending::<u64>()
                        });
                        while !got.0.get() {
                            got.1.notified().await;
                        }
                        if abort {
                            mesh.abort();
                            // Stay alive a little: the abort alone must end the call.
                            glommio::timer::sleep(Duration::from_millis(50)).await;
                        }
                        // Returning drops the mesh, which closes its channels.
                        return;
                    }
                    mesh.serve_fn(|_, q| async move { q });
                    assert!(matches!(mesh.call(1, 9).await, Err(CallError::Dropped)));
                    assert_eq!(mesh.in_flight(), 0);
                    assert!(matches!(mesh.call(1, 10).await, Err(CallError::Closed(10))));
                    // Shard 1 is gone, so shutting down does not wait for it.
                    mesh.shutdown().await;
                })
                .await
            })?;
            assert_eq!(done, vec![Some(()); 2], "abort: {abort}");
        }
        Ok(())
    }

    #[test]
    fn dropped_call_releases_its_entry() -> Result<(), RuntimeError> {
        let done = run(&small(2, 8), |shard| async move {
            bounded(async {
                let mesh: Rc<Mesh<u64, u64>> =
                    Mesh::new(shard, &MeshConfig::default()).expect("config");
                mesh.serve_fn(|_, q| async move {
                    glommio::timer::sleep(Duration::from_millis(q)).await;
                    q
                });
                if mesh.id() == 0 {
                    let gave_up =
                        futures_lite::future::or(async { mesh.call(1, 200).await.ok() }, async {
                            glommio::timer::sleep(Duration::from_millis(10)).await;
                            None
                        })
                        .await;
                    assert_eq!(gave_up, None);
                    assert_eq!(mesh.in_flight(), 0);
                    // The late answer to the abandoned call is dropped, not misdelivered.
                    glommio::timer::sleep(Duration::from_millis(250)).await;
                    assert_eq!(mesh.call(1, 1).await.ok(), Some(1));
                }
                mesh.shutdown().await;
            })
            .await
        })?;
        assert_eq!(done, vec![Some(()); 2]);
        Ok(())
    }

    #[test]
    fn requests_before_serve_wait_for_it() -> Result<(), RuntimeError> {
        let done = run(&small(2, 8), |shard| async move {
            bounded(async {
                let mesh: Rc<Mesh<u64, u64>> =
                    Mesh::new(shard, &MeshConfig::default()).expect("config");
                if mesh.id() == 1 {
                    glommio::timer::sleep(Duration::from_millis(50)).await;
                }
                mesh.serve_fn(|_, q| async move { q + 1 });
                assert_eq!(mesh.call(1 - mesh.id(), 1).await.ok(), Some(2));
                mesh.shutdown().await;
            })
            .await
        })?;
        assert_eq!(done, vec![Some(()); 2]);
        Ok(())
    }

    #[test]
    fn shutdown_keeps_serving_until_every_shard_is_done() -> Result<(), RuntimeError> {
        let done = run(&small(2, 8), |shard| async move {
            bounded(async {
                let mesh = echo(shard, &MeshConfig::default());
                if mesh.id() == 0 {
                    // Shard 1 is already in `shutdown` by now, and still answers.
                    glommio::timer::sleep(Duration::from_millis(50)).await;
                    assert_eq!(mesh.call(1, 3).await.ok(), Some((1, 0, 6)));
                }
                mesh.shutdown().await;
                mesh.in_flight()
            })
            .await
        })?;
        assert_eq!(done, vec![Some(0); 2]);
        Ok(())
    }

    #[test]
    fn zero_pending_max_is_refused() -> Result<(), RuntimeError> {
        let refused = run(&small(1, 8), |shard| async move {
            let made = Mesh::<u64, u64>::new(shard, &MeshConfig { pending_max: 0 });
            matches!(made, Err(MeshError::PendingMax(0)))
        })?;
        assert_eq!(refused, vec![true]);
        Ok(())
    }
}
