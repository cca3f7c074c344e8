//! Checks of the harness itself, independent of the agent: the namespaces,
//! the drop rule and the peers really produce the retransmits the agent
//! tests rely on, everything is cleaned up, and what runs as another user
//! runs wherever the checkout is.

use std::io::ErrorKind;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use kdiag_tests::env::require_root;
use kdiag_tests::identity::{Cap, Identity, NOBODY, SharedCopy, everyone_can_run_from};
use kdiag_tests::netns::{Family, NetnsPair, list_namespaces, unique_port};
use kdiag_tests::peer::{PEER_COMM, Peer};
use kdiag_tests::tempdir::TempDir;
use kdiag_tests::{cmd, max_wait};

const PEER: &str = env!("CARGO_BIN_EXE_kdiag-peer");

/// TcpRetransSegs of namespace `ns` (not saved to nstat's history: -s).
fn retrans_segs(ns: &str) -> u64 {
    let out = cmd::run_in(ns, "nstat", &["-asz", "TcpRetransSegs"]);
    out.lines()
        .find_map(|l| {
            l.strip_prefix("TcpRetransSegs")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no TcpRetransSegs in nstat output: {out}"))
}

/// Waits until the client namespace counts at least `min` retransmitted
/// segments.
fn wait_retrans(ns: &str, min: u64) {
    let deadline = Instant::now() + max_wait();
    loop {
        let now = retrans_segs(ns);
        if now >= min {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{ns}: TcpRetransSegs stayed at {now}, expected {min}"
        );
        thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn namespaces_peers_and_drop_rule_make_retransmits() {
    let net = NetnsPair::new();
    let names = net.names();
    let pids;
    {
        let (open, dropped) = (unique_port(), unique_port());
        let listener = Peer::listen(PEER, &net.server, net.server.v4, open);
        let client = Peer::connect(PEER, &net.client, net.server.v4, open, Some(50));
        let local = client.wait_connected();
        assert_eq!(local.ip(), net.client.v4);
        // The spawned child is the peer itself (ip netns exec execs in place).
        assert_eq!(client.comm(), PEER_COMM);
        assert_eq!(listener.comm(), PEER_COMM);
        let before = retrans_segs(&net.client.name);

        // ESTABLISHED: data to the now-dropped port is retransmitted.
        net.drop_server_port(open);
        wait_retrans(&net.client.name, before + 2);

        // SYN_SENT over IPv6: SYNs to a dropped port are retransmitted.
        net.drop_server_port(dropped);
        let v6 = net.server.addr(Family::V6);
        let syn = Peer::connect(PEER, &net.client, v6, dropped, None);
        let before = retrans_segs(&net.client.name);
        wait_retrans(&net.client.name, before + 1);
        let ss = cmd::run_in(&net.client.name, "ss", &["-tn", "state", "syn-sent"]);
        assert!(
            ss.contains(&format!("[{v6}]:{dropped}")),
            "no SYN_SENT socket to {v6}: {ss}"
        );

        net.undrop_server_ports();
        let ruleset = cmd::run_in(&net.server.name, "nft", &["list", "ruleset"]);
        assert!(
            !ruleset.contains("kdiagt"),
            "drop table left behind: {ruleset}"
        );
        pids = [listener.pid(), client.pid(), syn.pid()];
    }
    // Peers are killed (and reaped) when dropped.
    for pid in pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "peer {pid} still running"
        );
    }
    drop(net);
    let left: Vec<String> = list_namespaces()
        .into_iter()
        .filter(|n| names.contains(n))
        .collect();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
}

#[test]
fn cleanup_happens_when_a_test_panics() {
    let mut names = None;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let net = NetnsPair::new();
        net.drop_server_port(unique_port());
        names = Some(net.names());
        panic!("test failure");
    }));
    assert!(result.is_err());
    let names = names.expect("namespaces were created");
    let left: Vec<String> = list_namespaces()
        .into_iter()
        .filter(|n| names.contains(n))
        .collect();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
}

/// The checkout, and so every binary built in it, may be in a directory
/// other users cannot enter (root's home, a `mktemp -d` directory). What
/// runs as another identity is a shared copy, which works from there too:
/// shown here from such a directory, wherever this checkout actually is.
#[test]
fn other_identities_run_from_a_private_checkout() {
    require_root();
    let checkout = TempDir::new("checkout");
    let mode = std::fs::metadata(checkout.path()).unwrap().mode() & 0o7777;
    assert_eq!(mode, 0o700, "{}", checkout.path().display());
    let built = checkout.path().join("kdiag-peer");
    cmd::run("cp", &[PEER, built.to_str().expect("UTF-8 temporary path")]);

    // The premise: another user cannot run it where it was built.
    let denied = Command::new(&built).uid(NOBODY).gid(NOBODY).output();
    assert!(
        denied
            .as_ref()
            .is_err_and(|e| e.kind() == ErrorKind::PermissionDenied),
        "uid {NOBODY} could start {}: {denied:?}",
        built.display()
    );

    let copy = SharedCopy::of(&built);
    assert_eq!(copy.path().file_name(), built.file_name());
    everyone_can_run_from(copy.dir()).unwrap_or_else(|why| panic!("{why}"));
    for (path, want) in [(copy.dir(), 0o40755), (copy.path(), 0o100755)] {
        let meta = std::fs::metadata(path).unwrap();
        assert_eq!(
            (meta.mode(), meta.uid()),
            (want, 0),
            "mode and owner of {}",
            path.display()
        );
    }
    let nobody = Identity::nobody();
    // Without arguments kdiag-peer prints its usage and exits 1: it ran.
    let out = cmd::output(&mut nobody.command(&copy));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code() == Some(1) && stderr.starts_with("kdiag-peer: usage"),
        "as {nobody}: {} ({}): {stderr}",
        copy.path().display(),
        out.status
    );

    let dir = copy.dir().to_owned();
    drop(copy);
    assert!(!dir.exists(), "{} left behind", dir.display());
}

/// A process started as an identity has exactly its ids, no supplementary
/// groups, and exactly its capabilities in every set.
#[test]
fn identities_get_exactly_their_ids_and_capabilities() {
    require_root();
    let cat = SharedCopy::of(Path::new("/bin/cat"));
    for who in [
        Identity::nobody(),
        Identity::user_with(NOBODY, NOBODY, &[Cap::Bpf, Cap::Perfmon]),
        Identity::root_with(&[Cap::Bpf, Cap::Perfmon, Cap::SysAdmin]),
    ] {
        let status = cmd::run_command(who.command(&cat).arg("/proc/self/status"));
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .unwrap_or_else(|| panic!("as {who}: no {name} in {status}"))
                .split_whitespace()
                .collect::<Vec<_>>()
        };
        let (uid, gid) = (who.uid().to_string(), who.gid().to_string());
        assert_eq!(field("Uid"), [&uid; 4], "as {who}");
        assert_eq!(field("Gid"), [&gid; 4], "as {who}");
        assert!(field("Groups").is_empty(), "as {who}: {status}");
        let mask = format!("{:016x}", who.cap_mask());
        for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
            assert_eq!(field(set), [&mask], "{set} as {who}");
        }
    }
}
