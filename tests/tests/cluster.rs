//! Raft clusters of three real `metastore` processes on loopback: replication, reads on
//! every member, leader failure, catch-up through the log and through a snapshot, and
//! what clients see without a quorum.
//!
//! The members run with short raft timings (`--heartbeat-interval 50 --election-timeout
//! 500`) so elections take a fraction of a second; etcd's request timeout is then
//! 5 s + 2 × 500 ms = 6 s.

use std::time::{Duration, Instant};

use metastore_proto::etcdserverpb::{HashKvRequest, PutRequest, RangeRequest, StatusRequest};
use metastore_tests::cluster::Cluster;
use metastore_tests::ops::*;
use metastore_tests::{bounded, test_bounded, Engine, Kind, Server};
use tonic::Code;

const FAST: &[&str] = &["--heartbeat-interval", "50", "--election-timeout", "500"];
const LIMIT: Duration = Duration::from_secs(240);

fn kind() -> Kind {
    Kind::Metastore(Engine::RocksDb)
}

async fn put_on(s: &Server, k: &str, v: &str) -> i64 {
    let mut kv = s.kv().await;
    bounded("put", kv.put(put(k, v)))
        .await
        .unwrap_or_else(|e| panic!("put {k} on {}: {e:?}", s.name))
        .into_inner()
        .header
        .unwrap()
        .revision
}

/// Key → (value, mod_revision) under `prefix`, and the header revision.
async fn read_on(
    s: &Server,
    prefix: &str,
    serializable: bool,
) -> (Vec<(String, String, i64)>, i64) {
    let mut kv = s.kv().await;
    let mut req = if prefix.is_empty() {
        get_all()
    } else {
        get_prefix(prefix)
    };
    req.serializable = serializable;
    let r = bounded("range", kv.range(req))
        .await
        .unwrap_or_else(|e| panic!("range on {}: {e:?}", s.name))
        .into_inner();
    let kvs = r
        .kvs
        .into_iter()
        .map(|kv| {
            (
                String::from_utf8(kv.key.to_vec()).unwrap(),
                String::from_utf8(kv.value.to_vec()).unwrap(),
                kv.mod_revision,
            )
        })
        .collect();
    (kvs, r.header.unwrap().revision)
}

async fn hash_kv(s: &Server, revision: i64) -> (u32, i64) {
    let mut m = s.maintenance().await;
    let r = bounded("hashkv", m.hash_kv(HashKvRequest { revision }))
        .await
        .unwrap_or_else(|e| panic!("hashkv on {}: {e:?}", s.name))
        .into_inner();
    (r.hash, r.compact_revision)
}

/// Polls a serializable read on `s` until its revision reaches `revision`.
async fn wait_revision(s: &Server, revision: i64, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let (_, rev) = read_on(s, "", true).await;
        if rev >= revision {
            return;
        }
        if Instant::now() > deadline {
            panic!("{} stuck at revision {rev}, expected {revision}", s.name);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_on_any_member_are_read_linearizably_on_every_member() {
    test_bounded(LIMIT, async {
        let c = Cluster::start(kind(), 3, FAST).await;
        let leader = c.leader(Duration::from_secs(20)).await;
        let mut last = 0;
        for (i, m) in c.members.iter().enumerate() {
            last = put_on(m, &format!("k{i}"), &format!("from-{}", m.name)).await;
        }
        assert_eq!(last, 4, "three puts after the initial revision 1");
        for m in &c.members {
            // Linearizable: a read started after the acknowledgement sees every put,
            // whichever member serves it.
            let (kvs, rev) = read_on(m, "k", false).await;
            assert_eq!(rev, 4, "on {}", m.name);
            assert_eq!(
                kvs,
                vec![
                    ("k0".into(), "from-m1".into(), 2),
                    ("k1".into(), "from-m2".into(), 3),
                    ("k2".into(), "from-m3".into(), 4),
                ],
                "on {}",
                m.name
            );
        }
        // Every member agrees on the leader, the term and the key-space hash.
        let mut terms = Vec::new();
        let mut leaders = Vec::new();
        for m in &c.members {
            let s = m
                .maintenance()
                .await
                .status(StatusRequest {})
                .await
                .unwrap()
                .into_inner();
            terms.push(s.raft_term);
            leaders.push(s.leader);
            assert!(s.raft_applied_index >= 4, "{s:?}");
            assert_eq!(s.header.unwrap().raft_term, s.raft_term);
        }
        assert!(terms.iter().all(|t| *t == terms[0]), "{terms:?}");
        assert!(leaders.iter().all(|l| *l == leaders[0]), "{leaders:x?}");
        let leader_id = c.members[leader].member_id().await;
        assert_eq!(leaders[0], leader_id);
        let hashes: Vec<_> = futures_hashes(&c, 4).await;
        assert!(hashes.iter().all(|h| *h == hashes[0]), "{hashes:?}");
    })
    .await;
}

async fn futures_hashes(c: &Cluster, revision: i64) -> Vec<(u32, i64)> {
    let mut out = Vec::new();
    for m in c.members.iter().filter(|m| m.is_running()) {
        out.push(hash_kv(m, revision).await);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_leader_is_replaced_and_catches_up_through_the_log() {
    test_bounded(LIMIT, async {
        let mut c = Cluster::start(kind(), 3, FAST).await;
        let old = c.leader(Duration::from_secs(20)).await;
        for i in 0..20 {
            put_on(&c.members[i % 3], &format!("a{i:02}"), "x").await;
        }
        c.members[old].kill9();
        let new = c.leader(Duration::from_secs(20)).await;
        assert_ne!(new, old);
        // Writes continue on the two survivors, through either of them.
        let survivors: Vec<usize> = (0..3).filter(|i| *i != old).collect();
        let mut rev = 0;
        for i in 0..20 {
            rev = put_on(&c.members[survivors[i % 2]], &format!("b{i:02}"), "y").await;
        }
        assert_eq!(rev, 41);
        c.members[old].relaunch();
        c.members[old].wait_ready().await;
        wait_revision(&c.members[old], rev, Duration::from_secs(30)).await;
        for m in &c.members {
            let (kvs, r) = read_on(m, "", false).await;
            assert_eq!((kvs.len(), r), (40, 41), "on {}", m.name);
        }
        let hashes = futures_hashes(&c, rev).await;
        assert!(hashes.iter().all(|h| *h == hashes[0]), "{hashes:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_far_behind_catches_up_through_a_snapshot() {
    test_bounded(LIMIT, async {
        let mut args = FAST.to_vec();
        args.extend(["--snapshot-count", "50"]);
        let mut c = Cluster::start(kind(), 3, &args).await;
        let leader = c.leader(Duration::from_secs(20)).await;
        let lagging = (leader + 1) % 3;
        c.members[lagging].kill9();
        let writer = &c.members[leader];
        let mut kv = writer.kv().await;
        let mut rev = 0;
        for i in 0..300 {
            rev = bounded(
                "put",
                kv.put(PutRequest {
                    key: format!("s{i:03}").into_bytes(),
                    value: vec![b'v'; 100],
                    ..Default::default()
                }),
            )
            .await
            .unwrap()
            .into_inner()
            .header
            .unwrap()
            .revision;
        }
        assert!(
            writer.log_tail(200_000).contains("compacted the raft log"),
            "the leader should have compacted its log"
        );
        c.members[lagging].relaunch();
        c.members[lagging].wait_ready().await;
        wait_revision(&c.members[lagging], rev, Duration::from_secs(30)).await;
        assert!(
            c.members[lagging]
                .log_tail(200_000)
                .contains("installing a snapshot"),
            "the lagging member should have caught up through a snapshot"
        );
        let (kvs, r) = read_on(&c.members[lagging], "s", true).await;
        assert_eq!((kvs.len(), r), (300, rev));
        let hashes = futures_hashes(&c, rev).await;
        assert!(hashes.iter().all(|h| *h == hashes[0]), "{hashes:?}");
        // And it keeps up with new writes after the snapshot.
        let rev = put_on(&c.members[leader], "after", "snapshot").await;
        wait_revision(&c.members[lagging], rev, Duration::from_secs(10)).await;
        // A restart of the member that installed the snapshot keeps it.
        c.members[lagging].kill9();
        c.members[lagging].relaunch();
        c.members[lagging].wait_ready().await;
        let (kvs, _) = read_on(&c.members[lagging], "", true).await;
        assert_eq!(kvs.len(), 301);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_a_quorum_writes_and_linearizable_reads_time_out_serializable_reads_work() {
    test_bounded(LIMIT, async {
        let mut c = Cluster::start(kind(), 3, FAST).await;
        c.leader(Duration::from_secs(20)).await;
        put_on(&c.members[0], "k", "v").await;
        c.members[1].kill9();
        c.members[2].kill9();
        let m = &c.members[0];
        let mut kv = m.kv().await;
        let started = Instant::now();
        let err = bounded("put without quorum", kv.put(put("k", "w")))
            .await
            .unwrap_err();
        // What etcd 3.4 answers (see `no_quorum_answers_match_etcd`).
        assert_eq!(
            (err.code(), err.message()),
            (Code::Unknown, "context deadline exceeded")
        );
        assert!(started.elapsed() < Duration::from_secs(15));
        let err = bounded("linearizable read without quorum", kv.range(get("k")))
            .await
            .unwrap_err();
        assert_eq!(
            (err.code(), err.message()),
            (Code::Unavailable, "etcdserver: request timed out")
        );
        // A serializable read is served from the local state.
        let r = bounded(
            "serializable read",
            kv.range(RangeRequest {
                serializable: true,
                ..get("k")
            }),
        )
        .await
        .unwrap()
        .into_inner();
        assert_eq!(r.kvs[0].value, &b"v"[..]);
        // Status reports the lost leader.
        let s = m
            .maintenance()
            .await
            .status(StatusRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(s.leader, 0);
        assert_eq!(s.errors, vec!["etcdserver: no leader".to_string()]);
        // The quorum comes back: writes go through again. (The timed-out put's outcome
        // is unknown to its client, as with etcd: it may still commit.)
        c.members[1].relaunch();
        c.members[1].wait_ready().await;
        let rev = put_on(&c.members[0], "k", "z").await;
        assert!(rev >= 3, "{rev}");
        let (kvs, _) = read_on(&c.members[1], "k", false).await;
        assert_eq!(kvs, vec![("k".to_string(), "z".to_string(), rev)]);
    })
    .await;
}

/// Writers on every member; each member in turn is killed with SIGKILL and restarted
/// while they write. Every acknowledged put must be on every member afterwards, with the
/// revision it was acknowledged with, and the members must agree on HashKV.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_acknowledged_write_is_lost_when_any_member_is_killed_during_writes() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    test_bounded(LIMIT, async {
        let mut c = Cluster::start(kind(), 3, FAST).await;
        c.leader(Duration::from_secs(20)).await;
        let acked: Arc<Mutex<Vec<(String, i64)>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let mut writers = Vec::new();
        for (w, m) in c.members.iter().enumerate() {
            for lane in 0..2 {
                let url = m.url();
                let acked = acked.clone();
                let stop = stop.clone();
                writers.push(tokio::spawn(async move {
                    let mut n = 0;
                    while !stop.load(Ordering::SeqCst) {
                        n += 1;
                        let key = format!("w{w}-{lane}-{n:05}");
                        let attempt = async {
                            let ch = tonic::transport::Endpoint::from_shared(url.clone())
                                .unwrap()
                                .connect_timeout(Duration::from_millis(500))
                                .timeout(Duration::from_secs(10))
                                .connect()
                                .await
                                .ok()?;
                            let mut kv =
                                metastore_proto::etcdserverpb::kv_client::KvClient::new(ch);
                            let r = kv.put(put(&key, "v")).await.ok()?;
                            Some(r.into_inner().header.unwrap().revision)
                        };
                        match tokio::time::timeout(Duration::from_secs(12), attempt).await {
                            Ok(Some(rev)) => acked.lock().unwrap().push((key, rev)),
                            _ => tokio::time::sleep(Duration::from_millis(100)).await,
                        }
                    }
                }));
            }
        }
        for victim in 0..3 {
            tokio::time::sleep(Duration::from_millis(700)).await;
            c.members[victim].kill9();
            tokio::time::sleep(Duration::from_millis(700)).await;
            c.members[victim].relaunch();
            c.members[victim].wait_ready().await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        stop.store(true, Ordering::SeqCst);
        for w in writers {
            w.await.unwrap();
        }
        let acked = acked.lock().unwrap().clone();
        assert!(acked.len() > 30, "only {} puts acknowledged", acked.len());
        let (_, last) = read_on(&c.members[0], "", false).await;
        for m in &c.members {
            wait_revision(m, last, Duration::from_secs(30)).await;
            let (kvs, _) = read_on(m, "w", true).await;
            let stored: std::collections::HashMap<String, i64> =
                kvs.into_iter().map(|(k, _, rev)| (k, rev)).collect();
            for (key, rev) in &acked {
                assert_eq!(stored.get(key), Some(rev), "{key} on {}", m.name);
            }
        }
        let hashes = futures_hashes(&c, last).await;
        assert!(hashes.iter().all(|h| *h == hashes[0]), "{hashes:?}");
    })
    .await;
}

/// A lease renewed through a follower (which forwards to the leader) keeps its key
/// through a leader kill and a `move-leader`; once renewals stop, the key goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_renewed_lease_survives_leader_changes_and_expires_after() {
    use metastore_proto::etcdserverpb::lease_client::LeaseClient;
    use metastore_proto::etcdserverpb::maintenance_client::MaintenanceClient;
    use metastore_proto::etcdserverpb::{
        LeaseGrantRequest, LeaseKeepAliveRequest, LeaseTimeToLiveRequest, MoveLeaderRequest,
    };

    async fn renew(s: &Server, id: i64) -> Option<i64> {
        let attempt = async {
            let ch = tonic::transport::Endpoint::from_shared(s.url())
                .ok()?
                .connect_timeout(Duration::from_millis(500))
                .connect()
                .await
                .ok()?;
            let mut lease = LeaseClient::new(ch);
            let mut answers = lease
                .lease_keep_alive(futures::stream::iter([LeaseKeepAliveRequest { id }]))
                .await
                .ok()?
                .into_inner();
            answers.message().await.ok()?.map(|a| a.ttl)
        };
        tokio::time::timeout(Duration::from_secs(3), attempt)
            .await
            .ok()
            .flatten()
    }

    test_bounded(LIMIT, async {
        let mut c = Cluster::start(kind(), 3, FAST).await;
        let leader = c.leader(Duration::from_secs(20)).await;
        let follower = (leader + 1) % 3;
        let f = &c.members[follower];
        let mut lease = LeaseClient::new(f.channel().await);
        let id = lease
            .lease_grant(LeaseGrantRequest { ttl: 3, id: 0 })
            .await
            .unwrap()
            .into_inner()
            .id;
        let mut kv = f.kv().await;
        kv.put(PutRequest {
            key: b"session".to_vec(),
            value: b"alive".to_vec(),
            lease: id,
            ..Default::default()
        })
        .await
        .unwrap();
        // Renewal and time-to-live through a follower are answered by the leader.
        assert_eq!(renew(f, id).await, Some(3));
        let t = lease
            .lease_time_to_live(LeaseTimeToLiveRequest { id, keys: true })
            .await
            .unwrap()
            .into_inner();
        assert_eq!((t.granted_ttl, &t.keys), (3, &vec![b"session".to_vec()]));
        assert!((1..=3).contains(&t.ttl), "{t:?}");

        // Renew every 500 ms through the follower for 8 s (several TTLs) while the
        // leader is killed and restarted, then leadership is moved.
        let started = Instant::now();
        let mut killed = false;
        let mut moved = false;
        let mut renewed = 0;
        while started.elapsed() < Duration::from_secs(8) {
            if renew(&c.members[follower], id)
                .await
                .is_some_and(|ttl| ttl > 0)
            {
                renewed += 1;
            }
            if !killed && started.elapsed() > Duration::from_secs(1) {
                c.members[leader].kill9();
                killed = true;
            }
            if killed
                && !c.members[leader].is_running()
                && started.elapsed() > Duration::from_secs(3)
            {
                c.members[leader].relaunch();
            }
            if !moved && started.elapsed() > Duration::from_secs(5) {
                let now = c.leader(Duration::from_secs(10)).await;
                let to = (0..3).find(|i| *i != now).unwrap();
                let to_id = c.members[to].member_id().await;
                MaintenanceClient::new(c.members[now].channel().await)
                    .move_leader(MoveLeaderRequest { target_id: to_id })
                    .await
                    .unwrap();
                moved = true;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        assert!(moved && renewed >= 8, "renewed {renewed} times");
        for m in c.members.iter().filter(|m| m.is_running()) {
            let (kvs, _) = read_on(m, "session", true).await;
            assert_eq!(kvs.len(), 1, "the key vanished on {} while renewed", m.name);
        }
        // No more renewals: the key goes after its TTL (plus at most an election
        // timeout of extension and the revoke's commit).
        tokio::time::sleep(Duration::from_secs(6)).await;
        for m in c.members.iter().filter(|m| m.is_running()) {
            let (kvs, _) = read_on(m, "session", false).await;
            assert!(kvs.is_empty(), "the key outlived its lease on {}", m.name);
        }
    })
    .await;
}

/// A watcher on a follower sees every write, in order, once, across a leader kill; a
/// client that resumes on another member from its last revision + 1 sees no gap and no
/// duplicate, and the events equal those a watcher on the new leader gets.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watchers_on_followers_survive_a_leader_change_and_resume_elsewhere() {
    use metastore_proto::etcdserverpb::watch_request::RequestUnion;
    use metastore_proto::etcdserverpb::WatchCreateRequest;
    use metastore_tests::watch::RawWatch;

    /// (revision, key) of every event received until `last` is seen.
    async fn collect(w: &mut RawWatch, last: i64) -> Vec<(i64, String)> {
        let mut seen = Vec::new();
        while seen.last().map(|(r, _)| *r) != Some(last) {
            let Some(resp) = w.next(Duration::from_secs(15)).await else {
                panic!("watch stalled after {seen:?}");
            };
            for e in resp.events {
                let kv = e.kv.unwrap();
                seen.push((kv.mod_revision, String::from_utf8(kv.key.to_vec()).unwrap()));
            }
        }
        seen
    }

    fn create(w: &RawWatch, start: i64) {
        w.send(RequestUnion::CreateRequest(WatchCreateRequest {
            key: b"w".to_vec(),
            range_end: b"x".to_vec(),
            start_revision: start,
            ..Default::default()
        }));
    }

    test_bounded(LIMIT, async {
        let mut c = Cluster::start(kind(), 3, FAST).await;
        let leader = c.leader(Duration::from_secs(20)).await;
        let follower = (leader + 1) % 3;
        let other = (leader + 2) % 3;
        let mut w = RawWatch::open(c.members[follower].channel().await).await;
        create(&w, 0);
        let created = w.next(Duration::from_secs(10)).await.unwrap();
        assert!(created.created);
        let mut expected = Vec::new();
        for i in 0..10 {
            let k = format!("w{i:02}");
            expected.push((put_on(&c.members[leader], &k, "v").await, k));
        }
        c.members[leader].kill9();
        c.leader(Duration::from_secs(20)).await;
        for i in 10..20 {
            let k = format!("w{i:02}");
            expected.push((put_on(&c.members[other], &k, "v").await, k));
        }
        let last = expected.last().unwrap().0;
        let seen = collect(&mut w, last).await;
        assert_eq!(seen, expected, "the follower's watcher");

        // Resume on another member from the middle of the history.
        let resume_from = expected[7].0;
        let mut w2 = RawWatch::open(c.members[other].channel().await).await;
        create(&w2, resume_from);
        assert!(w2.next(Duration::from_secs(10)).await.unwrap().created);
        let seen = collect(&mut w2, last).await;
        assert_eq!(seen, expected[7..].to_vec(), "the resumed watcher");
    })
    .await;
}

/// Leases and their keys survive a restart of the whole cluster; the restarted leader
/// extends them (etcd's promotion) and, without renewals, they expire afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leases_survive_a_whole_cluster_restart() {
    use metastore_proto::etcdserverpb::lease_client::LeaseClient;
    use metastore_proto::etcdserverpb::{LeaseGrantRequest, LeaseLeasesRequest};

    test_bounded(LIMIT, async {
        let mut c = Cluster::start(kind(), 3, FAST).await;
        let leader = c.leader(Duration::from_secs(20)).await;
        let mut lease = LeaseClient::new(c.members[leader].channel().await);
        let id = lease
            .lease_grant(LeaseGrantRequest { ttl: 6, id: 0 })
            .await
            .unwrap()
            .into_inner()
            .id;
        let mut kv = c.members[leader].kv().await;
        kv.put(PutRequest {
            key: b"owned".to_vec(),
            value: b"v".to_vec(),
            lease: id,
            ..Default::default()
        })
        .await
        .unwrap();
        for m in &mut c.members {
            m.kill9();
        }
        for m in &mut c.members {
            m.relaunch();
        }
        for m in &c.members {
            m.wait_ready().await;
        }
        let leader = c.leader(Duration::from_secs(20)).await;
        let ids: Vec<i64> = LeaseClient::new(c.members[leader].channel().await)
            .lease_leases(LeaseLeasesRequest {})
            .await
            .unwrap()
            .into_inner()
            .leases
            .iter()
            .map(|l| l.id)
            .collect();
        assert_eq!(ids, vec![id]);
        for m in &c.members {
            let (kvs, _) = read_on(m, "owned", false).await;
            assert_eq!(kvs.len(), 1, "on {}", m.name);
        }
        // Not renewed: gone after the TTL and the promotion's extension.
        tokio::time::sleep(Duration::from_secs(9)).await;
        for m in &c.members {
            let (kvs, _) = read_on(m, "owned", false).await;
            assert!(kvs.is_empty(), "the key outlived its lease on {}", m.name);
        }
    })
    .await;
}

/// A member that follows the current leader (of three).
async fn a_follower(c: &Cluster) -> usize {
    (c.leader(Duration::from_secs(20)).await + 1) % 3
}

/// kill -9 every member but `survivor`: it is left without a quorum.
fn kill_all_but(c: &mut Cluster, survivor: usize) {
    for i in (0..c.members.len()).filter(|i| *i != survivor) {
        c.members[i].kill9();
    }
}

/// Without a quorum, a write, a linearizable read and Status on the surviving member
/// answer as etcd 3.4's do, after the same request timeout (5 s + 2 election timeouts).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_quorum_answers_match_etcd() {
    use metastore_proto::etcdserverpb::StatusRequest;

    test_bounded(LIMIT, async {
        let mut answers = Vec::new();
        for kind in [Kind::Etcd, kind()] {
            let mut c = Cluster::start(kind, 3, FAST).await;
            let survivor = a_follower(&c).await;
            kill_all_but(&mut c, survivor);
            tokio::time::sleep(Duration::from_secs(2)).await;
            let mut kv = c.members[survivor].kv().await;
            let started = Instant::now();
            let put = bounded("put", kv.put(put("k", "v"))).await.unwrap_err();
            let put_secs = started.elapsed().as_secs_f64().round();
            let get = bounded("get", kv.range(get("k"))).await.unwrap_err();
            let status = c.members[survivor]
                .maintenance()
                .await
                .status(StatusRequest {})
                .await
                .unwrap()
                .into_inner();
            answers.push(format!(
                "put: {:?} {:?} after ~{put_secs} s\nget: {:?} {:?}\nstatus: leader {} errors {:?}",
                put.code(),
                put.message(),
                get.code(),
                get.message(),
                status.leader,
                status.errors
            ));
        }
        assert_eq!(answers[1], answers[0], "metastore (left: etcd)");
    })
    .await;
}

/// What an `etcd-client` error says, for comparing answers.
fn grpc_error(e: etcd_client::Error) -> String {
    match e {
        etcd_client::Error::GRpcStatus(s) => format!("{:?} {:?}", s.code(), s.message()),
        other => format!("not a gRPC status: {other}"),
    }
}

/// etcd's "require leader" metadata (clientv3's `WithRequireLeader`, etcd-client's
/// `with_require_leader`): once a member has lost its leader, its open streams end with
/// "no leader" (after three election timeouts without one) and new calls are refused at
/// once, as on etcd.
#[tokio::test(flavor = "multi_thread")]
async fn require_leader_answers_match_etcd() {
    test_bounded(LIMIT, async {
        let mut answers = Vec::new();
        for kind in [Kind::Etcd, kind()] {
            let mut c = Cluster::start(kind, 3, FAST).await;
            let survivor = a_follower(&c).await;
            let mut client = c.members[survivor].etcd_client_requiring_leader().await;
            bounded("put with a leader", client.put("k", "v", None))
                .await
                .expect("put with a leader");
            let mut events = bounded("watch", client.watch("k", None))
                .await
                .expect("watch with a leader");
            let lease = bounded("grant", client.lease_grant(60, None))
                .await
                .expect("grant with a leader")
                .id();
            let (_keeper, mut renewals) = bounded("keep-alive", client.lease_keep_alive(lease))
                .await
                .expect("keep-alive stream with a leader");
            kill_all_but(&mut c, survivor);
            let lost_at = Instant::now();
            // The `created` response comes first.
            let watch_end = loop {
                match bounded("watch end", events.message()).await {
                    Ok(Some(r)) if r.created() && r.events().is_empty() => continue,
                    Ok(m) => break format!("ended without an error: {m:?}"),
                    Err(e) => break grpc_error(e),
                }
            };
            let watch_secs = lost_at.elapsed();
            let renewals_end = match bounded("keep-alive end", renewals.message()).await {
                Ok(m) => format!("ended without an error: {m:?}"),
                Err(e) => grpc_error(e),
            };
            let asked_at = Instant::now();
            let put = grpc_error(
                bounded("put without a leader", client.put("k", "v2", None))
                    .await
                    .unwrap_err(),
            );
            let new_watch = match bounded("new watch", client.watch("k", None)).await {
                Ok(_) => "accepted".to_string(),
                Err(e) => grpc_error(e),
            };
            let refused_in = asked_at.elapsed();
            // 500 ms election timeouts: the leader is gone after one or two, the streams
            // end three checks later; refusals take no waiting at all.
            assert!(
                watch_secs < Duration::from_secs(8),
                "{}: watch ended after {watch_secs:?}",
                kind.label()
            );
            assert!(
                refused_in < Duration::from_secs(1),
                "{}: refusals took {refused_in:?}",
                kind.label()
            );
            answers.push(format!(
                "watch: {watch_end}\nkeep-alive: {renewals_end}\nput: {put}\nnew watch: {new_watch}"
            ));
        }
        assert_eq!(answers[1], answers[0], "metastore (left: etcd)");
    })
    .await;
}
