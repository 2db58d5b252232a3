//! The leader's lease clock (etcd's primary lessor): when each lease expires, which
//! expired leases to revoke and how fast, when to checkpoint remaining TTLs, and renewals.
//!
//! Owns expiry *time*, which the state machine never sees: deadlines live here, in a
//! priority queue, only while this member leads. It follows the lease table through the
//! apply path ([`EventSink::leases_changed`], under the state machine's write lock), takes
//! the whole table over on promotion (under the read lock), and forgets everything on
//! demotion. It must never change the lease table itself: an expiry becomes effect only
//! through a replicated `LeaseRevoke` proposed by [`run`], rate-limited as etcd's
//! `leaseRevokeRate`, and a checkpoint only through a replicated `LeaseCheckpoint`.
//! Time is tokio's (`tokio::time::Instant`), so it is simulated under madsim.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use metastore_core::lease::LeaseChange;
use metastore_core::StateMachine;
use metastore_proto::etcdserverpb as pb;
use metastore_proto::metastore::internal_request::Request as Envelope;
use metastore_proto::mvccpb;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::api::Api;
use crate::replication::{read_state, EventSink};
use crate::signal as watch;

/// etcd's `expiredLeaseRetryInterval`: an expired lease whose revoke has not been applied
/// by then is revoked again.
const REVOKE_RETRY: Duration = Duration::from_secs(3);
/// etcd's `maxLeaseCheckpointBatchSize`.
const MAX_CHECKPOINT_BATCH: usize = 1000;
/// While the revoke rate limit holds a backlog back, the task waits at least this long
/// between batches.
const REVOKE_BATCH_WAIT: Duration = Duration::from_millis(5);
/// How often the expiry task looks at leadership when no deadline is due sooner. A new
/// leader extends every lease by an election timeout, so this only delays the takeover.
const LEADERSHIP_POLL: Duration = Duration::from_millis(100);

/// The lessor's settings (from the flags).
#[derive(Debug, Clone, Copy)]
pub struct LessorConfig {
    /// Added to every remaining TTL on promotion (etcd extends by an election timeout).
    pub extend: Duration,
    /// Expired leases revoked per second at most (etcd's `leaseRevokeRate`).
    pub revoke_rate: u32,
    /// Checkpoint interval, when lease checkpoints are on.
    pub checkpoint_interval: Option<Duration>,
}

impl Default for LessorConfig {
    fn default() -> Self {
        Self {
            extend: Duration::from_secs(1),
            revoke_rate: crate::config::DEFAULT_LEASE_REVOKE_RATE,
            checkpoint_interval: None,
        }
    }
}

/// A lease as the leader times it.
#[derive(Debug, Clone, Copy)]
struct Timing {
    /// Granted TTL, seconds.
    ttl: i64,
    /// Last checkpointed remaining TTL, seconds (0 = none).
    remaining_ttl: i64,
    expiry: Instant,
    /// When this lease's next checkpoint is due (at most one is pending, however often
    /// its checkpoints are cleared by renewals).
    checkpoint_due: Option<Instant>,
    /// Set once the lease was found expired and its revoke proposed: the expiry it had.
    /// Such a lease is not renewable any more (etcd's `Renew` of an expired lease waits
    /// for the revoke and answers not-found): the revoke is already on its way through
    /// the log, and a renewal answered now would promise a TTL the revoke then breaks.
    /// (`expiry` meanwhile holds the time to retry the revoke.)
    revoke_since: Option<Instant>,
}

impl Timing {
    /// When the lease runs out: its expiry, or the one it had when its revoke was sent
    /// (`expiry` then holds the retry time).
    fn deadline(&self) -> Instant {
        self.revoke_since.unwrap_or(self.expiry)
    }

    /// etcd's `RemainingTTL`: the checkpointed remaining TTL if any, else the full TTL.
    fn remaining_ttl_or_ttl(&self) -> i64 {
        if self.remaining_ttl > 0 {
            self.remaining_ttl
        } else {
            self.ttl
        }
    }
}

#[derive(Default)]
struct Inner {
    primary: bool,
    /// The term this member was promoted in; another term means another promotion.
    term: u64,
    leases: HashMap<i64, Timing>,
    /// (expiry, id), earliest first. Entries whose expiry no longer matches the lease's
    /// are stale and skipped; the heap is rebuilt when stale ones pile up.
    expiries: BinaryHeap<Reverse<(Instant, i64)>>,
    /// (due, id) of scheduled checkpoints.
    checkpoints: BinaryHeap<Reverse<(Instant, i64)>>,
}

/// What a renewal found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    /// Renewed for `ttl` seconds; `clear_checkpoint` asks the caller to replicate a
    /// checkpoint of 0 first, as etcd does, so a stale remaining TTL is not restored.
    Renewed { ttl: i64, clear_checkpoint: bool },
    /// No such lease (TTL 0 for the client).
    NotFound,
    /// The lease ran out and its revoke is pending: the caller waits for the revoke and
    /// answers TTL 0, as etcd does.
    Expired,
    /// This member does not lead: keep-alives must go to the leader.
    NotPrimary,
}

/// The primary lessor. Shared by the apply path (changes), the Lease service (renewals,
/// time to live) and the expiry task.
pub struct PrimaryLessor {
    config: LessorConfig,
    inner: Mutex<Inner>,
    wake: Notify,
}

impl PrimaryLessor {
    pub fn new(config: LessorConfig) -> Self {
        Self {
            config,
            inner: Mutex::new(Inner::default()),
            wake: Notify::new(),
        }
    }

    pub fn config(&self) -> &LessorConfig {
        &self.config
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The lessor's state is timers only; a panic elsewhere cannot leave it worse than
        // stale deadlines, so a poisoned lock is taken over.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn is_primary(&self) -> bool {
        self.lock().primary
    }

    pub fn term(&self) -> u64 {
        self.lock().term
    }

    /// etcd's `Promote(extend)`: becomes primary and sets every lease's expiry to now +
    /// its remaining TTL (checkpointed, else full) + `extend`; with at least
    /// `revoke_rate` leases, piles of leases expiring together are spread out so that at
    /// most 3/4 of the revoke rate expires in any second. `sm` must be held (read lock)
    /// so that no entry is applied in between.
    pub fn promote(&self, sm: &StateMachine, term: u64) {
        self.promote_at(sm, term, Instant::now())
    }

    fn promote_at(&self, sm: &StateMachine, term: u64, now: Instant) {
        let extend = self.config.extend;
        let mut inner = self.lock();
        inner.primary = true;
        inner.term = term;
        inner.leases.clear();
        inner.checkpoints.clear();
        for lease in sm.lessor().leases() {
            let mut t = Timing {
                ttl: lease.ttl,
                remaining_ttl: lease.remaining_ttl,
                expiry: now,
                checkpoint_due: None,
                revoke_since: None,
            };
            t.expiry = now + extend + secs(t.remaining_ttl_or_ttl());
            inner.leases.insert(lease.id, t);
        }
        let rate = self.config.revoke_rate as usize;
        if rate > 0 && inner.leases.len() >= rate {
            spread_expiries(&mut inner.leases, now, extend, rate);
        }
        rebuild_expiries(&mut inner);
        let ids: Vec<i64> = inner.leases.keys().copied().collect();
        for id in ids {
            self.schedule_checkpoint(&mut inner, id, now);
        }
        drop(inner);
        self.wake.notify_one();
    }

    /// etcd's `Demote`: stops timing anything.
    pub fn demote(&self) {
        let mut inner = self.lock();
        inner.primary = false;
        inner.leases.clear();
        inner.expiries.clear();
        inner.checkpoints.clear();
    }

    /// Follows one applied entry's lease changes (only the primary keeps timers).
    pub fn observe(&self, changes: &[LeaseChange]) {
        self.observe_at(changes, Instant::now())
    }

    fn observe_at(&self, changes: &[LeaseChange], now: Instant) {
        let mut inner = self.lock();
        if !inner.primary {
            return;
        }
        let mut earlier = false;
        for change in changes {
            match *change {
                LeaseChange::Granted { id, ttl } => {
                    // etcd's primary `Grant`: expires a full TTL from now.
                    let expiry = now + secs(ttl);
                    inner.leases.insert(
                        id,
                        Timing {
                            ttl,
                            remaining_ttl: 0,
                            expiry,
                            checkpoint_due: None,
                            revoke_since: None,
                        },
                    );
                    earlier |= push_expiry(&mut inner, expiry, id);
                    self.schedule_checkpoint(&mut inner, id, now);
                }
                LeaseChange::Revoked { id } => {
                    inner.leases.remove(&id);
                }
                LeaseChange::Checkpointed { id, remaining_ttl } => {
                    if let Some(t) = inner.leases.get_mut(&id) {
                        t.remaining_ttl = remaining_ttl;
                        self.schedule_checkpoint(&mut inner, id, now);
                    }
                }
            }
        }
        drop(inner);
        if earlier {
            self.wake.notify_one();
        }
    }

    /// etcd's `Renew`: a live lease expires a full TTL from now.
    pub fn renew(&self, id: i64) -> Renewal {
        self.renew_at(id, Instant::now())
    }

    fn renew_at(&self, id: i64, now: Instant) -> Renewal {
        let checkpoints = self.config.checkpoint_interval.is_some();
        let mut inner = self.lock();
        if !inner.primary {
            return Renewal::NotPrimary;
        }
        let Some(t) = inner.leases.get_mut(&id) else {
            return Renewal::NotFound;
        };
        if t.revoke_since.is_some() || t.expiry <= now {
            return Renewal::Expired;
        }
        let clear_checkpoint = checkpoints && t.remaining_ttl > 0;
        t.expiry = now + secs(t.ttl);
        let (ttl, expiry) = (t.ttl, t.expiry);
        push_expiry(&mut inner, expiry, id);
        Renewal::Renewed {
            ttl,
            clear_checkpoint,
        }
    }

    /// Remaining time of a lease the primary times, in seconds truncated toward zero as
    /// etcd's `int64(Remaining().Seconds())` (negative once expired and not yet revoked).
    /// `None` when not primary or not timed.
    pub fn remaining_secs(&self, id: i64) -> Option<i64> {
        self.remaining_secs_at(id, Instant::now())
    }

    fn remaining_secs_at(&self, id: i64, now: Instant) -> Option<i64> {
        let inner = self.lock();
        if !inner.primary {
            return None;
        }
        let t = inner.leases.get(&id)?;
        let expiry = t.deadline();
        Some(if expiry >= now {
            (expiry - now).as_secs() as i64
        } else {
            -((now - expiry).as_secs() as i64)
        })
    }

    /// Orders lease IDs by expiry, soonest first, as etcd's `Leases` sorts them; leases
    /// without a timer (not primary) go last, in ID order.
    pub fn sort_by_expiry(&self, ids: &mut [i64]) {
        let inner = self.lock();
        ids.sort_by_key(|id| (inner.leases.get(id).map(Timing::deadline), *id));
        // `None` sorts first in Option's order; move the untimed to the end instead.
        let timed = ids
            .iter()
            .filter(|id| inner.leases.contains_key(id))
            .count();
        ids.rotate_left(ids.len() - timed);
    }

    /// Pops up to `limit` leases whose expiry has passed, and re-registers each for
    /// another attempt `REVOKE_RETRY` later (a revoke that gets applied drops it).
    fn take_expired(&self, now: Instant, limit: usize) -> Vec<i64> {
        let mut inner = self.lock();
        let mut out = Vec::new();
        if !inner.primary {
            return out;
        }
        while out.len() < limit {
            let Some(&Reverse((at, id))) = inner.expiries.peek() else {
                break;
            };
            if at > now {
                break;
            }
            inner.expiries.pop();
            let retry = now + REVOKE_RETRY;
            match inner.leases.get_mut(&id) {
                Some(t) if t.expiry == at => {
                    t.revoke_since.get_or_insert(at);
                    t.expiry = retry;
                    out.push(id);
                }
                _ => continue, // stale entry
            }
            inner.expiries.push(Reverse((retry, id)));
        }
        out
    }

    /// Whether something may be due at `now` (the earliest heap entry; possibly a stale
    /// one, which only costs an early look). For the rate limiter's wake-up.
    fn has_expired(&self, now: Instant) -> bool {
        let inner = self.lock();
        inner.primary
            && inner
                .expiries
                .peek()
                .is_some_and(|Reverse((at, _))| *at <= now)
    }

    /// Pops up to `MAX_CHECKPOINT_BATCH` due checkpoints: each lease's remaining TTL,
    /// rounded up to a second as etcd's `math.Ceil(Remaining().Seconds())`.
    fn take_checkpoints(&self, now: Instant) -> Vec<pb::LeaseCheckpoint> {
        let mut inner = self.lock();
        let mut out = Vec::new();
        if !inner.primary || self.config.checkpoint_interval.is_none() {
            return out;
        }
        while out.len() < MAX_CHECKPOINT_BATCH {
            let Some(&Reverse((at, id))) = inner.checkpoints.peek() else {
                break;
            };
            if at > now {
                break;
            }
            inner.checkpoints.pop();
            if let Some(t) = inner.leases.get_mut(&id) {
                if t.checkpoint_due != Some(at) {
                    continue; // superseded
                }
                t.checkpoint_due = None;
                if t.revoke_since.is_none() && t.expiry > now {
                    let left = t.expiry - now;
                    let secs = left.as_secs() as i64 + i64::from(left.subsec_nanos() > 0);
                    out.push(pb::LeaseCheckpoint {
                        id,
                        remaining_ttl: secs,
                    });
                }
            }
        }
        out
    }

    /// etcd's `scheduleCheckpointIfNeeded`: a lease with more left than one interval gets
    /// a checkpoint one interval from now.
    fn schedule_checkpoint(&self, inner: &mut Inner, id: i64, now: Instant) {
        let Some(interval) = self.config.checkpoint_interval else {
            return;
        };
        let Some(t) = inner.leases.get_mut(&id) else {
            return;
        };
        if t.checkpoint_due.is_none()
            && t.revoke_since.is_none()
            && t.expiry > now
            && t.expiry - now > interval
        {
            let due = now + interval;
            t.checkpoint_due = Some(due);
            inner.checkpoints.push(Reverse((due, id)));
        }
    }

    /// The earliest moment something may be due (possibly a stale entry: waking early
    /// only costs a look).
    fn next_deadline(&self) -> Option<Instant> {
        let inner = self.lock();
        if !inner.primary {
            return None;
        }
        let e = inner.expiries.peek().map(|Reverse((at, _))| *at);
        let c = inner.checkpoints.peek().map(|Reverse((at, _))| *at);
        match (e, c) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

impl EventSink for PrimaryLessor {
    fn publish(&self, _events: Vec<mvccpb::Event>) {}
    fn wants_prev_kv(&self) -> bool {
        false
    }
    fn leases_changed(&self, changes: &[LeaseChange]) {
        self.observe(changes);
    }
}

fn secs(s: i64) -> Duration {
    Duration::from_secs(s.max(0) as u64)
}

/// Pushes an expiry; true when it is now the earliest (the task must wake sooner). Keeps
/// the heap from filling with stale entries of often-renewed leases.
fn push_expiry(inner: &mut Inner, expiry: Instant, id: i64) -> bool {
    let earliest = inner
        .expiries
        .peek()
        .is_none_or(|Reverse((at, _))| expiry < *at);
    inner.expiries.push(Reverse((expiry, id)));
    if inner.expiries.len() > 2 * inner.leases.len() + 1024 {
        rebuild_expiries(inner);
    }
    earliest
}

fn rebuild_expiries(inner: &mut Inner) {
    inner.expiries = inner
        .leases
        .iter()
        .map(|(id, t)| Reverse((t.expiry, *id)))
        .collect();
}

/// etcd's pile-up avoidance in `Promote`: walking leases by expiry, at most 3/4 of the
/// revoke rate may expire within a one-second window; later ones are pushed back.
fn spread_expiries(leases: &mut HashMap<i64, Timing>, now: Instant, extend: Duration, rate: usize) {
    let mut order: Vec<(Instant, i64)> = leases.iter().map(|(id, t)| (t.expiry, *id)).collect();
    order.sort();
    let Some(&(first, _)) = order.first() else {
        return;
    };
    let target = (3 * rate / 4).max(1);
    let mut base = first.saturating_duration_since(now);
    let mut next_window = base + Duration::from_secs(1);
    let mut expires = 0usize;
    for (expiry, id) in order {
        let remaining = expiry.saturating_duration_since(now);
        if remaining > next_window {
            base = remaining;
            next_window = base + Duration::from_secs(1);
            expires = 1;
            continue;
        }
        expires += 1;
        if expires <= target {
            continue;
        }
        let rate_delay = Duration::from_secs_f64(expires as f64 / target as f64);
        let delay = rate_delay.saturating_sub(remaining.saturating_sub(base));
        next_window = base + delay;
        if let Some(t) = leases.get_mut(&id) {
            t.expiry = now + delay + extend + secs(t.remaining_ttl_or_ttl());
        }
    }
}

/// The expiry task: follows leadership (promote on winning, demote on losing), revokes
/// expired leases through the log at most `revoke_rate` per second (a burst of half a
/// second's worth, as etcd's 500 per 500 ms tick), proposes due checkpoints, and sleeps
/// until the next deadline (not a fixed poll), so a lease is revoked within a few
/// milliseconds of its expiry. Ends when `stop` turns true.
pub async fn run(api: Arc<Api>, lessor: Arc<PrimaryLessor>, mut stop: watch::Receiver<bool>) {
    let rate = f64::from(lessor.config.revoke_rate.max(1));
    let burst = (rate / 2.0).max(1.0);
    let mut tokens = burst;
    let mut refilled = Instant::now();
    loop {
        if *stop.borrow() {
            break;
        }
        // Created before looking, so a change that lands while we look still wakes us.
        let woken = lessor.wake.notified();

        follow_leadership(&api, &lessor);
        let now = Instant::now();
        tokens = (tokens + (now - refilled).as_secs_f64() * rate).min(burst);
        refilled = now;
        let expired = lessor.take_expired(now, tokens.floor() as usize);
        tokens -= expired.len() as f64;
        // The term whose lease table said these expired.
        let table_term = lessor.term();
        for id in expired {
            let api = api.clone();
            tokio::spawn(async move {
                // A leader cut off from the others (or frozen) may not know yet that
                // another member leads and renews this lease; its revoke would reach the
                // new leader (followers forward proposals) and delete a lease the client
                // was just told lives on. Prove leadership first, and in the very term
                // whose table found the lease expired: a member that lost leadership and
                // won it back meanwhile starts that term with a fresh table, and the
                // stale verdict is void.
                if !api.ensure_leadership(Some(table_term)).await {
                    return;
                }
                match api
                    .propose_internal(Envelope::LeaseRevoke(pb::LeaseRevokeRequest { id }))
                    .await
                {
                    Ok(_) => tracing::debug!(lease = %format!("{id:x}"), "revoked expired lease"),
                    Err(crate::Error::Core(metastore_core::Error::LeaseNotFound)) => {}
                    Err(e) => tracing::warn!(
                        lease = %format!("{id:x}"),
                        error = %e,
                        "revoking an expired lease failed; retrying later"
                    ),
                }
            });
        }
        let checkpoints = lessor.take_checkpoints(now);
        if !checkpoints.is_empty() {
            let api = api.clone();
            tokio::spawn(async move {
                let request = Envelope::LeaseCheckpoint(pb::LeaseCheckpointRequest { checkpoints });
                if let Err(e) = api.propose_internal(request).await {
                    tracing::warn!(error = %e, "lease checkpoint failed");
                }
            });
        }

        let mut wake_at = now + LEADERSHIP_POLL;
        if let Some(at) = lessor.next_deadline() {
            wake_at = wake_at.min(at);
        }
        if tokens < 1.0 && lessor.has_expired(now) {
            // Out of revokes for now: come back when some are allowed again (in steps of
            // at least a few ms, so a backlog is worked off in small batches).
            let wait = Duration::from_secs_f64((1.0 - tokens) / rate).max(REVOKE_BATCH_WAIT);
            wake_at = now + wait;
        }
        // `biased`: replayable under simulation (see api::watch).
        tokio::select! {
            biased;
            _ = stop.changed() => {}
            _ = woken => {}
            _ = tokio::time::sleep_until(wake_at) => {}
        }
    }
}

/// Promotes on becoming leader (or leading in a new term), demotes on losing leadership.
fn follow_leadership(api: &Api, lessor: &PrimaryLessor) {
    let leader = api.log.is_leader();
    let term = api.log.status().term;
    if leader && (!lessor.is_primary() || lessor.term() != term) {
        match read_state(&api.state) {
            Ok(sm) => {
                lessor.promote(&sm, term);
                tracing::info!(leases = sm.lessor().len(), term, "lessor promoted");
            }
            Err(e) => tracing::error!(error = %e, "cannot read the lease table to promote"),
        }
    } else if !leader && lessor.is_primary() {
        lessor.demote();
        tracing::info!(term, "lessor demoted");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metastore_core::{MemoryBackend, StateMachineConfig};
    use metastore_proto::metastore::{InternalRequest, LeaseGrant};

    fn sm_with(leases: &[(i64, i64)]) -> StateMachine {
        let mut sm = StateMachine::open(
            Box::new(MemoryBackend::new()),
            StateMachineConfig::default(),
        )
        .unwrap();
        for (i, &(id, ttl)) in leases.iter().enumerate() {
            let r = InternalRequest {
                request: Some(Envelope::LeaseGrant(LeaseGrant { id, ttl })),
                ..Default::default()
            };
            assert!(sm.apply(i as u64 + 1, &r).result.is_ok());
        }
        sm
    }

    #[test]
    fn promote_extends_and_expiry_pops_in_order() {
        let sm = sm_with(&[(1, 10), (2, 5)]);
        let l = PrimaryLessor::new(LessorConfig::default());
        assert_eq!(l.renew(1), Renewal::NotPrimary);
        let start = Instant::now();
        l.promote_at(&sm, 2, start);
        // 5 s + 1 s of extension.
        assert_eq!(l.remaining_secs_at(2, start), Some(6));
        assert_eq!(
            l.remaining_secs_at(2, start + Duration::from_millis(1)),
            Some(5)
        );
        assert!(l.take_expired(start + secs(5), 10).is_empty());
        assert_eq!(l.take_expired(start + secs(6), 10), vec![2]);
        // 2's revoke was not applied: retried 3 s later (at 9 s), with 1 expiring at 11 s.
        assert_eq!(l.take_expired(start + secs(11), 10), vec![2, 1]);
        assert!(l.take_expired(start + secs(13), 10).is_empty());
        assert_eq!(l.take_expired(start + secs(14), 10), vec![1, 2]);
        l.observe(&[LeaseChange::Revoked { id: 2 }]);
        assert_eq!(l.take_expired(start + secs(100), 10), vec![1]);
        l.demote();
        assert!(l.take_expired(start + secs(1000), 10).is_empty());
        assert_eq!(l.remaining_secs_at(1, start), None);
    }

    #[test]
    fn renew_grant_and_expired() {
        let sm = sm_with(&[]);
        let l = PrimaryLessor::new(LessorConfig::default());
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        l.promote_at(&sm, 2, t0);
        assert_eq!(l.renew_at(7, t0), Renewal::NotFound);
        l.observe_at(&[LeaseChange::Granted { id: 7, ttl: 3 }], t0);
        assert_eq!(
            l.renew_at(7, at(2000)),
            Renewal::Renewed {
                ttl: 3,
                clear_checkpoint: false
            }
        );
        assert_eq!(l.remaining_secs_at(7, at(2000)), Some(3));
        // Only the renewed deadline counts: nothing expired at the first one.
        assert!(l.take_expired(at(4500), 10).is_empty());
        assert_eq!(l.remaining_secs_at(7, at(4500)), Some(0));
        assert_eq!(l.remaining_secs_at(7, at(6500)), Some(-1));
        assert_eq!(l.renew_at(7, at(5100)), Renewal::Expired);
        assert_eq!(l.take_expired(at(5100), 10), vec![7]);
        // Its revoke is on its way: a renewal now must not promise a new TTL, although
        // the revoke's retry time lies ahead; its remaining time stays the expired one.
        assert_eq!(l.renew_at(7, at(5200)), Renewal::Expired);
        assert_eq!(l.remaining_secs_at(7, at(6200)), Some(-1));
        // Rate limit: a limit of 0 takes nothing.
        l.observe_at(&[LeaseChange::Granted { id: 8, ttl: 1 }], at(5100));
        assert!(l.take_expired(at(7000), 0).is_empty());
        assert!(l.has_expired(at(7000)));
        // 8 expires at 6.1 s, before 7's retry at 8.1 s.
        assert!(!l.has_expired(at(6000)));
    }

    #[test]
    fn checkpointed_remaining_ttl_is_restored_and_cleared_on_renew() {
        let mut sm = sm_with(&[(1, 100)]);
        let r = InternalRequest {
            request: Some(Envelope::LeaseCheckpoint(pb::LeaseCheckpointRequest {
                checkpoints: vec![pb::LeaseCheckpoint {
                    id: 1,
                    remaining_ttl: 20,
                }],
            })),
            ..Default::default()
        };
        assert!(sm.apply(10, &r).result.is_ok());
        let l = PrimaryLessor::new(LessorConfig {
            checkpoint_interval: Some(Duration::from_secs(5)),
            ..Default::default()
        });
        let t0 = Instant::now();
        l.promote_at(&sm, 3, t0);
        assert_eq!(l.remaining_secs_at(1, t0), Some(21));
        assert!(l.take_checkpoints(t0).is_empty());
        let t5 = t0 + Duration::from_secs(5);
        let cps = l.take_checkpoints(t5);
        assert_eq!(
            cps,
            vec![pb::LeaseCheckpoint {
                id: 1,
                remaining_ttl: 16
            }]
        );
        assert_eq!(
            l.renew_at(1, t5),
            Renewal::Renewed {
                ttl: 100,
                clear_checkpoint: true
            }
        );
        assert_eq!(l.remaining_secs_at(1, t5), Some(100));
        // The checkpoint of 0 lands: the next one is scheduled an interval later.
        l.observe_at(
            &[LeaseChange::Checkpointed {
                id: 1,
                remaining_ttl: 0,
            }],
            t5,
        );
        assert_eq!(
            l.renew_at(1, t5),
            Renewal::Renewed {
                ttl: 100,
                clear_checkpoint: false
            }
        );
        assert!(l.take_checkpoints(t5 + Duration::from_secs(4)).is_empty());
        assert_eq!(l.take_checkpoints(t5 + Duration::from_secs(5)).len(), 1);
        // However often renewals clear the checkpoint, one checkpoint per interval.
        let t10 = t5 + Duration::from_secs(5);
        for i in 0..5 {
            l.observe_at(
                &[LeaseChange::Checkpointed {
                    id: 1,
                    remaining_ttl: 0,
                }],
                t10 + Duration::from_millis(i),
            );
        }
        assert!(l.take_checkpoints(t10 + Duration::from_secs(4)).is_empty());
        assert_eq!(l.take_checkpoints(t10 + Duration::from_secs(6)).len(), 1);
        assert_eq!(l.lock().checkpoints.len(), 0);
    }

    #[test]
    fn promote_spreads_piles_of_expiries() {
        let leases: Vec<(i64, i64)> = (1..=40).map(|i| (i, 10)).collect();
        let sm = sm_with(&leases);
        let l = PrimaryLessor::new(LessorConfig {
            revoke_rate: 20,
            ..Default::default()
        });
        let start = Instant::now();
        l.promote_at(&sm, 2, start);
        // All would expire at 11 s; 3/4 of 20 = 15 may expire in the first second, the
        // rest is pushed back by expires/15 s each (etcd's formula).
        assert!(l
            .take_expired(start + Duration::from_millis(10_990), 100)
            .is_empty());
        assert_eq!(
            l.take_expired(start + Duration::from_millis(11_990), 100)
                .len(),
            15
        );
        let rest = l.take_expired(start + Duration::from_millis(13_900), 100);
        assert_eq!(rest.len(), 25);
        let mut ids: Vec<i64> = (1..=40).collect();
        l.sort_by_expiry(&mut ids);
        assert_eq!(ids.len(), 40);
    }
}
