//! The lease store against a real PostgreSQL, each scenario both directly and through
//! PgBouncer in transaction mode.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};
use support::id::{self, SpelledNames};

use reaper_operator::Error;
use reaper_operator::lease::{LeaseName, LeaseStore, WorkloadCounts, WorkloadUpdate};
use support::db::{self, Via};
use tokio::sync::Barrier;

const LONG: Duration = Duration::from_secs(60);

/// A cluster's report of its one pod, running and ready.
const ONE_READY_POD: WorkloadCounts = WorkloadCounts {
    replicas: 1,
    running_pods: 1,
    ready_pods: 1,
};

/// A cluster's report of its one pod, started and not ready yet.
const ONE_STARTING_POD: WorkloadCounts = WorkloadCounts {
    ready_pods: 0,
    ..ONE_READY_POD
};

both_paths!(
    fifty_candidates_race_and_exactly_one_wins,
    expired_lease_is_taken_over_with_a_new_epoch,
    renew_after_expiry_fails_even_when_nobody_took_over,
    release_then_immediate_acquire_by_another,
    non_holder_renew_and_release_change_nothing,
    failed_acquire_of_a_held_lease_writes_and_locks_nothing,
    late_release_after_takeover_leaves_the_new_holder,
    deleted_row_heals_on_next_acquire_without_reusing_an_epoch,
    renew_many_returns_exactly_the_leases_still_held,
    acquirable_lists_exactly_the_leases_an_acquire_could_take,
    audit_table_matches_a_scripted_history,
    advisory_lock_does_not_protect_but_the_lease_does,
    acquire_and_release_notify_listeners,
    workload_reports_are_per_cluster_and_exclude_the_caller,
    only_the_holder_may_report_that_its_cluster_runs_nothing,
    one_statement_reports_many_leases_and_names_those_it_recorded,
    lease_event_refuses_truncate,
    held_lease_row_refuses_delete_and_truncate,
    free_or_expired_lease_row_can_be_deleted_and_epochs_continue,
    blocked_lease_statement_fails_after_the_lock_timeout,
    server_encoding_is_checked,
);

/// 50 candidates on separate connections race 20 times for one lease: the first round
/// for a missing row, then alternately for a released row and for an expired one.
async fn fifty_candidates_race_and_exactly_one_wins(via: Via) {
    let (_, schema) = db::fresh_schema(via).await;
    let mut candidates = Vec::new();
    for _ in 0..50 {
        candidates.push(db::store(via, &schema, 1).await);
    }
    // Open every connection before the race so the race is between statements.
    for c in &candidates {
        c.list().await.unwrap();
    }
    let mut last_epoch = 0;
    for round in 0..20 {
        let barrier = Arc::new(Barrier::new(candidates.len()));
        let mut tasks = Vec::new();
        for (i, store) in candidates.iter().cloned().enumerate() {
            let barrier = barrier.clone();
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                store
                    .try_acquire("race", &format!("candidate-{i}"), LONG)
                    .await
            }));
        }
        let mut winners = Vec::new();
        for t in tasks {
            if let Some(lease) = t.await.unwrap() {
                winners.push(lease);
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: winners {winners:?}");
        let winner = &winners[0];
        assert_eq!(winner.epoch, last_epoch + 1, "round {round}");
        last_epoch = winner.epoch;
        if round % 2 == 0 {
            candidates[0]
                .try_release("race", &winner.holder, winner.epoch)
                .await
                .unwrap();
        } else {
            // Expire it now (instead of sleeping through a ttl, which a slow round could
            // outlast and so legitimately see a second, later takeover).
            db::exec(&format!(
                "UPDATE {} SET renewed_at = renewed_at - interval '1 hour' WHERE name = 'race'",
                schema.qualify("lease")
            ))
            .await;
        }
    }
    assert_eq!(last_epoch, 20);
}

async fn expired_lease_is_taken_over_with_a_new_epoch(via: Via) {
    let (store, _) = db::fresh_schema(via).await;
    let a = store
        .try_acquire("l", "a", Duration::from_millis(300))
        .await
        .unwrap();
    assert_eq!(
        (a.holder.as_str(), a.epoch, a.previous_holder.as_str()),
        ("a", 1, "")
    );
    assert!(a.is_held());
    assert_eq!(
        a.expires_at - a.renewed_at,
        chrono::Duration::milliseconds(300)
    );
    assert!(
        store.try_acquire("l", "b", LONG).await.is_none(),
        "held lease taken"
    );

    tokio::time::sleep(Duration::from_millis(400)).await;
    let b = store
        .try_acquire("l", "b", LONG)
        .await
        .expect("expired lease not taken");
    assert_eq!(
        (b.holder.as_str(), b.epoch, b.previous_holder.as_str()),
        ("b", 2, "a")
    );
    assert_eq!(b.ttl, LONG, "ttl is the new holder's");
    assert!(
        store.try_renew("l", "a", 1).await.is_none(),
        "old holder renewed"
    );
    assert!(store.try_renew("l", "b", 2).await.is_some());
}

async fn renew_after_expiry_fails_even_when_nobody_took_over(via: Via) {
    let (store, _) = db::fresh_schema(via).await;
    // Long enough for the first renew to land in time on a loaded machine.
    let ttl = Duration::from_millis(1000);
    store.try_acquire("l", "a", ttl).await.unwrap();
    assert!(store.try_renew("l", "a", 1).await.is_some());
    tokio::time::sleep(ttl + Duration::from_millis(200)).await;
    assert!(
        store.try_renew("l", "a", 1).await.is_none(),
        "expired lease revived"
    );
    let row = store.row("l").await.unwrap();
    assert_eq!((row.holder.as_str(), row.epoch), ("a", 1));
    assert!(row.is_expired() && !row.is_held());
    // Coming back takes a new epoch, even for the same holder.
    let again = store.try_acquire("l", "a", LONG).await.unwrap();
    assert_eq!(again.epoch, 2);
}

async fn release_then_immediate_acquire_by_another(via: Via) {
    let (store, _) = db::fresh_schema(via).await;
    store.try_acquire("l", "a", LONG).await.unwrap();
    let released = store.try_release("l", "a", 1).await.expect("release");
    assert!(released.is_free());
    let b = store
        .try_acquire("l", "b", LONG)
        .await
        .expect("free lease not taken");
    assert_eq!((b.epoch, b.previous_holder.as_str()), (2, ""));
}

async fn non_holder_renew_and_release_change_nothing(via: Via) {
    let (store, _) = db::fresh_schema(via).await;
    let a = store.try_acquire("l", "a", LONG).await.unwrap();
    assert!(store.try_renew("l", "b", 1).await.is_none());
    assert!(store.try_release("l", "b", 1).await.is_none());
    assert!(
        store.try_renew("l", "a", 2).await.is_none(),
        "wrong epoch renewed"
    );
    assert!(
        store.try_release("l", "a", 7).await.is_none(),
        "wrong epoch released"
    );
    assert!(store.try_renew("other", "a", 1).await.is_none());
    let row = store.row("l").await.unwrap();
    assert_eq!(
        (row.holder.as_str(), row.epoch, row.renewed_at),
        ("a", 1, a.renewed_at)
    );
    assert_eq!(store.history("l").await.len(), 1, "no-ops were audited");
}

/// An acquire of a lease someone holds is a read: it leaves no new row version and no
/// row lock (`xmin`, `xmax`, `ctid` unchanged) and no audit row, and it does not wait
/// for a transaction that keeps the row locked.
async fn failed_acquire_of_a_held_lease_writes_and_locks_nothing(via: Via) {
    let (_, schema) = db::fresh_schema(via).await;
    let store = db::store(via, &schema, 1)
        .await
        .with_lock_timeout(Duration::from_secs(5));
    store.try_acquire("l", "a", LONG).await.unwrap();
    let lease = schema.qualify("lease");
    let mut conn = db::connection(Via::Direct).await;
    let version_sql = format!(
        "SELECT xmin::text || ' ' || xmax::text || ' ' || ctid::text FROM {lease} WHERE name = 'l'"
    );
    let before: String = db::scalar(&mut conn, &version_sql).await.unwrap();

    for _ in 0..3 {
        assert!(store.try_acquire("l", "b", LONG).await.is_none());
    }
    let after: String = db::scalar(&mut conn, &version_sql).await.unwrap();
    assert_eq!(before, after, "xmin xmax ctid of the lease row changed");
    assert_eq!(store.history("l").await.len(), 1, "failed acquires audited");

    // No row lock taken, so none waited for: the row locked FOR UPDATE by another
    // transaction, the failed acquire still answers at once. One that waited would
    // wait the whole lock timeout and fail with it (the bound is half of it, so load
    // cannot reach it).
    let mut blocker = db::connection(Via::Direct).await;
    db::raw(
        &mut blocker,
        &format!("BEGIN; SELECT * FROM {lease} WHERE name = 'l' FOR UPDATE"),
    )
    .await
    .unwrap();
    let started = Instant::now();
    assert!(store.try_acquire("l", "b", LONG).await.is_none());
    assert!(
        started.elapsed() < Duration::from_millis(2_500),
        "the failed acquire waited {:?} for the row lock",
        started.elapsed()
    );
    db::raw(&mut blocker, "ROLLBACK").await.unwrap();
}

async fn late_release_after_takeover_leaves_the_new_holder(via: Via) {
    let (store, _) = db::fresh_schema(via).await;
    store
        .try_acquire("l", "a", Duration::from_millis(200))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    store.try_acquire("l", "b", LONG).await.unwrap();
    assert!(store.try_release("l", "a", 1).await.is_none());
    let row = store.row("l").await.unwrap();
    assert_eq!((row.holder.as_str(), row.epoch), ("b", 2));
    assert!(row.is_held());
}

async fn deleted_row_heals_on_next_acquire_without_reusing_an_epoch(via: Via) {
    let (store, schema) = db::fresh_schema(via).await;
    for _ in 0..3 {
        let l = store.try_acquire("l", "a", LONG).await.unwrap();
        store.try_release("l", "a", l.epoch).await.unwrap();
    }
    db::exec(&format!(
        "DELETE FROM {} WHERE name = 'l'",
        schema.qualify("lease")
    ))
    .await;
    assert!(store.row("l").await.is_none());
    let healed = store
        .try_acquire("l", "b", LONG)
        .await
        .expect("missing row not healed");
    assert_eq!(
        healed.epoch, 4,
        "epoch must continue after the audit history"
    );
    // A lease that never existed starts at 1.
    assert_eq!(
        store.try_acquire("fresh", "b", LONG).await.unwrap().epoch,
        1
    );
}

async fn renew_many_returns_exactly_the_leases_still_held(via: Via) {
    let (store, _) = db::fresh_schema(via).await;
    let short = Duration::from_millis(1000);
    let mut held = Vec::new();
    // Names that need escaping inside an array literal, too.
    for name in [
        "keep-1",
        "keep-2",
        "keep-3",
        "q\"uote",
        "back\\slash",
        "c,o{m}ma",
        " NULL ",
        "o'brien",
    ] {
        let l = store.try_acquire(name, "me", LONG).await.unwrap();
        held.push((name.to_owned(), l.epoch));
    }
    let expired = store.try_acquire("taken", "me", short).await.unwrap();
    let released = store.try_acquire("released", "me", LONG).await.unwrap();
    let stale = store.try_acquire("stale-epoch", "me", LONG).await.unwrap();
    store.try_acquire("not-mine", "other", LONG).await.unwrap();
    tokio::time::sleep(short + Duration::from_millis(100)).await;
    store.try_acquire("taken", "thief", LONG).await.unwrap();
    store
        .try_release("released", "me", released.epoch)
        .await
        .unwrap();

    let mut request: Vec<(LeaseName, i64)> = held
        .iter()
        .map(|(name, epoch)| (id::lease(name), *epoch))
        .collect();
    request.push((id::lease("taken"), expired.epoch));
    request.push((id::lease("released"), released.epoch));
    request.push((id::lease("stale-epoch"), stale.epoch + 1));
    request.push((id::lease("not-mine"), 1));
    request.push((id::lease("never-existed"), 1));
    let before = store.row("keep-1").await.unwrap().renewed_at;
    let mut renewed: Vec<(String, i64)> = store
        .renew_many(&id::holder("me"), &request)
        .await
        .unwrap()
        .into_iter()
        .map(|l| (l.name, l.epoch))
        .collect();
    renewed.sort();
    held.sort();
    assert_eq!(renewed, held);
    assert!(store.row("keep-1").await.unwrap().renewed_at > before);
    assert!(
        store
            .renew_many(&id::holder("me"), &[])
            .await
            .unwrap()
            .is_empty()
    );
}

async fn acquirable_lists_exactly_the_leases_an_acquire_could_take(via: Via) {
    let (store, _) = db::fresh_schema(via).await;
    let short = Duration::from_millis(200);
    store.try_acquire("held", "other", LONG).await.unwrap();
    store.try_acquire("mine", "me", LONG).await.unwrap();
    store.try_acquire("q\"uote", "other", LONG).await.unwrap();
    store.try_acquire("expired", "other", short).await.unwrap();
    let freed = store.try_acquire("released", "other", LONG).await.unwrap();
    store
        .try_release("released", "other", freed.epoch)
        .await
        .unwrap();
    tokio::time::sleep(short + Duration::from_millis(100)).await;

    let names: Vec<LeaseName> = [
        "held", "mine", "q\"uote", "expired", "released", "missing", "c,o{m}ma",
    ]
    .map(id::lease)
    .to_vec();
    let found = store.acquirable(&names).await.unwrap();
    let asked: Vec<&str> = found.iter().map(|a| a.name.as_str()).collect();
    let names: Vec<&str> = names.iter().map(LeaseName::as_str).collect();
    assert_eq!(asked, names, "one answer per name, in order");
    let mut free: Vec<&str> = found
        .iter()
        .filter(|a| a.acquirable)
        .map(|a| a.name.as_str())
        .collect();
    free.sort();
    assert_eq!(free, ["c,o{m}ma", "expired", "missing", "released"]);
    for a in &found {
        match &a.lease {
            None => assert!(["missing", "c,o{m}ma"].contains(&a.name.as_str()), "{a:?}"),
            Some(row) => assert_eq!(row.name, a.name, "{a:?}"),
        }
        if a.acquirable {
            assert_eq!(a.acquirable_in, Duration::ZERO, "{a:?}");
        } else {
            // Held: acquirable at its expiry, counted on the database's clock from the
            // instant the row was read, in whole milliseconds rounded up.
            let row = a.lease.as_ref().unwrap();
            assert!(row.is_held(), "{a:?}");
            let left_us = (row.expires_at - row.observed_at)
                .num_microseconds()
                .unwrap();
            assert_eq!(
                a.acquirable_in,
                Duration::from_millis((left_us as u64).div_ceil(1000)),
                "{a:?}"
            );
            assert!(a.acquirable_in > LONG - Duration::from_secs(10), "{a:?}");
        }
    }
    // What it finds acquirable, acquire takes; what not, acquire refuses.
    for a in &found {
        let taken = store.try_acquire(&a.name, "me", LONG).await.is_some();
        assert_eq!(taken, a.acquirable, "{a:?}");
    }
    assert!(store.acquirable(&[]).await.unwrap().is_empty());

    // A lease about to expire: refused until the time it gave, taken from then on
    // (counted from when its answer arrived, as a standby does).
    let ttl = Duration::from_millis(1_500);
    store.try_acquire("soon", "other", ttl).await.unwrap();
    let soon = store
        .acquirable(&[id::lease("soon")])
        .await
        .unwrap()
        .remove(0);
    let arrived = tokio::time::Instant::now();
    assert!(
        !soon.acquirable && soon.acquirable_in > Duration::ZERO && soon.acquirable_in <= ttl,
        "{soon:?}"
    );
    assert_eq!(store.try_acquire("soon", "me", LONG).await, None);
    tokio::time::sleep_until(arrived + soon.acquirable_in).await;
    let taken = store.try_acquire("soon", "me", LONG).await;
    assert!(
        taken.is_some(),
        "refused at the instant acquirable gave: {soon:?}"
    );
}

async fn audit_table_matches_a_scripted_history(via: Via) {
    let (store, _) = db::fresh_schema(via).await;
    // Long enough that the next statement surely finds it held on a loaded machine.
    let short = Duration::from_millis(1500);
    store.try_acquire("l", "a", LONG).await.unwrap(); // 1 acquire a
    store.try_release("l", "a", 1).await.unwrap(); // 1 release a
    store.try_acquire("l", "b", short).await.unwrap(); // 2 acquire b
    assert!(store.try_acquire("l", "c", LONG).await.is_none()); // no event
    tokio::time::sleep(short + Duration::from_millis(100)).await;
    store.try_acquire("l", "c", LONG).await.unwrap(); // 3 takeover c from b
    assert!(store.try_release("l", "b", 2).await.is_none()); // late: no event
    store.try_renew("l", "c", 3).await.unwrap(); // renews are not audited
    store.try_release("l", "c", 3).await.unwrap(); // 3 release c

    let events = store.history("l").await;
    let history: Vec<(i64, &str, &str, &str)> = events
        .iter()
        .map(|e| {
            (
                e.epoch,
                e.holder.as_str(),
                e.previous_holder.as_str(),
                e.kind.as_str(),
            )
        })
        .collect();
    assert_eq!(
        history,
        vec![
            (1, "a", "", "acquire"),
            (1, "a", "", "release"),
            (2, "b", "", "acquire"),
            (3, "c", "b", "takeover"),
            (3, "c", "", "release"),
        ]
    );
    assert!(
        events.windows(2).all(|w| w[0].at <= w[1].at),
        "event times go back"
    );

    // Append-only: the history cannot be rewritten by accident.
    let err = sqlx::raw_sql("DELETE FROM lease_event")
        .execute(store.pool())
        .await;
    assert!(err.is_err());
}

/// Why the lease is a row and not `pg_advisory_lock`: through PgBouncer in transaction
/// mode a session lock belongs to whichever server connection ran the statement, which
/// then serves other clients, so a second client "gets" a lock the first one thinks it
/// holds. The lease, one autocommit statement at a time, stays exclusive on the same path.
async fn advisory_lock_does_not_protect_but_the_lease_does(via: Via) {
    // Distinct per path, because both variants run at once against one server.
    let key =
        7_000_000 + i64::from(std::process::id() % 100_000) * 2 + (via == Via::PgBouncer) as i64;
    let first = db::pool(via).await;
    assert!(
        try_advisory_lock(&first, key).await,
        "first client could not take a free advisory lock"
    );

    let mut second_client_also_got_it = false;
    for _ in 0..20 {
        let other = db::pool(via).await;
        let got = try_advisory_lock(&other, key).await;
        other.close().await;
        if got {
            second_client_also_got_it = true;
            break;
        }
    }
    match via {
        Via::Direct => assert!(
            !second_client_also_got_it,
            "on direct connections the advisory lock is exclusive"
        ),
        Via::PgBouncer => assert!(
            second_client_also_got_it,
            "expected PgBouncer to hand the locked server session to another client"
        ),
    }
    first.close().await;
    // Clear any session locks left on pooled server connections by this scenario.
    db::exec(&format!(
        "SELECT pg_terminate_backend(pid) FROM pg_locks \
         WHERE locktype = 'advisory' AND objid = {key} AND pid <> pg_backend_pid()"
    ))
    .await;

    // The lease on the same path: two clients, one winner.
    let (_, schema) = db::fresh_schema(via).await;
    let one: LeaseStore = db::store(via, &schema, 1).await;
    let two: LeaseStore = db::store(via, &schema, 1).await;
    assert!(one.try_acquire("l", "one", LONG).await.is_some());
    assert!(two.try_acquire("l", "two", LONG).await.is_none());
    assert!(one.try_renew("l", "one", 1).await.is_some());
}

async fn try_advisory_lock(pool: &sqlx::PgPool, key: i64) -> bool {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT pg_try_advisory_lock({key})"
    )))
    .persistent(false)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Acquire and release notify on a channel that a direct connection can LISTEN to
/// (the statements themselves may go through PgBouncer).
async fn acquire_and_release_notify_listeners(via: Via) {
    let (store, _) = db::fresh_schema(via).await;
    let mut listener = sqlx::postgres::PgListener::connect(&db::direct_url())
        .await
        .unwrap();
    listener
        .listen(reaper_operator::lease::NOTIFY_CHANNEL)
        .await
        .unwrap();
    let name = format!("notify-{}-{via:?}", std::process::id());
    let lease = store.try_acquire(&name, "a", LONG).await.unwrap();
    let got = recv(&mut listener, &name).await;
    assert_eq!(got.payload(), name);
    store.try_release(&name, "a", lease.epoch).await.unwrap();
    let got = recv(&mut listener, &name).await;
    assert_eq!(got.payload(), name);
    // Failed operations notify nobody.
    store.try_acquire(&name, "b", LONG).await.unwrap();
    recv(&mut listener, &name).await;
    assert!(store.try_acquire(&name, "c", LONG).await.is_none());
    let quiet = tokio::time::timeout(Duration::from_millis(300), recv(&mut listener, &name));
    assert!(quiet.await.is_err(), "a failed acquire notified");
}

async fn workload_reports_are_per_cluster_and_exclude_the_caller(via: Via) {
    let (store, _) = db::fresh_schema(via).await;
    let idle = WorkloadCounts::default();
    assert!(
        store
            .report(
                "l",
                "east",
                "east/a",
                ONE_READY_POD,
                Duration::from_secs(40)
            )
            .await
            .is_empty()
    );
    let seen_by_west = store
        .report("l", "west", "west/b", idle, Duration::from_secs(3))
        .await;
    assert_eq!(seen_by_west.len(), 1);
    assert_eq!(
        (
            seen_by_west[0].cluster.as_str(),
            seen_by_west[0].running_pods
        ),
        ("east", 1)
    );
    assert!(seen_by_west[0].age < Duration::from_secs(5));
    // Judged by the reporter's bound (east's 40 s), not the reader's (west's 3 s).
    assert_eq!(seen_by_west[0].stale_after, Duration::from_secs(40));
    assert_eq!(seen_by_west[0].refresh, Duration::from_secs(10));
    assert!(!seen_by_west[0].is_stale());
    store
        .report("l", "east", "east/c", idle, Duration::from_secs(3))
        .await;
    let seen_by_west = store
        .report("l", "west", "west/b", idle, Duration::from_secs(3))
        .await;
    assert_eq!(
        (
            seen_by_west[0].reported_by.as_str(),
            seen_by_west[0].running_pods
        ),
        ("east/c", 0)
    );
    assert!(
        store
            .report("other", "west", "west/b", idle, Duration::from_secs(3))
            .await
            .is_empty()
    );
}

/// A replica whose observation predates its peer's scale-up must not overwrite the
/// peer's report of the starting pod with "no pods": while a replica of the cluster
/// holds the lease, only that holder may report zero; reports of pods always count.
async fn only_the_holder_may_report_that_its_cluster_runs_nothing(via: Via) {
    let (store, _) = db::fresh_schema(via).await;
    let ttl = Duration::from_secs(30);
    let none = WorkloadCounts::default();
    let east_seen_by_west = |store: &LeaseStore| {
        let store = store.clone();
        async move {
            let reports = store.report("l", "west", "west/x", none, ttl).await;
            reports
                .into_iter()
                .find(|r| r.cluster == "east")
                .map(|r| (r.reported_by, r.running_pods))
        }
    };
    store.try_acquire("l", "east/a", ttl).await.unwrap();
    store
        .report("l", "east", "east/a", ONE_STARTING_POD, ttl)
        .await;
    // A peer's stale "nothing runs" is refused...
    store.report("l", "east", "east/b", none, ttl).await;
    assert_eq!(east_seen_by_west(&store).await, Some(("east/a".into(), 1)));
    // ...its report of pods is taken...
    store
        .report("l", "east", "east/b", ONE_STARTING_POD, ttl)
        .await;
    assert_eq!(east_seen_by_west(&store).await, Some(("east/b".into(), 1)));
    // ...and the holder itself may say its pods are gone.
    store.report("l", "east", "east/a", none, ttl).await;
    assert_eq!(east_seen_by_west(&store).await, Some(("east/a".into(), 0)));
    // Once nobody of the cluster holds the lease, any replica reports what it sees.
    store
        .report("l", "east", "east/a", ONE_STARTING_POD, ttl)
        .await;
    let held = store.row("l").await.unwrap();
    store.try_release("l", "east/a", held.epoch).await.unwrap();
    store.report("l", "east", "east/b", none, ttl).await;
    assert_eq!(east_seen_by_west(&store).await, Some(("east/b".into(), 0)));
}

/// `sync_workloads` is `sync_workload` for many leases at once: each report is judged
/// on its own (a peer's "no pods" refused, the rest recorded), the other clusters'
/// reports come back per lease (an empty list for a lease nobody else reported), and
/// the caller learns which reports were recorded.
async fn one_statement_reports_many_leases_and_names_those_it_recorded(via: Via) {
    let (store, _) = db::fresh_schema(via).await;
    let ttl = Duration::from_secs(30);
    let update = |name: &str, counts| WorkloadUpdate {
        name: id::lease(name),
        counts,
        timing: ttl.into(),
    };
    store.try_acquire("held", "east/a", ttl).await.unwrap();
    store
        .report("held", "east", "east/a", ONE_READY_POD, ttl)
        .await;
    store
        .report("held", "west", "west/x", ONE_READY_POD, ttl)
        .await;
    let synced = store
        .sync_workloads(
            &id::cluster("east"),
            &id::holder("east/b"),
            &[
                // Refused: east/a of the same cluster holds it.
                update("held", WorkloadCounts::default()),
                update("free", WorkloadCounts::default()),
                update("running", ONE_READY_POD),
                // The same lease twice: the report with more pods is the one kept.
                update("twice", WorkloadCounts::default()),
                update("twice", ONE_READY_POD),
            ],
        )
        .await
        .unwrap();
    let mut written: Vec<&str> = synced.written.iter().map(String::as_str).collect();
    written.sort_unstable();
    assert_eq!(written, ["free", "running", "twice"]);
    let mut names: Vec<&str> = synced.others.keys().map(String::as_str).collect();
    names.sort_unstable();
    assert_eq!(names, ["free", "held", "running", "twice"]);
    let west: Vec<(&str, i32)> = synced.others["held"]
        .iter()
        .map(|r| (r.cluster.as_str(), r.running_pods))
        .collect();
    assert_eq!(west, [("west", 1)]);
    assert!(synced.others["free"].is_empty());
    // What was recorded is what another cluster reads.
    let seen_by_west = store
        .sync_workloads(
            &id::cluster("west"),
            &id::holder("west/x"),
            &[
                update("held", ONE_READY_POD),
                update("twice", ONE_READY_POD),
            ],
        )
        .await
        .unwrap();
    let east = |name: &str| {
        seen_by_west.others[name]
            .iter()
            .find(|r| r.cluster == "east")
            .map(|r| (r.reported_by.clone(), r.running_pods))
    };
    assert_eq!(east("held"), Some(("east/a".into(), 1)));
    assert_eq!(east("twice"), Some(("east/b".into(), 1)));
}

/// The next notification about `name` (other tests notify on the same channel).
async fn recv(
    listener: &mut sqlx::postgres::PgListener,
    name: &str,
) -> sqlx::postgres::PgNotification {
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let n = listener.recv().await.unwrap();
            if n.payload() == name {
                return n;
            }
        }
    })
    .await
    .expect("no notification within 5 s")
}

/// TRUNCATE fires no row triggers, so the append-only history needs a statement trigger:
/// without it TRUNCATE lease_event + DELETE of the lease row restarted epochs at 1.
async fn lease_event_refuses_truncate(via: Via) {
    let (store, schema) = db::fresh_schema(via).await;
    store.try_acquire("l", "a", LONG).await.unwrap();
    let pg = db::refused(
        db::try_exec(via, &format!("TRUNCATE {}", schema.qualify("lease_event"))).await,
        "lease_event is append-only (TRUNCATE refused)",
    );
    assert!(
        pg.hint()
            .is_some_and(|h| h.contains("DISABLE TRIGGER lease_event_append_only")),
        "hint: {:?}",
        pg.hint()
    );
    assert_eq!(store.history("l").await.len(), 1, "history lost");
}

/// Deleting a held lease row would let the next acquire in at once (a second holder);
/// TRUNCATE would do the same to every lease, bypassing the row trigger.
async fn held_lease_row_refuses_delete_and_truncate(via: Via) {
    let (store, schema) = db::fresh_schema(via).await;
    let lease = schema.qualify("lease");
    store.try_acquire("l", "east/a", LONG).await.unwrap();
    store.try_acquire("free", "east/a", LONG).await.unwrap();
    store.try_release("free", "east/a", 1).await.unwrap();

    for sql in [
        format!("DELETE FROM {lease} WHERE name = 'l'"),
        // One held row refuses the whole statement, free rows included.
        format!("DELETE FROM {lease}"),
    ] {
        let pg = db::refused(
            db::try_exec(via, &sql).await,
            "lease l is held by east/a (epoch 1) until ",
        );
        assert!(
            pg.message()
                .ends_with(": deleting it would let a second holder in at once"),
            "{}",
            pg.message()
        );
        assert_eq!(pg.code(), "55006", "object_in_use");
        assert!(
            pg.hint().is_some_and(|h| h.contains("release")),
            "{:?}",
            pg.hint()
        );
    }

    db::refused(
        db::try_exec(via, &format!("TRUNCATE {lease}")).await,
        "TRUNCATE of the lease table refused",
    );

    let row = store.row("l").await.expect("held row deleted");
    assert_eq!((row.holder.as_str(), row.epoch), ("east/a", 1));
    assert!(store.row("free").await.is_some(), "free row deleted");
    assert!(
        store.try_acquire("l", "west/b", LONG).await.is_none(),
        "a second holder got in"
    );
}

/// A free or expired row may still be deleted by hand; the next acquire recreates it with
/// the epoch after the highest one in the audit history.
async fn free_or_expired_lease_row_can_be_deleted_and_epochs_continue(via: Via) {
    let (store, schema) = db::fresh_schema(via).await;
    let lease = schema.qualify("lease");
    let short = Duration::from_millis(200);

    for _ in 0..2 {
        let l = store.try_acquire("free", "a", LONG).await.unwrap();
        store.try_release("free", "a", l.epoch).await.unwrap();
    }
    db::try_exec(via, &format!("DELETE FROM {lease} WHERE name = 'free'"))
        .await
        .expect("DELETE of a free lease refused");
    assert!(store.row("free").await.is_none());
    let l = store.try_acquire("free", "b", LONG).await.unwrap();
    assert_eq!((l.epoch, l.previous_holder.as_str()), (3, ""));

    // Expired, never released: a, then a takeover by b, both left to expire.
    store.try_acquire("expired", "a", short).await.unwrap();
    tokio::time::sleep(short + Duration::from_millis(100)).await;
    let b = store.try_acquire("expired", "b", short).await.unwrap();
    assert_eq!(b.epoch, 2);
    tokio::time::sleep(short + Duration::from_millis(100)).await;
    db::try_exec(via, &format!("DELETE FROM {lease} WHERE name = 'expired'"))
        .await
        .expect("DELETE of an expired lease refused");
    let c = store.try_acquire("expired", "c", LONG).await.unwrap();
    assert_eq!(c.epoch, 3, "epoch must continue after the audit history");
}

/// A transaction that keeps a lease row locked (here `FOR UPDATE`; the old fencing
/// recipe's `FOR SHARE` did the same to renews) makes the statements that need the row
/// fail after the lock timeout with a clear error, instead of waiting until the call
/// timeout while holding a pooled connection; the connection is usable right after.
async fn blocked_lease_statement_fails_after_the_lock_timeout(via: Via) {
    let (_, schema) = db::fresh_schema(via).await;
    let lock_timeout = Duration::from_millis(300);
    // One connection, and a call timeout (10 s) far above the lock timeout.
    let store = db::store(via, &schema, 1)
        .await
        .with_lock_timeout(lock_timeout);
    assert_eq!(store.lock_timeout(), lock_timeout);
    store.try_acquire("l", "a", LONG).await.unwrap();
    store.try_acquire("other", "a", LONG).await.unwrap();

    let mut blocker = db::connection(Via::Direct).await;
    db::raw(
        &mut blocker,
        &format!(
            "BEGIN; SELECT * FROM {} WHERE name = 'l' FOR UPDATE",
            schema.qualify("lease")
        ),
    )
    .await
    .unwrap();

    let held = [(id::lease("l"), 1), (id::lease("other"), 1)];
    for what in ["renew", "renew_many", "release"] {
        let started = Instant::now();
        let result = match what {
            "renew" => store
                .renew(&id::lease("l"), &id::holder("a"), 1)
                .await
                .map(|_| ()),
            "renew_many" => store.renew_many(&id::holder("a"), &held).await.map(|_| ()),
            _ => store
                .release(&id::lease("l"), &id::holder("a"), 1)
                .await
                .map(|_| ()),
        };
        let took = started.elapsed();
        let error = result.expect_err("a statement on a locked row succeeded");
        assert!(
            matches!(error, Error::LockTimeout(t) if t == lock_timeout),
            "{what}: {error}"
        );
        assert!(
            error.to_string().contains("lock_timeout"),
            "unclear message: {error}"
        );
        assert!(
            took >= lock_timeout - Duration::from_millis(50) && took < Duration::from_secs(2),
            "{what} took {took:?} with a lock timeout of {lock_timeout:?}"
        );
        // The pool's only connection is free again at once, lock still held.
        let started = Instant::now();
        assert!(store.try_renew("other", "a", 1).await.is_some());
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    db::raw(&mut blocker, "ROLLBACK").await.unwrap();
    assert!(store.try_renew("l", "a", 1).await.is_some());
    // Nothing of the SET LOCAL stays on the (server) connection.
    let mut conn = db::connection(via).await;
    let setting: String = db::scalar(&mut conn, "SHOW lock_timeout").await.unwrap();
    assert_eq!(setting, "0");
}

/// A database in another encoding than UTF8 is refused, by `check_server` and before
/// `migrate` creates anything; the UTF8 test database passes.
async fn server_encoding_is_checked(via: Via) {
    let (store, _) = db::fresh_schema(via).await;
    store.check_server().await.expect("UTF8 database refused");

    let database = format!(
        "reaper_latin1_{}_{}",
        std::process::id(),
        via == Via::PgBouncer
    )
    .to_lowercase();
    db::exec(&format!(
        "CREATE DATABASE {database} WITH ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' \
         TEMPLATE template0"
    ))
    .await;
    let schema = db::unique_schema("latin1");
    let outcome = async {
        let store = LeaseStore::connect(
            &db::url_for_database(via, &database),
            &schema,
            Duration::from_secs(10),
            1,
        )
        .await
        .unwrap();
        let checked = store.check_server().await;
        // Migrations need a direct connection.
        let migrated = match via {
            Via::Direct => Some(store.migrate().await),
            Via::PgBouncer => None,
        };
        let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&db::url_for_database(
            Via::Direct,
            &database,
        ))
        .await
        .unwrap();
        let schemas: i64 = db::scalar(
            &mut conn,
            &format!(
                "SELECT count(*) FROM pg_namespace WHERE nspname = '{}'",
                schema.as_str()
            ),
        )
        .await
        .unwrap();
        let _ = sqlx::Connection::close(conn).await;
        store.pool().close().await;
        (checked, migrated, schemas)
    }
    .await;
    db::exec(&format!("DROP DATABASE {database} WITH (FORCE)")).await;

    let (checked, migrated, schemas) = outcome;
    let expected = "invalid configuration: the lease database uses encoding LATIN1; \
                    reaper-operator needs UTF8 (create the database with ENCODING 'UTF8')";
    let error = checked.expect_err("LATIN1 database accepted");
    assert!(matches!(error, Error::Config(_)), "{error:?}");
    assert_eq!(error.to_string(), expected);
    if let Some(migrated) = migrated {
        let error = migrated.expect_err("migrate accepted a LATIN1 database");
        assert_eq!(error.to_string(), expected);
    }
    assert_eq!(schemas, 0, "migrate created the schema before refusing");
}

/// A lease connection the server ended while it sat idle (`pg_terminate_backend`, a
/// restart) answers the next statement with the server's FATAL: that statement is sent
/// again on a new connection, and the dead one is not kept for the one after (a release,
/// which has a single attempt); a readiness ping is sent again as well.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_connection_the_server_ended_is_not_reused() {
    let (_, schema) = db::fresh_schema(Via::Direct).await;
    let store = db::store(Via::Direct, &schema, 1).await;
    let lease = store.try_acquire("ended", "a", LONG).await.unwrap();
    let mut admin = db::connection(Via::Direct).await;
    // Only this store's session: its last statement named this test's own schema
    // (other tests run in the same database at the same time).
    let end_the_stores_session = async |admin: &mut sqlx::PgConnection| {
        let sql = format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid() \
               AND backend_type = 'client backend' AND query LIKE '%\"{schema}\"%'"
        );
        db::raw(admin, &sql).await.unwrap();
        // Let the FATAL reach the idle connection's socket before the next statement.
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    end_the_stores_session(&mut admin).await;
    let renewed = store
        .renew(&id::lease("ended"), &id::holder("a"), lease.epoch)
        .await;
    assert!(
        matches!(&renewed, Ok(Some(l)) if l.epoch == lease.epoch),
        "renew after the session ended: {renewed:?}"
    );
    let released = store
        .release(&id::lease("ended"), &id::holder("a"), lease.epoch)
        .await;
    assert!(
        matches!(&released, Ok(Some(_))),
        "release after it: {released:?}"
    );
    assert_eq!(store.open_connections(), 1);

    // The readiness ping too: a restart must not make a replica unready for a period.
    end_the_stores_session(&mut admin).await;
    store.ping().await.expect("ping after the session ended");
}
