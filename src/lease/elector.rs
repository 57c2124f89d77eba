//! The per-lease leadership state machine.
//!
//! ```text
//! Follower --acquire ok--> Leader{epoch, last_renew_sent}
//! Leader   --renew ok--> Leader (last_renew_sent = send time of that renew)
//! Leader   --renew matched nothing--> Follower          (lost: step down now)
//! Leader   --no successful renew within renew_deadline--> Follower
//! Leader   --shutdown--> Follower (still holding the row) --release()--> free
//! ```
//!
//! The published [`Leadership`] carries a monotonic `valid_until`, so "am I leader?" is
//! answered from the clock at the moment of asking: a process that was paused past its
//! deadline sees itself as a follower when it wakes, before any tick runs.

use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, watch};
use tokio::time::MissedTickBehavior;

use super::batch::LeaseBatcher;
use super::identity::{Holder, LeaseName};
use super::store::{Lease, LeaseStore};
use crate::Error;
use crate::config::LeaseTimings;

/// Source of monotonic time, injectable so tests can simulate pauses.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> Instant;
}

#[derive(Clone, Copy, Debug, Default)]
pub struct MonotonicClock;

impl Clock for MonotonicClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// What the elector last decided, with the monotonic instant until which it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Leadership {
    Follower,
    Leader { epoch: i64, valid_until: Instant },
}

impl Leadership {
    /// The epoch if this is a leadership still valid at `now`.
    pub fn epoch_at(&self, now: Instant) -> Option<i64> {
        match *self {
            Leadership::Leader { epoch, valid_until } if now < valid_until => Some(epoch),
            _ => None,
        }
    }
}

/// A read handle on an elector's leadership, judged against the elector's clock.
#[derive(Clone)]
pub struct LeaderWatch {
    rx: watch::Receiver<Leadership>,
    clock: Arc<dyn Clock>,
}

impl LeaderWatch {
    /// The epoch if this process leads right now. Call it at the moment of acting.
    pub fn leader_epoch(&self) -> Option<i64> {
        self.rx.borrow().epoch_at(self.clock.now())
    }

    /// The last published state (its validity still has to be judged with the clock).
    pub fn published(&self) -> Leadership {
        *self.rx.borrow()
    }

    /// Resolves when the elector publishes a new state; `Err` once it is gone.
    pub async fn changed(&mut self) -> Result<(), watch::error::RecvError> {
        self.rx.changed().await
    }
}

#[derive(Clone, Debug)]
pub struct ElectorConfig {
    pub lease_name: LeaseName,
    /// `<cluster>/<identity>`.
    pub holder: Holder,
    pub timings: LeaseTimings,
}

/// What one tick did; for logs, metrics and tests.
#[derive(Debug)]
pub enum Tick {
    /// Took the lease (a new epoch). `previous_holder` is empty if it was free.
    Acquired(Lease),
    /// Someone else holds it. The row as this follower last read it: `None` when there
    /// is none, or when the tick learnt nothing current of it (an `acquire` was refused,
    /// so the row changed after it was read; an elector without a [`LeaseBatcher`] only
    /// sends `acquire`).
    Standby(Option<Lease>),
    Renewed(Lease),
    /// The renew matched nothing: another candidate took the lease, or it expired.
    Lost {
        epoch: i64,
    },
    /// No renew succeeded within the renew deadline (a pause or an outage); `error` is
    /// the database error of this tick's renew, if it made one.
    DeadlineMissed {
        epoch: i64,
        error: Option<Error>,
    },
    /// The database call failed; a leader keeps leading until its deadline.
    DatabaseError {
        error: Error,
        still_leader: bool,
    },
}

impl Tick {
    pub fn database_reachable(&self) -> bool {
        !matches!(
            self,
            Tick::DatabaseError { .. } | Tick::DeadlineMissed { error: Some(_), .. }
        )
    }
}

#[derive(Clone, Copy, Debug)]
struct Held {
    epoch: i64,
    last_renew_sent: Instant,
}

/// A follower's read, which arrived at `arrived`, found the lease acquirable in
/// `acquirable_in`: [`Elector::run`] may send an `acquire` then (see [`expiry_attempt_at`]).
#[derive(Debug)]
struct ExpiryAttempt {
    arrived: tokio::time::Instant,
    acquirable_in: Duration,
}

pub struct Elector {
    config: ElectorConfig,
    store: LeaseStore,
    batcher: Option<LeaseBatcher>,
    clock: Arc<dyn Clock>,
    held: Option<Held>,
    tx: watch::Sender<Leadership>,
    wake: Arc<Notify>,
    /// Set by a follower's tick whose read found the lease acquirable in a while;
    /// [`Elector::run`] takes it after that tick.
    soon: Option<ExpiryAttempt>,
}

impl Elector {
    pub fn new(config: ElectorConfig, store: LeaseStore, clock: Arc<dyn Clock>) -> Self {
        let (tx, _) = watch::channel(Leadership::Follower);
        Self {
            config,
            store,
            batcher: None,
            clock,
            held: None,
            tx,
            wake: Arc::new(Notify::new()),
            soon: None,
        }
    }

    /// Sends this elector's renews, and as a follower its check whether the lease is
    /// free, through `batcher` (shared with the other electors of the process) instead
    /// of one statement each; it then sends `acquire` only for a lease found free.
    ///
    /// # Panics
    /// If the batcher renews for another holder: its renews would never match.
    pub fn with_batcher(mut self, batcher: LeaseBatcher) -> Self {
        assert_eq!(
            batcher.holder(),
            &self.config.holder,
            "a renew batcher serves one holder"
        );
        self.batcher = Some(batcher);
        self
    }

    pub fn watch(&self) -> LeaderWatch {
        LeaderWatch {
            rx: self.tx.subscribe(),
            clock: self.clock.clone(),
        }
    }

    /// Notifying this makes [`Elector::run`] tick at once (e.g. on a release
    /// notification) instead of waiting for the retry period.
    pub fn waker(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    /// The epoch of the row this elector holds in the database, valid or not (what
    /// [`Elector::release`] would release).
    pub fn held_epoch(&self) -> Option<i64> {
        self.held.map(|h| h.epoch)
    }

    /// The epoch if this elector leads at this instant of its clock.
    pub fn leader_epoch(&self) -> Option<i64> {
        self.tx.borrow().epoch_at(self.clock.now())
    }

    /// One step of the state machine: acquire as a follower, renew as a leader.
    pub async fn tick(&mut self) -> Tick {
        let sent = self.clock.now();
        self.soon = None;
        match self.held {
            None => self.follow(sent).await,
            Some(held) => self.renew(held, sent).await,
        }
    }

    /// A follower's tick: with a batcher, the batched read tells whether the lease can
    /// be taken, and only then is `acquire` sent.
    async fn follow(&mut self, sent: Instant) -> Tick {
        if let Some(batcher) = &self.batcher {
            let read = batcher.acquirable(&self.config.lease_name).await;
            let arrived = tokio::time::Instant::now();
            match read {
                Ok(found) if found.acquirable => {}
                Ok(found) => {
                    self.soon = Some(ExpiryAttempt {
                        arrived,
                        acquirable_in: found.acquirable_in,
                    });
                    return Tick::Standby(found.lease);
                }
                Err(error) => {
                    return Tick::DatabaseError {
                        error,
                        still_leader: false,
                    };
                }
            }
        }
        self.acquire(sent).await
    }

    /// A leader's tick: renew, bounded by what is left of the renew deadline.
    async fn renew(&mut self, held: Held, sent: Instant) -> Tick {
        let deadline = self.config.timings.renew_deadline;
        if sent.saturating_duration_since(held.last_renew_sent) >= deadline {
            // Stop before talking to the database: the row may still say we hold it,
            // but we can no longer prove it. The lease then expires on its own and is
            // re-acquired with a new epoch; no release, which would hand it over while
            // our workload might still be running.
            self.step_down();
            return Tick::DeadlineMissed {
                epoch: held.epoch,
                error: None,
            };
        }

        // A renew that has not answered by the deadline is abandoned there, so stepping
        // down never waits for a hung call (the store's own timeout may be longer than
        // what is left).
        let remaining =
            deadline.saturating_sub(sent.saturating_duration_since(held.last_renew_sent));
        let renew = async {
            match &self.batcher {
                Some(batcher) => batcher.renew(&self.config.lease_name, held.epoch).await,
                // Boxed, as `acquire` below: a statement's future is most of a tick's
                // size, and every leader of a replica ticks at the same instant.
                None => {
                    Box::pin(self.store.renew(
                        &self.config.lease_name,
                        &self.config.holder,
                        held.epoch,
                    ))
                    .await
                }
            }
        };
        let renewed = match tokio::time::timeout(remaining, renew).await {
            Ok(result) => result,
            Err(_) => Err(Error::Timeout(remaining)),
        };
        match renewed {
            Ok(Some(lease)) => {
                self.lead(held.epoch, sent);
                Tick::Renewed(lease)
            }
            Ok(None) => {
                self.step_down();
                Tick::Lost { epoch: held.epoch }
            }
            Err(error) => {
                let deadline_passed = self
                    .clock
                    .now()
                    .saturating_duration_since(held.last_renew_sent)
                    >= deadline;
                if deadline_passed {
                    self.step_down();
                    Tick::DeadlineMissed {
                        epoch: held.epoch,
                        error: Some(error),
                    }
                } else {
                    Tick::DatabaseError {
                        error,
                        still_leader: true,
                    }
                }
            }
        }
    }

    /// A follower's `acquire`.
    async fn acquire(&mut self, sent: Instant) -> Tick {
        let acquire = self.store.acquire(
            &self.config.lease_name,
            &self.config.holder,
            self.config.timings.ttl,
        );
        match Box::pin(acquire).await {
            Ok(Some(lease)) => {
                self.lead(lease.epoch, sent);
                Tick::Acquired(lease)
            }
            // Refused: the row changed since it was read (someone took the lease), so
            // that read is out of date and is not passed on.
            Ok(None) => Tick::Standby(None),
            Err(error) => Tick::DatabaseError {
                error,
                still_leader: false,
            },
        }
    }

    /// Ticks at once, then every retry period (or at once when woken) until `shutdown`
    /// resolves. `on_tick` sees every outcome and how long its tick took. On shutdown it
    /// publishes `Follower` but keeps the row: the caller stops its workload and then
    /// calls [`Elector::release`].
    ///
    /// The periodic ticks fall on a grid shared by every elector of the process with the
    /// same retry period, so a [`LeaseBatcher`] sees their calls together.
    ///
    /// A follower whose read (through a [`LeaseBatcher`]) finds that the lease becomes
    /// acquirable before its next periodic tick, because its holder stopped renewing,
    /// also ticks at that instant, with an `acquire` and no read: a holder that died
    /// without releasing is replaced when its lease expires, not up to a retry period
    /// later. If the holder renewed meanwhile, that `acquire` is refused and the
    /// follower goes on on the grid.
    pub async fn run<F, T>(&mut self, shutdown: F, mut on_tick: T)
    where
        F: Future<Output = ()>,
        T: FnMut(&Tick, Duration),
    {
        let mut shutdown = std::pin::pin!(shutdown);
        let period = self.config.timings.retry_period;
        let mut interval = tokio::time::interval_at(next_on_grid(period), period);
        // Skip (not Delay) keeps the ticks on the shared grid after a slow tick.
        interval.set_missed_tick_behavior(MissedTickBehavior::Skip);
        let wake = self.wake.clone();
        let mut first = true;
        let mut attempt: Option<tokio::time::Instant> = None;
        loop {
            let mut at_expiry = None;
            if !std::mem::take(&mut first) {
                let attempt_due = async {
                    match attempt {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    biased;
                    _ = &mut shutdown => break,
                    _ = interval.tick() => {}
                    _ = wake.notified() => {}
                    _ = attempt_due => at_expiry = attempt.take(),
                }
            }
            let started = Instant::now();
            // Boxed: a tick's database calls are most of this future's size, and an
            // elector waits between ticks nearly all the time. Inline, every idle elector
            // of a replica with 10 000 Reapers would keep room for a whole tick.
            let step = Box::pin(async {
                match at_expiry {
                    // Only when it changes is a follower asking: whether the lease can be
                    // taken is decided by `acquire`'s statement, on the database's clock,
                    // under the row lock, so at most one holder is still the SQL's job.
                    // Asking early would only be refused.
                    Some(_) if self.held.is_none() => {
                        self.soon = None;
                        let sent = self.clock.now();
                        self.acquire(sent).await
                    }
                    _ => self.tick().await,
                }
            });
            let tick = tokio::select! {
                biased;
                _ = &mut shutdown => break,
                tick = step => tick,
            };
            // Whatever woke it, this tick replaces a pending attempt: it read the row
            // again (or acquired), and only its own read schedules one.
            attempt = self
                .soon
                .take()
                .and_then(|a| expiry_attempt_at(a.arrived, a.acquirable_in, next_on_grid(period)));
            log_tick(&self.config, &tick);
            on_tick(&tick, started.elapsed());
        }
        self.publish(Leadership::Follower);
    }

    /// Frees the lease if this elector still holds it (holder + epoch). Returns whether
    /// a row was released. Publishes `Follower` first.
    pub async fn release(&mut self) -> crate::Result<bool> {
        self.publish(Leadership::Follower);
        let Some(held) = self.held.take() else {
            return Ok(false);
        };
        let released = self
            .store
            .release(&self.config.lease_name, &self.config.holder, held.epoch)
            .await?;
        if released.is_some() {
            tracing::info!(lease = %self.config.lease_name, epoch = held.epoch, "released lease");
        }
        Ok(released.is_some())
    }

    fn lead(&mut self, epoch: i64, renew_sent: Instant) {
        self.held = Some(Held {
            epoch,
            last_renew_sent: renew_sent,
        });
        self.publish(Leadership::Leader {
            epoch,
            valid_until: renew_sent + self.config.timings.renew_deadline,
        });
    }

    fn step_down(&mut self) {
        self.held = None;
        self.publish(Leadership::Follower);
    }

    fn publish(&self, state: Leadership) {
        self.tx.send_if_modified(|current| {
            let changed = *current != state;
            *current = state;
            changed
        });
    }
}

/// When a follower whose read arrived at `arrived`, saying that the lease becomes
/// acquirable in `acquirable_in`, sends an `acquire` of its own: at `arrived +
/// acquirable_in`, if that comes before its periodic tick at `next_tick` (which reads
/// the row again, and schedules anew). The database measured `acquirable_in` on its own
/// clock before its answer left, so counting it from the arrival puts the attempt after
/// the expiry as the database sees it, by the answer's transit time: not so early that
/// it is refused, and no offset between the two hosts' clocks matters.
fn expiry_attempt_at(
    arrived: tokio::time::Instant,
    acquirable_in: Duration,
    next_tick: tokio::time::Instant,
) -> Option<tokio::time::Instant> {
    let at = arrived.checked_add(acquirable_in)?;
    (at < next_tick).then_some(at)
}

/// The first instant after now on the grid `anchor + k × period`, where the anchor is
/// fixed for the process: electors with equal periods tick together.
fn next_on_grid(period: Duration) -> tokio::time::Instant {
    static ANCHOR: OnceLock<tokio::time::Instant> = OnceLock::new();
    let anchor = *ANCHOR.get_or_init(tokio::time::Instant::now);
    let now = tokio::time::Instant::now();
    let period_nanos = period.as_nanos().max(1);
    let elapsed = now.saturating_duration_since(anchor).as_nanos();
    let periods = elapsed / period_nanos + 1;
    let offset = u64::try_from(periods * period_nanos).unwrap_or(u64::MAX);
    anchor + Duration::from_nanos(offset)
}

fn log_tick(config: &ElectorConfig, tick: &Tick) {
    let lease = config.lease_name.as_str();
    match tick {
        Tick::Acquired(l) if l.previous_holder.is_empty() => {
            tracing::info!(lease, epoch = l.epoch, "acquired lease")
        }
        Tick::Acquired(l) => tracing::warn!(
            lease, epoch = l.epoch, previous_holder = %l.previous_holder,
            "took over expired lease"
        ),
        Tick::Standby(_) | Tick::Renewed(_) => {}
        Tick::Lost { epoch } => tracing::warn!(lease, epoch, "lost lease: stepped down"),
        Tick::DeadlineMissed { epoch, error } => tracing::warn!(
            lease,
            epoch,
            error = error.as_ref().map(tracing::field::display),
            "no successful renew within the renew deadline: stepped down"
        ),
        Tick::DatabaseError {
            error,
            still_leader,
        } => tracing::warn!(lease, %error, still_leader, "lease database call failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn electors_with_equal_periods_share_one_grid() {
        let period = Duration::from_millis(40);
        let first = next_on_grid(period);
        let now = tokio::time::Instant::now();
        assert!(first > now && first <= now + period, "{first:?} vs {now:?}");
        std::thread::sleep(Duration::from_millis(25));
        let later = next_on_grid(period);
        let apart = later.duration_since(first).as_nanos();
        assert_eq!(apart % period.as_nanos(), 0, "off the grid by {apart} ns");
        // Another period has a grid of its own, from the same anchor.
        let other = next_on_grid(Duration::from_millis(30));
        assert!(other > tokio::time::Instant::now());
    }

    #[test]
    fn an_expiry_before_the_next_tick_gets_an_attempt_of_its_own() {
        let arrived = tokio::time::Instant::now();
        let next_tick = arrived + Duration::from_millis(1_000);
        let ms = Duration::from_millis;
        assert_eq!(
            expiry_attempt_at(arrived, ms(400), next_tick),
            Some(arrived + ms(400)),
            "counted from the arrival of the answer"
        );
        assert_eq!(
            expiry_attempt_at(arrived, ms(1), next_tick),
            Some(arrived + ms(1))
        );
        assert_eq!(
            expiry_attempt_at(arrived, ms(999), next_tick),
            Some(arrived + ms(999))
        );
        // At or after the next tick, that tick reads the row again.
        assert_eq!(expiry_attempt_at(arrived, ms(1_000), next_tick), None);
        assert_eq!(expiry_attempt_at(arrived, ms(13_000), next_tick), None);
        assert_eq!(expiry_attempt_at(arrived, Duration::MAX, next_tick), None);
    }

    #[test]
    fn leadership_is_judged_at_the_moment_of_asking() {
        let start = Instant::now();
        let state = Leadership::Leader {
            epoch: 7,
            valid_until: start + Duration::from_secs(10),
        };
        assert_eq!(state.epoch_at(start), Some(7));
        assert_eq!(
            state.epoch_at(start + Duration::from_millis(9_999)),
            Some(7)
        );
        assert_eq!(
            state.epoch_at(start + Duration::from_secs(10)),
            None,
            "valid_until is exclusive"
        );
        assert_eq!(Leadership::Follower.epoch_at(start), None);
    }
}
