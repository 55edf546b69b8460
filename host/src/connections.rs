//! What each client connection carries beside hyper: the shutdown signal it
//! watches and the timer of its request heads, both made so a request on a
//! kept-alive connection pays for neither.
//!
//! - [`Drain`] replaces hyper-util's `GracefulShutdown`, whose watcher polls
//!   a channel shared by every connection (a lock) each time a connection
//!   is polled: here a connection's poll reads one flag, and its task's
//!   waker is registered once, for the whole connection.
//! - [`HeadTimer`] is hyper's timer for `header_read_timeout` (slowloris).
//!   hyper asks for a new sleep for every request head; tokio would arm a
//!   timer each time. Here a connection has one tokio timer, moved on only
//!   when it fires before the head it now guards is due: once per timeout,
//!   not once per request.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use hyper_util::server::graceful::GracefulConnection;
use tokio::sync::Notify;

/// The host's shutdown signal, and the count of connections still open.
#[derive(Default)]
pub struct Drain {
    started: AtomicBool,
    next_id: AtomicU64,
    /// The task of each open connection that has been polled.
    wakers: Mutex<HashMap<u64, Waker>>,
    open: AtomicUsize,
    closed: Notify,
}

impl Drain {
    /// Counts a connection from when it is accepted (a TLS handshake
    /// included) until its [`Ticket`], or what it watches, is dropped.
    pub fn ticket(self: &Arc<Self>) -> Ticket {
        self.open.fetch_add(1, Ordering::AcqRel);
        Ticket {
            drain: Arc::clone(self),
        }
    }

    /// Tells every connection to finish what it is doing and close.
    pub fn start(&self) {
        self.started.store(true, Ordering::SeqCst);
        let wakers: Vec<Waker> = self.lock().values().cloned().collect();
        for waker in wakers {
            waker.wake();
        }
    }

    /// Waits until every watched connection has closed.
    pub async fn finished(&self) {
        loop {
            let closed = self.closed.notified();
            tokio::pin!(closed);
            closed.as_mut().enable();
            if self.open.load(Ordering::Acquire) == 0 {
                return;
            }
            closed.await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Waker>> {
        self.wakers.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// An accepted connection, counted until it is dropped.
pub struct Ticket {
    drain: Arc<Drain>,
}

impl Ticket {
    /// `connection`, shut down gracefully (its request in flight finished,
    /// then closed) once [`Drain::start`] is called.
    pub fn watch<C: GracefulConnection>(self, connection: C) -> Watched<C> {
        Watched {
            connection: Box::pin(connection),
            id: self.drain.next_id.fetch_add(1, Ordering::Relaxed),
            ticket: self,
            registered: false,
            shutting_down: false,
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.drain.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.drain.closed.notify_waiters();
        }
    }
}

/// A connection watching the shutdown signal.
pub struct Watched<C> {
    connection: Pin<Box<C>>,
    /// Dropped after the connection (declared after it).
    ticket: Ticket,
    id: u64,
    registered: bool,
    shutting_down: bool,
}

impl<C: GracefulConnection> Future for Watched<C> {
    type Output = Result<(), C::Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let drain = &this.ticket.drain;
        if !this.registered {
            // A connection is polled by its own task only: that task's
            // waker stays good for the connection's life.
            drain.lock().insert(this.id, cx.waker().clone());
            this.registered = true;
        }
        if !this.shutting_down && drain.started.load(Ordering::SeqCst) {
            this.shutting_down = true;
            this.connection.as_mut().graceful_shutdown();
        }
        this.connection.as_mut().poll(cx)
    }
}

impl<C> Drop for Watched<C> {
    fn drop(&mut self) {
        if self.registered {
            self.ticket.drain.lock().remove(&self.id);
        }
    }
}

/// hyper's timer for one connection's request heads (see the module).
#[derive(Clone, Default)]
pub struct HeadTimer {
    timer: Arc<Mutex<Option<Pin<Box<tokio::time::Sleep>>>>>,
}

impl hyper::rt::Timer for HeadTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep_until(now() + duration)
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(HeadSleep {
            deadline,
            timer: Arc::clone(&self.timer),
        })
    }
}

/// One head's deadline, on the connection's timer.
struct HeadSleep {
    deadline: Instant,
    timer: Arc<Mutex<Option<Pin<Box<tokio::time::Sleep>>>>>,
}

impl hyper::rt::Sleep for HeadSleep {}

impl Future for HeadSleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let deadline = self.deadline;
        if now() >= deadline {
            return Poll::Ready(());
        }
        let mut timer = self.timer.lock().unwrap_or_else(|e| e.into_inner());
        let sleep =
            timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline.into())));
        if sleep.deadline().into_std() > deadline {
            sleep.as_mut().reset(deadline.into());
        }
        // Set for an earlier head, the timer fires early: then it moves on
        // to this head's deadline.
        while sleep.as_mut().poll(cx).is_ready() {
            if now() >= deadline {
                return Poll::Ready(());
            }
            sleep.as_mut().reset(deadline.into());
        }
        Poll::Pending
    }
}

fn now() -> Instant {
    Instant::now()
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::rt::Timer;

    #[tokio::test]
    async fn a_head_sleep_ends_at_its_own_deadline_on_a_shared_timer() {
        let timer = HeadTimer::default();
        let start = now();
        // The first head's sleep arms the connection's timer for 100 ms;
        // that head comes in time, and the next one is due at 300 ms: the
        // timer fires at 100 ms and moves on, and the sleep ends no sooner
        // than its own deadline.
        let mut first = timer.sleep_until(start + Duration::from_millis(100));
        assert!(futures::poll!(first.as_mut()).is_pending());
        drop(first);
        let second = timer.sleep_until(start + Duration::from_millis(300));
        second.await;
        let waited = now() - start;
        assert!(waited >= Duration::from_millis(300), "{waited:?}");
    }
}
