//! Leases against a real etcd 3.4 and the server under test, through the `etcd-client`
//! crate and `etcdctl`: answers (with lease IDs chosen by the client, so they compare),
//! errors, codes and messages compared; server-chosen IDs and remaining TTLs compared by
//! shape. Then the timing behaviour on both servers: a key vanishes after its TTL when
//! nobody renews, stays for several TTLs while a keep-alive runs, a lease survives a
//! restart while renewed, and a revoke deletes every attached key in one revision. The
//! measured delay from TTL end to deletion is printed, not asserted beyond a generous
//! liveness bound.

use std::fmt::Debug;
use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare, CompareOp, GetOptions, LeaseGrantOptions, LeaseTimeToLiveOptions, PutOptions,
    Txn, TxnOp,
};
use metastore_tests::{bounded, mask_debug, mask_json, test_bounded, Engine, Kind, Server};

fn render<T: Debug>(r: Result<T, etcd_client::Error>) -> String {
    match r {
        Ok(v) => mask_debug(&format!("{v:?}")),
        Err(etcd_client::Error::GRpcStatus(s)) => {
            format!("error code={:?} message={:?}", s.code(), s.message())
        }
        Err(e) => format!("client error {e}"),
    }
}

/// Replaces the number after `field` (e.g. "ttl: ") with `_`.
fn mask_field(s: &str, field: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find(field) {
        out.push_str(&rest[..i + field.len()]);
        rest = &rest[i + field.len()..];
        let n = rest
            .char_indices()
            .take_while(|(j, c)| c.is_ascii_digit() || (*j == 0 && *c == '-'))
            .count();
        out.push('_');
        rest = &rest[n..];
    }
    out.push_str(rest);
    out
}

struct Both {
    e: Client,
    s: Client,
    label: &'static str,
    diffs: Vec<String>,
}

/// Runs `$call` on both clients, renders each answer through `$norm`, and compares.
macro_rules! same {
    ($b:expr, $what:expr, |$c:ident| $call:expr) => {
        same!($b, $what, |$c| $call, |s: String| s)
    };
    ($b:expr, $what:expr, |$c:ident| $call:expr, $norm:expr) => {{
        let what: &str = $what;
        let e = {
            let $c = &mut $b.e;
            $norm(render(bounded(what, $call).await))
        };
        let s = {
            let $c = &mut $b.s;
            $norm(render(bounded(what, $call).await))
        };
        if e != s {
            let m = format!(
                "DIFFERENCE on {what}\n  etcd:      {e}\n  {}: {s}",
                $b.label
            );
            eprintln!("{m}");
            $b.diffs.push(m);
        }
        s
    }};
}

fn grant_opts(id: i64) -> Option<LeaseGrantOptions> {
    Some(LeaseGrantOptions::new().with_id(id))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_answers_and_errors_match_etcd() {
    test_bounded(Duration::from_secs(120), async {
        let kind = Kind::subject();
        let (etcd, subject) = tokio::join!(Server::start(Kind::Etcd), Server::start(kind));
        let mut b = Both {
            e: etcd.etcd_client().await,
            s: subject.etcd_client().await,
            label: kind.label(),
            diffs: vec![],
        };
        let a = 0x1234i64;
        let short = 0x99i64;
        let other = 0x55i64;
        same!(b, "grant a 60", |c| c.lease_grant(60, grant_opts(a)));
        same!(b, "grant a again", |c| c.lease_grant(60, grant_opts(a)));
        same!(b, "grant too large", |c| c
            .lease_grant(9_000_000_001, grant_opts(0x77)));
        same!(b, "grant existing and too large", |c| c
            .lease_grant(9_000_000_001, grant_opts(a)));
        same!(b, "grant max", |c| c
            .lease_grant(9_000_000_000, grant_opts(0x78)));
        // Below the minimum (2 s with etcd's default election timeout): raised.
        same!(b, "grant 1 s", |c| c.lease_grant(1, grant_opts(short)));
        same!(b, "grant -5 s", |c| c.lease_grant(-5, grant_opts(0x98)));
        // Revoked at once, so that their short life cannot make the servers differ.
        same!(b, "revoke short", |c| c.lease_revoke(short));
        same!(b, "revoke -5 s", |c| c.lease_revoke(0x98));
        same!(b, "grant other", |c| c.lease_grant(50, grant_opts(other)));
        same!(b, "grant negative id", |c| c
            .lease_grant(30, grant_opts(-7)));
        same!(b, "put unknown lease", |c| c.put(
            "k0",
            "v",
            Some(PutOptions::new().with_lease(0x4242))
        ));
        for k in ["k2", "k1", "k3"] {
            same!(b, &format!("put {k} with a"), |c| c.put(
                k,
                "v",
                Some(PutOptions::new().with_lease(a))
            ));
        }
        same!(b, "put other with other", |c| c.put(
            "other",
            "v",
            Some(PutOptions::new().with_lease(other))
        ));
        same!(b, "put k3 ignore_lease", |c| c.put(
            "k3",
            "w",
            Some(PutOptions::new().with_ignore_lease())
        ));
        same!(b, "put plain detaches", |c| c.put("plain", "v", None));
        same!(b, "get all", |c| c
            .get("", Some(GetOptions::new().with_from_key())));
        let lease_cmp = |lease: i64| {
            Txn::new()
                .when([Compare::lease("k1", CompareOp::Equal, lease)])
                .and_then([TxnOp::put("t", "yes", None)])
                .or_else([TxnOp::put("t", "no", None)])
        };
        same!(b, "txn lease compare equal", |c| c.txn(lease_cmp(a)));
        same!(b, "txn lease compare other", |c| c.txn(lease_cmp(other)));
        same!(b, "txn put unknown lease", |c| c.txn(Txn::new().and_then(
            [TxnOp::put("t2", "v", Some(PutOptions::new().with_lease(5)))]
        )));
        // Remaining TTLs tick: compared by shape, checked by range.
        // etcd lists a lease's keys in map order: compared as sets.
        let mut key_sets = Vec::new();
        for c in [&mut b.e, &mut b.s] {
            let t = bounded(
                "timetolive keys",
                c.lease_time_to_live(a, Some(LeaseTimeToLiveOptions::new().with_keys())),
            )
            .await
            .unwrap();
            assert_eq!(t.granted_ttl(), 60);
            assert!((55..=60).contains(&t.ttl()), "remaining TTL {}", t.ttl());
            let mut keys = t.keys().to_vec();
            keys.sort();
            key_sets.push(keys);
        }
        assert_eq!(key_sets[0], key_sets[1]);
        assert_eq!(
            key_sets[1],
            vec![b"k1".to_vec(), b"k2".to_vec(), b"k3".to_vec()]
        );
        same!(
            b,
            "timetolive a",
            |c| c.lease_time_to_live(a, None),
            |s: String| { mask_field(&s, " ttl: ") }
        );
        same!(b, "timetolive unknown", |c| c
            .lease_time_to_live(0x4242, None));
        same!(b, "leases (by expiry)", |c| c.leases());
        same!(b, "keepalive unknown", |c| async {
            let (mut keeper, mut stream) = c.lease_keep_alive(0x4242).await?;
            keeper.keep_alive().await?;
            stream.message().await
        });
        same!(b, "keepalive a", |c| async {
            let (mut keeper, mut stream) = c.lease_keep_alive(a).await?;
            keeper.keep_alive().await?;
            stream.message().await
        });
        same!(b, "revoke unknown", |c| c.lease_revoke(0x4242));
        same!(b, "revoke a (3 keys, one revision)", |c| c.lease_revoke(a));
        same!(b, "get after revoke", |c| c
            .get("", Some(GetOptions::new().with_from_key())));
        same!(b, "revoke a again", |c| c.lease_revoke(a));
        same!(b, "timetolive revoked", |c| c.lease_time_to_live(a, None));
        same!(b, "keepalive revoked", |c| async {
            let (mut keeper, mut stream) = c.lease_keep_alive(a).await?;
            keeper.keep_alive().await?;
            stream.message().await
        });
        same!(b, "put revoked lease", |c| c.put(
            "k1",
            "v",
            Some(PutOptions::new().with_lease(a))
        ));
        same!(b, "revoke without keys", |c| c.lease_revoke(0x78));
        // ID 0 (etcd's NoLease) everywhere a client can send it.
        same!(b, "revoke 0", |c| c.lease_revoke(0));
        same!(b, "timetolive 0", |c| c.lease_time_to_live(0, None));
        same!(b, "keepalive 0", |c| async {
            let (mut keeper, mut stream) = c.lease_keep_alive(0).await?;
            keeper.keep_alive().await?;
            stream.message().await
        });
        same!(b, "put lease -1", |c| c.put(
            "k1",
            "v",
            Some(PutOptions::new().with_lease(-1))
        ));
        // Server-chosen IDs: positive, distinct, TTL as asked.
        for c in [&mut b.e, &mut b.s] {
            let g1 = bounded("grant", c.lease_grant(30, None)).await.unwrap();
            let g2 = bounded("grant", c.lease_grant(30, None)).await.unwrap();
            assert!(g1.id() > 0 && g2.id() > 0 && g1.id() != g2.id());
            assert_eq!(g1.ttl(), 30);
        }
        assert!(b.diffs.is_empty(), "{} differences", b.diffs.len());
        drop((etcd, subject));
    })
    .await;
}

/// Replaces lease IDs (16 hex digits) in etcdctl's text with `<id>`.
fn mask_hex_ids(s: &str) -> String {
    s.split('\n')
        .map(|line| {
            line.split(' ')
                .map(|w| {
                    if w.len() == 16 && w.chars().all(|c| c.is_ascii_hexdigit()) {
                        "<id>"
                    } else {
                        w
                    }
                })
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn etcdctl_text(s: &Server, args: &[&str]) -> String {
    let out = s.etcdctl(args);
    let json = args.contains(&"json");
    let stdout = if json && out.success() {
        let mut v: serde_json::Value = serde_json::from_str(&out.stdout).expect("JSON");
        mask_json(&mut v);
        if let Some(m) = v.as_object_mut() {
            for k in ["ID", "id", "ttl"] {
                if m.contains_key(k) {
                    m.insert(k.into(), 0.into());
                }
            }
        }
        v.to_string()
    } else {
        let t = mask_hex_ids(&out.stdout);
        // remaining(59s) ticks.
        match t.find("remaining(") {
            Some(i) => {
                let j = t[i..].find(')').map(|j| i + j).unwrap_or(t.len());
                format!("{}remaining(_){}", &t[..i], &t[j + 1..])
            }
            None => t,
        }
    };
    format!(
        "exit={:?}\nstdout:\n{}\nerror: {:?}",
        out.code,
        stdout,
        out.error_line().map(|l| mask_hex_ids(&l))
    )
}

fn granted_id(s: &Server, ttl: &str) -> String {
    let out = s.etcdctl(&["lease", "grant", ttl]);
    assert!(out.success(), "lease grant failed: {:?}", out.error_line());
    out.stdout
        .split_whitespace()
        .nth(1)
        .expect("lease id")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_lease_commands_match_etcd() {
    test_bounded(Duration::from_secs(150), async {
        let kind = Kind::subject();
        let (etcd, subject) = tokio::join!(Server::start(Kind::Etcd), Server::start(kind));
        let servers = [&etcd, &subject];
        let ids: Vec<String> = servers.iter().map(|s| granted_id(s, "60")).collect();
        let mut diffs = Vec::new();
        let mut check = |args: &dyn Fn(&str) -> Vec<String>| {
            let outs: Vec<String> = servers
                .iter()
                .zip(&ids)
                .map(|(s, id)| {
                    let a = args(id);
                    let a: Vec<&str> = a.iter().map(String::as_str).collect();
                    etcdctl_text(s, &a)
                })
                .collect();
            let what = args("<id>").join(" ");
            if outs[0] != outs[1] {
                let m = format!(
                    "DIFFERENCE on etcdctl {what}\n  etcd: {}\n  subject: {}",
                    outs[0], outs[1]
                );
                eprintln!("{m}");
                diffs.push(m);
            }
            outs[1].clone()
        };
        let v = |parts: &[&str]| parts.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        check(&|_| v(&["lease", "grant", "1"]));
        check(&|_| v(&["-w", "json", "lease", "grant", "30"]));
        check(&|_| v(&["lease", "grant", "9000000001"]));
        check(&|id| v(&["put", "--lease", id, "k1", "v1"]));
        // One key only: etcd lists a lease's keys in map order.
        check(&|_| v(&["put", "k2", "v2"]));
        check(&|_| v(&["put", "--lease", "1234", "k3", "v"]));
        let t = check(&|id| v(&["lease", "timetolive", id, "--keys"]));
        assert!(t.contains("attached keys([k1])"), "{t}");
        check(&|id| v(&["lease", "timetolive", id]));
        check(&|id| v(&["-w", "json", "lease", "timetolive", id, "--keys"]));
        check(&|_| v(&["lease", "timetolive", "1234"]));
        check(&|_| v(&["-w", "json", "lease", "timetolive", "1234"]));
        check(&|id| v(&["lease", "keep-alive", "--once", id]));
        check(&|id| v(&["-w", "json", "lease", "keep-alive", "--once", id]));
        check(&|_| v(&["lease", "keep-alive", "--once", "1234"]));
        check(&|_| v(&["lease", "list"]));
        check(&|_| v(&["lease", "revoke", "1234"]));
        check(&|id| v(&["lease", "revoke", id]));
        check(&|_| v(&["-w", "json", "get", "k1"]));
        check(&|_| v(&["get", "k", "--prefix"]));
        check(&|id| v(&["lease", "timetolive", id]));
        check(&|id| v(&["lease", "revoke", id]));
        check(&|id| v(&["lease", "keep-alive", "--once", id]));
        assert!(diffs.is_empty(), "{} differences", diffs.len());
    })
    .await;
}

/// Polls until `key` is gone (every 10 ms); returns when it vanished.
async fn wait_gone(c: &mut Client, key: &str, limit: Duration) -> Instant {
    let start = Instant::now();
    loop {
        let r = bounded("get", c.get(key, None)).await.unwrap();
        if r.kvs().is_empty() {
            return Instant::now();
        }
        assert!(start.elapsed() < limit, "{key} still there after {limit:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn key_exists(c: &mut Client, key: &str) -> bool {
    !bounded("get", c.get(key, None))
        .await
        .unwrap()
        .kvs()
        .is_empty()
}

/// A key vanishes after its TTL when nobody renews it, never before; on both servers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_vanishes_after_ttl_without_keepalive() {
    test_bounded(Duration::from_secs(120), async {
        let kind = Kind::subject();
        let (etcd, subject) = tokio::join!(Server::start(Kind::Etcd), Server::start(kind));
        for (label, server) in [("etcd", &etcd), (kind.label(), &subject)] {
            let mut c = server.etcd_client().await;
            let mut delays = Vec::new();
            for round in 0..3 {
                let key = format!("ttl/{round}");
                // The server's TTL starts between these two instants.
                let sent = Instant::now();
                let g = bounded("grant", c.lease_grant(2, None)).await.unwrap();
                let granted = Instant::now();
                bounded(
                    "put",
                    c.put(
                        key.as_str(),
                        "v",
                        Some(PutOptions::new().with_lease(g.id())),
                    ),
                )
                .await
                .unwrap();
                let rev = bounded("get", c.get("", Some(GetOptions::new().with_from_key())))
                    .await
                    .unwrap()
                    .header()
                    .unwrap()
                    .revision();
                tokio::time::sleep(Duration::from_millis(1500)).await;
                let exists = key_exists(&mut c, &key).await;
                // Only an answer that arrived before the earliest possible TTL end proves
                // anything (a loaded machine may answer later).
                if Instant::now() < sent + Duration::from_secs(2) {
                    assert!(exists, "{label}: {key} gone before its TTL");
                }
                let gone = wait_gone(&mut c, &key, Duration::from_secs(10)).await;
                let after_ttl = gone.saturating_duration_since(granted + Duration::from_secs(2));
                assert!(
                    gone >= sent + Duration::from_secs(2),
                    "{label}: expired early"
                );
                delays.push(after_ttl);
                // The expiry is one revoke: one revision, and the lease is gone.
                let r = bounded("get", c.get("", Some(GetOptions::new().with_from_key())))
                    .await
                    .unwrap();
                assert_eq!(r.header().unwrap().revision(), rev + 1, "{label}");
                let t = bounded("ttl", c.lease_time_to_live(g.id(), None))
                    .await
                    .unwrap();
                assert_eq!(t.ttl(), -1, "{label}");
            }
            println!("{label}: delay from TTL end to deletion (polled every 10 ms): {delays:?}");
        }
        drop((etcd, subject));
    })
    .await;
}

/// A key stays for several TTLs while a keep-alive stream renews it, and goes once the
/// renewals stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_keeps_key_for_many_ttls() {
    test_bounded(Duration::from_secs(120), async {
        let kind = Kind::subject();
        let (etcd, subject) = tokio::join!(Server::start(Kind::Etcd), Server::start(kind));
        for (label, server) in [("etcd", &etcd), (kind.label(), &subject)] {
            let mut c = server.etcd_client().await;
            let g = bounded("grant", c.lease_grant(2, None)).await.unwrap();
            bounded(
                "put",
                c.put("alive", "v", Some(PutOptions::new().with_lease(g.id()))),
            )
            .await
            .unwrap();
            let (mut keeper, mut stream) = bounded("keepalive", c.lease_keep_alive(g.id()))
                .await
                .unwrap();
            let start = Instant::now();
            let mut last_sent = start;
            while start.elapsed() < Duration::from_secs(7) {
                last_sent = Instant::now();
                bounded("keepalive send", keeper.keep_alive())
                    .await
                    .unwrap();
                let resp = bounded("keepalive recv", stream.message())
                    .await
                    .unwrap()
                    .expect("keep-alive stream ended");
                assert_eq!((resp.id(), resp.ttl()), (g.id(), 2), "{label}");
                assert!(
                    key_exists(&mut c, "alive").await,
                    "{label}: key lost while renewed"
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            drop((keeper, stream));
            let gone = wait_gone(&mut c, "alive", Duration::from_secs(10)).await;
            // The last renewal set a full 2 s TTL after it was sent.
            assert!(gone >= last_sent + Duration::from_secs(2), "{label}: early");
        }
        drop((etcd, subject));
    })
    .await;
}

/// A lease survives a restart while it is renewed, keeps its keys and TTL, and after the
/// restart its remaining TTL restarts from the full TTL plus the election-timeout
/// extension (etcd's Promote); it still expires once renewals stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_survives_restart_while_renewed() {
    test_bounded(Duration::from_secs(180), async {
        let kind = match Kind::subject() {
            // A restart of the memory engine loses everything by design.
            Kind::Metastore(Engine::Memory) => Kind::Metastore(Engine::RocksDb),
            k => k,
        };
        let (mut etcd, mut subject) = tokio::join!(Server::start(Kind::Etcd), Server::start(kind));
        for (label, server) in [("etcd", &mut etcd), (kind.label(), &mut subject)] {
            let mut c = server.etcd_client().await;
            let g = bounded("grant", c.lease_grant(4, None)).await.unwrap();
            let id = g.id();
            bounded(
                "put",
                c.put("survivor", "v", Some(PutOptions::new().with_lease(id))),
            )
            .await
            .unwrap();
            drop(c);
            server.terminate(Duration::from_secs(30));
            server.restart().await;
            let mut c = server.etcd_client().await;
            let (mut keeper, mut stream) =
                bounded("keepalive", c.lease_keep_alive(id)).await.unwrap();
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(6) {
                bounded("keepalive send", keeper.keep_alive())
                    .await
                    .unwrap();
                let resp = bounded("recv", stream.message()).await.unwrap().unwrap();
                assert_eq!(resp.ttl(), 4, "{label}: renew after restart");
                assert!(key_exists(&mut c, "survivor").await, "{label}");
                tokio::time::sleep(Duration::from_millis(700)).await;
            }
            let t = bounded(
                "ttl",
                c.lease_time_to_live(id, Some(LeaseTimeToLiveOptions::new().with_keys())),
            )
            .await
            .unwrap();
            assert_eq!(t.granted_ttl(), 4, "{label}");
            assert_eq!(t.keys(), &[b"survivor".to_vec()], "{label}");
            drop((keeper, stream));
            // Restart without renewing: the lease gets its full TTL plus the extension.
            drop(c);
            server.terminate(Duration::from_secs(30));
            server.restart().await;
            let mut c = server.etcd_client().await;
            let t = bounded("ttl", c.lease_time_to_live(id, None))
                .await
                .unwrap();
            assert!(
                (3..=5).contains(&t.ttl()),
                "{label}: remaining TTL {} after restart",
                t.ttl()
            );
            wait_gone(&mut c, "survivor", Duration::from_secs(15)).await;
        }
        drop((etcd, subject));
    })
    .await;
}

/// Mass expiry: many leases expiring together are all revoked, and writes keep going
/// meanwhile (checked on the subject only: etcd's answer is the same but slow to show).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mass_expiry_revokes_everything() {
    test_bounded(Duration::from_secs(120), async {
        let kind = Kind::subject();
        let subject = Server::start(kind).await;
        let mut c = subject.etcd_client().await;
        let n = 300;
        for i in 0..n {
            let g = bounded("grant", c.lease_grant(2, None)).await.unwrap();
            bounded(
                "put",
                c.put(
                    format!("mass/{i:04}"),
                    "v",
                    Some(PutOptions::new().with_lease(g.id())),
                ),
            )
            .await
            .unwrap();
        }
        let start = Instant::now();
        loop {
            // Writes are served throughout.
            bounded("put", c.put("writer", "v", None)).await.unwrap();
            let left = bounded(
                "count",
                c.get(
                    "mass/",
                    Some(GetOptions::new().with_prefix().with_count_only()),
                ),
            )
            .await
            .unwrap()
            .count();
            if left == 0 {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "{left} keys left"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let leases = bounded("leases", c.leases()).await.unwrap();
        assert!(leases.leases().is_empty());
    })
    .await;
}

/// With `--experimental-enable-lease-checkpoint`, the leader checkpoints remaining TTLs
/// and a restart resumes from the checkpoint (plus the election-timeout extension) rather
/// than from the full TTL. MetaStore persists checkpoints, as etcd 3.6 (and 3.5 with
/// `--experimental-enable-lease-checkpoint-persist`) does; etcd 3.4 keeps them in memory
/// only, so this runs on the subject alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpointed_remaining_ttl_survives_restart() {
    test_bounded(Duration::from_secs(120), async {
        let kind = match Kind::subject() {
            Kind::Etcd | Kind::Metastore(Engine::Memory) => Kind::Metastore(Engine::RocksDb),
            k => k,
        };
        let mut s = Server::start_with(
            kind,
            &[
                "--experimental-enable-lease-checkpoint",
                "--experimental-lease-checkpoint-interval",
                "1s",
            ],
        )
        .await;
        let mut c = s.etcd_client().await;
        let g = bounded("grant", c.lease_grant(30, None)).await.unwrap();
        bounded(
            "put",
            c.put("cp", "v", Some(PutOptions::new().with_lease(g.id()))),
        )
        .await
        .unwrap();
        // Several checkpoints go by (one per second).
        tokio::time::sleep(Duration::from_millis(4500)).await;
        drop(c);
        s.terminate(Duration::from_secs(30));
        s.restart().await;
        let mut c = s.etcd_client().await;
        let t = bounded("ttl", c.lease_time_to_live(g.id(), None))
            .await
            .unwrap();
        // Without checkpoints this would be 30 (full TTL + 1 s, truncated).
        assert!(
            (24..=28).contains(&t.ttl()),
            "remaining TTL {} after restart",
            t.ttl()
        );
        assert_eq!(t.granted_ttl(), 30);
        // A renewal clears the checkpoint: the full TTL is back, also after a restart.
        let (mut keeper, mut stream) = bounded("ka", c.lease_keep_alive(g.id())).await.unwrap();
        bounded("ka send", keeper.keep_alive()).await.unwrap();
        let r = bounded("ka recv", stream.message()).await.unwrap().unwrap();
        assert_eq!(r.ttl(), 30);
        drop((keeper, stream, c));
        s.terminate(Duration::from_secs(30));
        s.restart().await;
        let mut c = s.etcd_client().await;
        let t = bounded("ttl", c.lease_time_to_live(g.id(), None))
            .await
            .unwrap();
        assert!((27..=31).contains(&t.ttl()), "remaining TTL {}", t.ttl());
    })
    .await;
}
