//! Differential test with the `etcd-client` crate: the same calls against a real etcd and
//! the server under test, answers compared through their Debug rendering with
//! cluster_id/member_id/raft_term masked.

use std::fmt::Debug;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, DeleteOptions, GetOptions, PutOptions, SortOrder, SortTarget, Txn,
    TxnOp,
};
use metastore_tests::{bounded, mask_debug, test_bounded, Kind, Server};

fn render<T: Debug>(r: Result<T, etcd_client::Error>) -> String {
    match r {
        Ok(v) => mask_debug(&format!("{v:?}")),
        Err(etcd_client::Error::GRpcStatus(s)) => {
            format!("error code={:?} message={:?}", s.code(), s.message())
        }
        Err(e) => format!("client error {e}"),
    }
}

struct Both {
    e: Client,
    s: Client,
    label: &'static str,
    diffs: Vec<String>,
    calls: usize,
}

/// Runs `$call` (an expression using the client `c`) on both clients and compares.
macro_rules! same {
    ($b:expr, $what:expr, |$c:ident| $call:expr) => {{
        let what: &str = $what;
        let e = {
            let $c = &mut $b.e;
            render(bounded(what, $call).await)
        };
        let s = {
            let $c = &mut $b.s;
            render(bounded(what, $call).await)
        };
        $b.calls += 1;
        if e != s {
            let m = format!(
                "DIFFERENCE on {what}\n  etcd:      {e}\n  {}: {s}",
                $b.label
            );
            eprintln!("{m}");
            $b.diffs.push(m);
        }
    }};
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_client_kv_sequence() {
    test_bounded(Duration::from_secs(120), async {
        let kind = Kind::subject();
        let (etcd, subject) = tokio::join!(Server::start(Kind::Etcd), Server::start(kind));
        let mut b = Both {
            e: etcd.etcd_client().await,
            s: subject.etcd_client().await,
            label: kind.label(),
            diffs: vec![],
            calls: 0,
        };

        same!(b, "get missing", |c| c.get("foo", None));
        same!(b, "put foo", |c| c.put("foo", "bar", None));
        same!(b, "put foo prev_kv", |c| c.put(
            "foo",
            "baz",
            Some(PutOptions::new().with_prev_key())
        ));
        for i in 0..10 {
            let k = format!("pre/{i}");
            let v = format!("v{i}");
            same!(b, &format!("put {k}"), |c| c.put(
                k.as_str(),
                v.as_str(),
                None
            ));
        }
        same!(b, "put pre/3 again", |c| c.put("pre/3", "again", None));
        same!(b, "get foo", |c| c.get("foo", None));
        same!(b, "get prefix", |c| c
            .get("pre/", Some(GetOptions::new().with_prefix())));
        same!(b, "get prefix limit 3", |c| c.get(
            "pre/",
            Some(GetOptions::new().with_prefix().with_limit(3))
        ));
        same!(b, "get from key", |c| c
            .get("pre/5", Some(GetOptions::new().with_from_key())));
        same!(b, "get all keys-only", |c| c.get(
            "",
            Some(GetOptions::new().with_all_keys().with_keys_only())
        ));
        same!(b, "get all count-only", |c| c.get(
            "",
            Some(GetOptions::new().with_all_keys().with_count_only())
        ));
        same!(b, "get range", |c| c
            .get("pre/2", Some(GetOptions::new().with_range("pre/6"))));
        for (t, o) in [
            (SortTarget::Mod, SortOrder::Descend),
            (SortTarget::Create, SortOrder::Ascend),
            (SortTarget::Value, SortOrder::Descend),
            (SortTarget::Version, SortOrder::Descend),
            (SortTarget::Key, SortOrder::Descend),
            (SortTarget::Mod, SortOrder::None),
        ] {
            same!(b, &format!("get sorted {t:?} {o:?}"), |c| c.get(
                "pre/",
                Some(
                    GetOptions::new()
                        .with_prefix()
                        .with_sort(t, o)
                        .with_limit(4)
                )
            ));
        }
        same!(b, "get at revision 3", |c| c.get(
            "",
            Some(GetOptions::new().with_all_keys().with_revision(3))
        ));
        same!(b, "get future revision", |c| c
            .get("foo", Some(GetOptions::new().with_revision(1000))));
        same!(b, "get serializable", |c| c
            .get("foo", Some(GetOptions::new().with_serializable())));
        same!(b, "get min/max mod rev", |c| c.get(
            "",
            Some(
                GetOptions::new()
                    .with_all_keys()
                    .with_min_mod_revision(4)
                    .with_max_mod_revision(9)
            )
        ));
        same!(b, "put empty key", |c| c.put("", "x", None));
        same!(b, "put ignore_value missing", |c| c.put(
            "nokey",
            "",
            Some(PutOptions::new().with_ignore_value())
        ));
        same!(b, "put ignore_value", |c| c.put(
            "foo",
            "",
            Some(PutOptions::new().with_ignore_value().with_prev_key())
        ));
        same!(b, "delete missing", |c| c.delete("zzz", None));
        same!(b, "delete foo prev", |c| c
            .delete("foo", Some(DeleteOptions::new().with_prev_key())));
        same!(b, "delete range", |c| c.delete(
            "pre/1",
            Some(DeleteOptions::new().with_range("pre/4").with_prev_key())
        ));
        same!(b, "txn success", |c| c.txn(
            Txn::new()
                .when(vec![Compare::value("pre/5", CompareOp::Equal, "v5")])
                .and_then(vec![
                    TxnOp::put("pre/5", "v5b", Some(PutOptions::new().with_prev_key())),
                    TxnOp::get("pre/", Some(GetOptions::new().with_prefix())),
                    TxnOp::delete("pre/9", None),
                ])
                .or_else(vec![TxnOp::get("pre/5", None)])
        ));
        same!(b, "txn failure", |c| c.txn(
            Txn::new()
                .when(vec![
                    Compare::version("pre/5", CompareOp::Greater, 5),
                    Compare::mod_revision("pre/6", CompareOp::Less, 100),
                ])
                .and_then(vec![TxnOp::put("x", "y", None)])
                .or_else(vec![
                    TxnOp::get("pre/5", None),
                    TxnOp::txn(Txn::new().and_then(vec![TxnOp::put("nested", "1", None)])),
                ])
        ));
        same!(b, "txn prefix compare", |c| c.txn(
            Txn::new()
                .when(vec![Compare::create_revision(
                    "pre/",
                    CompareOp::Greater,
                    0
                )
                .with_prefix()])
                .and_then(vec![TxnOp::get("nested", None)])
        ));
        same!(b, "txn duplicate", |c| c.txn(Txn::new().and_then(vec![
            TxnOp::put("d", "1", None),
            TxnOp::put("d", "2", None)
        ])));
        same!(b, "compact 5", |c| c.compact(5, None));
        same!(b, "compact 5 again", |c| c.compact(5, None));
        same!(b, "compact future", |c| c.compact(10_000, None));
        same!(b, "get compacted", |c| c
            .get("foo", Some(GetOptions::new().with_revision(2))));
        same!(b, "get all", |c| c
            .get("", Some(GetOptions::new().with_all_keys())));
        let (ehash, shash) = (
            bounded("etcd hash_kv", b.e.hash_kv(0)).await.unwrap(),
            bounded("subject hash_kv", b.s.hash_kv(0)).await,
        );
        let shash = shash.map(|h| (h.hash(), h.compact_version()));
        if Ok((ehash.hash(), ehash.compact_version()))
            != shash.as_ref().map_err(|e| e.to_string()).cloned()
        {
            b.diffs.push(format!(
                "DIFFERENCE on hash_kv(0)\n  etcd:      {:?}\n  {}: {shash:?}",
                (ehash.hash(), ehash.compact_version()),
                b.label
            ));
        }
        drop((etcd, subject));
        assert!(
            b.diffs.is_empty(),
            "{} difference(s) in {} calls:\n{}",
            b.diffs.len(),
            b.calls,
            b.diffs.join("\n\n")
        );
    })
    .await
}
