//! Differential tests over the raw etcdserverpb gRPC stubs: every request goes to a real
//! etcd and to the server under test, and every response field is compared (header
//! cluster_id/member_id/raft_term zeroed), errors by gRPC code and message.

use std::time::Duration;

use metastore_proto::etcdserverpb::compare::CompareResult::{Equal, Greater, Less, NotEqual};
use metastore_proto::etcdserverpb::{
    CompactionRequest, Compare, PutRequest, RangeRequest, RequestOp, TxnRequest,
};
use metastore_tests::ops::*;
use metastore_tests::{bounded, test_bounded, GrpcError, Pair};

const LIMIT: Duration = Duration::from_secs(120);

async fn seed_keys(p: &mut Pair) {
    for (k, v) in [
        ("a", "1"),
        ("b", "22"),
        ("c", "333"),
        ("a/1", "x"),
        ("a/2", "yy"),
        ("a/3", "zzz"),
        ("b/x", "q"),
        ("a", "11"),
        ("a/2", "y2"),
        ("z", ""),
        ("a/1", "x2"),
        ("a/1", "x3"),
    ] {
        p.put(put(k, v)).await.expect("seed put");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_variants() {
    test_bounded(LIMIT, async {
        let mut p = Pair::start().await;
        // Empty store first.
        p.range(get("a")).await.ok();
        p.range(get_all()).await.ok();
        seed_keys(&mut p).await;

        let mut reqs: Vec<RangeRequest> = vec![
            get("a"),
            get("nope"),
            get_range("a", "c"),
            get_range("a", "a"),
            get_range("c", "a"),
            get_prefix("a/"),
            get_prefix("a"),
            get_from("b"),
            get_from("zz"),
            get_all(),
            RangeRequest {
                key: vec![0],
                range_end: b("b"),
                ..Default::default()
            },
            RangeRequest {
                key: b("a"),
                range_end: vec![0xff],
                ..Default::default()
            },
        ];
        // limit, count, more
        for limit in [-1, 0, 1, 2, 3, 8, 9, 100] {
            reqs.push(RangeRequest { limit, ..get_all() });
            reqs.push(RangeRequest {
                limit,
                ..get_prefix("a/")
            });
        }
        // sort: every order x target, with and without limit
        for order in [0, 1, 2] {
            for target in [0, 1, 2, 3, 4] {
                for limit in [0, 2] {
                    reqs.push(RangeRequest {
                        sort_order: order,
                        sort_target: target,
                        limit,
                        ..get_all()
                    });
                }
            }
        }
        // keys_only, count_only
        reqs.push(RangeRequest {
            keys_only: true,
            ..get_all()
        });
        reqs.push(RangeRequest {
            count_only: true,
            ..get_all()
        });
        reqs.push(RangeRequest {
            count_only: true,
            limit: 2,
            ..get_all()
        });
        reqs.push(RangeRequest {
            count_only: true,
            keys_only: true,
            ..get_prefix("a")
        });
        reqs.push(RangeRequest {
            keys_only: true,
            limit: 1,
            sort_order: 2,
            sort_target: 4,
            ..get_all()
        });
        // serializable
        reqs.push(RangeRequest {
            serializable: true,
            ..get_all()
        });
        reqs.push(RangeRequest {
            serializable: true,
            ..get("a")
        });
        // min/max mod/create revision filters
        for (a, b_, c, d) in [
            (3, 0, 0, 0),
            (0, 5, 0, 0),
            (3, 8, 0, 0),
            (0, 0, 4, 0),
            (0, 0, 0, 4),
            (0, 0, 2, 5),
            (9, 0, 0, 3),
            (100, 0, 0, 0),
            (-5, -5, -5, -5),
        ] {
            reqs.push(RangeRequest {
                min_mod_revision: a,
                max_mod_revision: b_,
                min_create_revision: c,
                max_create_revision: d,
                ..get_all()
            });
            reqs.push(RangeRequest {
                min_mod_revision: a,
                max_mod_revision: b_,
                min_create_revision: c,
                max_create_revision: d,
                limit: 2,
                ..get_all()
            });
        }
        // historical revisions, current, future
        for rev in [-1, 0, 1, 2, 5, 8, 12, 13, 14, 100] {
            reqs.push(RangeRequest {
                revision: rev,
                ..get_all()
            });
            reqs.push(RangeRequest {
                revision: rev,
                ..get("a/1")
            });
        }
        reqs.push(RangeRequest {
            revision: 4,
            count_only: true,
            ..get_prefix("a")
        });
        // empty key
        reqs.push(RangeRequest::default());
        reqs.push(get_range("", "b"));
        for r in reqs {
            let _ = p.range(r).await;
        }
        p.finish();
    })
    .await
}

/// Unknown sort enums. etcd 3.4.23 cannot be the reference here: it ignores an unknown
/// sort_order and *crashes* on an unknown sort_target. etcd 3.5 (the wire version MetaStore
/// implements) rejects both in `checkRangeRequest` with InvalidArgument
/// "etcdserver: invalid sort option", also inside a txn; the subject must do that and live on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_sort_options() {
    test_bounded(LIMIT, async {
        let kind = metastore_tests::Kind::subject();
        if kind == metastore_tests::Kind::Etcd {
            // etcd 3.4 would crash: nothing to validate against a second etcd.
            return;
        }
        let s = metastore_tests::Server::start(kind).await;
        let mut kv = s.kv().await;
        kv.put(put("a", "1")).await.expect("put");
        let expected = GrpcError {
            code: tonic::Code::InvalidArgument,
            message: "etcdserver: invalid sort option".into(),
        };
        let mut diffs = Vec::new();
        for (order, target) in [(3, 0), (7, 0), (-1, 0), (0, 5), (1, 9), (0, -1), (9, 9)] {
            let req = RangeRequest {
                sort_order: order,
                sort_target: target,
                ..get_all()
            };
            let got = bounded("range", kv.range(req.clone()))
                .await
                .map(|r| r.into_inner())
                .map_err(GrpcError::from);
            if got.as_ref().err() != Some(&expected) {
                diffs.push(format!(
                    "Range {req:?}\n  expected: {expected:?}\n  got: {got:?}"
                ));
            }
            let t = txn(vec![], vec![op_get(req)], vec![]);
            let got = bounded("txn", kv.txn(t.clone()))
                .await
                .map(|r| r.into_inner())
                .map_err(GrpcError::from);
            if got.as_ref().err() != Some(&expected) {
                diffs.push(format!(
                    "Txn {t:?}\n  expected: {expected:?}\n  got: {got:?}"
                ));
            }
        }
        // Still alive and unchanged.
        let r = bounded("range", kv.range(get_all()))
            .await
            .expect("range after")
            .into_inner();
        assert_eq!(r.kvs.len(), 1, "{r:?}");
        assert!(
            diffs.is_empty(),
            "{} difference(s):\n{}",
            diffs.len(),
            diffs.join("\n")
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_and_delete_variants() {
    test_bounded(LIMIT, async {
        let mut p = Pair::start().await;
        let _ = p.put(put_prev("k", "v1")).await;
        let _ = p.put(put_prev("k", "v2")).await;
        let _ = p.put(put("k", "")).await;
        let _ = p.put(put_prev("k", "v3")).await;
        // binary keys and values
        let _ = p
            .put(PutRequest {
                key: vec![0xff, 0x00, 0x01],
                value: vec![0, 1, 2, 255],
                prev_kv: true,
                ..Default::default()
            })
            .await;
        let _ = p
            .put(PutRequest {
                key: vec![0],
                value: b("zero"),
                ..Default::default()
            })
            .await;
        // errors
        let _ = p.put(put("", "v")).await;
        let _ = p.put(put_prev("", "")).await;
        let _ = p
            .put(PutRequest {
                ignore_value: true,
                prev_kv: true,
                ..put("k", "")
            })
            .await;
        let _ = p
            .put(PutRequest {
                ignore_value: true,
                ..put("missing", "")
            })
            .await;
        let _ = p
            .put(PutRequest {
                ignore_value: true,
                ..put("k", "value-and-ignore")
            })
            .await;
        let _ = p
            .put(PutRequest {
                ignore_lease: true,
                ..put("k", "v4")
            })
            .await;
        let _ = p
            .put(PutRequest {
                ignore_lease: true,
                lease: 5,
                ..put("k", "v4")
            })
            .await;
        let _ = p
            .put(PutRequest {
                lease: 12345,
                ..put("k", "v5")
            })
            .await;
        // sizes: well under the limit, just over 1.5 MiB, over the gRPC receive limit
        let _ = p
            .put(PutRequest {
                key: b("big"),
                value: vec![b'x'; 1024 * 1024],
                ..Default::default()
            })
            .await;
        let _ = p
            .range(RangeRequest {
                keys_only: true,
                ..get("big")
            })
            .await;
        let _ = p
            .put(PutRequest {
                key: b("big"),
                value: vec![b'y'; 1536 * 1024 + 100],
                ..Default::default()
            })
            .await;
        let _ = p
            .range(RangeRequest {
                keys_only: true,
                ..get_all()
            })
            .await;
        // deletes
        for k in ["a", "a/1", "a/2", "b", "b/1", "c", "d"] {
            let _ = p.put(put(k, k)).await;
        }
        let _ = p.delete_range(del_prev("nope")).await;
        let _ = p.delete_range(del_prev("a")).await;
        let _ = p.delete_range(del("a")).await;
        let _ = p.delete_range(del_prefix("a/", true)).await;
        let _ = p.delete_range(del_range("b", "d", false)).await;
        let _ = p.delete_range(del_range("c", "b", true)).await;
        let _ = p.delete_range(del("")).await;
        let _ = p.delete_range(del_range("", "x", false)).await;
        let _ = p.put(put_prev("a", "again")).await;
        let _ = p.put(put_prev("a", "again2")).await;
        let _ = p.range(get_all()).await;
        let _ = p
            .delete_range(metastore_proto::etcdserverpb::DeleteRangeRequest {
                key: b("d"),
                range_end: vec![0],
                prev_kv: true,
            })
            .await;
        let _ = p
            .delete_range(metastore_proto::etcdserverpb::DeleteRangeRequest {
                key: vec![0],
                range_end: vec![0],
                prev_kv: true,
            })
            .await;
        let _ = p.range(get_all()).await;
        let _ = p.put(put("a", "after-wipe")).await;
        let _ = p.range(get_all()).await;
        p.finish();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn txn_variants() {
    test_bounded(LIMIT, async {
        let mut p = Pair::start().await;
        seed_keys(&mut p).await;
        let mut reqs: Vec<TxnRequest> = Vec::new();
        // Every target x result on an existing and a missing key.
        for key in ["a", "a/1", "missing"] {
            for r in [Equal, Greater, Less, NotEqual] {
                for c in [
                    cmp_version(key, r, 2),
                    cmp_create(key, r, 4),
                    cmp_mod(key, r, 8),
                    cmp_value(key, r, "11"),
                    cmp_value(key, r, "x"),
                    cmp_lease(key, r, 0),
                    cmp_version(key, r, 0),
                ] {
                    reqs.push(txn(vec![c], vec![op_get(get(key))], vec![op_get(get("b"))]));
                }
            }
        }
        // Compares over a range
        for c in [
            over(cmp_version("a/", Greater, 0), prefix_end(b"a/")),
            over(cmp_version("a/", Equal, 1), prefix_end(b"a/")),
            over(cmp_mod("a", Less, 100), vec![0]),
            over(cmp_value("a/", Equal, "x3"), prefix_end(b"a/")),
            over(cmp_create("a", Greater, 0), b("c")),
            over(cmp_version("q", Equal, 0), b("r")),
            over(cmp_value("q", Equal, ""), b("r")),
        ] {
            reqs.push(txn(vec![c], vec![op_put(put("hit", "s"))], vec![]));
        }
        // Multiple compares, writes in both branches, nested txns
        reqs.push(txn(
            vec![cmp_value("a", Equal, "11"), cmp_version("b", Equal, 1)],
            vec![
                op_put(put_prev("a", "12")),
                op_get(get("a")),
                op_del(del_prefix("b/", true)),
                op_get(get_all()),
            ],
            vec![op_put(put("failed", "1"))],
        ));
        reqs.push(txn(
            vec![cmp_value("a", Equal, "nope")],
            vec![op_put(put("ok", "1"))],
            vec![
                op_put(put_prev("a", "13")),
                op_txn(txn(
                    vec![cmp_version("a", Greater, 0)],
                    vec![op_put(put("n1", "v")), op_get(get_prefix("n"))],
                    vec![op_put(put("n2", "v"))],
                )),
                op_get(get("n1")),
            ],
        ));
        // Read-only txn does not bump the revision; empty txn
        reqs.push(txn(vec![], vec![op_get(get_all())], vec![]));
        reqs.push(txn(vec![], vec![], vec![]));
        reqs.push(txn(vec![cmp_version("zzz", Equal, 0)], vec![], vec![]));
        // Deletes of missing keys only: no revision bump?
        reqs.push(txn(vec![], vec![op_del(del("missing1"))], vec![]));
        // put then delete then put in one txn on different keys; several puts
        reqs.push(txn(
            vec![],
            vec![
                op_put(put("t1", "1")),
                op_put(put("t2", "2")),
                op_del(del("c")),
                op_put(put("t3", "3")),
                op_get(get_prefix("t")),
            ],
            vec![],
        ));
        // Duplicate keys
        reqs.push(txn(
            vec![],
            vec![op_put(put("d", "1")), op_put(put("d", "2"))],
            vec![],
        ));
        reqs.push(txn(
            vec![],
            vec![op_put(put("d", "1")), op_del(del("d"))],
            vec![],
        ));
        reqs.push(txn(
            vec![],
            vec![op_put(put("a/5", "1")), op_del(del_prefix("a/", false))],
            vec![],
        ));
        reqs.push(txn(
            vec![],
            vec![op_del(del("d")), op_del(del("d"))],
            vec![],
        ));
        reqs.push(txn(
            vec![],
            vec![op_put(put("d", "1")), op_get(get("d")), op_get(get("d"))],
            vec![],
        ));
        reqs.push(txn(
            vec![],
            vec![op_put(put("d", "1"))],
            vec![op_put(put("d", "2"))],
        ));
        reqs.push(txn(
            vec![],
            vec![
                op_put(put("e", "1")),
                op_txn(txn(vec![], vec![op_put(put("e", "2"))], vec![])),
            ],
            vec![],
        ));
        reqs.push(txn(
            vec![],
            vec![
                op_txn(txn(vec![], vec![op_put(put("f", "2"))], vec![])),
                op_txn(txn(vec![], vec![op_put(put("f", "3"))], vec![])),
            ],
            vec![],
        ));
        reqs.push(txn(
            vec![],
            vec![op_txn(txn(
                vec![],
                vec![op_put(put("g", "2"))],
                vec![op_put(put("g", "3"))],
            ))],
            vec![],
        ));
        // Too many operations
        let many = |n: usize| -> Vec<RequestOp> {
            (0..n)
                .map(|i| op_put(put(&format!("m/{i:04}"), "v")))
                .collect()
        };
        reqs.push(txn(vec![], many(128), vec![]));
        reqs.push(txn(vec![], many(129), vec![]));
        reqs.push(txn(vec![], vec![], many(129)));
        reqs.push(txn(vec![], many(100), many(100)));
        let cmps = |n: usize| -> Vec<Compare> {
            (0..n)
                .map(|i| cmp_version(&format!("m/{i:04}"), Greater, 0))
                .collect()
        };
        reqs.push(txn(cmps(128), vec![op_get(get("m/0000"))], vec![]));
        reqs.push(txn(cmps(129), vec![], vec![]));
        // Invalid ops inside a txn
        reqs.push(txn(vec![], vec![op_put(put("", "1"))], vec![]));
        reqs.push(txn(vec![], vec![], vec![op_get(get(""))]));
        reqs.push(txn(vec![], vec![op_del(del(""))], vec![]));
        reqs.push(txn(vec![cmp_version("", Equal, 0)], vec![], vec![]));
        reqs.push(txn(
            vec![],
            vec![op_put(PutRequest {
                ignore_value: true,
                ..put("nokey", "")
            })],
            vec![],
        ));
        reqs.push(txn(
            vec![],
            vec![op_put(PutRequest {
                lease: 777,
                ..put("k", "1")
            })],
            vec![],
        ));
        reqs.push(txn(
            vec![],
            vec![op_get(RangeRequest {
                revision: 1000,
                ..get("a")
            })],
            vec![],
        ));
        reqs.push(txn(vec![], vec![RequestOp { request: None }], vec![]));
        // Compares with odd enums / missing target values
        reqs.push(txn(
            vec![Compare {
                result: 9,
                target: 0,
                key: b("a"),
                target_union: Some(metastore_proto::etcdserverpb::compare::TargetUnion::Version(1)),
                range_end: vec![],
            }],
            vec![op_get(get("a"))],
            vec![],
        ));
        reqs.push(txn(
            vec![Compare {
                result: 0,
                target: 3,
                key: b("z"),
                target_union: None,
                range_end: vec![],
            }],
            vec![op_get(get("z"))],
            vec![],
        ));
        reqs.push(txn(
            vec![Compare {
                result: 0,
                target: 0,
                key: b("a"),
                target_union: Some(metastore_proto::etcdserverpb::compare::TargetUnion::Value(
                    b("x"),
                )),
                range_end: vec![],
            }],
            vec![op_get(get("a"))],
            vec![],
        ));
        for r in reqs {
            let _ = p.txn(r).await;
        }
        let _ = p.range(get_all()).await;
        p.finish();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_and_hash() {
    test_bounded(LIMIT, async {
        let mut p = Pair::start().await;
        let _ = p.hash_kv(0).await;
        let _ = p.compact(CompactionRequest::default()).await;
        let _ = p
            .compact(CompactionRequest {
                revision: 1,
                physical: false,
            })
            .await;
        seed_keys(&mut p).await; // revisions 2..=13
        let _ = p.delete_range(del("b")).await; // 14
        let _ = p.put(put("b", "reborn")).await; // 15
        let _ = p.hash_kv(0).await;
        let _ = p.hash_kv(5).await;
        let _ = p
            .compact(CompactionRequest {
                revision: 16,
                physical: false,
            })
            .await;
        let _ = p
            .compact(CompactionRequest {
                revision: 100,
                physical: true,
            })
            .await;
        let _ = p
            .compact(CompactionRequest {
                revision: 6,
                physical: true,
            })
            .await;
        for rev in [0, 4, 5, 6, 7, 14, 15, 16] {
            let _ = p
                .range(RangeRequest {
                    revision: rev,
                    ..get_all()
                })
                .await;
        }
        let _ = p.hash_kv(0).await;
        let _ = p.hash_kv(5).await;
        let _ = p.hash_kv(10).await;
        let _ = p.hash_kv(100).await;
        let _ = p
            .compact(CompactionRequest {
                revision: 6,
                physical: false,
            })
            .await;
        let _ = p
            .compact(CompactionRequest {
                revision: 5,
                physical: false,
            })
            .await;
        let _ = p
            .compact(CompactionRequest {
                revision: -3,
                physical: false,
            })
            .await;
        // The tombstone of b (rev 14) and old versions go away at a compaction past them.
        let _ = p
            .compact(CompactionRequest {
                revision: 15,
                physical: true,
            })
            .await;
        for rev in [14, 15] {
            let _ = p
                .range(RangeRequest {
                    revision: rev,
                    ..get_all()
                })
                .await;
        }
        let _ = p.hash_kv(0).await;
        let _ = p.put(put_prev("b", "after")).await;
        let _ = p.put(put_prev("a", "after")).await;
        let _ = p.range(get_all()).await;
        let _ = p
            .range(RangeRequest {
                revision: 16,
                ..get_all()
            })
            .await;
        let _ = p
            .txn(txn(
                vec![],
                vec![op_get(RangeRequest {
                    revision: 3,
                    ..get("a")
                })],
                vec![],
            ))
            .await;
        let _ = p.hash_kv(0).await;
        p.finish();
    })
    .await
}

/// Malformed protobuf bodies: etcd (grpc-go) and the subject must both refuse them with the
/// same gRPC code (the message is the gRPC library's own text, so it is not compared),
/// write nothing, and stay up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_protobuf() {
    use metastore_tests::raw::call_raw;
    test_bounded(LIMIT, async {
        let mut p = Pair::start().await;
        let _ = p.put(put("a", "1")).await;
        let bodies: Vec<(&'static str, Vec<u8>)> = vec![
            ("/etcdserverpb.KV/Put", vec![0xff, 0xff, 0xff, 0xff]),
            ("/etcdserverpb.KV/Put", vec![0x0a, 0x05, b'a']),
            ("/etcdserverpb.KV/Put", vec![0x08, 0x01]),
            ("/etcdserverpb.KV/Put", vec![0x0a, 0x01, b'k', 0x12, 0x80]),
            (
                "/etcdserverpb.KV/Range",
                vec![0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f],
            ),
            ("/etcdserverpb.KV/Txn", vec![0x12, 0x03, 0x12, 0x01, 0x0a]),
            ("/etcdserverpb.KV/DeleteRange", vec![0x1a, 0x00, 0x07]),
            ("/etcdserverpb.KV/Compact", vec![0x08]),
        ];
        for (path, body) in bodies {
            let e = bounded(path, call_raw(p.etcd.channel().await, path, body.clone())).await;
            let s = bounded(
                path,
                call_raw(p.subject.channel().await, path, body.clone()),
            )
            .await;
            let code = |r: &Result<Vec<u8>, tonic::Status>| match r {
                Ok(b) => format!("Ok({} bytes)", b.len()),
                Err(st) => format!("{:?}", st.code()),
            };
            if std::env::var_os("METASTORE_TESTS_VERBOSE").is_some() {
                eprintln!("RAW {path} {body:?}\n  etcd: {e:?}\n  subject: {s:?}");
            }
            p.check_text(
                format!("{path} with body {body:?} (gRPC code only)"),
                code(&e),
                code(&s),
            );
        }
        // Nothing was written, both still serve.
        let _ = p.range(get_all()).await;
        let _ = p.put(put("b", "2")).await;
        p.finish();
    })
    .await
}

/// `--max-request-bytes` sets the request limit (and the gRPC receive limit 512 KiB above).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_request_bytes_flag() {
    test_bounded(LIMIT, async {
        let mut p = Pair::start_with(
            metastore_tests::Kind::subject(),
            &["--max-request-bytes=10000"],
        )
        .await;
        for n in [100, 9_900, 9_990, 10_001, 20_000, 10_000 + 512 * 1024 - 100] {
            let _ = p
                .put(PutRequest {
                    key: b("k"),
                    value: vec![b'x'; n],
                    ..Default::default()
                })
                .await;
        }
        let _ = p
            .txn(txn(
                vec![],
                (0..20)
                    .map(|i| op_put(put(&format!("t{i}"), &"y".repeat(600))))
                    .collect(),
                vec![],
            ))
            .await;
        let _ = p
            .range(RangeRequest {
                keys_only: true,
                ..get_all()
            })
            .await;
        p.finish();
    })
    .await
}

/// A message above the gRPC receive limit (`--max-request-bytes` + 512 KiB) is refused by
/// grpc-go before etcd sees it: ResourceExhausted "grpc: received message larger than max
/// (N vs. M)". The connection keeps serving, and nothing was written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_receive_limit() {
    test_bounded(LIMIT, async {
        let expect = |o: &metastore_tests::compare::Outcome<_>, len: usize, max: usize| {
            let e = o
                .as_ref()
                .expect_err("an oversized message must be refused");
            assert_eq!(e.code, tonic::Code::ResourceExhausted, "{e:?}");
            assert_eq!(
                e.message,
                format!("grpc: received message larger than max ({len} vs. {max})")
            );
        };
        let mut p = Pair::start().await;
        let value = 3 * 1024 * 1024;
        let o = p
            .put(PutRequest {
                key: b("big"),
                value: vec![b'z'; value],
                ..Default::default()
            })
            .await;
        // The encoded PutRequest: key field (2 + 3 bytes), value field (1 + varint + value).
        expect(&o, 5 + 1 + 4 + value, 1_572_864 + 524_288);
        let _ = p.range(get_all()).await;
        let _ = p.put(put("after", "1")).await;
        p.finish();

        let mut p = Pair::start_with(
            metastore_tests::Kind::subject(),
            &["--max-request-bytes=10000"],
        )
        .await;
        let value = 10_000 + 512 * 1024 + 100;
        let o = p
            .put(PutRequest {
                key: b("k"),
                value: vec![b'x'; value],
                ..Default::default()
            })
            .await;
        expect(&o, 3 + 1 + 3 + value, 10_000 + 524_288);
        let _ = p.range(get_all()).await;
        p.finish();
    })
    .await
}

/// HashKV at exactly the compacted revision: etcd 3.5 (the wire reference, which core
/// follows: `rev < compactRev` is refused) answers it; etcd 3.4 (the reference binary
/// here: `rev <= compactRev`) refuses it as compacted. Both halves are asserted, so the
/// difference stays visible (docs/compatibility.md) and cannot change silently on either
/// side; the revisions around it must agree with etcd.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hashkv_at_compacted_revision_follows_etcd_3_5() {
    use metastore_proto::etcdserverpb::HashKvRequest;
    test_bounded(LIMIT, async {
        let mut p = Pair::start().await;
        seed_keys(&mut p).await;
        for rev in [6, 10] {
            let _ = p
                .compact(CompactionRequest {
                    revision: rev,
                    physical: true,
                })
                .await;
            let req = HashKvRequest { revision: rev };
            let etcd = p.emt.clone().hash_kv(req).await;
            let st = etcd.expect_err("etcd 3.4 refuses HashKV at the compacted revision");
            assert_eq!(
                (st.code(), st.message()),
                (
                    tonic::Code::OutOfRange,
                    "etcdserver: mvcc: required revision has been compacted"
                )
            );
            let ours = p
                .smt
                .clone()
                .hash_kv(req)
                .await
                .expect("MetaStore answers HashKV at the compacted revision, as etcd 3.5 does")
                .into_inner();
            assert_eq!(ours.compact_revision, rev);
            assert_eq!(ours.header.map(|h| h.revision), Some(13));
            // The same question twice gets the same hash (nothing is recomputed from a
            // moving state).
            let again = p.smt.clone().hash_kv(req).await.unwrap().into_inner();
            assert_eq!(again.hash, ours.hash);
            // Below and above the compacted revision both agree with etcd.
            let _ = p.hash_kv(rev - 1).await;
            let _ = p.hash_kv(rev + 1).await;
            let _ = p.hash_kv(0).await;
        }
        p.finish();
    })
    .await
}
