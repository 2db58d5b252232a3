//! In-process tests of a whole member: a server on 127.0.0.1:0 driven through the
//! generated tonic clients. Black-box tests of the binary with etcd's own clients live in
//! `tests/`; these check the runtime's own promises (headers, limits, restart, shutdown).

use std::time::Duration;

use metastore_proto::etcdserverpb as pb;
use metastore_proto::etcdserverpb::cluster_client::ClusterClient;
use metastore_proto::etcdserverpb::kv_client::KvClient;
use metastore_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use metastore_runtime::config::{Config, Engine};
use tonic::Code;

const DEFAULT_MEMBER_ID: u64 = 0x8e9e05c52164694d;
const DEFAULT_CLUSTER_ID: u64 = 0xcdf818194e3a8c32;

mod common;
use common::start;

fn put(key: &str, value: &str) -> pb::PutRequest {
    pb::PutRequest {
        key: key.into(),
        value: value.into(),
        ..Default::default()
    }
}

fn get(key: &str) -> pb::RangeRequest {
    pb::RangeRequest {
        key: key.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn kv_round_trip_with_etcd_headers() {
    let (server, channel) = start(Config::for_tests()).await;
    let mut kv = KvClient::new(channel);

    let resp = kv.put(put("foo", "bar")).await.unwrap().into_inner();
    let h = resp.header.unwrap();
    assert_eq!(h.cluster_id, DEFAULT_CLUSTER_ID);
    assert_eq!(h.member_id, DEFAULT_MEMBER_ID);
    assert_eq!(h.raft_term, 2);
    assert_eq!(h.revision, 2);

    let resp = kv.range(get("foo")).await.unwrap().into_inner();
    assert_eq!(resp.kvs.len(), 1);
    assert_eq!(resp.kvs[0].value, &b"bar"[..]);
    assert_eq!(resp.header.unwrap().revision, 2);

    let serializable = pb::RangeRequest {
        serializable: true,
        ..get("foo")
    };
    let resp = kv.range(serializable).await.unwrap().into_inner();
    assert_eq!(resp.kvs[0].value, &b"bar"[..]);

    // A read-only txn is served locally and does not bump the revision.
    let txn = pb::TxnRequest {
        compare: vec![],
        success: vec![pb::RequestOp {
            request: Some(pb::request_op::Request::RequestRange(get("foo"))),
        }],
        failure: vec![],
    };
    let resp = kv.txn(txn).await.unwrap().into_inner();
    assert!(resp.succeeded);
    assert_eq!(resp.header.unwrap().revision, 2);

    // A writing txn goes through the log.
    let txn = pb::TxnRequest {
        compare: vec![],
        success: vec![pb::RequestOp {
            request: Some(pb::request_op::Request::RequestPut(put("k2", "v2"))),
        }],
        failure: vec![],
    };
    let resp = kv.txn(txn).await.unwrap().into_inner();
    assert_eq!(resp.header.unwrap().revision, 3);

    let resp = kv
        .delete_range(pb::DeleteRangeRequest {
            key: b"foo".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.deleted, 1);
    assert_eq!(resp.header.unwrap().revision, 4);

    let resp = kv
        .compact(pb::CompactionRequest {
            revision: 3,
            physical: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.header.unwrap().revision, 4);
    let err = kv
        .range(pb::RangeRequest {
            revision: 2,
            ..get("foo")
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange);
    assert_eq!(
        err.message(),
        "etcdserver: mvcc: required revision has been compacted"
    );

    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn etcd_errors_reach_the_client_exactly() {
    let mut config = Config::for_tests();
    config.max_request_bytes = 64 * 1024;
    let (server, channel) = start(config).await;
    let mut kv = KvClient::new(channel);

    let err = kv.put(put("", "v")).await.unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (Code::InvalidArgument, "etcdserver: key is not provided")
    );
    let err = kv.range(get("")).await.unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (Code::InvalidArgument, "etcdserver: key is not provided")
    );

    // Above --max-request-bytes but within the gRPC allowance: etcd's own error.
    let big = "x".repeat(64 * 1024 + 1);
    let err = kv.put(put("big", &big)).await.unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (Code::InvalidArgument, "etcdserver: request is too large")
    );
    // Above the gRPC limit: refused by the transport, not applied.
    let huge = "x".repeat(64 * 1024 + 600 * 1024);
    let err = kv.put(put("huge", &huge)).await.unwrap_err();
    assert_ne!(err.code(), Code::Ok);
    let resp = kv.range(get("huge")).await.unwrap().into_inner();
    assert!(resp.kvs.is_empty());

    let err = kv
        .range(pb::RangeRequest {
            revision: 100,
            ..get("a")
        })
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (
            Code::OutOfRange,
            "etcdserver: mvcc: required revision is a future revision"
        )
    );

    let mut ops = Vec::new();
    for i in 0..129 {
        ops.push(pb::RequestOp {
            request: Some(pb::request_op::Request::RequestPut(put(
                &format!("k{i}"),
                "v",
            ))),
        });
    }
    let err = kv
        .txn(pb::TxnRequest {
            compare: vec![],
            success: ops,
            failure: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (
            Code::InvalidArgument,
            "etcdserver: too many operations in txn request"
        )
    );
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn quota_refuses_writes_with_etcds_error() {
    let mut config = Config::for_tests();
    config.quota_backend_bytes = Some(1);
    let (server, channel) = start(config).await;
    let mut kv = KvClient::new(channel);
    let err = kv.put(put("a", "b")).await.unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (
            Code::ResourceExhausted,
            "etcdserver: mvcc: database space exceeded"
        )
    );
    // Deletes and reads are not charged.
    kv.range(get("a")).await.unwrap();
    kv.delete_range(pb::DeleteRangeRequest {
        key: b"a".to_vec(),
        ..Default::default()
    })
    .await
    .unwrap();
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn status_and_member_list_describe_the_member() {
    let (server, channel) = start(Config::for_tests()).await;
    let mut kv = KvClient::new(channel.clone());
    kv.put(put("a", "1")).await.unwrap();

    let mut m = MaintenanceClient::new(channel.clone());
    let s = m.status(pb::StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(s.version, "3.5.0");
    assert_eq!(s.leader, DEFAULT_MEMBER_ID);
    assert_eq!(s.raft_term, 2);
    assert!(s.raft_index >= 1);
    assert_eq!(s.raft_applied_index, s.raft_index);
    assert!(s.errors.is_empty());
    assert_eq!(s.header.unwrap().member_id, DEFAULT_MEMBER_ID);

    let h = m
        .hash_kv(pb::HashKvRequest { revision: 0 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(h.header.unwrap().revision, 2);
    let again = m
        .hash_kv(pb::HashKvRequest { revision: 0 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(h.hash, again.hash);
    m.hash(pb::HashRequest {}).await.unwrap();

    let mut c = ClusterClient::new(channel);
    let list = c
        .member_list(pb::MemberListRequest {
            linearizable: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.members.len(), 1);
    let me = &list.members[0];
    assert_eq!(me.id, DEFAULT_MEMBER_ID);
    assert_eq!(me.name, "default");
    assert_eq!(me.peer_ur_ls, vec!["http://localhost:2380".to_string()]);
    assert_eq!(
        me.client_ur_ls,
        vec![format!("http://{}", server.client_addrs[0])]
    );
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn concurrent_writes_all_succeed_with_gapless_revisions() {
    let (server, channel) = start(Config::for_tests()).await;
    let mut tasks = Vec::new();
    for i in 0..64 {
        let mut kv = KvClient::new(channel.clone());
        tasks.push(tokio::spawn(async move {
            let mut revs = Vec::new();
            for j in 0..10 {
                let r = kv
                    .put(put(&format!("k{i}-{j}"), "v"))
                    .await
                    .unwrap()
                    .into_inner();
                revs.push(r.header.unwrap().revision);
            }
            revs
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort_unstable();
    assert_eq!(all, (2..2 + 640).collect::<Vec<i64>>());
    server.shutdown().await.unwrap();
}

#[cfg(feature = "rocksdb")]
#[tokio::test]
async fn rocksdb_member_keeps_acknowledged_writes_across_restart() {
    let dir = tempfile::tempdir().unwrap();
    let config = || {
        let mut c = Config::for_tests();
        c.engine = Engine::RocksDb;
        c.data_dir = dir.path().join("m.etcd");
        c
    };
    let (server, channel) = start(config()).await;
    let mut kv = KvClient::new(channel);
    for i in 0..20 {
        kv.put(put(&format!("key{i}"), &format!("value{i}")))
            .await
            .unwrap();
    }
    server.shutdown().await.unwrap();

    let (server, channel) = start(config()).await;
    let mut kv = KvClient::new(channel.clone());
    let resp = kv.range(get("key19")).await.unwrap().into_inner();
    assert_eq!(resp.kvs[0].value, &b"value19"[..]);
    let h = resp.header.unwrap();
    assert_eq!(h.revision, 21);
    // Every start is a new term, as every etcd restart is a new election.
    assert_eq!(h.raft_term, 3);
    let r = kv.put(put("after", "restart")).await.unwrap().into_inner();
    assert_eq!(r.header.unwrap().revision, 22);
    let s = MaintenanceClient::new(channel)
        .status(pb::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(s.db_size > 0);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn shutdown_finishes_in_flight_writes_and_refuses_new_connections() {
    let (server, channel) = start(Config::for_tests()).await;
    let addr = server.client_addrs[0];
    let mut kv = KvClient::new(channel);
    let writer = tokio::spawn(async move {
        let mut acked = 0;
        for i in 0..10_000 {
            match kv.put(put(&format!("k{i}"), "v")).await {
                Ok(_) => acked += 1,
                Err(_) => break,
            }
        }
        acked
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    server.shutdown().await.unwrap();
    let acked = writer.await.unwrap();
    assert!(acked > 0);
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn unimplemented_services_say_so() {
    use metastore_proto::etcdserverpb::auth_client::AuthClient;
    let (server, channel) = start(Config::for_tests()).await;
    let err = AuthClient::new(channel)
        .auth_enable(pb::AuthEnableRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);
    server.shutdown().await.unwrap();
}
