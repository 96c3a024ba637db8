//! Locks on users and devices (DESIGN §6): they take effect at once. The authority refuses
//! logins, certificates and dial authorisations under a lock, and hands the current list to
//! every gateway with each presence acknowledgement so gateways and agents can act on it.

use edgeport_proto::rpc::{LockSpec, LockTarget, RpcError};

use crate::errors::{invalid, not_found};
use crate::store::{self, Store, Table};
use crate::users::check_name;

/// Longest lock message kept (it is shown to users and logged by agents).
const MAX_MESSAGE_LEN: usize = 512;

/// The message of the lock a user's removal leaves (see [`lock_removed_user`]).
pub const USER_REMOVED: &str = "the user was removed";

/// A removed user's live sessions end as under a lock: one that lasts as long as any
/// certificate the user may still hold (`max_ttl`), unless a lock is already in force.
pub fn lock_removed_user(
    store: &dyn Store,
    name: &str,
    max_ttl: u64,
    now: u64,
) -> Result<(), RpcError> {
    let target = LockTarget::User(name.to_string());
    if find(store, &target, now)?.is_some() {
        return Ok(());
    }
    add(
        store,
        &LockSpec {
            target,
            message: USER_REMOVED.to_string(),
            expires: now + max_ttl.max(1),
        },
        now,
    )
}

/// A new user of a removed user's name starts without the removal's lock (an
/// administrator's own lock on the name stays). Returns whether there was one: gateways must
/// then fetch the lock list again.
pub fn clear_removed_user(store: &dyn Store, name: &str) -> Result<bool, RpcError> {
    let key = key(&LockTarget::User(name.to_string()));
    if store::get::<LockSpec>(store, Table::Locks, &key)?.is_some_and(|l| l.message == USER_REMOVED)
    {
        store.delete(Table::Locks, &key)?;
        return Ok(true);
    }
    Ok(false)
}

fn key(target: &LockTarget) -> String {
    match target {
        LockTarget::User(n) => format!("user/{n}"),
        LockTarget::Device(n) => format!("device/{n}"),
        LockTarget::Gateway(n) => format!("gateway/{n}"),
    }
}

/// `user alice` / `device van-1`, for messages.
pub fn describe(target: &LockTarget) -> String {
    match target {
        LockTarget::User(n) => format!("user {n}"),
        LockTarget::Device(n) => format!("device {n}"),
        LockTarget::Gateway(n) => format!("gateway {n}"),
    }
}

fn is_active(l: &LockSpec, now: u64) -> bool {
    l.expires == 0 || l.expires > now
}

pub fn add(store: &dyn Store, spec: &LockSpec, now: u64) -> Result<(), RpcError> {
    match &spec.target {
        LockTarget::User(n) => check_name("user name", n)?,
        LockTarget::Device(n) => check_name("device id", n)?,
        LockTarget::Gateway(n) => check_name("gateway id", n)?,
    }
    if spec.expires != 0 && spec.expires <= now {
        return Err(invalid("the lock would already have expired"));
    }
    if spec.message.len() > MAX_MESSAGE_LEN || spec.message.chars().any(char::is_control) {
        return Err(invalid(format!(
            "the lock message must be at most {MAX_MESSAGE_LEN} printable characters"
        )));
    }
    store::put(store, Table::Locks, &key(&spec.target), spec)?;
    Ok(())
}

pub fn remove(store: &dyn Store, target: &LockTarget) -> Result<(), RpcError> {
    match store.delete(Table::Locks, &key(target))? {
        Some(_) => Ok(()),
        None => Err(not_found(format!("{} is not locked", describe(target)))),
    }
}

/// The locks in force, dropping expired ones from the store.
pub fn active(store: &dyn Store, now: u64) -> Result<Vec<LockSpec>, RpcError> {
    let mut out = Vec::new();
    for (k, l) in store::list::<LockSpec>(store, Table::Locks, "")? {
        if is_active(&l, now) {
            out.push(l);
        } else {
            store.delete(Table::Locks, &k)?;
        }
    }
    Ok(out)
}

/// The lock in force on `target`, if any.
pub fn find(
    store: &dyn Store,
    target: &LockTarget,
    now: u64,
) -> Result<Option<LockSpec>, RpcError> {
    Ok(store::get::<LockSpec>(store, Table::Locks, &key(target))?.filter(|l| is_active(l, now)))
}

/// "user bob is locked" plus the administrator's message, if any.
pub fn locked_message(lock: &LockSpec) -> String {
    if lock.message.is_empty() {
        format!("{} is locked", describe(&lock.target))
    } else {
        format!("{} is locked: {}", describe(&lock.target), lock.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locks_expire_and_are_listed() {
        let d = tempfile::tempdir().unwrap();
        let s = crate::store::SledStore::open(&d.path().join("s")).unwrap();
        let bob = LockTarget::User("bob".into());
        add(
            &s,
            &LockSpec {
                target: bob.clone(),
                message: "offboarding".into(),
                expires: 100,
            },
            10,
        )
        .unwrap();
        add(
            &s,
            &LockSpec {
                target: LockTarget::Device("van-1".into()),
                message: String::new(),
                expires: 0,
            },
            10,
        )
        .unwrap();
        let l = find(&s, &bob, 50).unwrap().unwrap();
        assert_eq!(locked_message(&l), "user bob is locked: offboarding");
        assert_eq!(active(&s, 50).unwrap().len(), 2);
        assert!(find(&s, &bob, 100).unwrap().is_none());
        assert_eq!(active(&s, 100).unwrap().len(), 1);
        assert!(remove(&s, &bob).is_err());
        remove(&s, &LockTarget::Device("van-1".into())).unwrap();
        assert!(active(&s, 100).unwrap().is_empty());
    }
}
