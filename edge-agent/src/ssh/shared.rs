//! Shared and moderated sessions (`tsh join`, issue 29). A PTY session is registered here
//! under its session id while it runs. Another user joins it over an SSH connection of
//! their own, with their own certificate, by the exec request
//! `edgeport-join@edgeport.dev SESSION_ID MODE`: the right to join in that mode comes from
//! the roles extension of the joiner's certificate (signed by the user CA) matched against
//! this device's labels, never from anything the gateway says. The terminal output goes to
//! every participant; a peer's or moderator's keystrokes go to the terminal, an observer's
//! are dropped with one notice. Joins and leaves are shown to everyone, recorded as
//! asciicast markers and audited (`session.join`, `session.leave`).
//!
//! A session whose user's roles require a moderator on this device waits (its program not
//! started) until a moderator joins, and is ended when the last moderator leaves.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use edgeport_proto::sshcert::RolesExtension;
use russh::server::{Handle, Msg};
use russh::{ChannelId, ChannelMsg, ChannelReadHalf, ChannelWriteHalf};
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, watch};

use super::process::Group;
use super::pty::PtyMaster;

/// The exec request that joins a session: `JOIN_COMMAND SESSION_ID MODE`.
pub const JOIN_COMMAND: &str = "edgeport-join@edgeport.dev";
/// Output chunks queued per participant (a terminal read is a few KiB); a participant that
/// falls further behind misses output rather than slowing the session down.
const QUEUE: usize = 64;
/// The key a participant leaves with: Ctrl-] (telnet's escape).
const LEAVE_KEY: u8 = 0x1d;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Observer,
    Peer,
    Moderator,
}

impl Mode {
    pub fn parse(s: &str) -> Option<Mode> {
        match s {
            "observer" => Some(Mode::Observer),
            "peer" => Some(Mode::Peer),
            "moderator" => Some(Mode::Moderator),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Observer => "observer",
            Mode::Peer => "peer",
            Mode::Moderator => "moderator",
        }
    }
}

/// The session id and mode of a join request's arguments (after [`JOIN_COMMAND`]).
pub fn parse_join(args: &str) -> Result<(String, Mode), String> {
    let mut it = args.split_whitespace();
    let (Some(id), mode, None) = (it.next(), it.next(), it.next()) else {
        return Err(format!(
            "usage: {JOIN_COMMAND} SESSION_ID [observer|peer|moderator]"
        ));
    };
    let mode = mode.unwrap_or("observer");
    let mode = Mode::parse(mode)
        .ok_or_else(|| format!("unknown join mode {mode:?}: observer, peer or moderator"))?;
    Ok((id.to_string(), mode))
}

/// Whether the certificate's roles let its user join sessions on a device with `labels` in
/// `mode`; the refusal says why in one line.
pub fn check_join(
    roles: &RolesExtension,
    labels: &BTreeMap<String, String>,
    mode: Mode,
) -> Result<(), String> {
    if roles.may_join(labels, mode.as_str()) {
        Ok(())
    } else {
        Err(format!(
            "your roles do not allow joining sessions on this device as {}",
            mode.as_str()
        ))
    }
}

/// A moderator is someone other than the session's own user: otherwise a user whose roles
/// both require a moderator and grant moderating could open their own session's gate from
/// a second channel.
pub fn check_not_own_moderator(owner: &str, user: &str, mode: Mode) -> Result<(), String> {
    if mode == Mode::Moderator && owner == user {
        Err("a session's own user cannot moderate it".to_string())
    } else {
        Ok(())
    }
}

/// Live shareable sessions by id.
pub type Registry = Arc<Mutex<HashMap<String, Arc<Shared>>>>;

/// Where a moderated session stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gate {
    Waiting,
    Go,
    Ended,
}

/// One shareable session.
pub struct Shared {
    pub id: String,
    pub owner: String,
    pub device: String,
    pub moderated: bool,
    registry: Registry,
    /// The owner's channel, for notices.
    owner_out: (Handle, ChannelId),
    state: Mutex<State>,
    gate: watch::Sender<Gate>,
}

#[derive(Default)]
struct State {
    master: Option<Arc<PtyMaster>>,
    group: Option<Arc<Group>>,
    recorder: Option<Recorder>,
    parts: Vec<Part>,
    next: u64,
    ended: bool,
}

type Recorder = Arc<Mutex<crate::audit::record::Recorder>>;

struct Part {
    id: u64,
    user: String,
    mode: Mode,
    tx: mpsc::Sender<Vec<u8>>,
}

impl Shared {
    /// Registers the session `id` of `owner`, whose channel is `owner_out`.
    pub fn register(
        registry: &Registry,
        id: &str,
        owner: &str,
        device: &str,
        moderated: bool,
        owner_out: (Handle, ChannelId),
    ) -> Option<Arc<Shared>> {
        let (gate, _) = watch::channel(Gate::Waiting);
        let me = Arc::new(Shared {
            id: id.to_string(),
            owner: owner.to_string(),
            device: device.to_string(),
            moderated,
            registry: registry.clone(),
            owner_out,
            state: Mutex::new(State::default()),
            gate,
        });
        let mut reg = registry.lock().ok()?;
        // One shareable session per id (the first PTY channel of a connection).
        if reg.contains_key(id) {
            return None;
        }
        reg.insert(id.to_string(), me.clone());
        Some(me)
    }

    pub fn find(registry: &Registry, id: &str) -> Option<Arc<Shared>> {
        registry.lock().ok()?.get(id).cloned()
    }

    pub fn gate(&self) -> watch::Receiver<Gate> {
        self.gate.subscribe()
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> Option<T> {
        self.state.lock().ok().map(|mut s| f(&mut s))
    }

    /// The program runs: its terminal, process group and recording. The recording gets a
    /// marker for each participant already there (the moderator who let it start).
    pub fn started(&self, master: Arc<PtyMaster>, group: Arc<Group>, recorder: Option<Recorder>) {
        self.with(|s| {
            if let Some(r) = &recorder {
                if let Ok(mut r) = r.lock() {
                    for p in &s.parts {
                        r.marker(&format!("{} joined as {}", p.user, p.mode.as_str()));
                    }
                }
            }
            s.master = Some(master);
            s.group = Some(group);
            s.recorder = recorder;
        });
    }

    /// Terminal output, to every participant.
    pub fn output(&self, data: &[u8]) {
        self.with(|s| {
            for p in &s.parts {
                let _ = p.tx.try_send(data.to_vec());
            }
        });
    }

    /// A line for everyone in the session and in the recording: `*** text ***`.
    fn notice(&self, text: &str) {
        let line = format!("\r\n*** {text} ***\r\n");
        self.with(|s| {
            if let Some(r) = &s.recorder {
                if let Ok(mut r) = r.lock() {
                    r.marker(text);
                    r.output(line.as_bytes());
                }
            }
            for p in &s.parts {
                let _ = p.tx.try_send(line.clone().into_bytes());
            }
        });
        let (h, ch) = self.owner_out.clone();
        tokio::spawn(async move {
            let _ = h.data(ch, line.into_bytes()).await;
        });
    }

    fn moderators(s: &State) -> usize {
        s.parts.iter().filter(|p| p.mode == Mode::Moderator).count()
    }

    /// Adds a participant; None when the session has ended.
    fn attach(&self, user: &str, mode: Mode) -> Option<(u64, mpsc::Receiver<Vec<u8>>)> {
        let (tx, rx) = mpsc::channel(QUEUE);
        let id = self
            .with(|s| {
                if s.ended {
                    return None;
                }
                s.next += 1;
                s.parts.push(Part {
                    id: s.next,
                    user: user.to_string(),
                    mode,
                    tx,
                });
                Some(s.next)
            })
            .flatten()?;
        self.notice(&format!("{user} joined as {}", mode.as_str()));
        if mode == Mode::Moderator {
            self.gate.send_if_modified(|g| {
                let open = *g == Gate::Waiting;
                if open {
                    *g = Gate::Go;
                }
                open
            });
        }
        Some((id, rx))
    }

    /// Removes a participant; a moderated session whose last moderator left ends.
    fn detach(&self, id: u64) {
        let Some((user, last_moderator)) = self
            .with(|s| {
                let i = s.parts.iter().position(|p| p.id == id)?;
                let p = s.parts.remove(i);
                let last = self.moderated && p.mode == Mode::Moderator && Self::moderators(s) == 0;
                Some((p.user, last && !s.ended))
            })
            .flatten()
        else {
            return;
        };
        self.notice(&format!("{user} left"));
        if last_moderator && *self.gate.borrow() == Gate::Go {
            self.notice(&format!(
                "session {} ended: the last moderator left",
                self.id
            ));
            let group = self.with(|s| s.group.clone()).flatten();
            if let Some(g) = group {
                tokio::spawn(async move { g.terminate(Duration::from_secs(2)).await });
            }
        }
    }

    /// Keystrokes of a peer or moderator, to the terminal.
    async fn input(&self, data: &[u8]) {
        if let Some(m) = self.with(|s| s.master.clone()).flatten() {
            let _ = m.write_all(data).await;
        }
    }

    /// The session is over: unregistered, every participant's channel closed.
    pub fn end(&self) {
        self.with(|s| {
            s.ended = true;
            s.parts.clear();
        });
        self.gate.send_replace(Gate::Ended);
        if let Ok(mut reg) = self.registry.lock() {
            if reg.get(&self.id).is_some_and(|s| std::ptr::eq(&**s, self)) {
                reg.remove(&self.id);
            }
        }
    }
}

/// Who joins, from their accepted certificate and connection.
pub struct Joiner {
    pub user: String,
    pub login: String,
    pub connection: String,
}

/// Serves a participant's channel until they leave or the session ends. False when the
/// session ended before they got in.
pub fn join(
    shared: Arc<Shared>,
    who: Joiner,
    mode: Mode,
    (mut read, write): (ChannelReadHalf, ChannelWriteHalf<Msg>),
    handle: Handle,
    channel: ChannelId,
) -> bool {
    let Some((id, mut rx)) = shared.attach(&who.user, mode) else {
        return false;
    };
    audit_part("session.join", &shared, &who, mode);
    tracing::info!(session = %shared.id, user = %who.user, mode = mode.as_str(), "joined a session");
    tokio::spawn(async move {
        let mut out = write.make_writer();
        let mut warned = false;
        loop {
            tokio::select! {
                chunk = rx.recv() => match chunk {
                    Some(d) => {
                        if out.write_all(&d).await.is_err() {
                            break;
                        }
                    }
                    None => break,
                },
                msg = read.wait() => match msg {
                    // Ctrl-] leaves (as telnet's escape); an observer's Ctrl-C too.
                    Some(ChannelMsg::Data { data })
                        if data.contains(&LEAVE_KEY)
                            || (mode == Mode::Observer && data.contains(&0x03)) =>
                    {
                        break;
                    }
                    Some(ChannelMsg::Data { data }) => {
                        if mode != Mode::Observer {
                            shared.input(&data).await;
                        } else if !warned {
                            warned = true;
                            let line = b"\r\n*** you joined as an observer: your keystrokes are not sent (Ctrl-] leaves) ***\r\n";
                            let _ = out.write_all(line).await;
                        }
                    }
                    Some(ChannelMsg::Close) | None => break,
                    Some(_) => {}
                },
            }
        }
        shared.detach(id);
        audit_part("session.leave", &shared, &who, mode);
        tracing::info!(session = %shared.id, user = %who.user, "left a session");
        let _ = handle.exit_status_request(channel, 0).await;
        let _ = handle.eof(channel).await;
        let _ = handle.close(channel).await;
    });
    true
}

/// A participant's `session.join` or `session.leave`, in the session's own id.
fn audit_part(kind: &str, shared: &Shared, who: &Joiner, mode: Mode) {
    crate::audit::event(kind)
        .session(&shared.id)
        .user(&who.user)
        .login(&who.login)
        .field("participant", &who.user)
        .field("mode", mode.as_str())
        .field("device", &shared.device)
        .field("owner", &shared.owner)
        .field("connection", &who.connection)
        .emit();
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("id", &self.id)
            .field("owner", &self.owner)
            .field("moderated", &self.moderated)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgeport_proto::sshcert::JoinRule;

    fn labels(fleet: &str) -> BTreeMap<String, String> {
        BTreeMap::from([("fleet".to_string(), fleet.to_string())])
    }

    #[test]
    fn join_rights_come_from_the_certificate_roles() {
        let vans = BTreeMap::from([("fleet".to_string(), vec!["vans".to_string()])]);
        let mut roles = RolesExtension::every_device(vec!["support".into()]);
        roles.join = vec![JoinRule {
            labels: vans.clone(),
            modes: vec!["observer".into()],
        }];
        assert!(check_join(&roles, &labels("vans"), Mode::Observer).is_ok());
        // Another mode, another fleet: refused, in one line naming the mode.
        let e = check_join(&roles, &labels("vans"), Mode::Peer).unwrap_err();
        assert!(e.contains("as peer") && !e.contains('\n'), "{e}");
        assert!(check_join(&roles, &labels("medical"), Mode::Observer).is_err());
        // No join rule at all: nothing, whatever the device.
        let plain = RolesExtension::every_device(vec!["field".into()]);
        for m in [Mode::Observer, Mode::Peer, Mode::Moderator] {
            assert!(check_join(&plain, &labels("vans"), m).is_err());
        }
        // Deny labels win over a join rule.
        let mut denied = roles.clone();
        denied.deny_labels = BTreeMap::from([("fleet".to_string(), vec!["vans".to_string()])]);
        assert!(check_join(&denied, &labels("vans"), Mode::Observer).is_err());
    }

    #[test]
    fn nobody_moderates_their_own_session() {
        assert!(check_not_own_moderator("ann", "ann", Mode::Moderator).is_err());
        assert!(check_not_own_moderator("ann", "bob", Mode::Moderator).is_ok());
        assert!(check_not_own_moderator("ann", "ann", Mode::Observer).is_ok());
    }

    #[test]
    fn join_requests_parse() {
        assert_eq!(parse_join(" abc peer").unwrap(), ("abc".into(), Mode::Peer));
        assert_eq!(parse_join("abc").unwrap(), ("abc".into(), Mode::Observer));
        assert!(parse_join("abc owner").is_err());
        assert!(parse_join("").is_err());
        assert!(parse_join("a b c").is_err());
    }

    #[test]
    fn moderator_rules_match_labels() {
        let mut roles = RolesExtension::every_device(vec!["field".into()]);
        roles.require_moderator = vec![BTreeMap::from([(
            "fleet".to_string(),
            vec!["medical".to_string()],
        )])];
        assert!(roles.requires_moderator(&labels("medical")));
        assert!(!roles.requires_moderator(&labels("vans")));
    }
}
