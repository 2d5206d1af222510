//! A process-wide stop signal that tasks await instead of polling a flag.
//!
//! [`Stop`] is shared by every shard (it is an `Arc`). Any thread may [`Stop::trigger`] it; every
//! task waiting in [`Stop::wait`] on any shard is then woken through its own `Waker` (glommio
//! queues a foreign thread's wake-up to the owning executor and kicks its eventfd).
//!
//! The lock is taken only when a task starts or stops waiting and once by the trigger, never per
//! message, so waiting costs nothing on the hot path. To keep that lock small when thousands of
//! tasks on one shard wait for stop (sessions, delivery connections), each shard makes one
//! [`LocalStop`]: a single relay task waits on the process-wide signal and then wakes all local
//! waiters through the shard-local [`Notify`].
//!
//! Invariant: once triggered, a stop stays triggered; every wait that starts afterwards
//! completes at once.

use std::cell::Cell;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use crate::notify::Notify;

/// The process-wide stop signal. Cheap to clone; all clones are the same signal.
///
/// `trigger` takes a lock and runs wakers, so it is not async-signal-safe: do not call it from
/// inside a signal handler. Receive signals on a plain thread instead, e.g. with
/// `signal_hook::iterator::Signals`, and trigger from there.
#[derive(Clone, Default)]
pub struct Stop {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    triggered: AtomicBool,
    waiters: Mutex<Waiters>,
}

/// The tasks waiting now, one entry each (removed when their wait ends or is dropped). With one
/// [`LocalStop`] per shard this holds about one entry per shard, so it needs no other limit.
#[derive(Default)]
struct Waiters {
    next_key: u64,
    wakers: HashMap<u64, Waker>,
}

impl Stop {
    pub fn new() -> Stop {
        Stop::default()
    }

    /// Ask everything to stop, from any thread. Idempotent.
    pub fn trigger(&self) {
        // The flag is set before the lock is taken: a waiter that registers after our drain
        // sees it under the lock, so no waiter can be left behind.
        if self.inner.triggered.swap(true, Ordering::AcqRel) {
            return;
        }
        let wakers = std::mem::take(&mut self.inner.lock().wakers);
        // Wake outside the lock: a wake-up to another executor does a channel send and an
        // eventfd write, which needs no lock of ours held.
        for waker in wakers.into_values() {
            waker.wake();
        }
    }

    /// Whether stop was triggered. One atomic load: fine on hot paths.
    pub fn is_triggered(&self) -> bool {
        self.inner.triggered.load(Ordering::Acquire)
    }

    /// Completes once stop is triggered (at once if it already was). Safe to drop early, e.g.
    /// when raced against a glommio timer: the registration is removed.
    pub fn wait(&self) -> StopWait<'_> {
        StopWait {
            stop: self,
            key: None,
            waker: None,
        }
    }

    /// Tasks registered as waiting now (the relay of each [`LocalStop`] counts as one).
    pub fn waiting(&self) -> usize {
        self.inner.lock().wakers.len()
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Waiters> {
        // Nothing panics while the lock is held (map insert/remove/take), and the map stays
        // consistent even if something did, so a poisoned lock is still safe to use.
        self.waiters.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The future returned by [`Stop::wait`].
pub struct StopWait<'a> {
    stop: &'a Stop,
    key: Option<u64>,
    /// The waker registered under `key`, kept here so a re-poll by the same task skips the lock.
    waker: Option<Waker>,
}

impl Future for StopWait<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.stop.is_triggered() {
            return Poll::Ready(());
        }
        if self.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            return Poll::Pending;
        }
        let stop = self.stop;
        let mut waiters = stop.inner.lock();
        if stop.is_triggered() {
            return Poll::Ready(());
        }
        let key = match self.key {
            Some(key) => key,
            None => {
                let key = waiters.next_key;
                waiters.next_key = key.wrapping_add(1);
                key
            }
        };
        waiters.wakers.insert(key, cx.waker().clone());
        drop(waiters);
        self.key = Some(key);
        self.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl Drop for StopWait<'_> {
    fn drop(&mut self) {
        let Some(key) = self.key else {
            return;
        };
        // After a trigger the map was drained (or is about to be, and waking a finished wait
        // is harmless), so there is nothing to remove and no reason to contend for the lock.
        if self.stop.is_triggered() {
            return;
        }
        self.stop.inner.lock().wakers.remove(&key);
    }
}

/// A shard's view of a [`Stop`]: any number of local tasks wait on it, and only its relay task
/// is registered with the process-wide signal.
///
/// Must be created on the shard's executor (it spawns the relay there). Dropping it cancels the
/// relay, which removes its registration.
pub struct LocalStop {
    stop: Stop,
    triggered: Cell<bool>,
    notify: Notify,
    /// Held, not detached: dropping the `LocalStop` cancels the relay.
    _relay: glommio::Task<()>,
}

impl LocalStop {
    pub fn new(stop: Stop) -> Rc<LocalStop> {
        Rc::new_cyclic(|me: &Weak<LocalStop>| {
            let me = me.clone();
            let global = stop.clone();
            let relay = glommio::spawn_local(async move {
                global.wait().await;
                if let Some(local) = me.upgrade() {
                    local.triggered.set(true);
                    local.notify.notify_all();
                }
            });
            LocalStop {
                stop,
                triggered: Cell::new(false),
                notify: Notify::new(),
                _relay: relay,
            }
        })
    }

    /// Whether stop was triggered. Also true in the short window after the trigger and before
    /// the relay ran, so no task starts new work it would have to abandon.
    pub fn is_triggered(&self) -> bool {
        self.triggered.get() || self.stop.is_triggered()
    }

    /// Completes once stop is triggered. No lock, no allocation beyond the local waker list.
    pub async fn wait(&self) {
        while !self.is_triggered() {
            self.notify.notified().await;
        }
    }

    /// The process-wide signal, e.g. to trigger it from this shard.
    pub fn stop(&self) -> &Stop {
        &self.stop
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::runtime::{run, RuntimeError};
    use crate::testing::{bounded, small, TEST_TIMEOUT};

    /// Trigger `stop` from a plain thread once `waiting` tasks are registered with it and
    /// `ready` says so, so the wake-up really crosses threads to tasks already asleep. Returns
    /// how many were registered at the trigger.
    fn trigger_when(
        stop: &Stop,
        waiting: usize,
        ready: impl Fn() -> bool + Send + 'static,
    ) -> std::thread::JoinHandle<Option<usize>> {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let deadline = Instant::now() + TEST_TIMEOUT;
            while stop.waiting() < waiting || !ready() {
                if Instant::now() > deadline {
                    return None;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            let registered = stop.waiting();
            stop.trigger();
            Some(registered)
        })
    }

    #[test]
    fn trigger_from_a_plain_thread_wakes_every_shard() -> Result<(), RuntimeError> {
        let stop = Stop::new();
        let trigger = trigger_when(&stop, 3, || true);
        let woke = run::<(), _, _, _>(&small(3, 8), {
            let stop = stop.clone();
            move |_| {
                let stop = stop.clone();
                async move { bounded(stop.wait()).await }
            }
        })?;
        assert_eq!(woke, vec![Some(()); 3]);
        assert_eq!(trigger.join().ok(), Some(Some(3)));
        // Once triggered, a new wait completes at once.
        assert!(stop.is_triggered());
        futures_lite::future::block_on(stop.wait());
        assert_eq!(stop.waiting(), 0);
        Ok(())
    }

    #[test]
    fn local_stop_wakes_many_tasks_with_one_registration() -> Result<(), RuntimeError> {
        const TASKS: usize = 1000;
        let stop = Stop::new();
        let started = Arc::new(AtomicUsize::new(0));
        let trigger = trigger_when(&stop, 1, {
            let started = started.clone();
            move || started.load(Ordering::Acquire) == TASKS
        });
        let woke = run::<(), _, _, _>(&small(1, 8), {
            let stop = stop.clone();
            move |_| {
                let stop = stop.clone();
                let started = started.clone();
                async move {
                    bounded(async {
                        let local = LocalStop::new(stop.clone());
                        let woken = Rc::new(Cell::new(0usize));
                        let tasks: Vec<_> = (0..TASKS)
                            .map(|_| {
                                let (local, woken) = (local.clone(), woken.clone());
                                let started = started.clone();
                                glommio::spawn_local(async move {
                                    // Counted in the same poll that starts the wait.
                                    started.fetch_add(1, Ordering::Release);
                                    local.wait().await;
                                    woken.set(woken.get() + 1);
                                })
                            })
                            .collect();
                        for task in tasks {
                            task.await;
                        }
                        woken.get()
                    })
                    .await
                }
            }
        })?;
        assert_eq!(woke, vec![Some(TASKS)]);
        // The thread triggered with all local tasks asleep and only the relay registered.
        assert_eq!(trigger.join().ok(), Some(Some(1)));
        Ok(())
    }

    #[test]
    fn a_dropped_wait_unregisters() -> Result<(), RuntimeError> {
        let stop = Stop::new();
        let left = run::<(), _, _, _>(&small(1, 8), {
            let stop = stop.clone();
            move |_| {
                let stop = stop.clone();
                async move {
                    let timed_out = futures_lite::future::or(
                        async {
                            stop.wait().await;
                            false
                        },
                        async {
                            glommio::timer::sleep(Duration::from_millis(10)).await;
                            true
                        },
                    )
                    .await;
                    let local = LocalStop::new(stop.clone());
                    glommio::timer::sleep(Duration::from_millis(1)).await;
                    let with_relay = stop.waiting();
                    drop(local);
                    // The relay's cancellation runs on the next turn of the executor.
                    glommio::timer::sleep(Duration::from_millis(1)).await;
                    (timed_out, with_relay, stop.waiting())
                }
            }
        })?;
        assert_eq!(left, vec![(true, 1, 0)]);
        Ok(())
    }
}
