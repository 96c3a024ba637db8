//! Byte accounting per device and service (issue 23): the agents' counters, which arrive with
//! presence, summed into daily totals.
//!
//! An agent's report is a snapshot of counters since it started. The record keeps the last
//! snapshot; what grew since it is added to today's totals. A snapshot with another start
//! time is a restarted agent, whose counters began at zero, so all of it is new. A snapshot
//! equal to the last one (gateways pass the same one on every presence report) writes
//! nothing.
//!
//! The counts are the agent's word, passed on by a gateway: good enough for a data plan, and
//! never used to decide who anyone is.

use std::collections::BTreeMap;

use edgeport_proto::usage::{
    DeviceUsage, ServiceBytes, UsageReport, MAX_SERVICES, MAX_SERVICE_NAME,
};
use serde::{Deserialize, Serialize};

use crate::store::{self, Store, StoreError, Table};

/// How many days of totals a device keeps.
pub const KEEP_DAYS: u64 = 93;
const DAY: u64 = 86_400;

/// One device's usage, by device id in [`Table::Usage`].
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct UsageRecord {
    /// The agent's last snapshot.
    pub last: UsageReport,
    /// Totals per day (Unix seconds at 00:00 UTC), then per service: (up, down).
    pub days: BTreeMap<u64, BTreeMap<String, (u64, u64)>>,
}

/// The report with only well-formed services (at most [`MAX_SERVICES`], short names).
fn sane(r: &UsageReport) -> UsageReport {
    UsageReport {
        since: r.since,
        services: r
            .services
            .iter()
            .filter(|s| !s.service.is_empty() && s.service.len() <= MAX_SERVICE_NAME)
            .take(MAX_SERVICES)
            .cloned()
            .collect(),
    }
}

/// What `now` adds to `rec`, given the agent's snapshot `report`; `None` if nothing changed.
pub fn absorb_into(mut rec: UsageRecord, report: &UsageReport, now: u64) -> Option<UsageRecord> {
    let report = sane(report);
    if report == rec.last {
        return None;
    }
    let restarted = report.since != rec.last.since;
    let day = now - now % DAY;
    let totals = rec.days.entry(day).or_default();
    for s in &report.services {
        let before = rec
            .last
            .services
            .iter()
            .find(|b| b.service == s.service)
            .filter(|_| !restarted);
        // Counters only grow while the agent runs; one that went back is taken as new.
        let (up, down) = match before {
            Some(b) if s.up >= b.up && s.down >= b.down => (s.up - b.up, s.down - b.down),
            _ => (s.up, s.down),
        };
        if up > 0 || down > 0 {
            let t = totals.entry(s.service.clone()).or_insert((0, 0));
            t.0 = t.0.saturating_add(up);
            t.1 = t.1.saturating_add(down);
        }
    }
    if totals.is_empty() {
        rec.days.remove(&day);
    }
    let oldest = day.saturating_sub(KEEP_DAYS * DAY);
    rec.days.retain(|d, _| *d > oldest);
    rec.last = report;
    Some(rec)
}

/// Adds a device's snapshot to its record.
pub fn absorb(
    store: &dyn Store,
    device: &str,
    report: &UsageReport,
    now: u64,
) -> Result<(), StoreError> {
    store::update::<UsageRecord, StoreError, _>(store, Table::Usage, device, |old| {
        let rec = old.unwrap_or_default();
        Ok(Some(absorb_into(rec.clone(), report, now).unwrap_or(rec)))
    })?;
    Ok(())
}

/// The start (Unix seconds, 00:00 UTC) of the calendar month `now` is in.
pub fn month_start(now: u64) -> u64 {
    // Days since 1970-01-01 to a civil date and back (Howard Hinnant's algorithm).
    let days = (now / DAY) as i64;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day_of_month = doy - (153 * mp + 2) / 5; // 0-based
    (days - day_of_month).max(0) as u64 * DAY
}

/// The bytes a device moved this calendar month: every service but `sftp` and `forward`,
/// which are part of `ssh`.
pub fn month_total(rec: &UsageRecord, now: u64) -> u64 {
    rec.days
        .range(month_start(now)..)
        .flat_map(|(_, services)| services.iter())
        .filter(|(name, _)| name.as_str() != "sftp" && name.as_str() != "forward")
        .map(|(_, (up, down))| up.saturating_add(*down))
        .fold(0u64, u64::saturating_add)
}

/// A device past its budget this month, by device id in [`Table::OverBudget`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OverBudget {
    pub month: u64,
    pub budget: u64,
}

/// Records whether `device` is past `budget` this month (and forgets it otherwise).
pub fn refresh_over_budget(
    store: &dyn Store,
    device: &str,
    budget: Option<u64>,
    now: u64,
) -> Result<(), StoreError> {
    let rec: UsageRecord = store::get(store, Table::Usage, device)?.unwrap_or_default();
    let month = month_start(now);
    let over = budget.filter(|b| month_total(&rec, now) >= *b);
    let old: Option<OverBudget> = store::get(store, Table::OverBudget, device)?;
    match over {
        Some(budget)
            if old
                .as_ref()
                .is_none_or(|o| o.month != month || o.budget != budget) =>
        {
            store::put(
                store,
                Table::OverBudget,
                device,
                &OverBudget { month, budget },
            )?;
        }
        None if old.is_some() => {
            store.delete(Table::OverBudget, device)?;
        }
        _ => {}
    }
    Ok(())
}

/// The devices past their budget this month (device, budget).
pub fn over_budget(store: &dyn Store, now: u64) -> Result<Vec<(String, u64)>, StoreError> {
    let month = month_start(now);
    Ok(store::list::<OverBudget>(store, Table::OverBudget, "")?
        .into_iter()
        .filter(|(_, o)| o.month == month)
        .map(|(d, o)| (d, o.budget))
        .collect())
}

/// Totals over the last `days` days (today included) of `device`, or of every device.
pub fn totals(
    store: &dyn Store,
    device: Option<&str>,
    days: u32,
    now: u64,
) -> Result<Vec<DeviceUsage>, StoreError> {
    let records: Vec<(String, UsageRecord)> = match device {
        Some(d) => store::get(store, Table::Usage, d)?
            .map(|r| vec![(d.to_string(), r)])
            .unwrap_or_default(),
        None => store::list(store, Table::Usage, "")?,
    };
    let today = now - now % DAY;
    let from = today.saturating_sub(u64::from(days.max(1) - 1) * DAY);
    Ok(records
        .into_iter()
        .map(|(device, rec)| summed(device, &rec, from))
        .filter(|u| !u.services.is_empty())
        .collect())
}

fn summed(device: String, rec: &UsageRecord, from: u64) -> DeviceUsage {
    let mut sums: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
    for (_, services) in rec.days.range(from..) {
        for (name, (up, down)) in services {
            let t = sums.entry(name).or_insert((0, 0));
            t.0 = t.0.saturating_add(*up);
            t.1 = t.1.saturating_add(*down);
        }
    }
    // The agent's own order first (ssh, sftp, ...), then any others by name.
    let order = |n: &str| {
        edgeport_proto::usage::SERVICES
            .iter()
            .position(|s| *s == n)
            .unwrap_or(usize::MAX)
    };
    let mut services: Vec<ServiceBytes> = sums
        .into_iter()
        .map(|(service, (up, down))| ServiceBytes {
            service: service.to_string(),
            up,
            down,
        })
        .collect();
    services.sort_by_key(|s| order(&s.service));
    DeviceUsage {
        device,
        from,
        services,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(since: u64, ssh: (u64, u64)) -> UsageReport {
        UsageReport {
            since,
            services: vec![ServiceBytes {
                service: "ssh".into(),
                up: ssh.0,
                down: ssh.1,
            }],
        }
    }

    #[test]
    fn growth_is_added_once_and_a_restart_counts_from_zero() {
        let t0 = 10 * DAY + 100;
        let r = absorb_into(UsageRecord::default(), &report(5, (100, 10)), t0).unwrap();
        // The same snapshot again (every presence report) changes nothing.
        assert!(absorb_into(r.clone(), &report(5, (100, 10)), t0 + 10).is_none());
        let r = absorb_into(r, &report(5, (150, 30)), t0 + 20).unwrap();
        assert_eq!(r.days[&(10 * DAY)]["ssh"], (150, 30));
        // The agent restarted: its counters began again at zero.
        let r = absorb_into(r, &report(9, (7, 3)), t0 + 30).unwrap();
        assert_eq!(r.days[&(10 * DAY)]["ssh"], (157, 33));
        // The next day has its own total.
        let r = absorb_into(r, &report(9, (17, 3)), t0 + DAY).unwrap();
        assert_eq!(r.days[&(11 * DAY)]["ssh"], (10, 0));
        let u = summed("d".into(), &r, 11 * DAY);
        assert_eq!(
            u.services,
            vec![ServiceBytes {
                service: "ssh".into(),
                up: 10,
                down: 0
            }]
        );
        let u = summed("d".into(), &r, 10 * DAY);
        assert_eq!((u.services[0].up, u.services[0].down), (167, 33));
    }

    #[test]
    fn months_start_on_the_first_at_midnight_utc() {
        // 2026-12-06T03:00:00Z -> 2026-12-01T00:00:00Z; 2024-02-29 -> 2024-02-01.
        assert_eq!(month_start(1_796_526_000), 1_796_083_200);
        assert_eq!(month_start(1_709_208_000), 1_706_745_600);
        assert_eq!(month_start(0), 0);
        let mut r = absorb_into(
            UsageRecord::default(),
            &report(1, (600, 400)),
            1_796_526_000,
        )
        .unwrap();
        r.days
            .entry(1_796_083_200 - DAY)
            .or_default()
            .insert("ssh".into(), (5000, 0));
        r.days
            .get_mut(&(1_796_526_000 - 1_796_526_000 % DAY))
            .unwrap()
            .insert("sftp".into(), (300, 0));
        assert_eq!(month_total(&r, 1_796_526_000), 1000);
    }

    #[test]
    fn old_days_are_dropped_and_junk_services_ignored() {
        let mut r = absorb_into(UsageRecord::default(), &report(1, (1, 1)), 0).unwrap();
        let mut junk = report(1, (2, 2));
        junk.services.push(ServiceBytes {
            service: "x".repeat(100),
            up: 5,
            down: 5,
        });
        r = absorb_into(r, &junk, (KEEP_DAYS + 5) * DAY).unwrap();
        assert_eq!(r.days.len(), 1);
        assert_eq!(r.last.services.len(), 1);
    }
}
