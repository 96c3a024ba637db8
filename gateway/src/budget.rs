//! Per-source budgets for unauthenticated work: handshakes in progress count against the
//! client's source (an IPv4 address, or an IPv6 /64, the usual allocation to one customer),
//! beneath the port's global cap. One address opening hundreds of idle connections
//! (slow-loris) then uses up its own few slots, not everyone's: agents and users from other
//! addresses still get theirs.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Handshakes one source may have in progress at once on one port.
pub const PER_SOURCE: u32 = 16;

/// The budget key of an address: IPv4 as is, IPv6 by its /64 (IPv4-mapped IPv6 as IPv4).
pub fn source_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// Work in progress per source.
#[derive(Default)]
pub struct SourceBudget {
    in_progress: Arc<Mutex<HashMap<IpAddr, u32>>>,
}

/// One unit of a source's budget, given back when dropped.
pub struct Slot {
    map: Arc<Mutex<HashMap<IpAddr, u32>>>,
    source: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.source) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.source);
            }
        }
    }
}

impl SourceBudget {
    /// A slot for `ip`'s source, unless it already has [`PER_SOURCE`] in progress.
    pub fn try_take(&self, ip: IpAddr) -> Option<Slot> {
        let source = source_of(ip);
        let mut m = self.in_progress.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(source).or_default();
        if *n >= PER_SOURCE {
            return None;
        }
        *n += 1;
        Some(Slot {
            map: self.in_progress.clone(),
            source,
        })
    }

    /// Sources with work in progress (for tests and metrics).
    pub fn sources(&self) -> usize {
        self.in_progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_source_cannot_take_everyones_slots() {
        let b = SourceBudget::default();
        let flood: IpAddr = "192.0.2.7".parse().unwrap();
        let slots: Vec<Slot> = (0..PER_SOURCE).map_while(|_| b.try_take(flood)).collect();
        assert_eq!(slots.len() as u32, PER_SOURCE);
        assert!(b.try_take(flood).is_none(), "over the source's budget");
        assert!(b.try_take("192.0.2.8".parse().unwrap()).is_some());
        drop(slots);
        assert!(b.try_take(flood).is_some(), "slots come back when dropped");
        // An IPv6 /64 is one source; another /64 is another.
        let v6 = |s: &str| -> IpAddr { s.parse().unwrap() };
        let held: Vec<Slot> = (0..PER_SOURCE)
            .map(|i| {
                b.try_take(v6(&format!("2001:db8:1:2::{:x}", i + 1)))
                    .unwrap()
            })
            .collect();
        assert!(b.try_take(v6("2001:db8:1:2:ffff::9")).is_none());
        assert!(b.try_take(v6("2001:db8:1:3::1")).is_some());
        drop(held);
        assert_eq!(source_of(v6("::ffff:192.0.2.7")), flood);
    }
}
