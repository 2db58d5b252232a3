//! Leases against what their clients observed.
//!
//! [`check_leases`] (safety) judges every [`LeaseRecord`] of a history. A lease cannot
//! expire before `invoked + TTL` of its grant or of any keep-alive that renewed it (the
//! leader starts a TTL no earlier than it receives the request, and a new leader only
//! extends), call the latest such instant its *deadline*. Only a revoke deletes a lease
//! key (no other client writes `kL…` keys). Then, unless the client invoked a revoke
//! before the observation completed:
//!
//! - no read of the key that completed before the deadline finds it absent (when the
//!   put was acknowledged);
//! - no keep-alive that completed before the deadline answers TTL 0;
//! - no operation that completed before the deadline returned a header revision at or
//!   after the revision of the key's DELETE event on any watch stream (that revision
//!   was created at the expiry, so nothing can have seen it earlier);
//!
//! and, once the lease is known to be gone (a revoke was answered, or a keep-alive
//! answered TTL 0), a read invoked afterwards must not find the key.
//!
//! [`check_lease_expiry`] (liveness) judges the end of a run: after the heal, a key
//! whose lease was last renewed (or granted) more than TTL + grace before a final
//! linearizable range must not be in it.
//!
//! Like every checker it must never panic and never fail a history a correct store
//! could produce.

use std::collections::HashMap;

use super::{show_bytes, CheckKind, Section, Violation, WatchExcerpt};
use crate::history::{History, KvRecord, LeaseRecord};

fn secs(ns: u64) -> String {
    format!("{:.3}s", ns as f64 / 1e9)
}

fn violation(lease: &LeaseRecord, message: String) -> Violation {
    Violation::new(
        CheckKind::Lease,
        Some(&lease.key),
        format!("{message}\n  lease: {lease}"),
    )
}

/// An observation of the store's revision: who, when it completed, and the revision.
#[derive(Clone, Copy)]
enum Seen<'h> {
    Kv(&'h KvRecord),
    LeaseRead(&'h LeaseRecord),
}

pub fn check_leases(history: &History) -> Result<(), Violation> {
    for lease in &history.leases {
        check_one(lease)?;
    }
    check_deletes_against_revisions(history)
}

fn check_one(lease: &LeaseRecord) -> Result<(), Violation> {
    let deadline = lease.alive_until_ns();
    if lease.put_revision.is_some() {
        for read in &lease.reads {
            if !read.present
                && read.completed_ns < deadline
                && !lease.revoke_invoked_before(read.completed_ns)
            {
                return Err(violation(
                    lease,
                    format!(
                        "the key was gone at a read completed at {} (rev {}), before the lease \
                         could have expired ({}) and with no revoke invoked",
                        secs(read.completed_ns),
                        read.revision,
                        secs(deadline)
                    ),
                ));
            }
        }
    }
    for k in &lease.keep_alives {
        if k.ttl <= 0 && k.completed_ns < deadline && !lease.revoke_invoked_before(k.completed_ns) {
            return Err(violation(
                lease,
                format!(
                    "a keep-alive completed at {} answered TTL {}, before the lease could have \
                     expired ({}) and with no revoke invoked",
                    secs(k.completed_ns),
                    k.ttl,
                    secs(deadline)
                ),
            ));
        }
    }
    // Once the lease is known gone, the key must be gone.
    let gone_at = lease
        .keep_alives
        .iter()
        .filter(|k| k.ttl <= 0)
        .map(|k| (k.completed_ns, "a keep-alive answered TTL 0"))
        .chain(lease.revoke.iter().filter_map(|r| {
            let at = r.completed_ns?;
            match r.revoked? {
                true => Some((at, "the revoke was acknowledged")),
                false => Some((at, "the revoke found no lease")),
            }
        }))
        .min_by_key(|(at, _)| *at);
    if let Some((at, why)) = gone_at {
        if let Some(read) = lease.reads.iter().find(|r| r.present && r.invoked_ns > at) {
            return Err(violation(
                lease,
                format!(
                    "{why} at {}, yet a read invoked at {} still found the key (rev {})",
                    secs(at),
                    secs(read.invoked_ns),
                    read.revision
                ),
            ));
        }
    }
    Ok(())
}

/// A lease key's DELETE at revision `R` happens at the lease's expiry (or revoke): an
/// operation that completed before the deadline cannot have seen revision `R`.
fn check_deletes_against_revisions(history: &History) -> Result<(), Violation> {
    if history.leases.is_empty() {
        return Ok(());
    }
    // Every observed (completion, revision), by completion time, with the running
    // maximum of revisions.
    let mut seen: Vec<(u64, i64, Seen<'_>)> = Vec::new();
    for r in &history.kv {
        if let (Some(at), Some(outcome)) = (r.completed_ns, &r.outcome) {
            seen.push((at, outcome.revision(), Seen::Kv(r)));
        }
    }
    for lease in &history.leases {
        for read in &lease.reads {
            seen.push((read.completed_ns, read.revision, Seen::LeaseRead(lease)));
        }
    }
    seen.sort_by_key(|(at, revision, _)| (*at, *revision));
    // best[i]: the index in `seen[..=i]` with the highest revision.
    let mut best: Vec<usize> = Vec::with_capacity(seen.len());
    for (i, (_, revision, _)) in seen.iter().enumerate() {
        let b = match best.last() {
            Some(&b) if seen[b].1 >= *revision => b,
            _ => i,
        };
        best.push(b);
    }

    // The first DELETE of each lease key on any stream.
    let mut deletes: HashMap<&[u8], (i64, usize, usize)> = HashMap::new();
    for (i, w) in history.watches.iter().enumerate() {
        for (ri, (_, events)) in w.responses.iter().enumerate() {
            for e in events.iter().filter(|e| e.deleted) {
                let entry = deletes.entry(&e.key).or_insert((e.revision, i, ri));
                if e.revision < entry.0 {
                    *entry = (e.revision, i, ri);
                }
            }
        }
    }
    for lease in &history.leases {
        let Some(&(deleted_at, wi, ri)) = deletes.get(lease.key.as_slice()) else {
            continue;
        };
        // Observations that count completed before the deadline and, when the client
        // revoked, no later than the revoke's invocation.
        let mut limit = lease.alive_until_ns();
        if let Some(r) = &lease.revoke {
            limit = limit.min(r.invoked_ns.saturating_add(1));
        }
        let n = seen.partition_point(|(at, _, _)| *at < limit);
        if n == 0 {
            continue;
        }
        let (at, revision, who) = seen[best[n - 1]];
        if revision < deleted_at {
            continue;
        }
        let mut v = violation(
            lease,
            format!(
                "the key's DELETE is at revision {deleted_at}, yet an operation completed at {} \
                 had already seen revision {revision}, before the lease could have expired ({})",
                secs(at),
                secs(lease.alive_until_ns())
            ),
        );
        match who {
            Seen::Kv(r) => v = v.with(Section::kv("the operation", vec![r.clone()])),
            Seen::LeaseRead(other) => {
                v.message
                    .push_str(&format!("\n  the read was of lease: {other}"));
            }
        }
        let w = &history.watches[wi];
        let excerpt = WatchExcerpt::response(wi, w, ri);
        return Err(v.with(Section::watch("the DELETE", vec![excerpt])));
    }
    Ok(())
}

/// Liveness at the end of a run: `present` are the lease keys a linearizable range
/// invoked at `checked_ns` returned. A lease not renewed for longer than its TTL plus
/// `grace_ns` before then must have taken its key with it.
pub fn check_lease_expiry(
    leases: &[LeaseRecord],
    present: &[Vec<u8>],
    checked_ns: u64,
    grace_ns: u64,
) -> Result<(), Violation> {
    for lease in leases {
        let expired_by = lease
            .renewed_until_ns
            .max(lease.grant_completed_ns)
            .saturating_add((lease.ttl.max(0) as u64).saturating_mul(1_000_000_000))
            .saturating_add(grace_ns);
        if expired_by < checked_ns && present.contains(&lease.key) {
            return Err(violation(
                lease,
                format!(
                    "the key {} was still there at {}, {} after the lease was last renewed \
                     (TTL {}s)",
                    show_bytes(&lease.key),
                    secs(checked_ns),
                    secs(checked_ns.saturating_sub(lease.renewed_until_ns)),
                    lease.ttl
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{
        KeepAlive, KvOp, KvOutcome, LeaseRead, LeaseRevoke, WatchEnd, WatchRecord, WatchedEvent,
    };

    const S: u64 = 1_000_000_000;

    /// Granted at 1 s (TTL 3), put at rev 5, kept alive at 2 s and 3 s (so alive until
    /// 6 s), not renewed after 3.5 s, read present at 4 s and absent at 7.5 s.
    fn lease() -> LeaseRecord {
        LeaseRecord {
            client: 0,
            id: 42,
            ttl: 3,
            grant_invoked_ns: S,
            grant_completed_ns: S + 1000,
            key: b"kL0-1".to_vec(),
            value: b"L0-1".to_vec(),
            put_revision: Some(5),
            keep_alives: vec![
                KeepAlive {
                    invoked_ns: 2 * S,
                    completed_ns: 2 * S + 1000,
                    ttl: 3,
                },
                KeepAlive {
                    invoked_ns: 3 * S,
                    completed_ns: 3 * S + 1000,
                    ttl: 3,
                },
            ],
            unanswered_keep_alives: vec![],
            renewed_until_ns: 3 * S + S / 2,
            revoke: None,
            reads: vec![
                LeaseRead {
                    invoked_ns: 4 * S,
                    completed_ns: 4 * S + 1000,
                    present: true,
                    revision: 8,
                },
                LeaseRead {
                    invoked_ns: 7 * S + S / 2,
                    completed_ns: 7 * S + S / 2 + 1000,
                    present: false,
                    revision: 12,
                },
            ],
        }
    }

    fn delete_stream(revision: i64) -> WatchRecord {
        WatchRecord {
            watcher: 0,
            member: 0,
            key: b"k".to_vec(),
            range_end: b"l".to_vec(),
            start_revision: 1,
            created_revision: 0,
            prev_kv: false,
            responses: vec![
                (
                    5,
                    vec![WatchedEvent {
                        key: b"kL0-1".to_vec(),
                        deleted: false,
                        revision: 5,
                        value: b"L0-1".to_vec(),
                        prev: None,
                    }],
                ),
                (
                    revision,
                    vec![WatchedEvent {
                        key: b"kL0-1".to_vec(),
                        deleted: true,
                        revision,
                        value: vec![],
                        prev: None,
                    }],
                ),
            ],
            end: WatchEnd::Stopped,
            started_ns: 0,
            ended_ns: 20 * S,
        }
    }

    fn get(completed_ns: u64, revision: i64) -> KvRecord {
        KvRecord {
            client: 3,
            op: KvOp::Get {
                key: b"k0".to_vec(),
            },
            invoked_ns: completed_ns - 1000,
            completed_ns: Some(completed_ns),
            outcome: Some(KvOutcome::Get { revision, kv: None }),
        }
    }

    fn history(lease: LeaseRecord) -> History {
        History {
            kv: vec![get(5 * S, 9), get(7 * S, 11)],
            watches: vec![delete_stream(10)],
            leases: vec![lease],
        }
    }

    fn rejects(h: &History, needle: &str) {
        let v = check_leases(h).expect_err("a violation");
        assert_eq!(v.check, CheckKind::Lease);
        let shown = v.to_string();
        assert!(shown.contains(needle), "expected {needle:?} in:\n{shown}");
    }

    #[test]
    fn accepts_a_lease_that_expired_after_its_deadline() {
        assert_eq!(check_leases(&history(lease())), Ok(()));
        assert_eq!(lease().alive_until_ns(), 6 * S);
    }

    #[test]
    fn rejects_a_key_read_absent_before_its_ttl_could_run_out() {
        let mut l = lease();
        l.reads[0].present = false;
        rejects(
            &History {
                leases: vec![l],
                ..History::default()
            },
            "key was gone",
        );
    }

    #[test]
    fn accepts_an_early_absence_after_a_revoke() {
        let mut l = lease();
        l.reads[0].present = false;
        l.revoke = Some(LeaseRevoke {
            invoked_ns: 3 * S + S / 2,
            completed_ns: None,
            revoked: None,
        });
        assert_eq!(
            check_leases(&History {
                leases: vec![l],
                ..History::default()
            }),
            Ok(())
        );
    }

    #[test]
    fn rejects_an_early_ttl_zero_keep_alive() {
        let mut l = lease();
        l.keep_alives.push(KeepAlive {
            invoked_ns: 3 * S + S / 4,
            completed_ns: 3 * S + S / 4 + 1000,
            ttl: 0,
        });
        rejects(
            &History {
                leases: vec![l],
                ..History::default()
            },
            "answered TTL 0",
        );
    }

    #[test]
    fn rejects_a_key_present_after_an_acknowledged_revoke() {
        let mut l = lease();
        l.revoke = Some(LeaseRevoke {
            invoked_ns: 3 * S + S / 2,
            completed_ns: Some(3 * S + S / 2 + 1000),
            revoked: Some(true),
        });
        rejects(
            &History {
                leases: vec![l],
                ..History::default()
            },
            "still found the key",
        );
    }

    #[test]
    fn rejects_a_revision_past_the_delete_seen_before_the_deadline() {
        // An operation completed at 5 s saw revision 10, the DELETE's revision: the
        // expiry cannot have happened before 6 s.
        let mut h = history(lease());
        h.kv[0] = get(5 * S, 10);
        rejects(&h, "DELETE is at revision 10");
        // With a revoke invoked before, it may.
        let mut l = lease();
        l.revoke = Some(LeaseRevoke {
            invoked_ns: 4 * S + S / 2,
            completed_ns: None,
            revoked: None,
        });
        h.leases = vec![l];
        assert_eq!(check_leases(&h), Ok(()));
    }

    #[test]
    fn liveness_accepts_gone_keys_and_fresh_leases() {
        let l = lease();
        // Renewed until 3.5 s, TTL 3, grace 10: due by 16.5 s.
        assert_eq!(
            check_lease_expiry(std::slice::from_ref(&l), &[], 30 * S, 10 * S),
            Ok(())
        );
        assert_eq!(
            check_lease_expiry(
                std::slice::from_ref(&l),
                std::slice::from_ref(&l.key),
                16 * S,
                10 * S
            ),
            Ok(())
        );
    }

    #[test]
    fn liveness_rejects_a_key_long_past_its_lease() {
        let l = lease();
        let v = check_lease_expiry(
            std::slice::from_ref(&l),
            std::slice::from_ref(&l.key),
            17 * S,
            10 * S,
        )
        .expect_err("a violation");
        assert!(v.to_string().contains("still there"), "{v}");
    }

    #[test]
    fn odd_records_do_not_panic() {
        let mut l = lease();
        l.ttl = -5;
        l.keep_alives[0].ttl = i64::MAX / 2;
        l.renewed_until_ns = u64::MAX;
        let h = History {
            leases: vec![l.clone()],
            ..History::default()
        };
        let _ = check_leases(&h);
        let _ = check_lease_expiry(&[l], &[], u64::MAX, u64::MAX);
    }
}
