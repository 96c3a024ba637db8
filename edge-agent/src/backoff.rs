//! Exponential backoff with full jitter (sleep a uniform random time between zero and
//! `min(cap, base * 2^attempt)`), so a gateway restart under thousands of agents spreads
//! their reconnects over the whole window instead of synchronising them into a storm.

use std::time::Duration;

#[derive(Clone, Debug)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap: cap.max(base),
            attempt: 0,
        }
    }

    /// The ceiling of the next delay (before jitter).
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(30)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// The next delay: uniform in `[0, ceiling]`; the ceiling doubles each time.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        ceiling.mul_f64(unit_random())
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// A uniform random number in [0, 1].
pub fn unit_random() -> f64 {
    let bytes = edgeport_proto::keys::random_bytes(8).unwrap_or_else(|_| vec![0x80; 8]);
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[..8]);
    (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        let mut ceilings = Vec::new();
        for _ in 0..8 {
            ceilings.push(b.ceiling().as_secs());
            let d = b.next_delay();
            assert!(d <= Duration::from_secs(30));
        }
        assert_eq!(ceilings, vec![1, 2, 4, 8, 16, 30, 30, 30]);
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_secs(1));
        for _ in 0..100 {
            assert!(b.next_delay() <= Duration::from_secs(30));
        }
        for _ in 0..1000 {
            let u = unit_random();
            assert!((0.0..=1.0).contains(&u));
        }
    }
}
