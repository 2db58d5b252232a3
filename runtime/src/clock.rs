//! The wall clock, injected. The runtime reads it only where etcd does: the start time
//! that seeds the request and lease ID generators, and the proposal time stamped on the
//! replicated envelope. Every timing decision (election and heartbeat ticks, lease
//! expiry, request timeouts) reads the monotonic clock instead, so a wall clock that
//! jumps must never change what the cluster decides. The simulation jumps it on one
//! member (`OffsetClock`) to keep that true.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub trait WallClock: Send + Sync + std::fmt::Debug + 'static {
    fn now(&self) -> SystemTime;

    /// Nanoseconds since the Unix epoch (0 before it).
    fn unix_nanos(&self) -> i64 {
        self.now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as i64)
            .unwrap_or(0)
    }
}

/// The machine's clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl WallClock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// The machine's clock moved by an offset that can jump (forward or back), as a wall
/// clock does when an operator or NTP sets it.
#[derive(Debug, Default)]
pub struct OffsetClock {
    offset_nanos: AtomicI64,
}

impl OffsetClock {
    pub fn new() -> Self {
        Self::default()
    }

    /// Moves the clock by `by` nanoseconds (negative: back).
    pub fn jump(&self, by: i64) {
        self.offset_nanos.fetch_add(by, Ordering::Relaxed);
    }

    /// Puts the clock back on the machine's time.
    pub fn reset(&self) {
        self.offset_nanos.store(0, Ordering::Relaxed);
    }

    pub fn offset(&self) -> i64 {
        self.offset_nanos.load(Ordering::Relaxed)
    }
}

impl WallClock for OffsetClock {
    fn now(&self) -> SystemTime {
        let offset = self.offset();
        let base = SystemTime::now();
        let magnitude = Duration::from_nanos(offset.unsigned_abs());
        if offset >= 0 {
            base + magnitude
        } else {
            base.checked_sub(magnitude).unwrap_or(UNIX_EPOCH)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_offset_clock_jumps_both_ways_and_resets() {
        let clock = OffsetClock::new();
        let before = clock.unix_nanos();
        clock.jump(3_600_000_000_000);
        assert!(clock.unix_nanos() >= before + 3_600_000_000_000);
        clock.jump(-7_200_000_000_000);
        assert!(clock.unix_nanos() < before);
        clock.reset();
        assert!(clock.unix_nanos() >= before);
        // Far before the epoch: clamped, not wrapped.
        clock.jump(i64::MIN / 2);
        assert_eq!(clock.unix_nanos(), 0);
    }
}
