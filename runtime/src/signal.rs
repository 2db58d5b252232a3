//! A value that many tasks watch for changes: the shape of `tokio::sync::watch`, used for
//! the runtime's control signals (stop, fatal failure, a watch stream closing).
//!
//! It exists because tokio's watch channel spreads its waiters over eight queues picked at
//! random from tokio's thread-local RNG, whose seed depends on a process-wide counter: the
//! order in which waiters wake then differs between two runs of one simulation seed (and
//! with how many seeds ran before in the process), so runs would not replay. Here waiters
//! queue on one `tokio::sync::Notify` and wake in the order they started waiting. It must
//! stay free of any randomness for that reason.

use std::ops::Deref;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard};

use tokio::sync::Notify;

struct Shared<T> {
    /// The value and how many times it was replaced.
    value: RwLock<(T, u64)>,
    changed: Notify,
    senders: AtomicUsize,
}

impl<T> Shared<T> {
    fn read(&self) -> RwLockReadGuard<'_, (T, u64)> {
        // Writers only swap the value in; a panic cannot leave it half-written.
        self.value.read().unwrap_or_else(|p| p.into_inner())
    }

    fn closed(&self) -> bool {
        self.senders.load(Ordering::Acquire) == 0
    }
}

/// Every sender is gone: the value can no longer change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the signal's sender is gone")]
pub struct Closed;

/// Creates a signal holding `init`.
pub fn channel<T>(init: T) -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Shared {
        value: RwLock::new((init, 0)),
        changed: Notify::new(),
        senders: AtomicUsize::new(1),
    });
    (
        Sender {
            shared: shared.clone(),
        },
        Receiver { shared, seen: 0 },
    )
}

pub struct Sender<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Sender<T> {
    /// Replaces the value and wakes every waiter; returns the old value.
    pub fn send_replace(&self, value: T) -> T {
        let old = {
            let mut slot = self.shared.value.write().unwrap_or_else(|p| p.into_inner());
            slot.1 += 1;
            std::mem::replace(&mut slot.0, value)
        };
        self.shared.changed.notify_waiters();
        old
    }

    pub fn subscribe(&self) -> Receiver<T> {
        Receiver {
            shared: self.shared.clone(),
            seen: self.shared.read().1,
        }
    }

    pub fn borrow(&self) -> Ref<'_, T> {
        Ref(self.shared.read())
    }
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        self.shared.senders.fetch_add(1, Ordering::AcqRel);
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        if self.shared.senders.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.shared.changed.notify_waiters();
        }
    }
}

pub struct Receiver<T> {
    shared: Arc<Shared<T>>,
    /// The version this receiver has seen.
    seen: u64,
}

impl<T> Clone for Receiver<T> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
            seen: self.seen,
        }
    }
}

/// A read guard on the current value. Do not hold it across an `.await`.
pub struct Ref<'a, T>(RwLockReadGuard<'a, (T, u64)>);

impl<T> Deref for Ref<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0 .0
    }
}

impl<T> Receiver<T> {
    pub fn borrow(&self) -> Ref<'_, T> {
        Ref(self.shared.read())
    }

    /// The current value, marking it seen.
    pub fn borrow_and_update(&mut self) -> Ref<'_, T> {
        let guard = self.shared.read();
        self.seen = guard.1;
        Ref(guard)
    }

    /// Waits until the value changes after the last one this receiver saw.
    pub async fn changed(&mut self) -> Result<(), Closed> {
        loop {
            // Registered before checking, so a change between the check and the wait is
            // not missed.
            let notified = self.shared.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let version = self.shared.read().1;
            if version != self.seen {
                self.seen = version;
                return Ok(());
            }
            if self.shared.closed() {
                return Err(Closed);
            }
            notified.await;
        }
    }

    /// Waits until `ready` holds for the value (checking the current one first).
    pub async fn wait_for(&mut self, mut ready: impl FnMut(&T) -> bool) -> Result<(), Closed> {
        loop {
            let notified = self.shared.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let guard = self.shared.read();
                self.seen = guard.1;
                if ready(&guard.0) {
                    return Ok(());
                }
            }
            if self.shared.closed() {
                return Err(Closed);
            }
            notified.await;
        }
    }
}

#[cfg(all(test, not(madsim)))]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waiters_see_changes_and_closing() {
        let (tx, mut rx) = channel(false);
        let mut other = rx.clone();
        let waiter = tokio::spawn(async move { other.wait_for(|v| *v).await });
        tokio::task::yield_now().await;
        assert!(!*rx.borrow());
        tx.send_replace(true);
        assert_eq!(waiter.await.unwrap(), Ok(()));
        assert_eq!(rx.changed().await, Ok(()));
        assert!(*rx.borrow_and_update());
        // Nothing new: changed() waits until the sender goes away.
        let pending = tokio::spawn(async move { rx.changed().await });
        tokio::task::yield_now().await;
        drop(tx);
        assert_eq!(pending.await.unwrap(), Err(Closed));
    }

    #[tokio::test]
    async fn a_subscriber_starts_from_the_current_value() {
        let (tx, _rx) = channel(1);
        tx.send_replace(2);
        let mut late = tx.subscribe();
        assert_eq!(*late.borrow(), 2);
        let waiting = tokio::spawn(async move { late.changed().await.map(|_| *late.borrow()) });
        tokio::task::yield_now().await;
        tx.send_replace(3);
        assert_eq!(waiting.await.unwrap(), Ok(3));
    }
}
