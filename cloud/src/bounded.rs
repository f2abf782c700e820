//! A bounded way into a `SyncArbiter` actor. actix's `SyncArbiter` mailboxes are unbounded; every
//! caller of the ledger and identity threads goes through [`Bounded`], which admits at most its
//! capacity of requests at once. The rest wait (without holding a thread) until one finishes:
//! the decision for a full queue is to wait, so no request is lost or refused for load alone.

use std::sync::Arc;

use actix::{dev::ToEnvelope, prelude::*};
use tokio::sync::Semaphore;

/// Requests the ledger thread holds at once (queued or running).
pub const LEDGER_QUEUE: usize = 256;
/// Requests the identity thread holds at once; 1:N searches and template syncs beyond it wait,
/// and never in the ledger's queue.
pub const IDENTITY_QUEUE: usize = 64;

/// An actor's address with a bound on requests in its mailbox.
pub struct Bounded<A: Actor> {
    addr: Addr<A>,
    permits: Arc<Semaphore>,
}

impl<A: Actor> Clone for Bounded<A> {
    fn clone(&self) -> Self {
        Bounded {
            addr: self.addr.clone(),
            permits: self.permits.clone(),
        }
    }
}

impl<A: Actor> Bounded<A> {
    /// At most `capacity` requests to `addr` at once.
    pub fn new(addr: Addr<A>, capacity: usize) -> Self {
        Bounded {
            addr,
            permits: Arc::new(Semaphore::new(capacity)),
        }
    }

    /// Sends `msg` once there is room, and waits for the answer.
    pub async fn send<M>(&self, msg: M) -> Result<M::Result, MailboxError>
    where
        M: Message + Send + 'static,
        M::Result: Send,
        A: Handler<M>,
        A::Context: ToEnvelope<A, M>,
    {
        let _permit = self
            .permits
            .acquire()
            .await
            .expect("the semaphore is never closed");
        self.addr.send(msg).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Slow;
    impl Actor for Slow {
        type Context = SyncContext<Self>;
    }
    #[derive(Message)]
    #[rtype(result = "usize")]
    struct Work;
    impl Handler<Work> for Slow {
        type Result = usize;
        fn handle(&mut self, _: Work, _: &mut Self::Context) -> usize {
            std::thread::sleep(std::time::Duration::from_millis(20));
            1
        }
    }

    #[actix::test]
    async fn no_more_than_the_bound_are_in_the_mailbox_and_every_request_is_answered() {
        let bounded = Bounded::new(SyncArbiter::start(1, || Slow), 2);
        let in_flight = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let most = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (bounded, in_flight, most) = (bounded.clone(), in_flight.clone(), most.clone());
            tasks.push(actix::spawn(async move {
                let _permit = bounded.permits.acquire().await.unwrap();
                let now = in_flight.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                most.fetch_max(now, std::sync::atomic::Ordering::SeqCst);
                let answer = bounded.addr.send(Work).await.unwrap();
                in_flight.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                answer
            }));
        }
        let mut answered = 0;
        for task in tasks {
            answered += task.await.unwrap();
        }
        assert_eq!(answered, 8);
        assert!(most.load(std::sync::atomic::Ordering::SeqCst) <= 2);
        // And through `send` itself.
        assert_eq!(bounded.send(Work).await.unwrap(), 1);
    }
}
