//! An idle QUIC tunnel's keep-alive interval, learned from the NAT in front of the device
//! (sans IO: the session feeds it counters, it answers with a new interval).
//!
//! An idle device pays for every keep-alive on its data plan, so the interval starts at the
//! longest that still notices a dead gateway in time ([`QUIC_CEILING`]). A carrier NAT that
//! forgets the device's UDP binding sooner than that gives the next packet a new public
//! port; the gateway follows the move (QUIC connection migration) and validates the new
//! path with a PATH_CHALLENGE, which the agent counts. The agent's own address did not
//! change, so the NAT timed out: the silence before that packet was too long. The interval
//! drops below it, and after an hour without another rebinding it creeps back up
//! half the distance to the silence that failed (a binary search that stops within
//! [`SETTLED`]). A new local address means a new network and starts over at the ceiling.
//!
//! Why it matters beyond bytes: while the binding is gone, a dial from the gateway cannot
//! reach the device until the device sends something.

use std::net::IpAddr;
use std::time::{Duration, Instant};

/// The longest keep-alive for an idle QUIC tunnel: 65 a hour, about 8.4 KB/h of IP bytes
/// both ways (docs/benchmarks.md), and well inside the 90 s idle timeout that declares a
/// silent device offline.
pub const QUIC_CEILING: Duration = Duration::from_secs(55);
/// The shortest: below it a NAT is not the problem.
pub const QUIC_FLOOR: Duration = Duration::from_secs(10);
/// How long an interval must hold without a rebinding before it is lengthened.
pub const STABLE_FOR: Duration = Duration::from_secs(3600);
/// A failed silence is forgotten after this long (the NAT may have changed).
pub const FORGET_AFTER: Duration = Duration::from_secs(24 * 3600);
/// The search stops when the interval is this close to the silence that failed.
pub const SETTLED: Duration = Duration::from_secs(5);
/// The share of a failed silence the interval drops to.
const BACK_OFF: f64 = 0.6;

/// One reading of the tunnel's counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reading {
    /// PATH_CHALLENGE frames received so far (the gateway saw this device at a new address).
    pub path_challenges: u64,
    /// UDP datagrams sent so far.
    pub datagrams_sent: u64,
    /// The local address the tunnel runs from, when known.
    pub local_ip: Option<IpAddr>,
}

/// A change of interval, for the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// The NAT forgot the binding after `silence`: keep-alive now `to`.
    Shorter { silence: Duration, to: Duration },
    /// No rebinding for [`STABLE_FOR`]: trying `to`.
    Longer { to: Duration },
    /// A new local address: back to the ceiling.
    NewNetwork { to: Duration },
}

/// Seconds for a log line: a tenth below ten, whole above.
fn secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 10.0 {
        format!("{s:.1}")
    } else {
        format!("{s:.0}")
    }
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Change::Shorter { silence, to } => write!(
                f,
                "the NAT in front of this device forgot its UDP binding after about {} s of \
                 silence; keep-alive now every {} s",
                secs(*silence),
                secs(*to)
            ),
            Change::Longer { to } => write!(
                f,
                "no NAT rebinding for an hour; trying a keep-alive every {} s",
                secs(*to)
            ),
            Change::NewNetwork { to } => write!(
                f,
                "new local address; keep-alive back to every {} s until the NAT says otherwise",
                secs(*to)
            ),
        }
    }
}

#[derive(Debug)]
pub struct NatKeepalive {
    floor: Duration,
    ceiling: Duration,
    interval: Duration,
    /// The shortest interval after which the NAT forgot the binding, and when.
    failed: Option<(Duration, Instant)>,
    /// The longest interval that held for [`STABLE_FOR`] on this network.
    good: Option<Duration>,
    /// Since when the interval has held without a rebinding.
    since: Instant,
    last: Reading,
    /// When the last datagram was seen leaving, and the silence before it.
    last_send: Instant,
    silence_before_send: Duration,
}

impl NatKeepalive {
    pub fn new(now: Instant, floor: Duration, ceiling: Duration, first: Reading) -> Self {
        let floor = floor.min(ceiling);
        Self {
            floor,
            ceiling,
            interval: ceiling,
            failed: None,
            good: None,
            since: now,
            last: first,
            last_send: now,
            silence_before_send: Duration::ZERO,
        }
    }

    /// The keep-alive interval to use now.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// How often to take a [`Reading`]: often enough to measure silences to a fraction of
    /// the shortest interval, rarely enough to let a device sleep.
    pub fn check_every(&self) -> Duration {
        (self.floor / 2).clamp(Duration::from_millis(200), Duration::from_secs(5))
    }

    /// Feeds one reading; returns the change of interval it causes, if any.
    pub fn observe(&mut self, now: Instant, r: Reading) -> Option<Change> {
        let prev = std::mem::replace(&mut self.last, r);
        if r.datagrams_sent != prev.datagrams_sent {
            self.silence_before_send = now.saturating_duration_since(self.last_send);
            self.last_send = now;
        }
        if let Some((_, at)) = self.failed {
            if now.saturating_duration_since(at) >= FORGET_AFTER {
                self.failed = None;
            }
        }
        if r.local_ip.is_some() && prev.local_ip.is_some() && r.local_ip != prev.local_ip {
            self.failed = None;
            self.good = None;
            self.since = now;
            if self.interval != self.ceiling {
                self.interval = self.ceiling;
                return Some(Change::NewNetwork { to: self.interval });
            }
            return None;
        }
        if r.path_challenges > prev.path_challenges {
            // The silence is measured to the check's resolution; a rebinding after a short
            // silence (traffic was flowing) is the NAT's own business, not a timeout.
            let silence = self.silence_before_send;
            if silence < self.floor {
                return None;
            }
            // The silence is at least the interval in force, rounded up to a check: the
            // interval is the sharper bound.
            let bound = silence.min(self.interval);
            self.failed = Some(match self.failed {
                Some((s, _)) if s < bound => (s, now),
                _ => (bound, now),
            });
            self.since = now;
            let to = match self.good {
                Some(g) if g < bound => g,
                _ => bound.mul_f64(BACK_OFF).max(self.floor),
            };
            if to < self.interval {
                self.interval = to;
                return Some(Change::Shorter { silence, to });
            }
            return None;
        }
        // Lengthen right after a packet left, so that the first silence at the new interval
        // is the new interval and not the rest of the old one on top.
        let just_sent = r.datagrams_sent != prev.datagrams_sent;
        if just_sent
            && self.interval < self.ceiling
            && now.saturating_duration_since(self.since) >= STABLE_FOR
        {
            self.since = now;
            self.good = Some(self.interval);
            let limit = self.failed.map(|(s, _)| s).unwrap_or(self.ceiling);
            if limit.saturating_sub(self.interval) <= SETTLED {
                return None;
            }
            let to = ((self.interval + limit) / 2).min(self.ceiling);
            self.interval = to;
            return Some(Change::Longer { to });
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IP: Option<IpAddr> = Some(IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2)));

    /// An idle tunnel behind a NAT that forgets bindings after `nat` of silence, driven for
    /// `hours`; returns the tuner and the number of rebindings seen.
    fn simulate(nat: Duration, hours: u64) -> (NatKeepalive, u64) {
        let t0 = Instant::now();
        let mut r = Reading {
            path_challenges: 0,
            datagrams_sent: 0,
            local_ip: IP,
        };
        let mut k = NatKeepalive::new(t0, QUIC_FLOOR, QUIC_CEILING, r);
        let step = k.check_every();
        let mut now = t0;
        let mut next_ping = t0 + k.interval();
        let mut last_packet = t0;
        let mut rebinds = 0;
        while now < t0 + Duration::from_secs(hours * 3600) {
            now += step;
            if now >= next_ping {
                r.datagrams_sent += 1;
                if now.duration_since(last_packet) > nat {
                    r.path_challenges += 1;
                    rebinds += 1;
                }
                last_packet = now;
            }
            let c = k.observe(now, r);
            if c.is_some() || now >= next_ping {
                next_ping = now + k.interval();
            }
        }
        (k, rebinds)
    }

    #[test]
    fn a_generous_nat_keeps_the_ceiling() {
        let (k, rebinds) = simulate(Duration::from_secs(120), 3);
        assert_eq!(rebinds, 0);
        assert_eq!(k.interval(), QUIC_CEILING);
    }

    #[test]
    fn a_short_nat_timeout_is_learned_and_not_exceeded_for_long() {
        for secs in [15, 28, 30, 42, 52] {
            let nat = Duration::from_secs(secs);
            let (k, rebinds) = simulate(nat, 12);
            assert!(k.interval() < nat, "NAT {secs} s: {:?}", k.interval());
            assert!(
                k.interval() + SETTLED * 3 >= nat,
                "NAT {secs} s: {:?}",
                k.interval()
            );
            // A few to learn it, then at most one failed probe above the good interval.
            assert!(rebinds <= 4, "NAT {secs} s: {rebinds} rebindings in 12 h");
        }
    }

    #[test]
    fn never_below_the_floor_and_traffic_is_not_a_timeout() {
        let t0 = Instant::now();
        let r0 = Reading {
            path_challenges: 0,
            datagrams_sent: 0,
            local_ip: IP,
        };
        let mut k = NatKeepalive::new(t0, QUIC_FLOOR, QUIC_CEILING, r0);
        // Busy: a packet every second, and a rebinding among them.
        let mut r = r0;
        for i in 1..=20u64 {
            r.datagrams_sent = i;
            r.path_challenges = u64::from(i == 10);
            assert_eq!(k.observe(t0 + Duration::from_secs(i), r), None);
        }
        // Silent for 12 s, then a rebinding: the floor holds.
        r.datagrams_sent += 1;
        r.path_challenges += 1;
        let c = k.observe(t0 + Duration::from_secs(32), r);
        assert_eq!(
            c,
            Some(Change::Shorter {
                silence: Duration::from_secs(12),
                to: QUIC_FLOOR
            })
        );
        assert!(c.is_some_and(|c| c.to_string().contains("every 10 s")));
    }

    #[test]
    fn a_new_network_starts_over() {
        let t0 = Instant::now();
        let mut r = Reading {
            path_challenges: 0,
            datagrams_sent: 0,
            local_ip: IP,
        };
        let mut k = NatKeepalive::new(t0, QUIC_FLOOR, QUIC_CEILING, r);
        r.datagrams_sent = 1;
        r.path_challenges = 1;
        assert!(matches!(
            k.observe(t0 + Duration::from_secs(55), r),
            Some(Change::Shorter { .. })
        ));
        r.local_ip = Some(IpAddr::V4(std::net::Ipv4Addr::new(10, 9, 0, 2)));
        r.path_challenges = 2;
        assert_eq!(
            k.observe(t0 + Duration::from_secs(60), r),
            Some(Change::NewNetwork { to: QUIC_CEILING })
        );
        assert_eq!(k.interval(), QUIC_CEILING);
    }
}
