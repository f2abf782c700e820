//! State owned by one dedicated thread and reached through a bounded queue: what does disk I/O
//! (a sled flush) or long CPU work (a scan) must not run on an async thread, and one owner means
//! no locks. Each call returns its own typed result.

use std::fmt::Display;

use tokio::sync::{mpsc, oneshot};

type Job<S> = Box<dyn FnOnce(&mut S) + Send>;

/// A handle to state `S` owned by its own thread; cheap to clone.
pub struct Worker<S> {
    name: &'static str,
    jobs: mpsc::Sender<Job<S>>,
}

impl<S> Clone for Worker<S> {
    fn clone(&self) -> Self {
        Worker {
            name: self.name,
            jobs: self.jobs.clone(),
        }
    }
}

impl<S: Send + 'static> Worker<S> {
    /// Moves `state` onto a new thread named `name`; at most `queue` calls wait for it, a caller
    /// beyond that waits (without holding an async thread) until there is room.
    pub fn start(name: &'static str, queue: usize, mut state: S) -> Self {
        let (jobs, mut waiting) = mpsc::channel::<Job<S>>(queue.max(1));
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                while let Some(job) = waiting.blocking_recv() {
                    job(&mut state);
                }
            })
            .unwrap_or_else(|e| crate::fail_stop(name, &e));
        Worker { name, jobs }
    }

    /// Runs `op` on the owner's thread and returns what it returned.
    pub async fn call<T, F>(&self, op: F) -> T
    where
        T: Send + 'static,
        F: FnOnce(&mut S) -> T + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job<S> = Box::new(move |state| {
            let _ = tx.send(op(state));
        });
        if self.jobs.send(job).await.is_err() {
            crate::fail_stop(self.name, &"its thread stopped");
        }
        match rx.await {
            Ok(value) => value,
            // The thread panicked inside `op`: its state is unknown.
            Err(_) => crate::fail_stop(self.name, &"its thread stopped"),
        }
    }

    /// Runs `op` on the owner's thread; an error stops the process ([`crate::fail_stop`]): after a
    /// failed write nobody knows what is on disk, and answering "nothing was written" is how money
    /// moves after "declined".
    pub async fn run<T, E, F>(&self, op: F) -> T
    where
        T: Send + 'static,
        E: Display + Send + 'static,
        F: FnOnce(&mut S) -> Result<T, E> + Send + 'static,
    {
        let name = self.name;
        self.call(move |state| match op(state) {
            Ok(value) => value,
            Err(error) => crate::fail_stop(name, &error),
        })
        .await
    }

    /// Like [`Worker::run`] without waiting for the result (stores that only need to happen).
    /// Queued at once when there is room, so that calls made one after the other run in that
    /// order; only when the queue is full does it wait on a task (needs a Tokio runtime).
    pub fn spawn<E, F>(&self, op: F)
    where
        E: Display + Send + 'static,
        F: FnOnce(&mut S) -> Result<(), E> + Send + 'static,
    {
        let name = self.name;
        let job: Job<S> = Box::new(move |state| {
            if let Err(error) = op(state) {
                crate::fail_stop(name, &error);
            }
        });
        match self.jobs.try_send(job) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(job)) => {
                let jobs = self.jobs.clone();
                tokio::spawn(async move {
                    if jobs.send(job).await.is_err() {
                        crate::fail_stop(name, &"its thread stopped");
                    }
                });
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                crate::fail_stop(name, &"its thread stopped")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn calls_run_in_order_on_the_owner_thread_and_return_their_results() {
        let worker = Worker::start("test-worker", 2, Vec::<u32>::new());
        let mut answers = Vec::new();
        for i in 0..10 {
            answers.push(
                worker
                    .call(move |v| {
                        v.push(i);
                        (std::thread::current().name().map(str::to_owned), v.len())
                    })
                    .await,
            );
        }
        for (i, (thread, len)) in answers.into_iter().enumerate() {
            assert_eq!(thread.as_deref(), Some("test-worker"));
            assert_eq!(len, i + 1);
        }
        let held = worker.call(|v| v.clone()).await;
        assert_eq!(held, (0..10).collect::<Vec<_>>());
        let sum: u32 = worker.run(|v| Ok::<_, String>(v.iter().sum())).await;
        assert_eq!(sum, 45);
    }
}
