//! The leadership state machine against a real PostgreSQL, with a manual monotonic
//! clock (to simulate pauses) and a TCP proxy in front of the database (to cut it).

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::id::{self, SpelledNames};

use reaper_operator::config::LeaseTimings;
use reaper_operator::lease::batch::DEFAULT_LINGER;
use reaper_operator::lease::{
    Clock, Elector, ElectorConfig, LeaderWatch, Leadership, Lease, LeaseBatcher, LeaseStore,
    MonotonicClock, Tick,
};
use support::db::{self, Via};
use support::proxy::{FaultProxy, Mode};

/// A clock that only moves when told to: a pause of the elector's process, seen from
/// the elector.
#[derive(Clone, Debug)]
struct ManualClock(Arc<Mutex<Instant>>);

impl Default for ManualClock {
    fn default() -> Self {
        Self(Arc::new(Mutex::new(Instant::now())))
    }
}

impl ManualClock {
    fn advance(&self, by: Duration) {
        *self.0.lock().expect("clock mutex poisoned") += by;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        *self.0.lock().expect("clock mutex poisoned")
    }
}

fn timings(ttl_ms: u64, deadline_ms: u64, retry_ms: u64) -> LeaseTimings {
    LeaseTimings::new(
        Duration::from_millis(ttl_ms),
        Duration::from_millis(deadline_ms),
        Duration::from_millis(retry_ms),
    )
    .unwrap()
}

fn config(holder: &str, timings: LeaseTimings) -> ElectorConfig {
    ElectorConfig {
        lease_name: id::lease("singleton"),
        holder: id::holder(holder),
        timings,
    }
}

/// A store whose connections go through a fault proxy, with a short call timeout.
async fn store_behind_proxy(
    proxy: &FaultProxy,
    store: &LeaseStore,
    timeout: Duration,
) -> LeaseStore {
    // A short call timeout also bounds the first connection; on a loaded machine that
    // can take longer once, and the tests are about what follows.
    let url = proxy.url_for(&db::direct_url());
    let mut attempts = 0;
    loop {
        match LeaseStore::connect(&url, store.schema(), timeout, 2).await {
            Ok(connected) => return connected,
            Err(error) if attempts < 4 => {
                attempts += 1;
                eprintln!("connecting through the proxy: {error}; again");
            }
            Err(error) => panic!("connecting through the proxy: {error}"),
        }
    }
}

/// Elector "a" with timings `t` and a manual clock, on a fresh schema, whose store
/// connects through a fault proxy; also a direct store on that schema, which sees the
/// database past the proxy.
async fn elector_behind_proxy(t: LeaseTimings) -> (LeaseStore, FaultProxy, ManualClock, Elector) {
    let (direct, _) = db::fresh_schema(Via::Direct).await;
    let proxy = FaultProxy::start(upstream()).await;
    let store = store_behind_proxy(&proxy, &direct, t.call_timeout()).await;
    let (clock, elector) = elector_with_manual_clock("a", t, store);
    (direct, proxy, clock, elector)
}

/// `holder`'s elector for "singleton" on `store`, and the manual clock it runs on.
fn elector_with_manual_clock(
    holder: &str,
    t: LeaseTimings,
    store: LeaseStore,
) -> (ManualClock, Elector) {
    let clock = ManualClock::default();
    let elector = Elector::new(config(holder, t), store, Arc::new(clock.clone()));
    (clock, elector)
}

fn upstream() -> String {
    let url = db::direct_url();
    let host_port = url.rsplit_once('@').unwrap().1.split('/').next().unwrap();
    host_port.to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_that_cannot_renew_steps_down_before_the_ttl_passes() {
    let t = timings(3_000, 2_000, 500);
    let (direct, proxy, clock, mut elector) = elector_behind_proxy(t).await;
    let watch = elector.watch();

    let acquired_at = Instant::now();
    let Tick::Acquired(lease) = elector.tick().await else {
        panic!("not acquired")
    };
    assert_eq!(elector.leader_epoch(), Some(lease.epoch));
    assert_eq!(watch.leader_epoch(), Some(lease.epoch));

    proxy.set(Mode::Blackhole);
    let mut stepped_down = false;
    for _ in 0..4 {
        clock.advance(Duration::from_millis(500));
        let tick = elector.tick().await;
        assert!(
            !tick.database_reachable() || matches!(tick, Tick::DeadlineMissed { .. }),
            "{tick:?}"
        );
        if elector.leader_epoch().is_none() {
            stepped_down = true;
            break;
        }
    }
    assert!(stepped_down, "still leader after the renew deadline");
    assert_eq!(watch.leader_epoch(), None);
    assert_eq!(watch.published(), Leadership::Follower);
    // The database still says the lease is held: the leader stepped down first.
    let row = direct.row("singleton").await.unwrap();
    assert!(
        row.is_held(),
        "lease expired before the leader stepped down: {row:?}"
    );
    assert!(acquired_at.elapsed() < t.ttl);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_leader_is_not_leader_when_it_wakes() {
    let t = timings(3_000, 2_000, 500);
    let (store, _) = db::fresh_schema(Via::Direct).await;
    let (clock, mut elector) = elector_with_manual_clock("a", t, store.clone());
    let watch = elector.watch();
    let Tick::Acquired(lease) = elector.tick().await else {
        panic!("not acquired")
    };
    assert!(matches!(elector.tick().await, Tick::Renewed(_)));

    // A pause (SIGSTOP, GC, starvation): no tick runs, time jumps past the deadline.
    clock.advance(t.renew_deadline);
    assert_eq!(elector.leader_epoch(), None, "woke up still leading");
    assert_eq!(
        watch.leader_epoch(),
        None,
        "watchers must judge by the clock too"
    );
    // The first tick after waking steps down without renewing: the row is not revived.
    let before = store.row("singleton").await.unwrap();
    assert!(
        matches!(elector.tick().await, Tick::DeadlineMissed { epoch, error: None } if epoch == lease.epoch)
    );
    assert_eq!(watch.published(), Leadership::Follower);
    let after = store.row("singleton").await.unwrap();
    assert_eq!(after.renewed_at, before.renewed_at);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_outage_steps_down_and_reacquires_with_a_new_epoch_after_it_heals() {
    let t = timings(1_500, 1_000, 300);
    let (_direct, proxy, clock, mut elector) = elector_behind_proxy(t).await;
    let Tick::Acquired(first) = elector.tick().await else {
        panic!("not acquired")
    };

    for mode in [Mode::Reset, Mode::Blackhole] {
        proxy.set(mode);
        for _ in 0..6 {
            clock.advance(Duration::from_millis(300));
            // Errors are values, never panics; after the deadline the elector follows.
            let _ = elector.tick().await;
        }
        assert_eq!(
            elector.leader_epoch(),
            None,
            "{mode:?}: still leader during outage"
        );
        proxy.set(Mode::Pass);
        // Let the old lease expire on the database's clock, then come back.
        let deadline = Instant::now() + Duration::from_secs(10);
        let epoch = loop {
            assert!(
                Instant::now() < deadline,
                "{mode:?}: no re-acquisition after healing"
            );
            clock.advance(Duration::from_millis(300));
            if let Tick::Acquired(lease) = elector.tick().await {
                break lease.epoch;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        };
        assert!(
            epoch > first.epoch,
            "{mode:?}: epoch {epoch} after {}",
            first.epoch
        );
        assert_eq!(elector.leader_epoch(), Some(epoch));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deposed_leader_steps_down_on_its_next_renew_and_keeps_competing() {
    let t = timings(1_000, 800, 300);
    let (store, _) = db::fresh_schema(Via::PgBouncer).await;
    let (_clock, mut old) = elector_with_manual_clock("old", t, store.clone());
    let Tick::Acquired(first) = old.tick().await else {
        panic!("not acquired")
    };
    // The old leader's clock does not move (it believes it is fine), but on the database
    // its lease expires and someone else takes it.
    tokio::time::sleep(t.ttl + Duration::from_millis(100)).await;
    let thief = store
        .try_acquire("singleton", "thief", Duration::from_millis(500))
        .await;
    assert!(thief.is_some());
    assert!(matches!(old.tick().await, Tick::Lost { epoch } if epoch == first.epoch));
    assert_eq!(old.leader_epoch(), None);
    assert!(matches!(old.tick().await, Tick::Standby(None)));
    tokio::time::sleep(Duration::from_millis(600)).await;
    let Tick::Acquired(again) = old.tick().await else {
        panic!("did not compete again")
    };
    assert_eq!(again.epoch, first.epoch + 2);
    assert_eq!(again.previous_holder, "thief");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_publishes_changes_and_release_frees_the_lease_for_a_standby() {
    let t = timings(3_000, 2_000, 200);
    let (store, _) = db::fresh_schema(Via::PgBouncer).await;
    let clock: Arc<ManualClock> = Arc::new(ManualClock::default());
    let mut leader = Elector::new(
        config("a", t),
        store.clone(),
        Arc::new(reaper_operator::lease::MonotonicClock),
    );
    let mut watch = leader.watch();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        leader
            .run(
                async {
                    stop_rx.await.ok();
                },
                |_, _| {},
            )
            .await;
        let released = leader.release().await.unwrap();
        (leader, released)
    });
    tokio::time::timeout(Duration::from_secs(5), watch.changed())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(watch.leader_epoch(), Some(1));

    let mut standby = Elector::new(config("b", t), store.clone(), clock);
    assert!(matches!(standby.tick().await, Tick::Standby(None)));
    stop_tx.send(()).unwrap();
    let (_leader, released) = task.await.unwrap();
    assert!(released);
    assert_eq!(watch.published(), Leadership::Follower);
    let Tick::Acquired(lease) = standby.tick().await else {
        panic!("standby did not take the released lease")
    };
    assert_eq!((lease.epoch, lease.previous_holder.as_str()), (2, ""));
}

// ---- Batched calls: every elector of a replica goes through one LeaseBatcher. ----

fn batched(
    name: &str,
    holder: &str,
    t: LeaseTimings,
    store: &LeaseStore,
    batcher: &LeaseBatcher,
    clock: Arc<dyn reaper_operator::lease::Clock>,
) -> Elector {
    let config = ElectorConfig {
        lease_name: id::lease(name),
        holder: id::holder(holder),
        timings: t,
    };
    Elector::new(config, store.clone(), clock).with_batcher(batcher.clone())
}

/// Replica "b"'s elector for "singleton", renewing through a batcher of its own (which
/// runs as long as the elector holds it).
fn batched_b(t: LeaseTimings, store: &LeaseStore) -> Elector {
    let batcher = LeaseBatcher::spawn(store.clone(), id::holder("b"), DEFAULT_LINGER);
    batched(
        "singleton",
        "b",
        t,
        store,
        &batcher,
        Arc::new(MonotonicClock),
    )
}

/// Runs the elector on its own task until `stop` turns true.
fn run_until(
    elector: Elector,
    stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    run_until_with(elector, stop, |_, _| {})
}

/// [`run_until`], calling `on_tick` after each tick.
fn run_until_with(
    mut elector: Elector,
    mut stop: tokio::sync::watch::Receiver<bool>,
    on_tick: impl FnMut(&Tick, Duration) + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        elector
            .run(
                async move {
                    let _ = stop.wait_for(|s| *s).await;
                },
                on_tick,
            )
            .await;
    })
}

async fn tick_all(electors: &mut [Elector]) -> Vec<Tick> {
    futures::future::join_all(electors.iter_mut().map(|e| e.tick())).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_renews_map_each_lease_to_its_own_outcome() {
    let long = timings(3_000, 2_000, 500);
    let short = timings(600, 450, 300);
    let (store, _) = db::fresh_schema(Via::PgBouncer).await;
    let batcher = LeaseBatcher::spawn(store.clone(), id::holder("a"), DEFAULT_LINGER);
    let clock = ManualClock::default();
    // Different timings share the batcher: x3 has a short ttl and will be taken over.
    let mut electors: Vec<Elector> = (0..10)
        .map(|i| {
            let t = if i == 3 { short } else { long };
            batched(
                &format!("x{i}"),
                "a",
                t,
                &store,
                &batcher,
                Arc::new(clock.clone()),
            )
        })
        .collect();
    for tick in tick_all(&mut electors).await {
        assert!(matches!(tick, Tick::Acquired(_)), "{tick:?}");
    }

    tokio::time::sleep(short.ttl + Duration::from_millis(100)).await;
    let thief = store
        .try_acquire("x3", "thief", Duration::from_secs(5))
        .await
        .expect("x3 expired on the database's clock");
    clock.advance(Duration::from_millis(300));
    let before = batcher.statements();
    let ticks = tick_all(&mut electors).await;
    let statements = batcher.statements() - before;
    assert!(
        (1..=2).contains(&statements),
        "10 renews took {statements} statements"
    );
    for (i, tick) in ticks.iter().enumerate() {
        if i == 3 {
            assert!(matches!(tick, Tick::Lost { epoch: 1 }), "x3: {tick:?}");
            assert_eq!(electors[i].leader_epoch(), None);
        } else {
            assert!(
                matches!(tick, Tick::Renewed(l) if l.name == format!("x{i}")),
                "x{i}: {tick:?}"
            );
            assert_eq!(electors[i].leader_epoch(), Some(1));
        }
    }
    // The lost lease was not extended for its old holder.
    let row = store.row("x3").await.unwrap();
    assert_eq!((row.holder.as_str(), row.epoch), ("thief", thief.epoch));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_leaders_step_down_at_their_deadline_while_the_batch_hangs() {
    let t = timings(3_000, 2_000, 500);
    let (direct, _) = db::fresh_schema(Via::Direct).await;
    let proxy = FaultProxy::start(upstream()).await;
    let store = store_behind_proxy(&proxy, &direct, Duration::from_secs(30)).await;
    let batcher = LeaseBatcher::spawn(store.clone(), id::holder("a"), DEFAULT_LINGER);
    let mut electors: Vec<Elector> = (0..10)
        .map(|i| {
            batched(
                &format!("h{i}"),
                "a",
                t,
                &store,
                &batcher,
                Arc::new(MonotonicClock),
            )
        })
        .collect();
    let acquired_at = Instant::now();
    for tick in tick_all(&mut electors).await {
        assert!(matches!(tick, Tick::Acquired(_)), "{tick:?}");
    }

    // The batch statement hangs far longer than any deadline (30 s call timeout): each
    // elector must give up on its own at its deadline, on the real clock.
    proxy.set(Mode::Blackhole);
    while electors.iter().any(|e| e.leader_epoch().is_some()) {
        assert!(
            acquired_at.elapsed() < t.ttl,
            "still leading after {:?}",
            acquired_at.elapsed()
        );
        for tick in tick_all(&mut electors).await {
            assert!(!tick.database_reachable() || matches!(tick, Tick::DeadlineMissed { .. }));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stepped_down_after = acquired_at.elapsed();
    assert!(
        stepped_down_after >= t.renew_deadline && stepped_down_after < t.ttl,
        "stepped down after {stepped_down_after:?}"
    );
    proxy.set(Mode::Pass);
    for i in 0..10 {
        let row = direct.row(format!("h{i}")).await.unwrap();
        assert!(row.is_held(), "h{i} expired before its leader stepped down");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_batched_electors_use_about_one_statement_per_retry_period() {
    let t = timings(3_000, 2_000, 400);
    let (_, schema) = db::fresh_schema(Via::PgBouncer).await;
    let store = db::store(Via::PgBouncer, &schema, 8).await;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    // A leading replica and a standby with 200 leases each.
    let mut replicas = Vec::new();
    for holder in ["a", "b"] {
        let batcher = LeaseBatcher::spawn(store.clone(), id::holder(holder), DEFAULT_LINGER);
        let mut watches = Vec::new();
        for i in 0..200 {
            let elector = batched(
                &format!("many-{i}"),
                holder,
                t,
                &store,
                &batcher,
                Arc::new(MonotonicClock),
            );
            watches.push(elector.watch());
            tasks.push(run_until(elector, stop_rx.clone()));
        }
        if holder == "a" {
            let settle_until = Instant::now() + Duration::from_secs(20);
            while !watches.iter().all(|w| w.leader_epoch().is_some()) {
                assert!(
                    Instant::now() < settle_until,
                    "200 leases not acquired in 20 s"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        replicas.push((batcher, watches));
    }
    tokio::time::sleep(t.retry_period * 2).await;
    let before: Vec<u64> = replicas.iter().map(|(b, _)| b.statements()).collect();
    let started = Instant::now();
    tokio::time::sleep(t.retry_period * 5).await;
    let periods = started.elapsed().as_secs_f64() / t.retry_period.as_secs_f64();
    let statements: Vec<u64> = replicas
        .iter()
        .zip(&before)
        .map(|((b, _), before)| b.statements() - before)
        .collect();
    let (leader, standby) = (&replicas[0].1, &replicas[1].1);
    assert!(leader.iter().all(|w| w.leader_epoch().is_some()));
    assert!(standby.iter().all(|w| w.leader_epoch().is_none()));
    stop_tx.send(true).unwrap();
    for task in tasks {
        task.await.unwrap();
    }
    eprintln!(
        "200 leases, {periods:.1} retry periods: leader {} statements, standby {}",
        statements[0], statements[1]
    );
    // One per period each, with slack for a loaded machine splitting a batch; unbatched
    // it would be 200 per period each.
    for (who, n) in ["leader", "standby"].iter().zip(&statements) {
        assert!(
            *n as f64 <= 2.0 * periods.ceil() + 2.0,
            "{who}: {n} statements in {periods:.1} retry periods"
        );
        assert!(*n as f64 >= periods.floor() - 1.0, "{who}: {n}");
    }
}

/// Holder "a"'s elector for "singleton" (no batcher), run on its own task until that is
/// aborted; each lease it renews is sent on the returned channel.
fn spawn_renewing_holder(
    t: LeaseTimings,
    store: &LeaseStore,
) -> (
    tokio::task::JoinHandle<()>,
    tokio::sync::mpsc::UnboundedReceiver<Lease>,
) {
    let mut holder = Elector::new(config("a", t), store.clone(), Arc::new(MonotonicClock));
    let (renewed_tx, renewed) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        holder
            .run(std::future::pending::<()>(), |tick, _| {
                if let Tick::Renewed(lease) = tick {
                    let _ = renewed_tx.send(lease.clone());
                }
            })
            .await;
    });
    (task, renewed)
}

/// The next lease [`spawn_renewing_holder`]'s holder renews (within 5 s).
async fn next_renew(renewed: &mut tokio::sync::mpsc::UnboundedReceiver<Lease>) -> Lease {
    tokio::time::timeout(Duration::from_secs(5), renewed.recv())
        .await
        .expect("the holder did not renew")
        .unwrap()
}

/// From a standby's ticks so far (`Ok`: the row as a standby tick read it, `Err`: the
/// lease it acquired), its last read before it acquired (which must show holder "a")
/// and that acquisition.
fn last_read_then_acquired(
    ticks: &mut tokio::sync::mpsc::UnboundedReceiver<Result<Option<Lease>, Lease>>,
) -> (Lease, Lease) {
    let mut last_read = None;
    let mut acquired = None;
    while let Ok(seen) = ticks.try_recv() {
        match seen {
            Ok(row) => {
                let row = row.expect("a standby read showed no row");
                assert_eq!(row.holder, "a", "{row:?}");
                last_read = Some(row);
            }
            Err(lease) => {
                acquired = Some(lease);
                break;
            }
        }
    }
    (last_read.unwrap(), acquired.unwrap())
}

/// A holder that dies without releasing (kill -9: no release, no notification) is
/// replaced when its lease expires on the database's clock, not at the standby's next
/// periodic tick after that. Both electors tick on the process's shared grid and the ttl
/// is 3.5 retry periods, so the expiry falls half a period after a standby tick: waiting
/// for the next tick would take over 500 ms late.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_takes_over_a_dead_holders_lease_at_its_expiry() {
    let t = timings(3_500, 2_500, 1_000);
    let (store, _) = db::fresh_schema(Via::PgBouncer).await;

    let (holder_task, mut renewed) = spawn_renewing_holder(t, &store);
    // Renewing on the grid: from here on its lease expires 3.5 periods after a grid tick.
    for _ in 0..2 {
        next_renew(&mut renewed).await;
    }

    let follower = batched_b(t, &store);
    let mut leadership = follower.watch();
    let (ticks_tx, mut ticks) = tokio::sync::mpsc::unbounded_channel();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let follower_task = run_until_with(follower, stop_rx, move |tick, _| {
        let seen = match tick {
            Tick::Standby(row) => Ok(row.clone()),
            Tick::Acquired(lease) => Err(lease.clone()),
            _ => return,
        };
        let _ = ticks_tx.send(seen);
    });
    tokio::time::sleep(t.retry_period * 2).await;

    // Killed right after a renew (so none is in flight): the task ends where it is, and
    // the row stays as that renew left it.
    while renewed.try_recv().is_ok() {}
    let last_renew = next_renew(&mut renewed).await;
    holder_task.abort();
    let _ = holder_task.await;
    tokio::time::timeout(t.ttl + Duration::from_secs(3), async {
        while leadership.leader_epoch().is_none() {
            leadership.changed().await.unwrap();
        }
    })
    .await
    .expect("the standby did not take over the expired lease");
    stop_tx.send(true).unwrap();
    follower_task.await.unwrap();

    // The standby's reads carried the row; the last one is the holder's last renew.
    let (last_read, acquired) = last_read_then_acquired(&mut ticks);
    assert_eq!(
        (last_read.epoch, last_read.expires_at),
        (last_renew.epoch, last_renew.expires_at)
    );
    assert_eq!(
        (acquired.epoch, acquired.previous_holder.as_str()),
        (2, "a")
    );
    let events = store.history("singleton").await;
    let takeover = events.last().unwrap();
    assert_eq!((takeover.kind.as_str(), takeover.epoch), ("takeover", 2));
    assert_eq!(takeover.at, acquired.acquired_at);
    // Database times on both sides: the expiry the holder's last renew set, and the
    // takeover. The acquire's statement never takes a lease before its expiry.
    let late = acquired.acquired_at - last_renew.expires_at;
    eprintln!(
        "expired at {}, taken over {} ms later",
        last_renew.expires_at,
        late.num_milliseconds()
    );
    assert!(
        late >= chrono::TimeDelta::zero(),
        "taken before expiry: {late}"
    );
    assert!(
        late < chrono::TimeDelta::milliseconds(300),
        "taken over {} ms after the expiry",
        late.num_milliseconds()
    );
}

/// A holder that renews just before the instant a standby's read found for its expiry
/// keeps the lease: the standby's attempt at that instant is refused, and it goes back to
/// its periodic ticks (it does not retry until it succeeds), then takes the lease at the
/// renewed expiry once the holder stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_attempt_at_expiry_is_refused_when_the_holder_renewed() {
    let t = timings(3_500, 2_500, 1_000);
    let (store, _) = db::fresh_schema(Via::PgBouncer).await;
    let held = store.try_acquire("singleton", "a", t.ttl).await.unwrap();

    let (ticks_tx, mut ticks) = tokio::sync::mpsc::unbounded_channel();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let follower_task = run_until_with(batched_b(t, &store), stop_rx, move |tick, _| {
        let acquired = match tick {
            Tick::Standby(_) => None,
            Tick::Acquired(lease) => Some(lease.clone()),
            _ => return,
        };
        let _ = ticks_tx.send((Instant::now(), acquired));
    });
    // The first tick is immediate, the second on the grid: renew right after it, so the
    // expiry falls half a period after a later grid tick.
    for _ in 0..2 {
        let (_, acquired) = ticks.recv().await.unwrap();
        assert!(acquired.is_none());
    }
    let first_renew = Instant::now();
    store.try_renew("singleton", "a", held.epoch).await.unwrap();
    // After the standby's read three ticks later (which found the expiry 0.5 s away), and
    // before that expiry.
    tokio::time::sleep_until((first_renew + Duration::from_millis(3_200)).into()).await;
    let last_renew = store
        .try_renew("singleton", "a", held.epoch)
        .await
        .expect("the lease expired before its holder's last renew");

    let (mut standby_ticks, mut refused_at_first_expiry) = (Vec::new(), 0);
    let (taken_at, acquired) = loop {
        let (at, acquired) = tokio::time::timeout(t.ttl + Duration::from_secs(3), ticks.recv())
            .await
            .expect("the standby did not take over the expired lease")
            .unwrap();
        if let Some(lease) = acquired {
            break (at, lease);
        }
        let since = at.duration_since(first_renew);
        if since >= t.ttl && since < t.ttl + Duration::from_millis(300) {
            refused_at_first_expiry += 1;
        }
        standby_ticks.push(since);
    };
    stop_tx.send(true).unwrap();
    follower_task.await.unwrap();

    assert_eq!(
        refused_at_first_expiry, 1,
        "one refused attempt at the first expiry; standby ticks at {standby_ticks:?}"
    );
    // Back on the grid: one tick per period, plus the refused attempt.
    let periods = taken_at.duration_since(first_renew).as_secs_f64() / t.retry_period.as_secs_f64();
    assert!(
        (standby_ticks.len() as f64) <= periods.ceil() + 2.0,
        "{} standby ticks in {periods:.1} periods: {standby_ticks:?}",
        standby_ticks.len()
    );
    assert_eq!(
        (acquired.epoch, acquired.previous_holder.as_str()),
        (2, "a")
    );
    let late = acquired.acquired_at - last_renew.expires_at;
    assert!(
        late >= chrono::TimeDelta::zero() && late < chrono::TimeDelta::milliseconds(300),
        "taken over {} ms after the renewed expiry",
        late.num_milliseconds()
    );
}

/// One replica of the race: an elector per lease of `names` for `holder`, the even ones
/// with the first of `timings`, the odd ones with the second, all renewing through one
/// batcher on a store behind `proxy`.
fn start_racing_replica(
    proxy: &FaultProxy,
    schema: &reaper_operator::config::Schema,
    holder: &str,
    names: &[String],
    (t, slow): (LeaseTimings, LeaseTimings),
) -> Vec<Elector> {
    // Connected on first use, as the operator's stores are: a slow first connection
    // on a loaded machine costs a tick, not the test.
    let store = LeaseStore::connect_lazy(
        &proxy.url_for(&db::direct_url()),
        schema,
        t.call_timeout(),
        4,
    )
    .unwrap();
    let batcher = LeaseBatcher::spawn(store.clone(), id::holder(holder), DEFAULT_LINGER);
    names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let timings = if i % 2 == 0 { t } else { slow };
            batched(
                name,
                holder,
                timings,
                &store,
                &batcher,
                Arc::new(MonotonicClock),
            )
        })
        .collect()
}

/// Samples the two replicas' views of each lease every 3 ms until `stop` turns true;
/// returns the number of samples and every instant both considered themselves leader
/// of the same lease.
fn spawn_two_leaders_sampler(
    watches: Vec<Vec<LeaderWatch>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<(u64, Vec<String>)> {
    tokio::spawn(async move {
        let (mut samples, mut both) = (0u64, Vec::new());
        while !*stop.borrow_and_update() {
            for (i, (a, b)) in watches[0].iter().zip(&watches[1]).enumerate() {
                // Judge both states at one instant, and only if neither changed
                // around it (a stalled sampler must not compare two moments).
                let (pa, pb) = (a.published(), b.published());
                let now = Instant::now();
                if a.published() != pa || b.published() != pb {
                    continue;
                }
                if let (Some(ea), Some(eb)) = (pa.epoch_at(now), pb.epoch_at(now)) {
                    both.push(format!("race-{i}: east at {ea}, west at {eb}"));
                }
            }
            samples += 1;
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
        (samples, both)
    })
}

/// Cuts one replica's database connections (reset or blackhole) for 0.2-2 s, then lets
/// them pass for 0.1-1 s.
async fn cut_one_replica_for_a_while(
    rng: &mut impl rand::Rng,
    proxies: &[FaultProxy],
    watches: &[Vec<LeaderWatch>],
) {
    // Mostly cut the replica that leads more leases: an adversary that only ever
    // cut the standby would test nothing (one such seed moved no lease at all).
    let leading = |replica: &[LeaderWatch]| {
        let now = Instant::now();
        replica
            .iter()
            .filter(|w| w.published().epoch_at(now).is_some())
            .count()
    };
    let busier = usize::from(leading(&watches[1]) > leading(&watches[0]));
    let victim = if rng.random_bool(0.75) {
        &proxies[busier]
    } else {
        &proxies[rng.random_range(0..2)]
    };
    let mode = if rng.random_bool(0.5) {
        Mode::Reset
    } else {
        Mode::Blackhole
    };
    victim.set(mode);
    tokio::time::sleep(Duration::from_millis(rng.random_range(200..2_000))).await;
    victim.set(Mode::Pass);
    tokio::time::sleep(Duration::from_millis(rng.random_range(100..1_000))).await;
}

/// Two replicas with 20 shared leases each, all renewing through their batchers, while
/// their database connections are cut at random (reset or blackhole, 0.2-2 s). At no
/// sampled instant may both replicas consider themselves leader of the same lease, and
/// the audit history must show strictly growing epochs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_replicas_under_random_cuts_never_lead_the_same_lease_at_once() {
    use rand::SeedableRng;
    // Two timings, so a cut can cost a replica some of its leases and not others: its
    // batches then mix renews that succeed with renews that must report a loss.
    let (t, slow) = (timings(1_200, 800, 250), timings(2_400, 1_800, 500));
    let (direct, schema) = db::fresh_schema(Via::Direct).await;
    let seed: u64 = rand::random();
    eprintln!("seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let names: Vec<String> = (0..20).map(|i| format!("race-{i}")).collect();

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut proxies = Vec::new();
    let mut watches: Vec<Vec<LeaderWatch>> = Vec::new();
    let mut tasks = Vec::new();
    for holder in ["east/a", "west/b"] {
        let proxy = FaultProxy::start(upstream()).await;
        let replica = start_racing_replica(&proxy, &schema, holder, &names, (t, slow));
        proxies.push(proxy);
        watches.push(replica.iter().map(Elector::watch).collect());
        tasks.extend(replica.into_iter().map(|e| run_until(e, stop_rx.clone())));
    }
    let sampler = spawn_two_leaders_sampler(watches.clone(), stop_rx.clone());

    // At least 10 s of cuts, and on until they have moved leases at least 5 times (a
    // loaded machine may start the electors late), for at most 40 s.
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(40)
        && (started.elapsed() < Duration::from_secs(10) || takeovers(&direct, &names).await < 5)
    {
        cut_one_replica_for_a_while(&mut rng, &proxies, &watches).await;
    }
    stop_tx.send(true).unwrap();
    let (samples, both) = sampler.await.unwrap();
    for task in tasks {
        task.await.unwrap();
    }
    assert!(
        both.is_empty(),
        "seed {seed}: two leaders at once: {both:?}"
    );
    assert!(samples > 100, "sampler starved: {samples} samples");

    for name in &names {
        let epochs = acquired_epochs(&direct, name).await;
        assert!(
            epochs.windows(2).all(|w| w[0] < w[1]),
            "seed {seed}: {name} epochs not strictly increasing: {epochs:?}"
        );
    }
    let takeovers = takeovers(&direct, &names).await;
    eprintln!("seed {seed}: {takeovers} takeovers");
    // Not vacuous: the cuts moved leases between the replicas.
    assert!(takeovers >= 5, "seed {seed}: only {takeovers} takeovers");
}

/// After a network reset every idle connection in the pool is dead. A renew must not
/// fail once per dead connection (that can add up to a missed deadline): it is sent
/// again on a fresh connection within its call timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renew_after_a_reset_is_not_lost_to_dead_pooled_connections() {
    let (_, schema) = db::fresh_schema(Via::Direct).await;
    let proxy = FaultProxy::start(upstream()).await;
    let store = LeaseStore::connect(
        &proxy.url_for(&db::direct_url()),
        &schema,
        Duration::from_secs(5),
        4,
    )
    .await
    .unwrap();
    let lease = store
        .try_acquire("pooled", "a", Duration::from_secs(30))
        .await
        .unwrap();
    // Fill the pool: four statements at once hold four connections, unless one ends
    // before the last starts (a loaded machine) and its connection is reused; then again.
    for _ in 0..20 {
        let pooled = id::lease("pooled");
        let reads = (0..4).map(|_| store.get(&pooled));
        for got in futures::future::join_all(reads).await {
            got.unwrap();
        }
        if store.open_connections() == 4 {
            break;
        }
    }
    assert_eq!(store.open_connections(), 4);
    proxy.set(Mode::Reset);
    tokio::time::sleep(Duration::from_millis(200)).await;
    proxy.set(Mode::Pass);
    for round in 0..3 {
        let renewed = store
            .renew(&id::lease("pooled"), &id::holder("a"), lease.epoch)
            .await;
        assert!(
            matches!(renewed, Ok(Some(_))),
            "renew {round} after the reset: {renewed:?}"
        );
    }
    let batched = store
        .renew_many(&id::holder("a"), &[(id::lease("pooled"), lease.epoch)])
        .await
        .unwrap();
    assert_eq!(batched.len(), 1);
}

/// The epochs `name` was acquired at, in order.
async fn acquired_epochs(store: &LeaseStore, name: &str) -> Vec<i64> {
    store
        .history(name)
        .await
        .iter()
        .filter(|e| e.kind != "release")
        .map(|e| e.epoch)
        .collect()
}

/// How often the leases `names` changed hands (acquisitions after each one's first).
async fn takeovers(store: &LeaseStore, names: &[String]) -> usize {
    let mut moved = 0;
    for name in names {
        moved += acquired_epochs(store, name).await.len().saturating_sub(1);
    }
    moved
}
