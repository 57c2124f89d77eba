//! The connections the lease statements run on.
//!
//! Not a `sqlx::PgPool`: a connection that goes back into a sqlx pool is pinged first (a
//! `Sync` and its `ReadyForQuery`, one more round trip), in a task the pool spawns on
//! the runtime, and the connection is free again only once that round trip is done.
//! Every lease statement thus cost two round trips and a cross-thread hand-over, which
//! was most of its latency (docs/benchmarks-lease.md, "Where the time went"). The
//! ping is there to catch connections left mid-statement by a cancelled caller; here a
//! connection goes back only after its statement ran to the end (its `ReadyForQuery`
//! read, or an error response that sqlx drains before the next statement), and any
//! other connection (timed out, cancelled, I/O error) is dropped instead.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// As sqlx's pool: an idle connection is closed after this long unused...
const IDLE_TIMEOUT: Duration = Duration::from_secs(10 * 60);
/// ... and every connection after this long, so a server-side change of settings or a
/// PgBouncer reload reaches it eventually.
const MAX_LIFETIME: Duration = Duration::from_secs(30 * 60);

/// Up to `max` connections, opened on demand, reused last-in first-out.
#[derive(Debug)]
pub(crate) struct Connections {
    options: PgConnectOptions,
    permits: std::sync::Arc<Semaphore>,
    max: u32,
    idle: Mutex<Vec<Idle>>,
    open: std::sync::Arc<AtomicUsize>,
}

#[derive(Debug)]
struct Idle {
    conn: PgConnection,
    opened: Instant,
    since: Instant,
}

/// A connection checked out for one statement. Dropped without [`Checkout::give_back`]
/// (an error, a timeout, a cancelled caller), it is closed, never reused.
pub(crate) struct Checkout {
    conn: Option<PgConnection>,
    opened: Instant,
    _permit: OwnedSemaphorePermit,
    open: std::sync::Arc<AtomicUsize>,
}

impl Checkout {
    pub(crate) fn conn(&mut self) -> &mut PgConnection {
        self.conn
            .as_mut()
            .expect("connection present until given back")
    }
}

impl Drop for Checkout {
    fn drop(&mut self) {
        if self.conn.take().is_some() {
            self.open.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Connections {
    pub(crate) fn new(options: PgConnectOptions, max: u32) -> Self {
        let max = max.max(1);
        Self {
            options,
            permits: std::sync::Arc::new(Semaphore::new(max as usize)),
            max,
            idle: Mutex::new(Vec::new()),
            open: std::sync::Arc::new(AtomicUsize::new(0)),
        }
    }

    pub(crate) fn max(&self) -> u32 {
        self.max
    }

    /// Connections open now, idle or running a statement.
    pub(crate) fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Waits for a free slot, then takes the most recently used idle connection or
    /// opens one. The caller bounds the wait (its call timeout).
    pub(crate) async fn checkout(&self) -> Result<Checkout, sqlx::Error> {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| sqlx::Error::PoolClosed)?;
        let reused = {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            // Oldest at the front: close the ones unused for too long, and any past their
            // lifetime.
            let before = idle.len();
            idle.retain(|c| {
                now.duration_since(c.since) < IDLE_TIMEOUT
                    && now.duration_since(c.opened) < MAX_LIFETIME
            });
            self.open.fetch_sub(before - idle.len(), Ordering::Relaxed);
            idle.pop()
        };
        let (conn, opened) = match reused {
            Some(idle) => (idle.conn, idle.opened),
            None => {
                let conn = PgConnection::connect_with(&self.options).await?;
                self.open.fetch_add(1, Ordering::Relaxed);
                (conn, Instant::now())
            }
        };
        Ok(Checkout {
            conn: Some(conn),
            opened,
            _permit: permit,
            open: self.open.clone(),
        })
    }

    /// Keeps a connection whose statement ran to the end, for the next statement.
    pub(crate) fn give_back(&self, mut checkout: Checkout) {
        let Some(conn) = checkout.conn.take() else {
            return;
        };
        // Under the lock, so a `close` that emptied the list cannot miss this one, and
        // the list stays in the order of `since`.
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if self.permits.is_closed() || now.duration_since(checkout.opened) >= MAX_LIFETIME {
            self.open.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        idle.push(Idle {
            conn,
            opened: checkout.opened,
            since: now,
        });
    }

    /// Closes the idle connections (a `Terminate` each); busy ones close when their
    /// statement ends, since no new statement can start.
    pub(crate) async fn close(&self) {
        self.permits.close();
        let idle: Vec<Idle> =
            std::mem::take(&mut *self.idle.lock().unwrap_or_else(|e| e.into_inner()));
        for c in idle {
            self.open.fetch_sub(1, Ordering::Relaxed);
            let _ = c.conn.close().await;
        }
    }
}
