//! The fault schedule: which faults happen to which members and when, all drawn from the
//! seed, and the log of what was done, with simulated timestamps.
//!
//! This module owns injecting and healing faults. It must never leave a fault in place
//! at the end of a schedule ([`heal_all`] undoes everything), and it keeps at most one
//! fault active at a time so the cluster keeps a quorum most of the time and the
//! workload makes progress between faults.

use std::fmt;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use madsim::net::NetSim;
use madsim::rand::seq::SliceRandom;
use madsim::rand::Rng;

use crate::cluster::SimCluster;

/// What was injected, when (simulated time since the start of the run).
#[derive(Clone, Default)]
pub struct FaultLog {
    entries: Arc<Mutex<Vec<(Duration, String)>>>,
}

impl FaultLog {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn record(&self, what: String) {
        let at = madsim::time::TimeHandle::current().elapsed();
        tracing::info!(at = ?at, "{what}");
        self.lock().push((at, what));
    }

    pub fn entries(&self) -> Vec<(Duration, String)> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(Duration, String)>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl fmt::Display for FaultLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (at, what) in self.entries() {
            writeln!(f, "  {:>9.3}s  {what}", at.as_secs_f64())?;
        }
        Ok(())
    }
}

/// The kinds of fault a schedule draws from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// Cut one member off from everyone, clients included (symmetric partition).
    Isolate,
    /// Cut one member off from the other members only: its clients still reach it.
    PartitionFromPeers,
    /// Drop traffic in one direction between two members.
    OneWay,
    /// Crash a member (losing unsynced writes) and restart it later.
    Crash,
    /// Freeze a member (a long GC pause, a stopped VM) and resume it later.
    Pause,
    /// Transfer leadership to another member.
    MoveLeader,
    /// Lose a share of all packets (retransmitted later, as TCP would).
    PacketLoss,
    /// Slow every message down.
    Latency,
    /// Remove a member from the cluster (MemberRemove), then add a new member with new
    /// addresses and an empty disk in its place (MemberAdd, joining by snapshot).
    ReplaceMember,
    /// Set one member's wall clock forward or back (by seconds to a day), often followed
    /// by a crash and restart, so the member starts its ID generators on the jumped time.
    ClockJump,
}

impl FaultKind {
    pub const ALL: [FaultKind; 10] = [
        FaultKind::Isolate,
        FaultKind::PartitionFromPeers,
        FaultKind::OneWay,
        FaultKind::Crash,
        FaultKind::Pause,
        FaultKind::MoveLeader,
        FaultKind::PacketLoss,
        FaultKind::Latency,
        FaultKind::ReplaceMember,
        FaultKind::ClockJump,
    ];
}

/// How often and how long faults happen.
#[derive(Debug, Clone)]
pub struct FaultPlan {
    pub kinds: Vec<FaultKind>,
    /// Quiet time between faults.
    pub gap: Range<Duration>,
    /// How long a fault stays in place.
    pub hold: Range<Duration>,
}

impl Default for FaultPlan {
    fn default() -> Self {
        Self {
            kinds: FaultKind::ALL.to_vec(),
            gap: Duration::from_millis(200)..Duration::from_secs(3),
            hold: Duration::from_millis(500)..Duration::from_secs(5),
        }
    }
}

/// Injects faults from `plan` until `run_for` has passed, then heals everything.
pub async fn run_schedule(cluster: &mut SimCluster, plan: &FaultPlan, run_for: Duration) {
    let end = tokio::time::Instant::now() + run_for;
    if plan.kinds.is_empty() {
        tokio::time::sleep_until(end).await;
        return;
    }
    loop {
        let gap = madsim::rand::thread_rng().gen_range(plan.gap.clone());
        tokio::time::sleep(gap).await;
        if tokio::time::Instant::now() >= end {
            break;
        }
        let kind = *plan
            .kinds
            .choose(&mut madsim::rand::thread_rng())
            .expect("kinds is not empty");
        let hold = madsim::rand::thread_rng().gen_range(plan.hold.clone());
        let hold = hold.min(end.saturating_duration_since(tokio::time::Instant::now()));
        inject(cluster, kind, hold).await;
    }
    heal_all(cluster).await;
}

async fn inject(cluster: &mut SimCluster, kind: FaultKind, hold: Duration) {
    let n = cluster.size();
    let mut rng = madsim::rand::thread_rng();
    let victim = rng.gen_range(0..n);
    let other = (victim + rng.gen_range(1..n.max(2))) % n;
    drop(rng);
    if cluster.members[victim].removed || cluster.members[other].removed {
        // A slot whose replacement has not joined yet is left alone (restarting the
        // removed member's node would bring a removed member back).
        return;
    }
    let net = NetSim::current();
    let log = cluster.log().clone();
    let name = |i: usize| format!("m{i}");
    match kind {
        FaultKind::Isolate => {
            net.clog_node(cluster.node_id(victim));
            log.record(format!("isolate {} for {hold:?}", name(victim)));
            tokio::time::sleep(hold).await;
            net.unclog_node(cluster.node_id(victim));
            log.record(format!("heal {}", name(victim)));
        }
        FaultKind::PartitionFromPeers => {
            for j in (0..n).filter(|j| *j != victim) {
                net.clog_link(cluster.node_id(victim), cluster.node_id(j));
                net.clog_link(cluster.node_id(j), cluster.node_id(victim));
            }
            log.record(format!(
                "partition {} from its peers for {hold:?}",
                name(victim)
            ));
            tokio::time::sleep(hold).await;
            for j in (0..n).filter(|j| *j != victim) {
                net.unclog_link(cluster.node_id(victim), cluster.node_id(j));
                net.unclog_link(cluster.node_id(j), cluster.node_id(victim));
            }
            log.record(format!("heal {}", name(victim)));
        }
        FaultKind::OneWay => {
            net.clog_link(cluster.node_id(victim), cluster.node_id(other));
            log.record(format!(
                "drop {} -> {} for {hold:?}",
                name(victim),
                name(other)
            ));
            tokio::time::sleep(hold).await;
            net.unclog_link(cluster.node_id(victim), cluster.node_id(other));
            log.record(format!("heal {} -> {}", name(victim), name(other)));
        }
        FaultKind::Crash => {
            cluster.crash(victim);
            tokio::time::sleep(hold).await;
            cluster.restart(victim);
        }
        FaultKind::Pause => {
            cluster.pause(victim);
            tokio::time::sleep(hold).await;
            cluster.resume(victim);
        }
        FaultKind::MoveLeader => {
            cluster.move_leader(victim).await;
        }
        FaultKind::PacketLoss => {
            let rate = madsim::rand::thread_rng().gen_range(0.05..0.4);
            net.update_config(|c| c.packet_loss_rate = rate);
            log.record(format!("lose {:.0}% of packets for {hold:?}", rate * 100.0));
            tokio::time::sleep(hold).await;
            net.update_config(|c| c.packet_loss_rate = 0.0);
            log.record("packet loss off".into());
        }
        FaultKind::ReplaceMember => {
            if cluster.remove_member(victim).await {
                tokio::time::sleep(hold).await;
                replace(cluster, victim).await;
            }
        }
        FaultKind::ClockJump => {
            let mut rng = madsim::rand::thread_rng();
            let magnitude = *[1i64, 60, 3600, 86_400]
                .choose(&mut rng)
                .expect("not empty");
            let by = if rng.gen_bool(0.5) {
                magnitude
            } else {
                -magnitude
            };
            let restart = rng.gen_bool(0.5);
            drop(rng);
            cluster.jump_clock(victim, by);
            if restart {
                cluster.crash(victim);
                tokio::time::sleep(hold.min(Duration::from_secs(1))).await;
                cluster.restart(victim);
            }
        }
        FaultKind::Latency => {
            let max = Duration::from_millis(madsim::rand::thread_rng().gen_range(50..400));
            net.update_config(|c| c.send_latency = Duration::from_millis(1)..max);
            log.record(format!("latency up to {max:?} for {hold:?}"));
            tokio::time::sleep(hold).await;
            net.update_config(|c| c.send_latency = NORMAL_LATENCY);
            log.record("latency normal".into());
        }
    }
}

/// madsim's default send latency.
const NORMAL_LATENCY: Range<Duration> = Duration::from_millis(1)..Duration::from_millis(10);

/// Undoes every fault: network back to normal, paused members resumed, crashed ones
/// restarted, removed ones replaced (retrying while the cluster recovers).
pub async fn heal_all(cluster: &mut SimCluster) {
    let net = NetSim::current();
    let n = cluster.size();
    for i in 0..n {
        net.unclog_node(cluster.node_id(i));
        for j in 0..n {
            if i != j {
                net.unclog_link(cluster.node_id(i), cluster.node_id(j));
            }
        }
    }
    net.update_config(|c| {
        c.packet_loss_rate = 0.0;
        c.send_latency = NORMAL_LATENCY;
    });
    for i in 0..n {
        if cluster.members[i].paused {
            cluster.resume(i);
        }
        if cluster.members[i].down {
            cluster.restart(i);
        }
    }
    for i in 0..n {
        replace(cluster, i).await;
    }
    cluster.reset_clocks();
    cluster.log().record("heal all".into());
}

/// Fills a removed slot with a new member, retrying while the cluster elects a leader
/// (removing the leader makes it step down) or refuses for lack of started members.
async fn replace(cluster: &mut SimCluster, slot: usize) {
    for _ in 0..30 {
        if !cluster.members[slot].removed || cluster.add_member(slot).await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
