//! A wake-all notification for tasks on one shard.
//!
//! Shard-local state lives in `RefCell`s; a task that waits for that state to change loops
//! `while !ready() { notify.notified().await }`. Single-threaded, so no wake-up can slip between
//! the check and the wait: a [`Notified`] remembers the epoch it was created in and completes
//! once any later `notify_all` ran.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

#[derive(Default)]
pub struct Notify {
    epoch: Cell<u64>,
    wakers: RefCell<Vec<Waker>>,
}

impl Notify {
    pub fn new() -> Notify {
        Notify::default()
    }

    /// Wake every task waiting now. No I/O, no allocation.
    pub fn notify_all(&self) {
        self.epoch.set(self.epoch.get().wrapping_add(1));
        let wakers = std::mem::take(&mut *self.wakers.borrow_mut());
        for waker in wakers {
            waker.wake();
        }
    }

    /// Completes at the first `notify_all` after this call.
    pub fn notified(&self) -> Notified<'_> {
        Notified {
            notify: self,
            epoch: self.epoch.get(),
            registered: false,
        }
    }
}

pub struct Notified<'a> {
    notify: &'a Notify,
    epoch: u64,
    registered: bool,
}

impl Future for Notified<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.notify.epoch.get() != self.epoch {
            return Poll::Ready(());
        }
        if !self.registered {
            self.notify.wakers.borrow_mut().push(cx.waker().clone());
            self.registered = true;
        } else {
            // Polled again without a notification (e.g. raced against a timer): keep the newest
            // waker rather than piling up copies.
            let mut wakers = self.notify.wakers.borrow_mut();
            if !wakers.iter().any(|w| w.will_wake(cx.waker())) {
                wakers.push(cx.waker().clone());
            }
        }
        Poll::Pending
    }
}
