//! Recordings at scale through the real tsh, gateway and authority (issue 28): `tsh
//! recordings ls` pages newest first (`--limit`, `--all`) without gaps or duplicates, a
//! store from before paging is rewritten when the authority opens it, and `tsh play`
//! streams a 100 MB recording back byte-exact.
//!
//! The recordings are written straight into the authority's store while it is stopped
//! (through the authority's own `recordings::append`, as its audit intake does): hundreds of
//! real sessions would take minutes.

// Test code, helpers included: failing loudly is its job.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::collections::HashSet;
use std::time::Instant;

use edgeport_authority::recordings;
use edgeport_authority::store::{self, SledStore, Store, Table};
use edgeport_authority::users::UserRecord;
use edgeport_e2e::fabric::Gateway;
use edgeport_e2e::ssh::Tsh;
use edgeport_e2e::{Authority, TempDir};
use edgeport_proto::audit::RecordingInfo;
use serde_json::Value;

const PW: &str = "correct horse battery";
/// Recordings of alice's (besides the big one and two old-layout ones).
const MANY: u64 = 300;
const BIG: usize = 100 * 1024 * 1024;

fn big_byte(i: usize) -> u8 {
    b"abcdefghijklmnopqrstuvwxyz0123456789 \n"[(i * 31 + i / 4093) % 38]
}

fn ids(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| r["session_id"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn recordings_page_newest_first_and_play_streams_100_mb() {
    let tmp = TempDir::new();
    let auth_dir = tmp.join("authority");
    let mut auth = Authority::start(&auth_dir, "rec");
    let gw = Gateway::start(&tmp.join("gateway"), &auth);
    auth.add_user("alice", "root", PW);
    let tsh = Tsh::new(tmp.join("tsh-home"), &gw.addr);
    tsh.login("alice", PW, &gw.ca_pin, &[])
        .expect_ok("tsh login");

    // With the authority stopped, fill its store.
    let (addr, cluster) = (auth.addr.clone(), auth.cluster.clone());
    auth.proc.stop();
    let t0 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let written = Instant::now();
    {
        let st = SledStore::open(&auth_dir.join("store")).unwrap();
        let alice: UserRecord = store::get(&st, Table::Users, "alice").unwrap().unwrap();
        let rec = |sid: &str, user: &str, started_ms: u64| RecordingInfo {
            session_id: sid.into(),
            device: "dev1".into(),
            user: user.into(),
            login: "root".into(),
            started_ms,
            bytes: 0,
            user_id: if user == "alice" {
                alice.id.clone()
            } else {
                "someone-else".into()
            },
        };
        // Shuffled start times, one second apart; every third one is another user's.
        for i in 0..MANY * 3 / 2 {
            let k = (i * 7919) % (MANY * 3 / 2);
            let user = if k % 3 == 2 { "carol" } else { "alice" };
            let started = t0 + k * 1000;
            recordings::append(
                &st,
                rec(&format!("s{k:05}"), user, started),
                started,
                b"x\n",
            )
            .unwrap();
        }
        // Two recordings as an authority from before paging stored them (its store has no
        // note that the rewrite ran).
        st.delete(Table::AuditState, "@recordings-layout").unwrap();
        for (n, sid) in ["legacy1", "legacy2"].iter().enumerate() {
            let mut old = rec(sid, "alice", t0 - 10_000 + n as u64);
            old.bytes = 12;
            st.put(
                Table::RecordingIndex,
                sid,
                serde_json::to_vec(&old).unwrap(),
            )
            .unwrap();
            st.put(
                Table::Recordings,
                &format!("{sid}/{:020}", 2),
                b"legacy ".to_vec(),
            )
            .unwrap();
            st.put(
                Table::Recordings,
                &format!("{sid}/{:020}", 5),
                b"cast\n".to_vec(),
            )
            .unwrap();
        }
        // The big one, newest, in the agent's 16 KiB pieces.
        let piece = 16 * 1024;
        let mut at = 0;
        while at < BIG {
            let len = piece.min(BIG - at);
            let data: Vec<u8> = (at..at + len).map(big_byte).collect();
            let started = t0 + MANY * 3 * 1000;
            recordings::append(&st, rec("big", "alice", started), started, &data).unwrap();
            at += len;
        }
        st.flush().unwrap();
    }
    eprintln!("MEASURE wrote the store: {:?}", written.elapsed());
    auth = Authority::start_at(&auth_dir, &cluster, &addr);

    // The newest page by default (50), newest first; the big one is the newest.
    let listed = Instant::now();
    let page = tsh
        .run(&["recordings", "ls", "--format", "json"], None)
        .expect_ok("tsh recordings ls")
        .json();
    eprintln!("MEASURE tsh recordings ls (50): {:?}", listed.elapsed());
    let page = ids(&page);
    assert_eq!(page.len(), 50, "{page:?}");
    assert_eq!(page[0], "big");
    let alice_newest: Vec<String> = (0..MANY * 3 / 2)
        .rev()
        .filter(|k| k % 3 != 2)
        .map(|k| format!("s{k:05}"))
        .collect();
    assert_eq!(page[1..], alice_newest[..49]);

    let seven = tsh
        .run(
            &["recordings", "ls", "--format", "json", "--limit", "7"],
            None,
        )
        .expect_ok("tsh recordings ls --limit 7")
        .json();
    assert_eq!(ids(&seven), page[..7]);
    // A limit above one page is several requests, stitched together.
    let many = tsh
        .run(
            &["recordings", "ls", "--format", "json", "--limit", "150"],
            None,
        )
        .expect_ok("tsh recordings ls --limit 150")
        .json();
    assert_eq!(ids(&many)[..50], page[..]);
    assert_eq!(ids(&many).len(), 150);

    // Every one, once, newest first: the legacy ones (rewritten on open) last.
    let listed = Instant::now();
    let all = tsh
        .run(&["recordings", "ls", "--format", "json", "--all"], None)
        .expect_ok("tsh recordings ls --all")
        .json();
    eprintln!(
        "MEASURE tsh recordings ls --all ({}): {:?}",
        MANY + 3,
        listed.elapsed()
    );
    let all = ids(&all);
    assert_eq!(all.len() as u64, MANY + 3, "{all:?}");
    assert_eq!(
        all.iter().collect::<HashSet<_>>().len(),
        all.len(),
        "duplicates"
    );
    assert_eq!(all[1..=MANY as usize], alice_newest[..]);
    assert_eq!(all[MANY as usize + 1..], ["legacy2", "legacy1"]);
    assert!(
        !all.iter().any(|s| ids_of_carol(s)),
        "another user's recording listed"
    );

    // Text: the same page, and a hint that there is more.
    let text = tsh
        .run(&["recordings", "ls", "--limit", "3"], None)
        .expect_ok("tsh recordings ls --limit 3");
    assert_eq!(text.stdout().lines().count(), 2 + 3, "{}", text.stdout());
    assert!(text.stdout().contains("big"));
    assert!(text.stderr().contains("--all"), "{}", text.stderr());
    let bad = tsh.run(&["recordings", "ls", "--limit", "0"], None);
    assert_eq!(bad.code(), Some(2), "{}", bad.stderr());

    // A rewritten legacy recording plays as before.
    let legacy = tsh
        .run(&["play", "legacy1", "--format", "cast"], None)
        .expect_ok("tsh play legacy1");
    assert_eq!(legacy.stdout(), "legacy cast\n");

    // 100 MB back, byte-exact.
    let played = Instant::now();
    let out = tsh
        .run(&["play", "big", "--format", "cast"], None)
        .expect_ok("tsh play big");
    let secs = played.elapsed().as_secs_f64();
    eprintln!(
        "MEASURE tsh play 100 MB: {secs:.1} s ({:.1} MB/s)",
        100.0 / secs.max(1e-9)
    );
    let got = &out.out.stdout;
    assert_eq!(got.len(), BIG);
    if let Some(i) = (0..BIG).find(|&i| got[i] != big_byte(i)) {
        panic!("byte {i} differs");
    }
    drop(auth);
}

fn ids_of_carol(sid: &str) -> bool {
    sid.strip_prefix('s')
        .and_then(|k| k.parse::<u64>().ok())
        .is_some_and(|k| k % 3 == 2)
}
