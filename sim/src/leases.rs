//! Simulated lease users: each grants a lease, puts a key with it, keeps it alive over a
//! `LeaseKeepAlive` stream for a while, then revokes it or lets it expire, reads its key
//! until it is gone, and starts over. Each runs on its own node, talks to members only
//! through the generated etcd gRPC clients, and records one [`LeaseRecord`] per lease.
//!
//! As with the KV clients, a record holds only what the client observed: any error or
//! timeout leaves the operation unknown (an unanswered keep-alive, an indeterminate put
//! or revoke), never a guess. Randomness comes from `madsim::rand` only.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use futures::SinkExt;
use madsim::rand::Rng;
use metastore_proto::etcdserverpb as pb;
use metastore_runtime::signal as watch;
use pb::kv_client::KvClient;
use pb::lease_client::LeaseClient;
use tonic::transport::Channel;

use crate::clients::{Recorder, KEY_PREFIX, OP_TIMEOUT};
use crate::cluster::{connect, Endpoints};
use crate::history::{KeepAlive, LeaseRead, LeaseRecord, LeaseRevoke};

/// Every lease key starts with this prefix (inside the watchers' range `[k, l)`).
pub const LEASE_KEY_PREFIX: &[u8] = b"kL";
/// The end of the lease keys' range.
pub const LEASE_KEY_PREFIX_END: &[u8] = b"kM";

/// The node a lease client runs on (10.0.250.150 and up).
pub fn lease_client_ip(index: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 0, 250, 150 + index as u8))
}

fn lease_key(client: usize, n: u64) -> Vec<u8> {
    debug_assert!(LEASE_KEY_PREFIX.starts_with(KEY_PREFIX));
    let mut k = LEASE_KEY_PREFIX.to_vec();
    k.extend_from_slice(format!("{client}-{n}").as_bytes());
    k
}

fn rng_ms(range: std::ops::Range<u64>) -> Duration {
    Duration::from_millis(madsim::rand::thread_rng().gen_range(range))
}

/// A client's connection to one member, failing over to the next after any error.
struct Link {
    endpoints: Endpoints,
    member: usize,
    channel: Option<Channel>,
}

impl Link {
    async fn channel(&mut self) -> Option<Channel> {
        if self.channel.is_none() {
            match connect(&self.endpoints.url(self.member)).await {
                Some(c) => self.channel = Some(c),
                None => {
                    self.fail();
                    return None;
                }
            }
        }
        self.channel.clone()
    }

    fn fail(&mut self) {
        self.channel = None;
        self.member = (self.member + 1) % self.endpoints.len();
    }
}

/// Sleeps for `d`, or less if `stop` turns true; returns whether it stopped.
async fn sleep_or_stop(d: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    let stopped = tokio::select! {
        biased;
        _ = stop.wait_for(|s| *s) => true,
        _ = tokio::time::sleep(d) => false,
    };
    stopped || *stop.borrow()
}

/// One lease client, until `stop` turns true (a lease in use then is left to expire).
pub async fn lease_client(
    client: usize,
    endpoints: Endpoints,
    recorder: Recorder,
    mut stop: watch::Receiver<bool>,
) {
    let mut link = Link {
        member: client % endpoints.len(),
        endpoints,
        channel: None,
    };
    let mut n = 0u64;
    while !*stop.borrow() {
        if sleep_or_stop(rng_ms(0..200), &mut stop).await {
            return;
        }
        let Some(channel) = link.channel().await else {
            continue;
        };
        // Grant. A grant with no answer may have created a lease without keys: nothing
        // observable to check, so it is not recorded.
        let ttl = madsim::rand::thread_rng().gen_range(2..=6);
        let grant_invoked_ns = recorder.now_ns();
        let granted = tokio::time::timeout(
            OP_TIMEOUT,
            LeaseClient::new(channel.clone()).lease_grant(pb::LeaseGrantRequest { ttl, id: 0 }),
        )
        .await;
        let grant = match granted {
            Ok(Ok(r)) if r.get_ref().error.is_empty() && r.get_ref().id != 0 => r.into_inner(),
            _ => {
                link.fail();
                continue;
            }
        };
        n += 1;
        let mut record = LeaseRecord {
            client,
            id: grant.id,
            ttl: grant.ttl,
            grant_invoked_ns,
            grant_completed_ns: recorder.now_ns(),
            key: lease_key(client, n),
            value: format!("L{client}-{n}").into_bytes(),
            put_revision: None,
            keep_alives: Vec::new(),
            unanswered_keep_alives: Vec::new(),
            renewed_until_ns: 0,
            revoke: None,
            reads: Vec::new(),
        };
        let put = tokio::time::timeout(
            OP_TIMEOUT,
            KvClient::new(channel.clone()).put(pb::PutRequest {
                key: record.key.clone(),
                value: record.value.clone(),
                lease: record.id,
                ..Default::default()
            }),
        )
        .await;
        match put {
            Ok(Ok(r)) => record.put_revision = r.into_inner().header.map(|h| h.revision),
            _ => link.fail(),
        }

        // Keep it alive for a while, one request per about a third of the TTL.
        let hold = rng_ms(0..10_000);
        let stopped = keep_alive(&mut record, hold, &mut link, &recorder, &mut stop).await;
        record.renewed_until_ns = recorder.now_ns();
        if stopped {
            // The stop is noticed only between keep-alives, none outstanding: the last
            // request sent bounds the renewals. (The instant the stop is noticed can
            // differ by a poll between two runs of a seed, so it is not recorded.)
            record.renewed_until_ns = record
                .keep_alives
                .iter()
                .map(|k| k.invoked_ns)
                .chain(record.unanswered_keep_alives.iter().copied())
                .chain(std::iter::once(record.grant_completed_ns))
                .max()
                .unwrap_or(record.grant_completed_ns);
            recorder.lease(record);
            return;
        }

        // Sometimes revoke; otherwise let it expire.
        if madsim::rand::thread_rng().gen_bool(0.3) {
            revoke(&mut record, &mut link, &recorder).await;
        }

        // Read the key until it is gone (or for a while past the TTL).
        let give_up = record.renewed_until_ns + (record.ttl.max(0) as u64 + 5) * 1_000_000_000;
        while recorder.now_ns() < give_up {
            if read(&mut record, &mut link, &recorder).await == Some(false) {
                break;
            }
            let pause = rng_ms(200..(record.ttl.max(1) as u64 * 400));
            if sleep_or_stop(pause, &mut stop).await {
                break;
            }
        }
        recorder.lease(record);
    }
}

/// Keeps the lease alive over a `LeaseKeepAlive` stream for `hold`, reopening the
/// stream on the next member after any failure, and sometimes reads the key. Returns
/// whether `stop` turned true.
async fn keep_alive(
    record: &mut LeaseRecord,
    hold: Duration,
    link: &mut Link,
    recorder: &Recorder,
    stop: &mut watch::Receiver<bool>,
) -> bool {
    let until = tokio::time::Instant::now() + hold;
    let period_ms = (record.ttl.max(1) as u64 * 1000) / 3;
    let mut stream = None;
    loop {
        let pause = rng_ms(period_ms / 2..period_ms + 1);
        let now = tokio::time::Instant::now();
        if now >= until {
            return false;
        }
        if sleep_or_stop(pause.min(until - now), stop).await {
            return true;
        }
        if tokio::time::Instant::now() >= until {
            return false;
        }
        if madsim::rand::thread_rng().gen_bool(0.2) {
            read(record, link, recorder).await;
        }
        if stream.is_none() {
            let Some(channel) = link.channel().await else {
                continue;
            };
            let (tx, rx) = futures::channel::mpsc::channel::<pb::LeaseKeepAliveRequest>(4);
            match tokio::time::timeout(OP_TIMEOUT, LeaseClient::new(channel).lease_keep_alive(rx))
                .await
            {
                Ok(Ok(r)) => stream = Some((tx, r.into_inner())),
                _ => {
                    link.fail();
                    continue;
                }
            }
        }
        let Some((tx, responses)) = stream.as_mut() else {
            continue;
        };
        let invoked_ns = recorder.now_ns();
        let answer = tokio::time::timeout(OP_TIMEOUT, async {
            tx.send(pb::LeaseKeepAliveRequest { id: record.id })
                .await
                .ok()?;
            responses.message().await.ok().flatten()
        })
        .await;
        match answer {
            Ok(Some(r)) if r.id == record.id => {
                record.keep_alives.push(KeepAlive {
                    invoked_ns,
                    completed_ns: recorder.now_ns(),
                    ttl: r.ttl,
                });
                if r.ttl <= 0 {
                    // The lease is gone: nothing left to renew.
                    return false;
                }
            }
            _ => {
                record.unanswered_keep_alives.push(invoked_ns);
                stream = None;
                link.fail();
            }
        }
    }
}

async fn revoke(record: &mut LeaseRecord, link: &mut Link, recorder: &Recorder) {
    let Some(channel) = link.channel().await else {
        return;
    };
    let invoked_ns = recorder.now_ns();
    let result = tokio::time::timeout(
        OP_TIMEOUT,
        LeaseClient::new(channel).lease_revoke(pb::LeaseRevokeRequest { id: record.id }),
    )
    .await;
    let revoked = match result {
        Ok(Ok(_)) => Some(true),
        Ok(Err(status))
            if status.code() == tonic::Code::NotFound
                && status.message().contains("lease not found") =>
        {
            Some(false)
        }
        _ => None,
    };
    if revoked.is_none() {
        link.fail();
    }
    record.revoke = Some(LeaseRevoke {
        invoked_ns,
        completed_ns: revoked.map(|_| recorder.now_ns()),
        revoked,
    });
}

/// A linearizable read of the lease's key; `None` when it failed (not recorded).
async fn read(record: &mut LeaseRecord, link: &mut Link, recorder: &Recorder) -> Option<bool> {
    let channel = link.channel().await?;
    let invoked_ns = recorder.now_ns();
    let result = tokio::time::timeout(
        OP_TIMEOUT,
        KvClient::new(channel).range(pb::RangeRequest {
            key: record.key.clone(),
            ..Default::default()
        }),
    )
    .await;
    let r = match result {
        Ok(Ok(r)) => r.into_inner(),
        _ => {
            link.fail();
            return None;
        }
    };
    let Some(revision) = r.header.map(|h| h.revision) else {
        link.fail();
        return None;
    };
    let present = !r.kvs.is_empty();
    record.reads.push(LeaseRead {
        invoked_ns,
        completed_ns: recorder.now_ns(),
        present,
        revision,
    });
    Some(present)
}
