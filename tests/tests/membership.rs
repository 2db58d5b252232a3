//! Cluster membership and leadership with etcdctl against a three-member MetaStore
//! cluster: member list (with published names and client URLs), `endpoint hashkv
//! --cluster`, adding a learner that joins with `--initial-cluster-state existing` and
//! catches up, what a learner refuses, promotion, `move-leader`, update and removal, and
//! etcd's errors for each.

use std::time::{Duration, Instant};

use metastore_proto::etcdserverpb::{MoveLeaderRequest, RangeRequest, StatusRequest};
use metastore_tests::cluster::Cluster;
use metastore_tests::{bounded, test_bounded, CmdOutput, Engine, Kind, Server};
use tonic::Code;

const FAST: &[&str] = &["--heartbeat-interval", "50", "--election-timeout", "500"];

fn ok(out: &CmdOutput, what: &str) -> String {
    assert!(out.success(), "{what}: {out:?}");
    out.stdout.clone()
}

fn endpoints(c: &Cluster) -> String {
    c.members
        .iter()
        .filter(|m| m.is_running())
        .map(|m| m.endpoint())
        .collect::<Vec<_>>()
        .join(",")
}

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// `etcdctl member list -w json` members: (id, name, client URL count, is_learner).
fn member_list(s: &Server) -> Vec<(u64, String, usize, bool)> {
    let out = ok(&s.etcdctl(&["member", "list", "-w", "json"]), "member list");
    let v = json(&out);
    v["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["ID"].as_u64().unwrap(),
                m["name"].as_str().unwrap_or("").to_string(),
                m["clientURLs"].as_array().map_or(0, |a| a.len()),
                m["isLearner"].as_bool().unwrap_or(false),
            )
        })
        .collect()
}

async fn serializable_revision(s: &Server) -> Option<i64> {
    // The member may not be listening yet: no panicking connect here.
    let ep = tonic::transport::Endpoint::from_shared(s.url())
        .ok()?
        .connect_timeout(Duration::from_secs(1));
    let ch = tokio::time::timeout(Duration::from_secs(2), ep.connect())
        .await
        .ok()?
        .ok()?;
    let mut kv = metastore_proto::etcdserverpb::kv_client::KvClient::new(ch);
    let r = tokio::time::timeout(
        Duration::from_secs(2),
        kv.range(RangeRequest {
            key: b"\0".to_vec(),
            range_end: b"\0".to_vec(),
            serializable: true,
            count_only: true,
            ..Default::default()
        }),
    )
    .await
    .ok()?
    .ok()?;
    Some(r.into_inner().header.unwrap().revision)
}

async fn eventually<F, Fut>(what: &str, limit: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !f().await {
        if Instant::now() > deadline {
            panic!("{what}: not within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn members_are_listed_added_promoted_updated_and_removed_with_etcdctl() {
    test_bounded(Duration::from_secs(300), async {
        let mut c = Cluster::start(Kind::Metastore(Engine::RocksDb), 3, FAST).await;
        let leader = c.leader(Duration::from_secs(20)).await;

        // Every member publishes its name and client URLs through the log.
        eventually(
            "members publish their attributes",
            Duration::from_secs(20),
            || async {
                let list = member_list(&c.members[0]);
                list.len() == 3
                    && list
                        .iter()
                        .all(|(_, name, urls, _)| !name.is_empty() && *urls == 1)
            },
        )
        .await;
        let list = member_list(&c.members[1]);
        let names: Vec<&str> = list.iter().map(|m| m.1.as_str()).collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(sorted, vec!["m1", "m2", "m3"]);

        // Every member has the same key space. `--cluster` makes etcdctl ask one member
        // for the member list and then dial every member's client URL directly, which
        // sends that URL as the HTTP/2 :authority (runtime/src/authority.rs).
        let out = ok(
            &c.members[0].etcdctl(&["put", "k", "v"]),
            "put before hashkv",
        );
        assert_eq!(out.trim(), "OK");
        tokio::time::sleep(Duration::from_millis(500)).await;
        let out = ok(
            &c.members[1].etcdctl(&["endpoint", "hashkv", "--cluster", "-w", "json"]),
            "endpoint hashkv --cluster",
        );
        let hashes: Vec<(String, u64)> = json(&out)
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                let ep = e["Endpoint"].as_str().unwrap().to_string();
                (ep, e["HashKV"]["hash"].as_u64().unwrap())
            })
            .collect();
        assert_eq!(hashes.len(), 3, "{out}");
        assert!(hashes.iter().all(|h| h.1 == hashes[0].1), "{out}");
        let mut urls: Vec<String> = hashes.into_iter().map(|h| h.0).collect();
        urls.sort();
        let mut expected: Vec<String> = c.members.iter().map(|m| m.url()).collect();
        expected.sort();
        assert_eq!(urls, expected, "{out}");
        // The same with the endpoints listed.
        let out = ok(
            &metastore_tests::etcdctl(&endpoints(&c), &["endpoint", "hashkv", "-w", "json"], None),
            "endpoint hashkv",
        );
        assert_eq!(json(&out).as_array().unwrap().len(), 3, "{out}");
        // `endpoint status --cluster`: three members, one leader, the one all agree on.
        let out = ok(
            &c.members[2].etcdctl(&["endpoint", "status", "--cluster", "-w", "json"]),
            "endpoint status --cluster",
        );
        let statuses = json(&out);
        let statuses = statuses.as_array().unwrap();
        assert_eq!(statuses.len(), 3, "{out}");
        let leaders: Vec<u64> = statuses
            .iter()
            .map(|e| e["Status"]["leader"].as_u64().unwrap())
            .collect();
        let members: Vec<u64> = statuses
            .iter()
            .map(|e| e["Status"]["header"]["member_id"].as_u64().unwrap())
            .collect();
        assert!(leaders.iter().all(|l| *l == leaders[0]), "{out}");
        assert!(members.contains(&leaders[0]), "{out}");
        // etcdctl reports health on stderr.
        let out = c.members[0].etcdctl(&["endpoint", "health", "--cluster"]);
        assert!(out.success(), "{out:?}");
        assert_eq!(out.stderr.matches("is healthy").count(), 3, "{out:?}");

        // Add a learner; it joins as an existing cluster's member and catches up.
        let mut m4 = Server::prepare(
            Kind::Metastore(Engine::RocksDb),
            "m4",
            &[FAST, &["--initial-cluster-state", "existing"]].concat(),
        );
        let peer4 = m4.peer_url();
        let leader_ep = c.members[leader].endpoint();
        let out = ok(
            &c.members[leader].etcdctl(&[
                "member",
                "add",
                "m4",
                "--peer-urls",
                &peer4,
                "--learner",
            ]),
            "member add --learner",
        );
        assert!(out.contains("added to cluster"), "{out}");
        assert!(
            out.contains("ETCD_INITIAL_CLUSTER_STATE=\"existing\""),
            "{out}"
        );
        let initial = c
            .members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url()))
            .chain([format!("m4={peer4}")])
            .collect::<Vec<_>>()
            .join(",");
        m4.initial_cluster = Some(initial);
        // Before it runs, the learner has none of the log: a promote is refused, also
        // when sent to a follower (which asks the leader, as etcd does).
        let learner_id = member_list(&c.members[leader])
            .iter()
            .find(|m| m.3)
            .expect("the learner is listed")
            .0;
        let follower = (leader + 1) % 3;
        let out = c.members[follower].etcdctl(&["member", "promote", &format!("{learner_id:x}")]);
        assert!(
            out.stderr.contains(
                "etcdserver: can only promote a learner member which is in sync with leader"
            ),
            "{out:?}"
        );
        m4.launch();
        let target = serializable_revision(&c.members[leader]).await.unwrap();
        eventually(
            "the learner catches up",
            Duration::from_secs(30),
            || async {
                serializable_revision(&m4)
                    .await
                    .is_some_and(|r| r >= target)
            },
        )
        .await;
        let m4_id = m4.member_id().await;
        let list = member_list(&c.members[0]);
        assert!(list.iter().any(|m| m.0 == m4_id && m.3), "{list:?}");
        // A second learner is one too many.
        let out = c.members[leader].etcdctl(&[
            "member",
            "add",
            "m5",
            "--peer-urls",
            "http://127.0.0.1:1",
            "--learner",
        ]);
        assert!(
            out.stderr
                .contains("etcdserver: too many learner members in cluster"),
            "{out:?}"
        );
        // An existing peer URL is refused.
        let out = c.members[leader].etcdctl(&["member", "add", "m6", "--peer-urls", &peer4]);
        assert!(
            out.stderr.contains("etcdserver: Peer URLs already exists"),
            "{out:?}"
        );

        // The learner serves serializable reads and Status only.
        let mut kv = m4.kv().await;
        let err = bounded("learner put", kv.put(metastore_tests::ops::put("x", "y")))
            .await
            .unwrap_err();
        assert_eq!(
            (err.code(), err.message()),
            (
                Code::Unavailable,
                "etcdserver: rpc not supported for learner"
            )
        );
        let err = bounded(
            "learner linearizable get",
            kv.range(metastore_tests::ops::get("k")),
        )
        .await
        .unwrap_err();
        assert_eq!(err.message(), "etcdserver: rpc not supported for learner");
        let s = m4
            .maintenance()
            .await
            .status(StatusRequest {})
            .await
            .unwrap()
            .into_inner();
        assert!(s.is_learner);

        // Promote it.
        let m4_hex = format!("{m4_id:x}");
        assert_eq!(m4_id, learner_id);
        // Through a follower: it forwards to the leader.
        eventually("member promote", Duration::from_secs(20), || {
            let out = c.members[follower].etcdctl(&["member", "promote", &m4_hex]);
            async move { out.success() && out.stdout.contains("promoted in cluster") }
        })
        .await;
        eventually(
            "the promoted member serves linearizable reads",
            Duration::from_secs(20),
            || async {
                let mut kv = m4.kv().await;
                kv.range(metastore_tests::ops::get("k")).await.is_ok()
            },
        )
        .await;
        let out = c.members[leader].etcdctl(&["member", "promote", &m4_hex]);
        assert!(
            out.stderr
                .contains("etcdserver: can only promote a learner member"),
            "{out:?}"
        );

        // move-leader to another voter.
        let to = (leader + 1) % 3;
        let to_id = c.members[to].member_id().await;
        let eps = endpoints(&c) + "," + &m4.endpoint();
        let out = ok(
            &metastore_tests::etcdctl(&eps, &["move-leader", &format!("{to_id:x}")], None),
            "move-leader",
        );
        assert!(out.contains("Leadership transferred"), "{out}");
        assert_eq!(c.leader(Duration::from_secs(10)).await, to);
        // Asked of a follower, or of an unknown target, MoveLeader fails as in etcd.
        let mut m = c.members[leader].maintenance().await;
        let err = m
            .move_leader(MoveLeaderRequest { target_id: to_id })
            .await
            .unwrap_err();
        assert_eq!(
            (err.code(), err.message()),
            (Code::FailedPrecondition, "etcdserver: not leader")
        );
        let mut m = c.members[to].maintenance().await;
        let err = m
            .move_leader(MoveLeaderRequest { target_id: 42 })
            .await
            .unwrap_err();
        assert_eq!(
            (err.code(), err.message()),
            (
                Code::FailedPrecondition,
                "etcdserver: bad leader transferee"
            )
        );
        drop(leader_ep);

        // Update: the same URLs are accepted; an unknown member is not found.
        let out = ok(
            &c.members[to].etcdctl(&["member", "update", &m4_hex, "--peer-urls", &peer4]),
            "member update",
        );
        assert!(out.contains("updated in cluster"), "{out}");
        let out = c.members[to].etcdctl(&[
            "member",
            "update",
            "2a",
            "--peer-urls",
            "http://127.0.0.1:9",
        ]);
        assert!(
            out.stderr.contains("etcdserver: member not found"),
            "{out:?}"
        );

        // Remove m4: it leaves, the others carry on.
        let out = ok(
            &c.members[to].etcdctl(&["member", "remove", &m4_hex]),
            "member remove",
        );
        assert!(out.contains("removed from cluster"), "{out}");
        let out = c.members[to].etcdctl(&["member", "remove", &m4_hex]);
        assert!(
            out.stderr.contains("etcdserver: member not found"),
            "{out:?}"
        );
        assert_eq!(member_list(&c.members[0]).len(), 3);
        eventually(
            "the removed member stops",
            Duration::from_secs(20),
            || async { !m4.is_running() },
        )
        .await;
        let out = ok(
            &c.members[0].etcdctl(&["put", "after", "removal"]),
            "put after removal",
        );
        assert_eq!(out.trim(), "OK");
        c.members[0].kill9();
    })
    .await;
}
