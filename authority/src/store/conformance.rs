//! What every [`Store`] must do, as checks that run against any implementation: the unit
//! tests run them on sled, the end-to-end tests on a real PostgreSQL server. Each returns
//! what went wrong instead of panicking, so it can live outside `#[cfg(test)]`.

use std::sync::{Arc, Barrier};

use super::{get, update, Store, StoreError, Table};

type Checked = Result<(), String>;

macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+));
        }
    };
}

fn s<T>(r: Result<T, StoreError>) -> Result<T, String> {
    r.map_err(|e| e.to_string())
}

fn keys(rows: Vec<(String, Vec<u8>)>) -> Vec<String> {
    rows.into_iter().map(|(k, _)| k).collect()
}

/// Every check in turn. The store should be empty; the checks leave records behind.
pub fn run_all(store: Arc<dyn Store>) -> Checked {
    basic_operations(&*store)?;
    prefix_scans_are_ordered_and_exact(&*store)?;
    range_pages_are_bounded_and_exact(&*store)?;
    cas_race_has_exactly_one_winner(store.clone())?;
    update_counts_every_increment_under_contention(store.clone())?;
    corrupt_records_are_reported(&*store)?;
    every_table_is_its_own_namespace(&*store)
}

/// Each table of [`Table::ALL`] (the newest included) keeps its own keys.
pub fn every_table_is_its_own_namespace(st: &dyn Store) -> Checked {
    for (i, t) in Table::ALL.iter().enumerate() {
        s(st.put(*t, "ns/k", i.to_string().into_bytes()))?;
    }
    for (i, t) in Table::ALL.iter().enumerate() {
        let got = s(st.get(*t, "ns/k"))?;
        ensure!(
            got == Some(i.to_string().into_bytes()),
            "table {} read another table's record: {got:?}",
            t.name()
        );
        ensure!(
            s(st.delete(*t, "ns/k"))?.is_some(),
            "table {} lost its record",
            t.name()
        );
    }
    Ok(())
}

pub fn basic_operations(st: &dyn Store) -> Checked {
    ensure!(
        s(st.get(Table::Users, "a"))?.is_none(),
        "a missing key reads as a value"
    );
    s(st.put(Table::Users, "a", b"1".to_vec()))?;
    s(st.put(Table::Users, "ab", b"2".to_vec()))?;
    s(st.put(Table::Users, "b", b"3".to_vec()))?;
    s(st.put(Table::Users, "b", b"3".to_vec()))?; // a put replaces
    s(st.put(Table::Devices, "a", b"x".to_vec()))?; // tables are separate namespaces
    let a = s(st.get(Table::Users, "a"))?;
    ensure!(a.as_deref() == Some(&b"1"[..]), "users/a reads {a:?}");
    let ks = keys(s(st.scan_prefix(Table::Users, "a"))?);
    ensure!(ks == ["a", "ab"], "prefix a lists {ks:?}");
    let n = s(st.scan_prefix(Table::Users, ""))?.len();
    ensure!(n == 3, "the users table lists {n} records");
    let gone = s(st.delete(Table::Users, "a"))?;
    ensure!(
        gone.as_deref() == Some(&b"1"[..]),
        "delete returned {gone:?}"
    );
    ensure!(
        s(st.delete(Table::Users, "a"))?.is_none(),
        "a second delete found a value"
    );
    ensure!(
        !s(st.compare_and_swap(Table::Users, "b", Some(b"nope"), None))?,
        "CAS with a wrong expected value swapped"
    );
    ensure!(
        s(st.compare_and_swap(Table::Users, "b", Some(b"3"), Some(b"4".to_vec())))?,
        "CAS with the right expected value did not swap"
    );
    ensure!(
        s(st.compare_and_swap(Table::Users, "new", None, Some(b"5".to_vec())))?,
        "CAS from absent did not create"
    );
    ensure!(
        !s(st.compare_and_swap(Table::Users, "new", None, Some(b"6".to_vec())))?,
        "CAS from absent replaced an existing record"
    );
    ensure!(
        s(st.compare_and_swap(Table::Users, "new", Some(b"5"), None))?,
        "CAS to absent did not delete"
    );
    ensure!(
        s(st.get(Table::Users, "new"))?.is_none(),
        "CAS to absent left the record"
    );
    ensure!(
        s(st.compare_and_swap(Table::Users, "new", None, None))?,
        "CAS absent -> absent on a missing key failed"
    );
    ensure!(
        !s(st.compare_and_swap(Table::Users, "b", None, None))?,
        "CAS absent -> absent on a present key succeeded"
    );
    s(st.flush())
}

/// Keys compare bytewise, as the audit log's zero-padded sequence numbers need, any byte
/// (NUL too) may be in a key, and a prefix never matches a longer id (`d/van-1/` is not
/// `d/van-10/`).
pub fn prefix_scans_are_ordered_and_exact(st: &dyn Store) -> Checked {
    for k in [
        "d/van-10/00000000000000000001",
        "d/van-1/00000000000000000002",
        "d/van-1/00000000000000000010",
        "d/van-1/00000000000000000001",
        "d/Van-1/00000000000000000001",
        "d/van-1/\u{e9}",
        "d/van-1_/1",
        "d/van-1/\u{0}nul",
        "e",
    ] {
        s(st.put(Table::AuditEvents, k, k.as_bytes().to_vec()))?;
    }
    let ks = keys(s(st.scan_prefix(Table::AuditEvents, "d/van-1/"))?);
    ensure!(
        ks == [
            "d/van-1/\u{0}nul",
            "d/van-1/00000000000000000001",
            "d/van-1/00000000000000000002",
            "d/van-1/00000000000000000010",
            "d/van-1/\u{e9}",
        ],
        "prefix d/van-1/ lists {ks:?}"
    );
    let all = keys(s(st.scan_prefix(Table::AuditEvents, ""))?);
    let mut sorted = all.clone();
    sorted.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    ensure!(all == sorted, "a full scan is not in byte order: {all:?}");
    ensure!(all.len() == 9, "a full scan lists {} of 9", all.len());
    Ok(())
}

/// `scan_from` pages through a prefix in key order: at most `limit` rows, starting at
/// `from` (or the prefix), never past the prefix, and paging on from the last key + `\0`
/// visits every key once.
pub fn range_pages_are_bounded_and_exact(st: &dyn Store) -> Checked {
    for i in 0..25u32 {
        let k = format!("s1/e{i:020}");
        s(st.put(Table::Recordings, &k, k.as_bytes().to_vec()))?;
    }
    for k in ["s1", "s10/e00000000000000000001", "s0/e1", "s1/"] {
        s(st.put(Table::Recordings, k, Vec::new()))?;
    }
    let first = keys(s(st.scan_from(Table::Recordings, "s1/e", "", 3))?);
    ensure!(
        first
            == [
                "s1/e00000000000000000000",
                "s1/e00000000000000000001",
                "s1/e00000000000000000002"
            ],
        "the first page lists {first:?}"
    );
    let mid = keys(s(st.scan_from(
        Table::Recordings,
        "s1/e",
        "s1/e00000000000000000023",
        10,
    ))?);
    ensure!(
        mid == ["s1/e00000000000000000023", "s1/e00000000000000000024"],
        "a page from key 23 lists {mid:?} (it must stop at the prefix's end)"
    );
    let mut seen = Vec::new();
    let mut from = String::new();
    loop {
        let page = keys(s(st.scan_from(Table::Recordings, "s1/e", &from, 4))?);
        ensure!(page.len() <= 4, "a page of 4 has {} rows", page.len());
        let Some(last) = page.last() else { break };
        from = format!("{last}\u{0}");
        seen.extend(page);
    }
    let want: Vec<String> = (0..25u32).map(|i| format!("s1/e{i:020}")).collect();
    ensure!(seen == want, "paging visited {seen:?}");
    ensure!(
        s(st.scan_from(Table::Recordings, "s1/e", "s1/e", 0))?.is_empty(),
        "a page of 0 has rows"
    );
    let whole = s(st.scan_from(Table::Recordings, "", "s1/", 2))?;
    ensure!(
        keys(whole) == ["s1/", "s1/e00000000000000000000"],
        "an empty prefix pages the whole table from `from`"
    );
    Ok(())
}

/// Eight threads try to take one token at once: exactly one succeeds.
pub fn cas_race_has_exactly_one_winner(st: Arc<dyn Store>) -> Checked {
    s(st.put(Table::Tokens, "t", b"unused".to_vec()))?;
    let barrier = Arc::new(Barrier::new(8));
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let (st, barrier) = (st.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                st.compare_and_swap(
                    Table::Tokens,
                    "t",
                    Some(b"unused"),
                    Some(format!("used by {i}").into_bytes()),
                )
            })
        })
        .collect();
    let mut wins = 0;
    for h in handles {
        match h.join() {
            Ok(Ok(true)) => wins += 1,
            Ok(Ok(false)) => {}
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err("a racing thread panicked".into()),
        }
    }
    ensure!(wins == 1, "{wins} threads took the same token");
    Ok(())
}

/// Read-modify-write from four threads loses no increment.
pub fn update_counts_every_increment_under_contention(st: Arc<dyn Store>) -> Checked {
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let st = st.clone();
            std::thread::spawn(move || -> Result<(), StoreError> {
                for _ in 0..50 {
                    update::<u64, StoreError, _>(&*st, Table::Users, "n", |n| {
                        Ok(Some(n.unwrap_or(0) + 1))
                    })?;
                }
                Ok(())
            })
        })
        .collect();
    for h in handles {
        match h.join() {
            Ok(r) => s(r)?,
            Err(_) => return Err("an updating thread panicked".into()),
        }
    }
    let n = s(get::<u64>(&*st, Table::Users, "n"))?;
    ensure!(n == Some(200), "200 increments made {n:?}");
    Ok(())
}

pub fn corrupt_records_are_reported(st: &dyn Store) -> Checked {
    s(st.put(Table::Users, "x", b"{not json".to_vec()))?;
    match get::<u64>(st, Table::Users, "x") {
        Err(StoreError::Corrupt { .. }) => Ok(()),
        other => Err(format!("a corrupt record read as {other:?}")),
    }
}
