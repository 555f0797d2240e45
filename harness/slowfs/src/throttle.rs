//! How long an operation must wait: the fixed fsync and per-write delays, and a token bucket
//! for write throughput.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A token bucket limiting throughput to `rate` bytes per second, holding at most `burst`
/// bytes of credit.
///
/// It is kept as a "theoretical arrival time" (GCRA): `tat` is the instant at which the bucket
/// would be full again if nothing more were written. A request for `n` bytes arriving at `now`
/// moves `tat` to `max(tat, now) + n / rate` and must wait until `tat - burst / rate`. So the
/// bytes whose waits have ended by any instant `t` never exceed `burst + rate * (t - t0)`.
/// Reservations are made when requests arrive, so concurrent writers queue up in arrival order
/// and share the rate; none can starve the others.
#[derive(Debug)]
pub struct TokenBucket {
    rate: u64,
    burst: u64,
    tat: Mutex<Option<Instant>>,
}

impl TokenBucket {
    /// A bucket of `rate` bytes per second (at least 1) and `burst` bytes of credit.
    pub fn new(rate: u64, burst: u64) -> TokenBucket {
        TokenBucket { rate: rate.max(1), burst, tat: Mutex::new(None) }
    }

    fn duration_of(&self, bytes: u64) -> Duration {
        let nanos = u128::from(bytes) * 1_000_000_000 / u128::from(self.rate);
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    /// Reserves `bytes` at `now` and returns how long the caller must wait before performing
    /// its write.
    pub fn reserve(&self, bytes: u64, now: Instant) -> Duration {
        let mut tat = self.tat.lock().unwrap_or_else(|e| e.into_inner());
        let start = match *tat {
            Some(t) if t > now => t,
            _ => now,
        };
        let new_tat = start + self.duration_of(bytes);
        *tat = Some(new_tat);
        let ready = new_tat.checked_sub(self.duration_of(self.burst)).unwrap_or(now);
        ready.saturating_duration_since(now)
    }
}

/// The delays of one filesystem.
#[derive(Debug, Default)]
pub struct Delays {
    /// Added before every fsync and fdatasync of a file.
    pub fsync: Duration,
    /// Added before every fsync of a directory.
    pub fsyncdir: Duration,
    /// Added before every write request.
    pub per_write: Duration,
    /// Write throughput limit.
    pub bucket: Option<TokenBucket>,
}

impl Delays {
    /// How long a write request of `bytes` arriving now must wait (reserving its share of the
    /// throughput limit).
    pub fn write_delay(&self, bytes: u64) -> Duration {
        let throttle = match &self.bucket {
            Some(bucket) => bucket.reserve(bytes, Instant::now()),
            None => Duration::ZERO,
        };
        self.per_write + throttle
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn no_burst_charges_each_write_before_it_is_performed() {
        let bucket = TokenBucket::new(1000, 0); // 1000 B/s: 1 byte per ms
        let t0 = Instant::now();
        assert_eq!(bucket.reserve(100, t0), 100 * MS);
        // A second write arriving at once queues behind the first.
        assert_eq!(bucket.reserve(50, t0), 150 * MS);
        // One arriving after the bucket drained waits only for itself.
        assert_eq!(bucket.reserve(10, t0 + 1000 * MS), 10 * MS);
    }

    #[test]
    fn burst_credit_is_spent_then_the_rate_applies() {
        let bucket = TokenBucket::new(1000, 200);
        let t0 = Instant::now();
        assert_eq!(bucket.reserve(150, t0), Duration::ZERO);
        assert_eq!(bucket.reserve(50, t0), Duration::ZERO);
        assert_eq!(bucket.reserve(100, t0), 100 * MS);
        // Idle time refills the credit, but never beyond `burst`.
        let later = t0 + 10_000 * MS;
        assert_eq!(bucket.reserve(200, later), Duration::ZERO);
        assert_eq!(bucket.reserve(1, later), MS);
    }

    #[test]
    fn throughput_never_exceeds_rate_plus_burst() {
        let bucket = TokenBucket::new(1 << 20, 64 << 10);
        let t0 = Instant::now();
        let mut done = 0u64;
        for i in 0..100 {
            let arrival = t0 + MS * i as u32;
            let wait = bucket.reserve(100_000, arrival);
            let ready = (arrival + wait).duration_since(t0);
            done += 100_000;
            let allowed = (64 << 10) as f64 + (1 << 20) as f64 * ready.as_secs_f64();
            assert!(done as f64 <= allowed + 1.0, "{done} bytes by {ready:?}");
        }
    }

    #[test]
    fn write_delay_adds_the_per_write_delay() {
        let delays = Delays { per_write: 5 * MS, ..Delays::default() };
        assert_eq!(delays.write_delay(1 << 20), 5 * MS);
    }
}
