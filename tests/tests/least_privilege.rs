//! What the agent keeps once attached, and what the systemd unit promises:
//! it runs as an unprivileged user with no capability it does not need,
//! under a seccomp filter, refuses to start when it could not give up what
//! it must, and still works with exactly the unit's user and capabilities.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use kdiag_tests::agent::Agent;
use kdiag_tests::cmd;
use kdiag_tests::env::{require_root, skip_unless};
use kdiag_tests::identity::{Cap, Identity};
use kdiag_tests::max_wait;
use kdiag_tests::netns::{NetnsPair, unique_port};
use kdiag_tests::peer::{ListenOptions, PEER_COMM, Peer};
use kdiag_tests::record::{self, port_field, u64_field};
use kdiag_tests::tempdir::TempDir;
use serde_json::{Value, json};

const PEER: &str = env!("CARGO_BIN_EXE_kdiag-peer");

/// Sends 100 bytes this often on ESTABLISHED test connections.
const SEND_EVERY_MS: u64 = 50;

/// Capabilities that must be gone once attached, from every set:
/// CAP_DAC_OVERRIDE (1), CAP_SYS_PTRACE (19), CAP_SYS_ADMIN (21).
const FORBIDDEN: u64 = (1 << 1) | (1 << 19) | (1 << 21);
/// The one capability the agent may keep (on kernels that need it).
const CAP_BPF: u64 = 1 << 39;

/// The highest exposure `systemd-analyze security` may rate the unit: 2.3
/// without network access, plus the Internet sockets (0.3) of its metrics
/// listener on loopback.
const MAX_EXPOSURE: f64 = 2.6;

fn unit_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kdiag-agent.service")
}

/// What deploy/kdiag-agent.service runs: as whom, and with which arguments.
struct Unit {
    /// The unit's `User=` (root if none) with its capabilities: the bounding
    /// set for root, the ambient set for another user.
    identity: Identity,
    /// The capabilities, by name, for messages.
    caps: Vec<Cap>,
    /// ExecStart's arguments.
    args: Vec<String>,
    /// The uid of the agent's `--user`.
    runs_as: u32,
}

impl Unit {
    fn read() -> Unit {
        let path = unit_path();
        let text =
            fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        // The last assignment of a key (each is assigned once here).
        let value = |key: &str| -> Option<String> {
            text.lines()
                .rev()
                .find_map(|l| l.trim().strip_prefix(key)?.strip_prefix('='))
                .map(|v| v.trim().to_owned())
        };
        let caps_of = |key: &str| -> Vec<Cap> {
            value(key)
                .unwrap_or_default()
                .split_whitespace()
                .map(|name| {
                    Cap::from_name(name).unwrap_or_else(|| {
                        panic!("the unit's {key} names {name}, which no test identity has")
                    })
                })
                .collect()
        };
        let exec = value("ExecStart").expect("the unit has no ExecStart");
        let mut args: Vec<String> = exec.split_whitespace().skip(1).map(str::to_owned).collect();
        // Tests run at once: each agent serves its metrics on a port of its
        // own, on loopback as the unit does.
        if let Some(i) = args.iter().position(|a| a == "--metrics-addr") {
            args[i + 1] = format!("127.0.0.1:{}", unique_port());
        }
        let user_arg = args
            .iter()
            .position(|a| a == "--user")
            .map_or("nobody", |i| args[i + 1].as_str());
        let (runs_as, _) = lookup_user(user_arg);
        let (identity, caps) = match value("User").filter(|u| !u.is_empty()) {
            None => {
                let caps = caps_of("CapabilityBoundingSet");
                (Identity::root_with(&caps), caps)
            }
            Some(user) => {
                let (uid, gid) = lookup_user(&user);
                let caps = caps_of("AmbientCapabilities");
                (Identity::user_with(uid, gid, &caps), caps)
            }
        };
        // Kernels before 5.11 charge the maps to this limit.
        let identity = match value("LimitMEMLOCK").as_deref() {
            None => identity,
            Some("infinity") => identity.with_memlock_limit(None),
            Some(bytes) => identity.with_memlock_limit(Some(bytes.parse().unwrap_or_else(|_| {
                panic!("the unit's LimitMEMLOCK={bytes} is neither infinity nor bytes")
            }))),
        };
        Unit {
            identity,
            caps,
            args,
            runs_as,
        }
    }

    /// ExecStart's arguments followed by `extra`.
    fn args_with(&self, extra: &[&str]) -> Vec<String> {
        let mut args = self.args.clone();
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        args
    }
}

/// The uid and gid of `name`, from /etc/passwd.
fn lookup_user(name: &str) -> (u32, u32) {
    let passwd = fs::read_to_string("/etc/passwd").expect("reading /etc/passwd");
    passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() > 3 && f[0] == name)
        .and_then(|f| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
        .unwrap_or_else(|| {
            panic!("no user {name} in /etc/passwd (`cargo xtask setup` creates the unit's)")
        })
}

fn spawn(who: Option<&Identity>, args: &[String]) -> Agent {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match who {
        Some(who) => Agent::spawn_as(who, &args),
        None => Agent::spawn(&args),
    }
}

/// The `name:` line of `status`, as its whitespace-separated fields.
fn status_field<'a>(status: &'a str, name: &str) -> Vec<&'a str> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {name} in {status}"))
        .split_whitespace()
        .collect()
}

/// Checks the running agent's /proc/PID/status and its `agent_start`: all
/// its ids are `uid` (not root), none of the forbidden capabilities is in
/// any set, it holds at most CAP_BPF (and says which in `agent_start`),
/// no_new_privs is set and a seccomp filter is installed.
fn assert_unprivileged(agent: &Agent, start: &Value, uid: u32) {
    assert_ne!(uid, 0, "the agent is to run as root");
    let status = fs::read_to_string(format!("/proc/{}/status", agent.pid())).unwrap();
    let uid_text = uid.to_string();
    assert_eq!(
        status_field(&status, "Uid"),
        [uid_text.as_str(); 4],
        "{status}"
    );
    let mask = |set: &str| u64::from_str_radix(status_field(&status, set)[0], 16).unwrap();
    for set in ["CapEff", "CapPrm", "CapBnd"] {
        assert_eq!(
            mask(set) & FORBIDDEN,
            0,
            "{set} holds a forbidden capability:\n{status}"
        );
    }
    let held = mask("CapEff");
    assert_eq!(mask("CapPrm"), held, "{status}");
    assert_eq!(held & !CAP_BPF, 0, "holds more than CAP_BPF:\n{status}");
    assert_eq!(mask("CapInh"), 0, "{status}");
    assert_eq!(mask("CapAmb"), 0, "{status}");
    assert_eq!(status_field(&status, "NoNewPrivs"), ["1"], "{status}");
    assert_eq!(status_field(&status, "Seccomp"), ["2"], "{status}");

    assert_eq!(start["uid"], json!(uid), "uid in {start}");
    assert!(start["gid"].is_u64(), "gid in {start}");
    let said: Vec<&str> = start["capabilities"]
        .as_array()
        .unwrap_or_else(|| panic!("no capabilities list in {start}"))
        .iter()
        .map(|c| c.as_str().expect("a capability name"))
        .collect();
    let expected: &[&str] = if held == 0 { &[] } else { &["CAP_BPF"] };
    assert_eq!(said, expected, "capabilities in {start}, CapEff {held:x}");
}

/// Matches the retransmit records sent from `sport` to `dport`.
fn retrans_from(sport: u16, dport: u16) -> impl Fn(&Value) -> bool {
    move |rec| {
        record::is_type(rec, "retrans")
            && port_field(rec, "sport") == sport
            && port_field(rec, "dport") == dport
    }
}

/// Waits for two retransmits from `sport` to `dport` naming `owner`, and
/// checks that every one before them names it too, or no one. The agent
/// holds an event at most 1 s for the /proc lookup of its owner, and a
/// lookup in an emulated guest under load took longer: that event is then
/// written without an owner (never with another's), and the answer serves
/// every later one.
fn assert_owned_by(agent: &Agent, sport: u16, dport: u16, owner: &Peer) {
    let what = format!("retransmits {sport} -> {dport} of pid {}", owner.pid());
    let named = |rec: &Value| rec["pid"] == json!(owner.pid());
    let from = retrans_from(sport, dport);
    agent.wait_for_n(&what, 2, max_wait(), |r| from(r) && named(r));
    let recs: Vec<Value> = agent.records().into_iter().filter(|r| from(r)).collect();
    let first = recs.iter().position(named).expect("waited for");
    for (i, rec) in recs.iter().enumerate() {
        if i < first {
            assert!(rec["pid"].is_null(), "owner of {rec}");
            continue;
        }
        assert_eq!(rec["pid"], json!(owner.pid()), "owner of {rec}");
        assert_eq!(rec["comm"], json!(PEER_COMM), "comm of {rec}");
        assert!(u64_field(rec, "conn_retrans") >= 1, "{rec}");
    }
}

#[test]
fn the_units_identity_attributes_sockets_older_than_the_agent() {
    require_root();
    let unit = Unit::read();
    let net = NetnsPair::new();
    let port = unique_port();
    // Both connected before the agent starts: only the snapshot the agent
    // takes before giving up its privileges knows their owner.
    let _listener = Peer::listen(PEER, &net.server, net.server.v4, port);
    let client = Peer::connect(PEER, &net.client, net.server.v4, port, Some(SEND_EVERY_MS));
    let local = client.wait_connected();

    let args = unit.args_with(&["--port", &port.to_string()]);
    let mut agent = spawn(Some(&unit.identity), &args);
    let start = agent.wait_start();
    assert_unprivileged(&agent, &start, unit.runs_as);
    net.drop_server_port(port);
    assert_owned_by(&agent, local.port(), port, &client);
    let (status, _) = agent.stop();
    assert_eq!(status.code(), Some(0), "{}", agent.stderr());
    agent.assert_programs_released();
}

#[test]
fn the_units_identity_attributes_sockets_accepted_from_an_older_listener() {
    require_root();
    let unit = Unit::read();
    let net = NetnsPair::new();
    let port = unique_port();
    // The listener is older than the agent, so the kernel programs never
    // learn its owner; the connection it accepts comes after the agent's
    // snapshot. Its owner is the listener's, from the snapshot.
    let opts = ListenOptions {
        send_every_ms: Some(SEND_EVERY_MS),
        ..ListenOptions::default()
    };
    let server = Peer::listen_with(PEER, &net.server, net.server.v4, port, &opts);
    let args = unit.args_with(&["--port", &port.to_string()]);
    let mut agent = spawn(Some(&unit.identity), &args);
    agent.wait_start();
    let client = Peer::connect(PEER, &net.client, net.server.v4, port, None);
    let client_port = client.wait_connected().port();
    net.drop_from_server_port(port);
    assert_owned_by(&agent, port, client_port, &server);
    let (status, _) = agent.stop();
    assert_eq!(status.code(), Some(0), "{}", agent.stderr());
    agent.assert_programs_released();
}

#[test]
fn a_call_outside_the_seccomp_filter_is_refused() {
    require_root();
    let port = unique_port().to_string();
    let mut agent = Agent::spawn(&["--try-forbidden-syscall", "retrans", "--port", &port]);
    agent.wait_start();
    let deadline = Instant::now() + max_wait();
    let report = loop {
        let stderr = agent.stderr();
        if let Some(line) = stderr
            .lines()
            .find(|l| l.contains("--try-forbidden-syscall"))
        {
            break line.to_owned();
        }
        if Instant::now() > deadline {
            agent.fail("no report of the forbidden call on stderr");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        report.contains("socket() refused") && report.contains("os error 1"),
        "not refused with EPERM: {report}"
    );
    // Refused, not killed: the agent goes on and stops cleanly.
    agent.stop_ok();
    agent.assert_programs_released();
}

/// Root with the capabilities a root start needs (the unit's, which starts
/// as its user, and CAP_SETUID and CAP_SETGID to leave root) but `missing`.
fn root_without(missing: Cap) -> Identity {
    let mut caps = Unit::read().caps;
    caps.extend([Cap::Setuid, Cap::Setgid]);
    assert!(caps.contains(&missing), "{missing:?} is not needed");
    caps.retain(|c| *c != missing);
    Identity::root_with(&caps)
}

#[test]
fn it_refuses_to_start_when_it_could_not_give_up_its_privileges() {
    require_root();
    for (missing, named) in [
        // CAP_SYS_ADMIN and CAP_SYS_PTRACE would stay in the bounding set.
        (Cap::Setpcap, "CAP_SETPCAP"),
        // It could not leave root.
        (Cap::Setuid, "CAP_SETUID"),
    ] {
        let who = root_without(missing);
        let (code, stderr) = Agent::run_to_exit_as(&who, &["retrans"]);
        assert_eq!(code, 1, "as {who}: {stderr}");
        assert!(stderr.contains(named), "as {who}: {stderr}");
    }
    // Started as the user it is to run as, it needs neither.
    let unit = Unit::read();
    let mut agent = spawn(Some(&unit.identity), &unit.args_with(&[]));
    let start = agent.wait_start();
    assert_unprivileged(&agent, &start, unit.runs_as);
    agent.stop_ok();
    agent.assert_programs_released();
}

#[test]
fn the_unit_passes_a_security_review() {
    let unit = unit_path();
    // A root of its own, so that no drop-in the host may have for the unit
    // counts.
    let root = TempDir::new("analyze");
    let units = root.path().join("etc/systemd/system");
    fs::create_dir_all(&units).unwrap();
    fs::copy(&unit, units.join("kdiag-agent.service")).unwrap();
    let out = cmd::output(
        Command::new("systemd-analyze")
            .args(["security", "--offline=yes", "--no-pager"])
            .arg(format!("--root={}", root.path().display()))
            .arg("kdiag-agent.service"),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let read_only = String::from_utf8_lossy(&out.stderr).contains("Read-only file system");
    if read_only
        && !skip_unless(
            false,
            "systemd-analyze cannot set up its unit search paths on a read-only root file system",
        )
    {
        return;
    }
    let exposure: f64 = text
        .lines()
        .find_map(|l| l.split("Overall exposure level for").nth(1))
        .and_then(|rest| rest.split(':').nth(1))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "no overall exposure in `systemd-analyze security` ({}):\n{text}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        });
    assert!(
        exposure <= MAX_EXPOSURE,
        "{} rates {exposure}, over {MAX_EXPOSURE}:\n{text}",
        unit.display()
    );
}
