//! Differential tests with etcdctl (API v3): the same commands against a real etcd and
//! the server under test; stdout, exit code and the `Error:` line must be equal
//! (`-w json` output compared as JSON with member-specific header fields masked).

use std::time::Duration;

use metastore_tests::{mask_json, test_bounded, CmdOutput, Pair, Server};

const LIMIT: Duration = Duration::from_secs(150);

/// What is compared of one etcdctl run.
fn normalize(s: &Server, args: &[&str], out: &CmdOutput) -> String {
    let stdout = out.stdout.replace(&s.endpoint(), "<endpoint>");
    let json = args
        .iter()
        .any(|a| *a == "-w=json" || *a == "--write-out=json")
        || args.windows(2).any(|w| w[0] == "-w" && w[1] == "json");
    let stdout = if json && out.success() {
        match serde_json::from_str::<serde_json::Value>(&stdout) {
            Ok(mut v) => {
                mask_json(&mut v);
                serde_json::to_string_pretty(&v).unwrap()
            }
            Err(e) => format!("<invalid JSON: {e}> {stdout}"),
        }
    } else {
        // `-w fields` prints the header ids on their own lines.
        stdout
            .lines()
            .map(|l| {
                for f in ["\"ClusterID\"", "\"MemberID\"", "\"RaftTerm\""] {
                    if l.starts_with(f) {
                        return format!("{f} : <masked>");
                    }
                }
                l.to_string()
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    format!(
        "exit={:?}\nstdout:\n{}\nerror: {:?}",
        out.code,
        stdout,
        out.error_line()
    )
}

fn run(p: &mut Pair, args: &[&str], stdin: Option<&str>) -> String {
    let (e, s) = match stdin {
        None => (p.etcd.etcdctl(args), p.subject.etcdctl(args)),
        Some(i) => (
            p.etcd.etcdctl_stdin(args, i),
            p.subject.etcdctl_stdin(args, i),
        ),
    };
    let what = match stdin {
        None => format!("etcdctl {}", args.join(" ")),
        Some(i) => format!("etcdctl {} <<< {i:?}", args.join(" ")),
    };
    let en = normalize(&p.etcd, args, &e);
    let sn = normalize(&p.subject, args, &s);
    p.check_text(what, en, sn)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_kv() {
    test_bounded(LIMIT, async {
        let mut p = Pair::start().await;
        let cmds: &[&[&str]] = &[
            &["get", "foo"],
            &["put", "foo", "bar"],
            &["put", "foo", "bar2", "--prev-kv"],
            &["put", "foo", "bar3", "--prev-kv", "-w", "json"],
            &["get", "foo"],
            &["get", "foo", "-w", "json"],
            &["get", "foo", "-w", "fields"],
            &["put", "a/1", "one"],
            &["put", "a/2", "two"],
            &["put", "a/3", "three"],
            &["put", "b", "bee"],
            &["put", "a/2", "two-again"],
            &["put", "c", "sea"],
            &["put", "--", "-dash", "v"],
            &["get", "a", "--prefix"],
            &["get", "a/", "--prefix", "-w", "json"],
            &["get", "a", "--prefix", "--keys-only"],
            // etcdctl 3.4 has no --count-only / --min-mod-rev: those are covered by diff_grpc.
            &["get", "a", "--prefix", "--hex"],
            &["get", "a", "--prefix", "-w", "table"],
            &["get", "a", "--prefix", "--print-value-only"],
            &["get", "foo", "--print-value-only"],
            &["get", "b", "--from-key"],
            &["get", "", "--from-key", "--keys-only"],
            &["get", "", "--prefix", "-w", "json"],
            &["get", "a/1", "a/3"],
            &["get", "a", "--prefix", "--limit", "2"],
            &["get", "a", "--prefix", "--limit", "2", "-w", "json"],
            &["get", "", "--from-key", "--limit", "1", "-w", "json"],
            &[
                "get",
                "a",
                "--prefix",
                "--sort-by=MODIFY",
                "--order=DESCEND",
            ],
            &["get", "a", "--prefix", "--sort-by=CREATE", "--order=ASCEND"],
            &[
                "get",
                "a",
                "--prefix",
                "--sort-by=VERSION",
                "--order=DESCEND",
            ],
            &["get", "a", "--prefix", "--sort-by=VALUE"],
            &["get", "a", "--prefix", "--sort-by=KEY", "--order=DESCEND"],
            &["get", "", "--from-key", "--order=DESCEND", "--limit", "3"],
            &[
                "get",
                "",
                "--from-key",
                "--sort-by=MODIFY",
                "--limit",
                "2",
                "-w",
                "json",
            ],
            &["get", "a", "--prefix", "--order=SIDEWAYS"],
            &["get", "foo", "--rev", "2"],
            &["get", "foo", "--rev", "3", "-w", "json"],
            &["get", "a", "--prefix", "--rev", "6"],
            &["get", "foo", "--rev", "1000"],
            &["get", "foo", "--consistency=s"],
            &[
                "get",
                "a",
                "--prefix",
                "--keys-only",
                "--consistency=s",
                "-w",
                "json",
            ],
            &["del", "a/1"],
            &["del", "nope"],
            &["del", "a/1", "a/3", "--prev-kv"],
            &["del", "a", "--prefix", "--prev-kv", "-w", "json"],
            &["del", "b", "--from-key"],
            &["get", "", "--from-key"],
            &["put", "", "empty-key"],
            &["get", ""],
            &["del", ""],
            &["put", "k", "v", "--ignore-value"],
            &["put", "foo", "--ignore-value"],
            &["put", "k2", "v", "--lease", "1234"],
            &["put", "foo", "zz", "--ignore-lease"],
            &["get", "", "--from-key", "-w", "json"],
        ];
        for c in cmds {
            run(&mut p, c, None);
        }
        // Oversize value through stdin (etcdctl put reads the value from stdin).
        let big = "x".repeat(1536 * 1024 + 10);
        run(&mut p, &["put", "big"], Some(&big));
        run(&mut p, &["get", "big", "--keys-only"], None);
        p.finish();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_txn_compaction_endpoint() {
    test_bounded(LIMIT, async {
        let mut p = Pair::start().await;
        for c in [
            ["put", "foo", "bar"],
            ["put", "k1", "v1"],
            ["put", "k2", "v2"],
            ["put", "foo", "bar2"],
        ] {
            run(&mut p, &c, None);
        }
        let txns = [
            "value(\"foo\") = \"bar2\"\n\nput foo bar3\nget foo\ndel k1\n\nput foo fail\n\n",
            "value(\"foo\") = \"nope\"\n\nput foo bar4\n\nput k3 v3\nget k --prefix\n\n",
            "mod(\"k2\") > \"0\"\nversion(\"foo\") = \"3\"\ncreate(\"k2\") < \"100\"\n\nget k2\nget foo\n\n\n",
            "\n\nget foo\n\n\n",
            "\n\nput d 1\nput d 2\n\n\n",
            "version(\"nokey\") = \"0\"\n\nput nokey here\n\n\n",
            "lease(\"foo\") = \"0\"\n\nget foo\n\n\n",
        ];
        for t in txns {
            run(&mut p, &["txn"], Some(t));
            run(&mut p, &["txn", "-w", "json"], Some(t));
        }
        run(
            &mut p,
            &["txn", "--interactive"],
            Some("value(\"foo\") = \"bar4\"\n\nput foo bar5\n\nget foo\n\n"),
        );
        for c in [
            &["get", "", "--from-key", "-w", "json"][..],
            &["endpoint", "hashkv", "-w", "json"],
            &["compaction", "1000"],
            &["compaction", "0"],
            &["compaction", "3"],
            &["compaction", "3"],
            &["compaction", "2"],
            &["get", "foo", "--rev", "2"],
            &["get", "foo", "--rev", "3", "-w", "json"],
            &["get", "foo", "--rev", "99"],
            &["endpoint", "hashkv", "-w", "json"],
            &["compaction", "--physical", "6"],
            &["get", "", "--from-key", "--rev", "6", "-w", "json"],
            &["endpoint", "hashkv", "-w", "json"],
            &["put", "after", "compaction"],
            &["get", "", "--from-key", "-w", "json"],
            &["endpoint", "hashkv", "-w", "json"],
        ] {
            run(&mut p, c, None);
        }

        // endpoint status: ids, sizes, raft index and version legitimately differ; compare
        // what must agree.
        let summarize = |s: &Server| -> String {
            let out = s.etcdctl(&["endpoint", "status", "-w", "json"]);
            assert!(
                out.success(),
                "{}: endpoint status failed: {out:?}",
                s.kind.label()
            );
            let v: serde_json::Value = serde_json::from_str(&out.stdout)
                .unwrap_or_else(|e| panic!("{}: bad JSON {e}: {}", s.kind.label(), out.stdout));
            let st = &v[0]["Status"];
            format!(
                "revision={} leader_is_self={} version_present={} db_size_positive={} raft_term_positive={}",
                st["header"]["revision"],
                st["leader"] == st["header"]["member_id"] && st["leader"].as_u64().unwrap_or(0) != 0,
                st["version"].as_str().map(|x| !x.is_empty()).unwrap_or(false),
                st["dbSize"].as_i64().unwrap_or(0) > 0,
                st["raftTerm"].as_u64().unwrap_or(0) > 0,
            )
        };
        let (e, s) = (summarize(&p.etcd), summarize(&p.subject));
        p.check_text("etcdctl endpoint status -w json (summary)".into(), e, s);
        let (e, s) = (
            p.etcd.etcdctl(&["endpoint", "health"]),
            p.subject.etcdctl(&["endpoint", "health"]),
        );
        p.check_text(
            "etcdctl endpoint health (exit code)".into(),
            format!("{:?}", e.code),
            format!("{:?}", s.code),
        );
        p.finish();
    })
    .await
}
