//! Checks of the harness itself, independent of the agent: the namespaces,
//! the drop rule and the peers really produce the retransmits the agent
//! tests rely on, and everything is cleaned up.

use std::thread;
use std::time::{Duration, Instant};

use kdiag_tests::netns::{Family, NetnsPair, list_namespaces, unique_port};
use kdiag_tests::peer::{PEER_COMM, Peer};
use kdiag_tests::{WAIT, cmd};

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
    let deadline = Instant::now() + WAIT;
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
