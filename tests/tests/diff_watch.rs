//! Watch against a real etcd 3.4: raw gRPC streams (every response field compared,
//! header ids/term masked), the `etcd-client` crate, and `etcdctl watch` (key, prefix,
//! --rev, --prev-kv, interactive mode, a compacted revision).

use std::time::Duration;

use etcd_client::{DeleteOptions, WatchOptions};
use metastore_proto::etcdserverpb::watch_create_request::FilterType;
use metastore_proto::etcdserverpb::{WatchCreateRequest, WatchResponse};
use metastore_tests::ops::{self, b};
use metastore_tests::watch::{mask, RawWatch};
use metastore_tests::{mask_json, test_bounded, Background, CmdOutput, Kind, Pair, Server};

const LIMIT: Duration = Duration::from_secs(180);
/// How long a stream must stay silent before a step's responses are considered complete
/// (etcd syncs catching-up watchers every 100 ms).
const QUIET: Duration = Duration::from_millis(400);

fn create(key: &str, end: &str) -> WatchCreateRequest {
    WatchCreateRequest {
        key: b(key),
        range_end: b(end),
        ..Default::default()
    }
}

/// One step of a scripted watch session, run against both servers.
enum Step {
    Create(WatchCreateRequest),
    Cancel(i64),
    Progress,
    Empty,
    Put(&'static str, &'static str),
    Del(&'static str, &'static str),
    Txn(metastore_proto::etcdserverpb::TxnRequest),
    Compact(i64),
}

async fn run_step(s: &Server, w: &RawWatch, step: &Step) {
    let mut kv = s.kv().await;
    match step {
        Step::Create(c) => w.create(c.clone()),
        Step::Cancel(id) => w.cancel(*id),
        Step::Progress => w.progress(),
        Step::Empty => w.send_empty(),
        Step::Put(k, v) => {
            kv.put(ops::put(k, v)).await.expect("put");
        }
        Step::Del(k, e) => {
            kv.delete_range(ops::del_range(k, e, false))
                .await
                .expect("delete");
        }
        Step::Txn(t) => {
            kv.txn(t.clone()).await.expect("txn");
        }
        Step::Compact(r) => {
            kv.compact(metastore_proto::etcdserverpb::CompactionRequest {
                revision: *r,
                physical: true,
            })
            .await
            .expect("compact");
        }
    }
}

/// Responses of one step, grouped by watch ID (etcd orders different watchers' responses
/// by map iteration), each watcher's own order kept.
fn grouped(mut v: Vec<WatchResponse>) -> Vec<WatchResponse> {
    v = v.into_iter().map(mask).collect();
    v.sort_by_key(|r| r.watch_id);
    v
}

/// Joins each run of fragments into the response they came from.
fn merge_fragments(v: Vec<WatchResponse>) -> Vec<WatchResponse> {
    let mut out: Vec<WatchResponse> = Vec::new();
    let mut open = false;
    for r in v {
        match out.last_mut() {
            Some(last) if open && last.watch_id == r.watch_id => {
                last.events.extend(r.events);
                last.fragment = r.fragment;
            }
            _ => out.push(r.clone()),
        }
        open = out.last().unwrap().fragment;
    }
    out
}

/// Runs `steps` on one stream per server; `merge` compares fragmented responses by
/// their reassembled content only.
async fn compare_session(p: &mut Pair, steps: &[(&str, Step)], merge: bool) {
    let mut ew = RawWatch::open(p.etcd.channel().await).await;
    let mut sw = RawWatch::open(p.subject.channel().await).await;
    for (what, step) in steps {
        run_step(&p.etcd, &ew, step).await;
        run_step(&p.subject, &sw, step).await;
        let (mut e, mut s) = tokio::join!(ew.drain(QUIET), sw.drain(QUIET));
        if merge {
            e = merge_fragments(grouped(e));
            s = merge_fragments(grouped(s));
        }
        let _ = p.check(
            format!("watch step: {what}"),
            Ok(grouped(e)),
            Ok(grouped(s)),
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_stream_matches_etcd() {
    test_bounded(LIMIT, async {
        let mut p = Pair::start().await;
        for (k, v) in [("a", "1"), ("b/1", "x"), ("b/2", "y")] {
            p.put(ops::put(k, v)).await.unwrap();
        }
        p.delete_range(ops::del("a")).await.unwrap();
        let txn = ops::txn(
            vec![],
            vec![
                ops::op_put(ops::put("b/1", "z")),
                ops::op_put(ops::put("c", "1")),
                ops::op_del(ops::del("b/2")),
            ],
            vec![],
        );
        let steps = vec![
            ("create key a", Step::Create(create("a", ""))),
            (
                "create prefix b/ from revision 2 with prev_kv",
                Step::Create(WatchCreateRequest {
                    start_revision: 2,
                    prev_kv: true,
                    ..create("b/", "b0")
                }),
            ),
            (
                "create from-key \\0 with NODELETE and watch_id 10",
                Step::Create(WatchCreateRequest {
                    filters: vec![FilterType::Nodelete as i32],
                    watch_id: 10,
                    ..create("", "\0")
                }),
            ),
            (
                "duplicate watch_id 10",
                Step::Create(WatchCreateRequest {
                    watch_id: 10,
                    ..create("x", "")
                }),
            ),
            ("inverted range", Step::Create(create("z", "a"))),
            ("equal range", Step::Create(create("q", "q"))),
            (
                "empty key from revision 1",
                Step::Create(WatchCreateRequest {
                    start_revision: 1,
                    ..create("", "")
                }),
            ),
            (
                "negative start revision",
                Step::Create(WatchCreateRequest {
                    start_revision: -5,
                    ..create("a", "")
                }),
            ),
            (
                "unknown filter value",
                Step::Create(WatchCreateRequest {
                    filters: vec![7],
                    ..create("zz", "")
                }),
            ),
            ("cancel unknown id", Step::Cancel(99)),
            ("request with no union", Step::Empty),
            ("put a", Step::Put("a", "2")),
            ("txn put b/1 c, delete b/2", Step::Txn(txn)),
            ("cancel 10", Step::Cancel(10)),
            ("put c after cancel", Step::Put("c", "2")),
            ("progress request", Step::Progress),
            (
                "create in the future",
                Step::Create(WatchCreateRequest {
                    start_revision: 10,
                    ..create("c", "")
                }),
            ),
            ("put c below the future start", Step::Put("c", "3")),
            ("put c at the future start", Step::Put("c", "4")),
            ("compact 6", Step::Compact(6)),
            (
                "create below the compacted revision",
                Step::Create(WatchCreateRequest {
                    start_revision: 2,
                    ..create("a", "")
                }),
            ),
            (
                "create at the compacted revision",
                Step::Create(WatchCreateRequest {
                    start_revision: 6,
                    prev_kv: true,
                    ..create("a", "")
                }),
            ),
            (
                "create with NOPUT",
                Step::Create(WatchCreateRequest {
                    filters: vec![FilterType::Noput as i32],
                    prev_kv: true,
                    ..create("b/1", "")
                }),
            ),
            ("put b/1 (filtered)", Step::Put("b/1", "w")),
            ("delete b/", Step::Del("b/", "b0")),
            ("progress request again", Step::Progress),
        ];
        compare_session(&mut p, &steps, false).await;
        p.finish();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_fragments_match_etcd() {
    test_bounded(LIMIT, async {
        let mut p = Pair::start_with(Kind::subject(), &["--max-request-bytes", "1024"]).await;
        // The txn fits in 1024 bytes; its events with prev_kv do not.
        let big = "v".repeat(150);
        let big: &'static str = Box::leak(big.into_boxed_str());
        for i in 0..5 {
            p.put(ops::put(&format!("f/{i}"), "old")).await.unwrap();
        }
        let txn = ops::txn(
            vec![],
            (0..5)
                .map(|i| ops::op_put(ops::put(&format!("f/{i}"), big)))
                .collect(),
            vec![],
        );
        let steps = vec![
            (
                "create prefix f/ with fragment",
                Step::Create(WatchCreateRequest {
                    fragment: true,
                    prev_kv: true,
                    ..create("f/", "f0")
                }),
            ),
            (
                "create prefix f/ without fragment",
                Step::Create(WatchCreateRequest {
                    prev_kv: true,
                    ..create("f/", "f0")
                }),
            ),
            ("txn of five large puts", Step::Txn(txn)),
        ];
        compare_session(&mut p, &steps, false).await;
        // Known difference: etcd sends the history a new watcher catches up with
        // unfragmented when it is ready before the `created` response went out (its send
        // loop buffers it and flushes it whole); MetaStore fragments it as asked. The
        // reassembled content must be the same.
        let steps = vec![(
            "create from revision 2 with fragment",
            Step::Create(WatchCreateRequest {
                fragment: true,
                prev_kv: true,
                start_revision: 2,
                ..create("f/", "f0")
            }),
        )];
        compare_session(&mut p, &steps, true).await;
        p.finish();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_notify_matches_etcd() {
    test_bounded(LIMIT, async {
        let flags = ["--experimental-watch-progress-notify-interval", "300ms"];
        let mut p = Pair::start_with(Kind::subject(), &flags).await;
        p.put(ops::put("p", "1")).await.unwrap();
        let mut first = Vec::new();
        for s in [&p.etcd, &p.subject] {
            let mut w = RawWatch::open(s.channel().await).await;
            w.create(WatchCreateRequest {
                progress_notify: true,
                ..create("p", "")
            });
            let created = w.next(Duration::from_secs(5)).await.expect("created");
            assert!(created.created);
            // A notification arrives within a few intervals, with no events, for the
            // watcher, at the current revision.
            let n = w.next(Duration::from_secs(5)).await.expect("progress");
            first.push(mask(n));
        }
        let s = first.pop().unwrap();
        let e = first.pop().unwrap();
        let _ = p.check("first progress notification".into(), Ok(e), Ok(s));
        p.finish();
    })
    .await;
}

/// A rendering of etcd-client watch events that both servers must agree on.
fn render_events(resp: &etcd_client::WatchResponse) -> Vec<String> {
    resp.events()
        .iter()
        .map(|e| {
            let kv = e.kv().unwrap();
            let prev = e.prev_kv().map(|p| {
                format!(
                    "{}@{}",
                    String::from_utf8_lossy(p.value()),
                    p.mod_revision()
                )
            });
            format!(
                "{:?} {}={} c{} m{} v{} prev={prev:?}",
                e.event_type(),
                String::from_utf8_lossy(kv.key()),
                String::from_utf8_lossy(kv.value()),
                kv.create_revision(),
                kv.mod_revision(),
                kv.version()
            )
        })
        .collect()
}

/// The next response of an etcd-client stream: (watch ID, event count, rendering).
async fn next(ws: &mut etcd_client::WatchStream) -> (i64, usize, String) {
    let r = tokio::time::timeout(Duration::from_secs(5), ws.message())
        .await
        .expect("a watch response")
        .unwrap()
        .unwrap();
    let line = format!(
        "id={} created={} canceled={} compact={} rev={} events={:?}",
        r.watch_id(),
        r.created(),
        r.canceled(),
        r.compact_revision(),
        r.header().unwrap().revision(),
        render_events(&r)
    );
    (r.watch_id(), r.events().len(), line)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_client_watch_matches_etcd() {
    test_bounded(LIMIT, async {
        let mut p = Pair::start().await;
        let mut seen = Vec::new();
        for s in [&p.etcd, &p.subject] {
            let mut c = s.etcd_client().await;
            c.put("w/a", "1", None).await.unwrap();
            c.put("w/b", "2", None).await.unwrap();
            let mut ws = c
                .watch(
                    "w/",
                    Some(
                        WatchOptions::new()
                            .with_prefix()
                            .with_prev_key()
                            .with_start_revision(2),
                    ),
                )
                .await
                .unwrap();
            let mut got: Vec<(i64, String)> = Vec::new();
            // created, then the two past events (one response).
            let mut events = 0;
            while events < 2 {
                let (id, n, line) = next(&mut ws).await;
                events += n;
                got.push((id, line));
            }
            ws.watch("w/a", None).await.unwrap();
            let (id, _, line) = next(&mut ws).await;
            got.push((id, line));
            c.put("w/a", "3", None).await.unwrap();
            c.delete("w/", Some(DeleteOptions::new().with_prefix()))
                .await
                .unwrap();
            // w/ sees the put and both deletes; w/a the put and its delete.
            let mut events = 0;
            while events < 5 {
                let (id, n, line) = next(&mut ws).await;
                events += n;
                got.push((id, line));
            }
            ws.cancel(0).await.unwrap();
            let (id, _, line) = next(&mut ws).await;
            got.push((id, line));
            ws.request_progress().await.unwrap();
            let (id, _, line) = next(&mut ws).await;
            got.push((id, line));
            got.sort_by_key(|(id, _)| *id);
            seen.push(
                got.into_iter()
                    .map(|(_, l)| l)
                    .collect::<Vec<_>>()
                    .join("\n"),
            );
        }
        let s = seen.pop().unwrap();
        let e = seen.pop().unwrap();
        p.check_text("etcd-client watch session".into(), e, s);
        p.finish();
    })
    .await;
}

/// etcdctl's output with JSON lines masked.
fn normalize(out: &CmdOutput) -> String {
    let stdout: Vec<String> = out
        .stdout
        .lines()
        .map(|l| match serde_json::from_str::<serde_json::Value>(l) {
            Ok(mut v) if l.starts_with('{') => {
                mask_json(&mut v);
                v.to_string()
            }
            _ => l.to_string(),
        })
        .collect();
    format!(
        "exit={:?}\nstdout:\n{}\nerror: {:?}",
        out.code,
        stdout.join("\n"),
        out.error_line()
    )
}

/// Runs `etcdctl watch <args>` against both servers while `writes` run, then stops it.
async fn etcdctl_watch(p: &mut Pair, args: &[&str], lines: &[&str], writes: &[&[&str]]) {
    let mut outs = Vec::new();
    for s in [&p.etcd, &p.subject] {
        let mut bg = Background::start(&s.endpoint(), args);
        for l in lines {
            bg.line(l);
        }
        tokio::time::sleep(Duration::from_millis(800)).await;
        for w in writes {
            assert!(s.etcdctl(w).success(), "etcdctl {w:?}");
        }
        outs.push(normalize(&bg.stop(Duration::from_millis(800))));
    }
    let s = outs.pop().unwrap();
    let e = outs.pop().unwrap();
    let what = format!("etcdctl {} {lines:?} during {writes:?}", args.join(" "));
    p.check_text(what, e, s);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_watch_matches_etcd() {
    test_bounded(LIMIT, async {
        let mut p = Pair::start().await;
        for s in [&p.etcd, &p.subject] {
            for (k, v) in [("a", "1"), ("a", "2"), ("pre/x", "3"), ("pre/y", "4")] {
                assert!(s.etcdctl(&["put", k, v]).success());
            }
            assert!(s.etcdctl(&["del", "pre/x"]).success());
        }
        // History (the watch prints the past and then waits).
        etcdctl_watch(&mut p, &["watch", "--rev=1", "a"], &[], &[]).await;
        etcdctl_watch(&mut p, &["watch", "--rev=2", "--prefix", "pre/"], &[], &[]).await;
        etcdctl_watch(&mut p, &["watch", "--rev=3", "--prev-kv", "a"], &[], &[]).await;
        etcdctl_watch(
            &mut p,
            &["watch", "--rev=1", "--prefix", "", "-w", "json"],
            &[],
            &[],
        )
        .await;
        // Live.
        etcdctl_watch(
            &mut p,
            &["watch", "--prefix", "--prev-kv", "pre/"],
            &[],
            &[
                &["put", "pre/z", "5"],
                &["put", "pre/z", "6"],
                &["del", "--prefix", "pre/"],
            ],
        )
        .await;
        etcdctl_watch(
            &mut p,
            &["watch", "a", "-w", "json"],
            &[],
            &[&["put", "a", "7"], &["del", "a"]],
        )
        .await;
        // Interactive mode: commands on stdin.
        etcdctl_watch(
            &mut p,
            &["watch", "-i"],
            &["watch a", "watch --prefix i/"],
            &[&["put", "a", "8"], &["put", "i/1", "9"]],
        )
        .await;
        etcdctl_watch(
            &mut p,
            &["watch", "-i"],
            &["watch --rev=1 --prev-kv a"],
            &[],
        )
        .await;
        // A compacted start revision: etcdctl reports the cancel and exits.
        for s in [&p.etcd, &p.subject] {
            assert!(s.etcdctl(&["compaction", "5"]).success());
        }
        etcdctl_watch(&mut p, &["watch", "--rev=2", "a"], &[], &[]).await;
        etcdctl_watch(&mut p, &["watch", "--rev=2", "a", "-w", "json"], &[], &[]).await;
        p.finish();
    })
    .await;
}

/// A lease's expiry reaches watchers as DELETE events of one revision, with `prev_kv`,
/// exactly as etcd's do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_expiry_is_watched_like_etcd() {
    test_bounded(LIMIT, async {
        let mut p = Pair::start().await;
        let mut seen = Vec::new();
        for s in [&p.etcd, &p.subject] {
            let mut c = s.etcd_client().await;
            let mut ws = c
                .watch(
                    "l/",
                    Some(WatchOptions::new().with_prefix().with_prev_key()),
                )
                .await
                .unwrap();
            let (_, _, created) = next(&mut ws).await;
            let lease = c.lease_grant(2, None).await.unwrap().id();
            let opts = || Some(etcd_client::PutOptions::new().with_lease(lease));
            c.put("l/a", "1", opts()).await.unwrap();
            c.put("l/b", "2", opts()).await.unwrap();
            let mut got = vec![created];
            let mut events = 0;
            // Two puts, then both deletes when the lease expires (etcd: within ~0.5 s
            // of the TTL; the wait below is bounded by `next`'s 5 s and the TTL).
            while events < 4 {
                let r = tokio::time::timeout(Duration::from_secs(10), ws.message())
                    .await
                    .expect("a watch response")
                    .unwrap()
                    .unwrap();
                events += r.events().len();
                got.push(format!(
                    "rev={} events={:?}",
                    r.header().unwrap().revision(),
                    render_events(&r)
                ));
            }
            seen.push(got.join("\n"));
        }
        let s = seen.pop().unwrap();
        let e = seen.pop().unwrap();
        p.check_text("lease expiry seen by a watcher".into(), e, s);
        p.finish();
    })
    .await;
}
