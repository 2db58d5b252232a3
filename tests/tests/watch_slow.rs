//! A watch stream that stops reading while many writes go on: the server's memory stays
//! bounded (VmRSS from /proc, with a generous bound, no timing), other watchers keep
//! receiving every event, and when the slow stream resumes each of its watchers gets
//! every event in order without a gap, or a prefix of them and a compaction cancel.

use std::time::Duration;

use metastore_proto::etcdserverpb::{CompactionRequest, WatchCreateRequest, WatchResponse};
use metastore_tests::ops;
use metastore_tests::watch::RawWatch;
use metastore_tests::{test_bounded, Engine, Kind, Server};

const WATCHERS: usize = 50;
const WRITES: i64 = 2000;
const VALUE: usize = 8 << 10;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// Checks one watcher's responses: consecutive revisions from `first`, then either all
/// the way to `last` or a compaction cancel at a revision above the last one received.
fn check_watcher(id: i64, responses: &[&WatchResponse], first: i64, last: i64) -> bool {
    let mut expect = first;
    for r in responses {
        if r.canceled {
            assert!(
                r.compact_revision > expect - 1 && r.compact_revision > 0,
                "watcher {id}: cancel {r:?} after revision {}",
                expect - 1
            );
            return false;
        }
        for e in &r.events {
            let kv = e.kv.as_ref().unwrap();
            assert_eq!(kv.mod_revision, expect, "watcher {id}: gap or duplicate");
            assert_eq!(kv.value.len(), VALUE);
            expect += 1;
        }
    }
    assert_eq!(expect, last + 1, "watcher {id}: missing events at the end");
    true
}

/// One round: a slow stream of `WATCHERS` watchers on "k" and a fast one, `WRITES`
/// puts while the slow one is not read, optionally a compaction of half of them, then
/// the slow stream is read. Returns (complete, canceled) slow watchers.
async fn round(s: &Server, compact: bool) -> (usize, usize) {
    let pid = s.pid().expect("pid");
    let mut kv = s.kv().await;
    let first = kv.put(ops::put("k", "start")).await.unwrap().into_inner();
    let first = first.header.unwrap().revision + 1; // the first write below

    // The slow stream, on its own connection (its unread data must not hold up the
    // other streams' shared HTTP/2 window): many watchers on the written key.
    let mut slow = RawWatch::open(s.channel().await).await;
    for _ in 0..WATCHERS {
        slow.create(WatchCreateRequest {
            key: b"k".to_vec(),
            ..Default::default()
        });
    }
    for _ in 0..WATCHERS {
        assert!(slow.next(Duration::from_secs(10)).await.unwrap().created);
    }
    let mut fast = RawWatch::open(s.channel().await).await;
    fast.create(WatchCreateRequest {
        key: b"k".to_vec(),
        ..Default::default()
    });
    assert!(fast.next(Duration::from_secs(10)).await.unwrap().created);

    let before = rss_kib(pid);
    let value = "x".repeat(VALUE);
    let writer = tokio::spawn(async move {
        for _ in 0..WRITES {
            kv.put(ops::put("k", &value)).await.unwrap();
        }
        kv
    });
    // The fast watcher sees every write while the slow stream is not read.
    let mut expect = first;
    while expect < first + WRITES {
        let r = fast
            .next(Duration::from_secs(30))
            .await
            .expect("fast watcher stalled");
        for e in r.events {
            assert_eq!(e.kv.unwrap().mod_revision, expect);
            expect += 1;
        }
    }
    let mut kv = writer.await.unwrap();
    let last = first + WRITES - 1;
    let after = rss_kib(pid);
    // Unbounded buffering would hold WATCHERS copies of the history (~800 MB here);
    // the history itself is ~16 MB in the memory engine.
    let growth_mib = after.saturating_sub(before) / 1024;
    eprintln!("RSS before {before} KiB, after {after} KiB, growth {growth_mib} MiB");
    assert!(growth_mib < 200, "server RSS grew by {growth_mib} MiB");

    if compact {
        // Compact history the slow watchers have not read yet: they either caught up
        // already or must be canceled with the compacted revision.
        kv.compact(CompactionRequest {
            revision: first + WRITES / 2,
            physical: true,
        })
        .await
        .unwrap();
    }

    // Resume reading.
    let responses = slow.drain(Duration::from_secs(3)).await;
    let mut complete = 0;
    let mut canceled = 0;
    for i in 0..WATCHERS as i64 {
        let mine: Vec<&WatchResponse> = responses.iter().filter(|r| r.watch_id == i).collect();
        if check_watcher(i, &mine, first, last) {
            complete += 1;
        } else {
            canceled += 1;
        }
    }
    eprintln!("slow watchers: {complete} complete, {canceled} canceled by compaction");
    assert_eq!(complete + canceled, WATCHERS);
    (complete, canceled)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_stream_is_bounded_and_loses_nothing() {
    test_bounded(Duration::from_secs(300), async {
        // The memory engine: its RSS is the server's own data structures, not RocksDB's
        // caches.
        let s = Server::start_with(Kind::Metastore(Engine::Memory), &[]).await;
        // Without compaction every slow watcher gets everything once it reads again.
        let (complete, _) = round(&s, false).await;
        assert_eq!(complete, WATCHERS);
        // With history compacted under it, a watcher that fell behind is canceled with
        // the compacted revision, never silently skipped ahead.
        round(&s, true).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_watch_streams_do_not_hold_up_shutdown() {
    test_bounded(Duration::from_secs(120), async {
        let mut s = Server::start_with(Kind::Metastore(Engine::RocksDb), &[]).await;
        let mut kv = s.kv().await;
        kv.put(ops::put("k", "v")).await.unwrap();
        // A stream that has stopped reading with events pending: its buffered data
        // cannot leave, so the member stops within its drain bound (10 s), cleanly.
        let stuck = RawWatch::open(s.channel().await).await;
        stuck.create(WatchCreateRequest {
            key: b"k".to_vec(),
            start_revision: 1,
            ..Default::default()
        });
        let value = "x".repeat(64 << 10);
        for _ in 0..50 {
            kv.put(ops::put("k", &value)).await.unwrap();
        }
        let status = s.terminate(Duration::from_secs(30));
        assert!(status.success(), "exit status {status:?}");
        drop(stuck);

        // After a restart the history is still there; a stream that is read ends as soon
        // as the member stops (well under the 10 s drain bound).
        s.restart().await;
        let mut w = RawWatch::open(s.channel().await).await;
        w.create(WatchCreateRequest {
            key: b"k".to_vec(),
            start_revision: 2,
            ..Default::default()
        });
        assert!(w.next(Duration::from_secs(10)).await.unwrap().created);
        let mut revs = Vec::new();
        while revs.len() < 51 {
            let r = w
                .next(Duration::from_secs(10))
                .await
                .expect("history after restart");
            revs.extend(r.events.iter().map(|e| e.kv.as_ref().unwrap().mod_revision));
        }
        assert_eq!(revs, (2..=52).collect::<Vec<i64>>());
        let status = s.terminate(Duration::from_secs(5));
        assert!(status.success(), "exit status {status:?}");
    })
    .await;
}
