//! Coalesces the database calls of all electors of one process: leaders' renews into
//! one `renew_many` statement, followers' "is it free, and if not, when?" checks into
//! one `acquirable` read.
//!
//! A replica holding 1 000 leases would otherwise send 1 000 `UPDATE`s every retry
//! period, and a standby 1 000 `acquire`s. Electors with the same retry period tick on a
//! shared grid (see [`Elector::run`](super::Elector::run)), so their requests arrive
//! within a few milliseconds of each other; the batcher waits a short linger after the
//! first request and sends everything that has queued as one statement per kind.
//! Followers then `acquire` only the leases the read found free or expired, or that it
//! found about to expire (at that instant: see [`Elector::run`](super::Elector::run)).
//!
//! Safety does not depend on the batching: each elector still takes its `sent` instant
//! before queueing its request, so the database's `renewed_at` (taken when the batch
//! runs) is never earlier than the instant the elector's `valid_until` counts from, and
//! each elector still abandons its request at its own remaining deadline. A request
//! whose elector has given up is dropped from the next batch rather than renewed: a
//! lease nobody acts on must be left to expire.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::identity::{Holder, LeaseName};
use super::store::{Availability, Lease, LeaseStore};
use crate::{Error, Result};

/// Longest wait for more requests after the first one of a batch.
pub const DEFAULT_LINGER: Duration = Duration::from_millis(5);

/// Largest batch: 10 000 leases renew in one statement in 127 to 134 ms, median, on a
/// quiet machine (docs/benchmarks-lease.md), but longer than the 1 s call timeout on a
/// replica busy starting 10 000 pods (docs/benchmarks.md, "Leaner caches").
const MAX_BATCH: usize = 10_000;

struct Renew {
    name: LeaseName,
    epoch: i64,
    reply: oneshot::Sender<Result<Option<Lease>>>,
}

struct Probe {
    name: LeaseName,
    reply: oneshot::Sender<Result<Availability>>,
}

enum Request {
    Renew(Renew),
    Probe(Probe),
}

impl Request {
    fn abandoned(&self) -> bool {
        match self {
            Request::Renew(r) => r.reply.is_closed(),
            Request::Probe(p) => p.reply.is_closed(),
        }
    }
}

/// A handle on the batching task of one holder. Cloning shares the task.
#[derive(Clone)]
pub struct LeaseBatcher {
    holder: Holder,
    tx: mpsc::UnboundedSender<Request>,
    statements: Arc<AtomicU64>,
}

impl LeaseBatcher {
    /// Starts the batching task for `holder`; it ends when the last handle is dropped.
    pub fn spawn(store: LeaseStore, holder: Holder, linger: Duration) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let statements = Arc::new(AtomicU64::new(0));
        tokio::spawn(batch_loop(
            store,
            holder.clone(),
            linger,
            rx,
            statements.clone(),
        ));
        Self {
            holder,
            tx,
            statements,
        }
    }

    pub fn holder(&self) -> &Holder {
        &self.holder
    }

    /// Renews `name` at `epoch` for this batcher's holder, in the next batch.
    /// `Ok(None)` means "you are not the leader", exactly as [`LeaseStore::renew`].
    pub async fn renew(&self, name: &LeaseName, epoch: i64) -> Result<Option<Lease>> {
        let (reply, answer) = oneshot::channel();
        self.call(
            Request::Renew(Renew {
                name: name.clone(),
                epoch,
                reply,
            }),
            answer,
        )
        .await
    }

    /// `name`'s row and whether it is missing, free or expired on the database's clock
    /// (if not, an `acquire` would fail), and if not, how long until it could be; in the
    /// next batch (see [`LeaseStore::acquirable`]).
    pub async fn acquirable(&self, name: &LeaseName) -> Result<Availability> {
        let (reply, answer) = oneshot::channel();
        let request = Request::Probe(Probe {
            name: name.clone(),
            reply,
        });
        self.call(request, answer).await
    }

    async fn call<T>(&self, request: Request, answer: oneshot::Receiver<Result<T>>) -> Result<T> {
        if self.tx.send(request).is_err() {
            return Err(Error::BatcherStopped);
        }
        match answer.await {
            Ok(result) => result,
            Err(_) => Err(Error::BatcherStopped),
        }
    }

    /// How many statements (renews and reads) this batcher has sent.
    pub fn statements(&self) -> u64 {
        self.statements.load(Ordering::Relaxed)
    }
}

async fn batch_loop(
    store: LeaseStore,
    holder: Holder,
    linger: Duration,
    mut rx: mpsc::UnboundedReceiver<Request>,
    statements: Arc<AtomicU64>,
) {
    let holder = Arc::new(holder);
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        let linger_until = tokio::time::Instant::now() + linger;
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(request) => batch.push(request),
                Err(_) => match tokio::time::timeout_at(linger_until, rx.recv()).await {
                    Ok(Some(request)) => batch.push(request),
                    Ok(None) | Err(_) => break,
                },
            }
        }
        batch.retain(|request| !request.abandoned());
        let (mut renews, mut probes) = (Vec::new(), Vec::new());
        for request in batch {
            match request {
                Request::Renew(renew) => renews.push(renew),
                Request::Probe(probe) => probes.push(probe),
            }
        }
        // Each batch runs on its own task so one hung connection does not hold back the
        // calls queued after it; the pool bounds how many run at once.
        if !renews.is_empty() {
            statements.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(send_renews(store.clone(), holder.clone(), renews));
        }
        if !probes.is_empty() {
            statements.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(send_probes(store.clone(), probes));
        }
    }
}

async fn send_renews(store: LeaseStore, holder: Arc<Holder>, batch: Vec<Renew>) {
    let held: Vec<(LeaseName, i64)> = batch.iter().map(|r| (r.name.clone(), r.epoch)).collect();
    match store.renew_many(&holder, &held).await {
        Ok(renewed) => {
            let mut by_key: HashMap<(&str, i64), &Lease> = HashMap::with_capacity(renewed.len());
            for lease in &renewed {
                by_key.insert((lease.name.as_str(), lease.epoch), lease);
            }
            for request in batch {
                let lease = by_key
                    .get(&(request.name.as_str(), request.epoch))
                    .map(|l| (*l).clone());
                let _ = request.reply.send(Ok(lease));
            }
        }
        Err(error) => {
            let error = Arc::new(error);
            for request in batch {
                let _ = request.reply.send(Err(Error::Shared(error.clone())));
            }
        }
    }
}

async fn send_probes(store: LeaseStore, batch: Vec<Probe>) {
    let mut names: Vec<LeaseName> = batch.iter().map(|p| p.name.clone()).collect();
    names.sort_unstable();
    names.dedup();
    match store.acquirable(&names).await {
        Ok(found) => {
            let by_name: HashMap<&str, &Availability> =
                found.iter().map(|a| (a.name.as_str(), a)).collect();
            for request in batch {
                let answer = match by_name.get(request.name.as_str()) {
                    Some(availability) => Ok((*availability).clone()),
                    // The read returns a row per name asked for; this would be a bug.
                    None => Err(Error::Config(format!(
                        "the acquirable read returned nothing for lease {:?}",
                        request.name
                    ))),
                };
                let _ = request.reply.send(answer);
            }
        }
        Err(error) => {
            let error = Arc::new(error);
            for request in batch {
                let _ = request.reply.send(Err(Error::Shared(error.clone())));
            }
        }
    }
}
