//! Black-box test harness for MetaStore.
//!
//! Starts real server processes (the `metastore` binary, or a real `/usr/bin/etcd` to
//! compare against) on free loopback ports with temporary data dirs, waits until they
//! answer, and kills them (by their own PID) when the guard is dropped or when their
//! bounded life runs out. Also runs `etcdctl` with a timeout, and holds the helpers the
//! differential tests use to compare etcd's and MetaStore's answers field by field.
//!
//! Nothing here skips: a missing binary is a test failure with a message saying what to
//! build or install.

pub mod bench;
pub mod cluster;
pub mod compare;
pub mod etcdctl;
pub mod lease_bench;
pub mod ops;
pub mod raw;
pub mod server;
pub mod watch;
pub mod watch_bench;

pub use compare::*;
pub use etcdctl::*;
pub use server::*;

use std::time::Duration;

/// Upper bound for any single gRPC call made by the tests.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(20);

/// Runs a future with [`CALL_TIMEOUT`], panicking with `what` if it does not finish.
pub async fn bounded<F: std::future::Future>(what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(CALL_TIMEOUT, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {CALL_TIMEOUT:?}: {what}"),
    }
}

/// Runs a whole test body with an overall bound, so that no test can hang.
pub async fn test_bounded<F: std::future::Future>(limit: Duration, fut: F) -> F::Output {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("test did not finish within {limit:?}"),
    }
}

/// A small deterministic PRNG (splitmix64), so that seeded workloads are reproducible
/// without depending on a particular `rand` version's algorithms.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x5DEE_CE66_D1CE_4E5B)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    /// Uniform in `lo..=hi` (`lo` if the range is empty).
    pub fn range_i64(&mut self, lo: i64, hi: i64) -> i64 {
        if hi <= lo {
            return lo;
        }
        lo + (self.below((hi - lo + 1) as u64) as i64)
    }
    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}
