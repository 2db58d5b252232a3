//! Seeded random workload, differential: a few hundred random puts, deletes, ranges (all
//! options), txns (nested, with compares of every kind, sometimes invalid), compactions
//! and HashKV calls, sent to a real etcd and to the server under test in lockstep. The
//! first difference fails the test with the seed, the step and both answers; the final
//! HashKV must be equal too. Seeds are fixed; `METASTORE_RANDOM_SEEDS=1,2,3` and
//! `METASTORE_RANDOM_OPS=N` override them.

use std::time::Duration;

use metastore_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use metastore_proto::etcdserverpb::{
    CompactionRequest, Compare, DeleteRangeRequest, HashKvRequest, PutRequest, RangeRequest,
    RequestOp, TxnRequest,
};
use metastore_tests::ops::*;
use metastore_tests::{bounded, test_bounded, Engine, Kind, Pair, Rng};

const KEYS: &[&str] = &[
    "a", "b", "c", "d", "e", "k0", "k1", "k2", "k3", "p/0", "p/1", "p/2", "p/3", "p/4", "q",
];

struct Gen {
    rng: Rng,
    rev: i64,
    compacted: i64,
}

impl Gen {
    fn key(&mut self) -> Vec<u8> {
        match self.rng.below(40) {
            0 => vec![0xff],
            1 => vec![0xff, 0xff, 0x00],
            2 => vec![0x00],
            3 => vec![b'p', b'/', 0xff],
            _ => b(self.rng.pick(KEYS)),
        }
    }

    fn value(&mut self) -> Vec<u8> {
        let n = self.rng.below(12) as usize;
        (0..n).map(|_| b'a' + self.rng.below(6) as u8).collect()
    }

    /// A random (key, range_end): single key, prefix, [a, b), from-key, all.
    fn span(&mut self) -> (Vec<u8>, Vec<u8>) {
        match self.rng.below(6) {
            0 | 1 => (self.key(), vec![]),
            2 => {
                let p: &[u8] =
                    self.rng
                        .pick(&[&b"p/"[..], b"k", b"a", b"p", &[0xff], &[0xff, 0xff]]);
                (p.to_vec(), prefix_end(p))
            }
            3 => {
                let (x, y) = (self.key(), self.key());
                (x, y)
            }
            4 => (self.key(), vec![0]),
            _ => (vec![0], vec![0]),
        }
    }

    fn some_rev(&mut self) -> i64 {
        match self.rng.below(4) {
            0 => 0,
            1 => self
                .rng
                .range_i64((self.compacted - 2).max(0), self.rev + 2),
            2 => self.rng.range_i64(self.compacted.max(1), self.rev.max(1)),
            _ => self.rev,
        }
    }

    fn range(&mut self) -> RangeRequest {
        let (key, range_end) = self.span();
        let mut r = RangeRequest {
            key,
            range_end,
            ..Default::default()
        };
        if self.rng.chance(30) {
            r.limit = self.rng.range_i64(-1, 4);
        }
        if self.rng.chance(25) {
            r.revision = self.some_rev();
        }
        if self.rng.chance(2) {
            r.revision = -1;
        }
        if self.rng.chance(3) {
            r.range_end = r.key.clone();
        }
        if self.rng.chance(30) {
            r.sort_order = self.rng.range_i64(0, 2) as i32;
            r.sort_target = self.rng.range_i64(0, 4) as i32;
        }
        r.serializable = self.rng.chance(20);
        r.keys_only = self.rng.chance(15);
        r.count_only = self.rng.chance(10);
        if self.rng.chance(10) {
            r.min_mod_revision = self.rng.range_i64(0, self.rev);
        }
        if self.rng.chance(10) {
            r.max_mod_revision = self.rng.range_i64(0, self.rev);
        }
        if self.rng.chance(10) {
            r.min_create_revision = self.rng.range_i64(0, self.rev);
        }
        if self.rng.chance(10) {
            r.max_create_revision = self.rng.range_i64(0, self.rev);
        }
        r
    }

    fn put(&mut self) -> PutRequest {
        let mut p = PutRequest {
            key: self.key(),
            value: self.value(),
            prev_kv: self.rng.chance(40),
            ..Default::default()
        };
        if self.rng.chance(7) {
            p.ignore_value = true;
            p.value.clear();
        }
        if self.rng.chance(3) {
            p.ignore_lease = true;
        }
        if self.rng.chance(2) {
            p.key.clear();
        }
        p
    }

    fn delete(&mut self) -> DeleteRangeRequest {
        let (key, range_end) = if self.rng.chance(70) {
            (self.key(), vec![])
        } else {
            self.span()
        };
        DeleteRangeRequest {
            key,
            range_end,
            prev_kv: self.rng.chance(50),
        }
    }

    fn compare(&mut self) -> Compare {
        let result = self.rng.range_i64(0, 3) as i32;
        let target = self.rng.range_i64(0, 4) as i32;
        let key = self.key();
        let union = match CompareTarget::try_from(target).unwrap() {
            CompareTarget::Version => TargetUnion::Version(self.rng.range_i64(0, 4)),
            CompareTarget::Create => TargetUnion::CreateRevision(self.rng.range_i64(0, self.rev)),
            CompareTarget::Mod => TargetUnion::ModRevision(self.rng.range_i64(0, self.rev + 1)),
            CompareTarget::Value => TargetUnion::Value(self.value()),
            CompareTarget::Lease => TargetUnion::Lease(self.rng.range_i64(-1, 1)),
        };
        let _ = CompareResult::try_from(result).unwrap();
        let range_end = if self.rng.chance(15) {
            self.span().1
        } else {
            vec![]
        };
        Compare {
            result,
            target,
            key,
            target_union: Some(union),
            range_end,
        }
    }

    fn ops(&mut self, depth: u32) -> Vec<RequestOp> {
        let n = self.rng.below(4) as usize;
        (0..n)
            .map(|_| match self.rng.below(10) {
                0..=3 => {
                    // etcd 3.4 panics (and dies) on an ignore_value put whose key an earlier
                    // op of the same txn deleted, so txns never carry ignore_value.
                    let mut p = self.put();
                    p.ignore_value = false;
                    op_put(p)
                }
                4 | 5 => op_del(self.delete()),
                6..=8 => op_get(self.range()),
                _ if depth < 2 => op_txn(self.txn(depth + 1)),
                _ => op_get(self.range()),
            })
            .collect()
    }

    fn txn(&mut self, depth: u32) -> TxnRequest {
        let n = self.rng.below(3) as usize;
        TxnRequest {
            compare: (0..n).map(|_| self.compare()).collect(),
            success: self.ops(depth),
            failure: self.ops(depth),
        }
    }
}

/// Runs one seed against etcd and `kind`; returns the differences and the subject's final
/// HashKV.
async fn run_seed(kind: Kind, seed: u64, steps: usize) -> (Vec<String>, u32) {
    let mut p = Pair::start_subject(kind).await;
    // Differences on reads (Range, HashKV) are collected and the run goes on; after a
    // difference on a write the two stores may have diverged, so the run stops there.
    let mut g = Gen {
        rng: Rng::new(seed),
        rev: 1,
        compacted: 0,
    };
    let mut unsettled = false;
    for step in 0..steps {
        let ctx = format!("seed {seed} step {step}");
        let before = p.mismatches.len();
        let dice = g.rng.below(100);
        let rev = match dice {
            0..=29 => p.put(g.put()).await.ok().and_then(|r| r.header),
            30..=39 => p.delete_range(g.delete()).await.ok().and_then(|r| r.header),
            40..=64 => p.range(g.range()).await.ok().and_then(|r| r.header),
            65..=89 => p.txn(g.txn(0)).await.ok().and_then(|r| r.header),
            90..=95 => {
                let revision = g.rng.range_i64(g.compacted - 1, g.rev + 1);
                let physical = g.rng.chance(50);
                let r = p.compact(CompactionRequest { revision, physical }).await;
                if r.is_ok() {
                    g.compacted = revision;
                    unsettled |= !physical;
                }
                r.ok().and_then(|r| r.header)
            }
            _ => {
                if unsettled {
                    // etcd compacts in the background unless `physical` is set, and its
                    // HashKV races with that (two etcds disagree with each other): give the
                    // background compaction time to finish so etcd's answer is the settled one.
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    unsettled = false;
                }
                let mut revision = g.some_rev();
                if revision == g.compacted && revision > 0 {
                    // Known difference (docs/compatibility.md): HashKV at exactly the
                    // compacted revision (etcd 3.4 refuses, 3.5 and MetaStore answer);
                    // asserted by diff_grpc::hashkv_at_compacted_revision_follows_etcd_3_5.
                    revision += 1;
                }
                p.hash_kv(revision).await.ok().and_then(|r| r.header)
            }
        };
        if p.mismatches.len() > before {
            let last = p.mismatches.pop().unwrap();
            p.mismatches.push(format!("[{ctx}] {last}"));
            let write = !(40..=64).contains(&dice) && dice < 96;
            if write || p.mismatches.len() >= 10 {
                break;
            }
        }
        if let Some(h) = rev {
            assert!(h.revision >= g.rev, "{ctx}: etcd's revision went back");
            g.rev = h.revision;
        }
    }
    let _ = p.range(get_all()).await;
    if unsettled {
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let _ = p.hash_kv(0).await;
    eprintln!(
        "seed {seed}: {} calls compared, final revision {}, compacted {}",
        p.calls, g.rev, g.compacted
    );
    let mut smt = p.smt.clone();
    let hash = bounded(
        "subject hash_kv",
        smt.hash_kv(HashKvRequest { revision: 0 }),
    )
    .await
    .expect("subject hash_kv")
    .into_inner()
    .hash;
    (std::mem::take(&mut p.mismatches), hash)
}

/// Runs every seed (a difference in one does not hide the others), then fails listing all.
async fn run_seeds(seeds: &[u64]) {
    let mut all = Vec::new();
    for &seed in seeds {
        all.extend(run_seed(Kind::subject(), seed, steps()).await.0);
    }
    assert!(
        all.is_empty(),
        "{} difference(s) between etcd and {} over seeds {seeds:?}:\n\n{}",
        all.len(),
        metastore_tests::Kind::subject().label(),
        all.join("\n\n")
    );
}

fn seeds(default: &[u64]) -> Vec<u64> {
    match std::env::var("METASTORE_RANDOM_SEEDS") {
        Ok(s) => s
            .split(',')
            .map(|x| x.trim().parse().expect("METASTORE_RANDOM_SEEDS: numbers"))
            .collect(),
        Err(_) => default.to_vec(),
    }
}

fn steps() -> usize {
    std::env::var("METASTORE_RANDOM_OPS")
        .ok()
        .map(|s| s.parse().expect("METASTORE_RANDOM_OPS: a number"))
        .unwrap_or(300)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_workload_seeds_a() {
    test_bounded(Duration::from_secs(480), async {
        run_seeds(&seeds(&[1, 2])).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_workload_seeds_b() {
    if std::env::var("METASTORE_RANDOM_SEEDS").is_ok() {
        return; // the override runs in _a only
    }
    test_bounded(Duration::from_secs(480), async {
        run_seeds(&[3, 4]).await;
    })
    .await
}

/// The same operation log applied to the memory and the RocksDB engine gives the same
/// HashKV (and each matches etcd along the way).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_and_rocksdb_engines_agree() {
    if Kind::subject() == Kind::Etcd {
        return; // engines are metastore's
    }
    test_bounded(Duration::from_secs(480), async {
        let seed = 7;
        let (d1, h1) = run_seed(Kind::Metastore(Engine::RocksDb), seed, steps()).await;
        let (d2, h2) = run_seed(Kind::Metastore(Engine::Memory), seed, steps()).await;
        assert_eq!(
            h1, h2,
            "seed {seed}: final HashKV differs between the RocksDB ({h1}) and memory ({h2}) engines"
        );
        let all: Vec<String> = d1.into_iter().chain(d2).collect();
        assert!(
            all.is_empty(),
            "differences from etcd:\n\n{}",
            all.join("\n\n")
        );
    })
    .await
}
