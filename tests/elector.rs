//! The leadership state machine against a real PostgreSQL, with a manual monotonic
//! clock (to simulate pauses) and a TCP proxy in front of the database (to cut it).

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use reaper_operator::config::LeaseTimings;
use reaper_operator::lease::{Elector, ElectorConfig, Leadership, LeaseStore, ManualClock, Tick};
use support::db::{self, Via};
use support::proxy::{FaultProxy, Mode};

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
        lease_name: "singleton".into(),
        holder: holder.into(),
        timings,
    }
}

/// A store whose connections go through a fault proxy, with a short call timeout.
async fn store_behind_proxy(
    proxy: &FaultProxy,
    store: &LeaseStore,
    timeout: Duration,
) -> LeaseStore {
    LeaseStore::connect(
        &proxy.url_for(&db::direct_url()),
        store.schema(),
        timeout,
        2,
    )
    .await
    .unwrap()
}

fn upstream() -> String {
    let url = db::direct_url();
    let host_port = url.rsplit_once('@').unwrap().1.split('/').next().unwrap();
    host_port.to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_that_cannot_renew_steps_down_before_the_ttl_passes() {
    let t = timings(3_000, 2_000, 500);
    let (direct, _) = db::fresh_schema(Via::Direct).await;
    let proxy = FaultProxy::start(upstream()).await;
    let store = store_behind_proxy(&proxy, &direct, t.call_timeout()).await;
    let clock = ManualClock::default();
    let mut elector = Elector::new(config("a", t), store, Arc::new(clock.clone()));
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
    let row = direct.get("singleton").await.unwrap().unwrap();
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
    let clock = ManualClock::default();
    let mut elector = Elector::new(config("a", t), store.clone(), Arc::new(clock.clone()));
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
    let before = store.get("singleton").await.unwrap().unwrap();
    assert!(
        matches!(elector.tick().await, Tick::DeadlineMissed { epoch, error: None } if epoch == lease.epoch)
    );
    assert_eq!(watch.published(), Leadership::Follower);
    let after = store.get("singleton").await.unwrap().unwrap();
    assert_eq!(after.renewed_at, before.renewed_at);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_outage_steps_down_and_reacquires_with_a_new_epoch_after_it_heals() {
    let t = timings(1_500, 1_000, 300);
    let (direct, _) = db::fresh_schema(Via::Direct).await;
    let proxy = FaultProxy::start(upstream()).await;
    let store = store_behind_proxy(&proxy, &direct, t.call_timeout()).await;
    let clock = ManualClock::default();
    let mut elector = Elector::new(config("a", t), store, Arc::new(clock.clone()));
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
    let clock = ManualClock::default();
    let mut old = Elector::new(config("old", t), store.clone(), Arc::new(clock.clone()));
    let Tick::Acquired(first) = old.tick().await else {
        panic!("not acquired")
    };
    // The old leader's clock does not move (it believes it is fine), but on the database
    // its lease expires and someone else takes it.
    tokio::time::sleep(t.ttl + Duration::from_millis(100)).await;
    let thief = store
        .acquire("singleton", "thief", Duration::from_millis(500))
        .await
        .unwrap();
    assert!(thief.is_some());
    assert!(matches!(old.tick().await, Tick::Lost { epoch } if epoch == first.epoch));
    assert_eq!(old.leader_epoch(), None);
    assert!(matches!(old.tick().await, Tick::Standby));
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
    assert!(matches!(standby.tick().await, Tick::Standby));
    stop_tx.send(()).unwrap();
    let (_leader, released) = task.await.unwrap();
    assert!(released);
    assert_eq!(watch.published(), Leadership::Follower);
    let Tick::Acquired(lease) = standby.tick().await else {
        panic!("standby did not take the released lease")
    };
    assert_eq!((lease.epoch, lease.previous_holder.as_str()), (2, ""));
}
