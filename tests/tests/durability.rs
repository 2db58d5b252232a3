//! Crash and restart: kill -9 during a stream of acknowledged puts (RocksDB engine), and
//! graceful SIGTERM restarts (RocksDB and memory engines).
//!
//! These run against metastore (or, with METASTORE_TESTS_SUBJECT=etcd, against etcd, to
//! validate the tests themselves).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metastore_proto::etcdserverpb::{CompactionRequest, HashKvRequest, PutRequest, RangeRequest};
use metastore_tests::ops::*;
use metastore_tests::{bounded, test_bounded, Engine, Kind, Server};

/// An acknowledged put: key, value, revision.
type Acked = (Vec<u8>, Vec<u8>, i64);

fn durable_kind() -> Kind {
    match Kind::subject() {
        Kind::Etcd => Kind::Etcd,
        Kind::Metastore(_) => Kind::Metastore(Engine::RocksDb),
    }
}

/// Reads every key under `prefix`: key -> (create_revision, mod_revision, version, value),
/// plus the header revision.
async fn read_all(s: &Server, prefix: &str) -> (BTreeMap<Vec<u8>, (i64, i64, i64, Vec<u8>)>, i64) {
    let mut kv = s.kv().await;
    let r = bounded("range all", kv.range(get_prefix(prefix)))
        .await
        .unwrap_or_else(|e| panic!("{}: range after restart: {e:?}", s.kind.label()))
        .into_inner();
    let rev = r.header.as_ref().map(|h| h.revision).unwrap_or(-1);
    let m = r
        .kvs
        .into_iter()
        .map(|kv| {
            (
                kv.key.to_vec(),
                (
                    kv.create_revision,
                    kv.mod_revision,
                    kv.version,
                    kv.value.to_vec(),
                ),
            )
        })
        .collect();
    (m, rev)
}

/// One kill -9 cycle: `writers` clients stream unique puts; the process is SIGKILLed after
/// `kill_after`; it is restarted on the same data dir and every acknowledged put must be
/// there with its revision, with no gap in revisions.
async fn kill9_cycle(s: &mut Server, cycle: usize, writers: usize, kill_after: Duration) {
    let acked: Arc<Mutex<Vec<Acked>>> = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for w in 0..writers {
        let mut kv = s.kv().await;
        let acked = acked.clone();
        tasks.push(tokio::spawn(async move {
            for n in 0..1_000_000u64 {
                let key = format!("w/{cycle}/{w}/{n:07}").into_bytes();
                let value = format!("value-{cycle}-{w}-{n}").into_bytes();
                let req = PutRequest {
                    key: key.clone(),
                    value: value.clone(),
                    ..Default::default()
                };
                match tokio::time::timeout(Duration::from_secs(10), kv.put(req)).await {
                    Ok(Ok(r)) => {
                        let rev = r.into_inner().header.expect("header").revision;
                        acked.lock().unwrap().push((key, value, rev));
                    }
                    _ => return,
                }
            }
        }));
    }
    tokio::time::sleep(kill_after).await;
    s.kill9();
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(30), t)
            .await
            .expect("writer did not stop after the kill");
    }
    let acked = acked.lock().unwrap().clone();
    s.restart().await;

    let (all, rev) = read_all(s, "w/").await;
    let mut missing = Vec::new();
    for (k, v, r) in &acked {
        match all.get(k) {
            Some((create, m, ver, val)) if create == r && m == r && *ver == 1 && val == v => {}
            other => missing.push(format!(
                "{} acked at revision {r}, after restart: {other:?}",
                String::from_utf8_lossy(k)
            )),
        }
    }
    assert!(
        missing.is_empty(),
        "cycle {cycle} ({} acknowledged puts, killed after {kill_after:?}): {} lost or changed:\n{}",
        acked.len(),
        missing.len(),
        missing.iter().take(20).cloned().collect::<Vec<_>>().join("\n")
    );
    let max_acked = acked.iter().map(|a| a.2).max().unwrap_or(0);
    assert!(
        rev >= max_acked,
        "cycle {cycle}: revision after restart {rev} < highest acknowledged {max_acked}"
    );
    // Every key is written once, so the mod revisions of all keys must be exactly
    // 2..=rev: one revision per put, none lost, none skipped.
    let mut revs: Vec<i64> = all.values().map(|v| v.1).collect();
    revs.sort_unstable();
    let expected: Vec<i64> = (2..=rev).collect();
    if revs != expected {
        let gaps: Vec<i64> = expected
            .iter()
            .filter(|r| revs.binary_search(r).is_err())
            .copied()
            .take(20)
            .collect();
        panic!(
            "cycle {cycle}: revisions not gapless after restart: header revision {rev}, {} keys, \
             first missing revisions {gaps:?}",
            revs.len()
        );
    }
    // And the next write continues right after.
    let mut kv = s.kv().await;
    let r = bounded(
        "put after restart",
        kv.put(put(&format!("w/{cycle}/next"), "x")),
    )
    .await
    .expect("put after restart")
    .into_inner();
    assert_eq!(
        r.header.unwrap().revision,
        rev + 1,
        "cycle {cycle}: first put after restart"
    );
    eprintln!(
        "kill -9 cycle {cycle}: {} acknowledged puts before the kill after {kill_after:?}, \
         {} keys after restart, revision {rev}",
        acked.len(),
        all.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_keeps_acknowledged_puts() {
    test_bounded(Duration::from_secs(200), async {
        let mut s = Server::start(durable_kind()).await;
        // Different kill timings, several concurrent writers (group commit), and a single
        // writer; all on the same data dir, so revisions must continue across crashes.
        let plan = [
            (8, Duration::from_millis(300)),
            (1, Duration::from_millis(700)),
            (16, Duration::from_millis(1500)),
            (4, Duration::from_millis(50)),
            (8, Duration::from_millis(2500)),
        ];
        for (cycle, (writers, after)) in plan.into_iter().enumerate() {
            kill9_cycle(&mut s, cycle, writers, after).await;
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_restart_keeps_data_and_revision() {
    test_bounded(Duration::from_secs(120), async {
        let mut s = Server::start(durable_kind()).await;
        let mut kv = s.kv().await;
        for i in 0..50 {
            bounded(
                "put",
                kv.put(put(&format!("r/{:03}", i % 20), &format!("v{i}"))),
            )
            .await
            .expect("put");
        }
        bounded("delete", kv.delete_range(del_prefix("r/01", false)))
            .await
            .expect("delete");
        bounded(
            "compact",
            kv.compact(CompactionRequest {
                revision: 20,
                physical: true,
            }),
        )
        .await
        .expect("compact");
        bounded("put", kv.put(put("r/last", "x")))
            .await
            .expect("put");

        let snapshot = |kv: &mut metastore_proto::etcdserverpb::kv_client::KvClient<_>| {
            let mut kv = kv.clone();
            async move {
                let cur = bounded("range", kv.range(get_all()))
                    .await
                    .unwrap()
                    .into_inner();
                let old = bounded(
                    "range at 30",
                    kv.range(RangeRequest {
                        revision: 30,
                        ..get_all()
                    }),
                )
                .await
                .unwrap()
                .into_inner();
                let compacted = bounded(
                    "range at 19",
                    kv.range(RangeRequest {
                        revision: 19,
                        ..get_all()
                    }),
                )
                .await
                .map(|_| ())
                .map_err(|e| (e.code(), e.message().to_string()));
                (cur.kvs, cur.header.unwrap().revision, old.kvs, compacted)
            }
        };
        let before = snapshot(&mut kv).await;
        let hash_before = bounded(
            "hashkv",
            s.maintenance().await.hash_kv(HashKvRequest { revision: 0 }),
        )
        .await
        .unwrap()
        .into_inner();

        let status = s.terminate(Duration::from_secs(30));
        use std::os::unix::process::ExitStatusExt;
        assert!(
            status.success() || status.signal() == Some(libc_sigterm()),
            "{} exited with {status} after SIGTERM",
            s.kind.label()
        );
        s.restart().await;
        let mut kv = s.kv().await;
        let after = snapshot(&mut kv).await;
        assert_eq!(
            before, after,
            "data, revision or history changed across a restart"
        );
        let hash_after = bounded(
            "hashkv",
            s.maintenance().await.hash_kv(HashKvRequest { revision: 0 }),
        )
        .await
        .unwrap()
        .into_inner();
        assert_eq!(
            (hash_before.hash, hash_before.compact_revision),
            (hash_after.hash, hash_after.compact_revision),
            "HashKV changed across a restart"
        );
        let r = bounded("put", kv.put(put("r/after", "y")))
            .await
            .expect("put")
            .into_inner();
        assert_eq!(r.header.unwrap().revision, before.1 + 1);
    })
    .await
}

fn libc_sigterm() -> i32 {
    15
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_engine_serves_and_stops() {
    test_bounded(Duration::from_secs(60), async {
        let kind = match Kind::subject() {
            Kind::Etcd => Kind::Etcd,
            Kind::Metastore(_) => Kind::Metastore(Engine::Memory),
        };
        let mut s = Server::start(kind).await;
        let mut kv = s.kv().await;
        for i in 0..10 {
            let r = bounded("put", kv.put(put(&format!("m/{i}"), "v")))
                .await
                .expect("put")
                .into_inner();
            assert_eq!(r.header.unwrap().revision, i + 2);
        }
        let r = bounded("range", kv.range(get_prefix("m/")))
            .await
            .expect("range")
            .into_inner();
        assert_eq!(r.count, 10);
        let out = s.etcdctl(&["get", "m/3", "--print-value-only"]);
        assert_eq!(out.stdout, "v\n", "{out:?}");
        let status = s.terminate(Duration::from_secs(30));
        use std::os::unix::process::ExitStatusExt;
        assert!(
            status.success() || status.signal() == Some(libc_sigterm()),
            "{} exited with {status} after SIGTERM",
            s.kind.label()
        );
        // A restart serves again: empty for the memory engine, intact for a durable one.
        s.restart().await;
        let mut kv = s.kv().await;
        let r = bounded("range", kv.range(get_prefix("m/")))
            .await
            .expect("range")
            .into_inner();
        let expected = if s.kind.durable() { 10 } else { 0 };
        assert_eq!(r.count, expected, "{} after restart: {r:?}", s.kind.label());
        let r = bounded("put", kv.put(put("m/x", "v")))
            .await
            .expect("put")
            .into_inner();
        assert_eq!(
            r.header.unwrap().revision,
            if s.kind.durable() { 12 } else { 2 }
        );
    })
    .await
}
