//! In-process tests of lease expiry in a whole member: the revoke rate limit holds under
//! a mass expiry (never more than the burst plus the rate times the elapsed time), every
//! expired lease is still revoked in the end, writes are served meanwhile, and the
//! minimum TTL comes from the election timeout.

use std::time::{Duration, Instant};

use metastore_proto::etcdserverpb as pb;
use metastore_proto::etcdserverpb::kv_client::KvClient;
use metastore_proto::etcdserverpb::lease_client::LeaseClient;
use metastore_runtime::config::Config;
use tonic::transport::Channel;

mod common;
use common::start;

fn prefix_count(prefix: &str) -> pb::RangeRequest {
    let mut end = prefix.as_bytes().to_vec();
    *end.last_mut().unwrap() += 1;
    pb::RangeRequest {
        key: prefix.into(),
        range_end: end,
        count_only: true,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mass_expiry_is_rate_limited_and_complete() {
    let mut config = Config::for_tests();
    config.lease_revoke_rate = 20; // burst of 10, then 20 per second
    let (server, channel) = start(config).await;
    let mut lease = LeaseClient::new(channel.clone());
    let mut kv = KvClient::new(channel);
    let n = 60;
    for i in 0..n {
        let g = lease
            .lease_grant(pb::LeaseGrantRequest { ttl: 2, id: 0 })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(g.ttl, 2);
        kv.put(pb::PutRequest {
            key: format!("m/{i:03}").into_bytes(),
            value: b"v".to_vec(),
            lease: g.id,
            ..Default::default()
        })
        .await
        .unwrap();
    }
    // The instant of the last poll that saw nothing deleted: the first revoke came after.
    let mut before_first = Instant::now();
    let mut max_seen_rate_excess = 0i64;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let sent = Instant::now();
        kv.put(pb::PutRequest {
            key: b"writer".to_vec(),
            value: b"w".to_vec(),
            ..Default::default()
        })
        .await
        .expect("writes are served during a mass expiry");
        let left = kv
            .range(prefix_count("m/"))
            .await
            .unwrap()
            .into_inner()
            .count;
        let deleted = n - left;
        if deleted == 0 {
            before_first = sent;
        } else {
            let elapsed = before_first.elapsed().as_secs_f64();
            let allowed = 10.0 + 20.0 * elapsed;
            max_seen_rate_excess = max_seen_rate_excess.max(deleted - allowed.floor() as i64);
            assert!(
                deleted as f64 <= allowed + 1.0,
                "{deleted} revoked within {elapsed:.2}s of the first (allowed {allowed:.0})"
            );
        }
        if left == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{left} leases never revoked");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let leases = LeaseClient::new(
        Channel::from_shared(format!("http://{}", server.client_addrs[0]))
            .unwrap()
            .connect()
            .await
            .unwrap(),
    )
    .lease_leases(pb::LeaseLeasesRequest {})
    .await
    .unwrap()
    .into_inner();
    assert!(leases.leases.is_empty());
    println!("closest approach to the rate limit: {max_seen_rate_excess}");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn minimum_ttl_follows_the_election_timeout() {
    let mut config = Config::for_tests();
    config.min_lease_ttl = metastore_runtime::config::min_lease_ttl(100, 3000);
    let (server, channel) = start(config).await;
    let mut lease = LeaseClient::new(channel);
    let g = lease
        .lease_grant(pb::LeaseGrantRequest { ttl: 1, id: 5 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((g.id, g.ttl), (5, 5));
    let t = lease
        .lease_time_to_live(pb::LeaseTimeToLiveRequest { id: 5, keys: true })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(t.granted_ttl, 5);
    assert!((4..=5).contains(&t.ttl));
    assert!(t.header.unwrap().member_id != 0);
    server.shutdown().await.unwrap();
}
