//! Socket owners' cgroups on a host without a cgroup2 mount: the agent
//! takes them from systemd's v1 hierarchy (`name=systemd`). Such a host is
//! emulated for the agent alone: it runs in a mount namespace of its own
//! from which the cgroup2 mount is removed.

use kdiag_tests::agent::Agent;
use kdiag_tests::cgroup::{TestCgroup, cgroup2_mount_if_any, v1_mount};
use kdiag_tests::env::skip_unless;
use kdiag_tests::max_wait;
use kdiag_tests::netns::{NetnsPair, unique_port};
use kdiag_tests::peer::{ConnectOptions, Peer};
use kdiag_tests::record;
use serde_json::json;

const PEER: &str = env!("CARGO_BIN_EXE_kdiag-peer");

#[test]
fn without_cgroup2_owners_are_named_in_systemds_v1_hierarchy() {
    let Some(systemd) = v1_mount("name=systemd") else {
        // A pure cgroup v2 host (the vm-test guests) has no v1 hierarchy.
        skip_unless(false, "no v1 name=systemd hierarchy is mounted");
        return;
    };
    let cgroup = TestCgroup::new_in(systemd);
    let net = NetnsPair::new();
    let port = unique_port();
    let _listener = Peer::listen(PEER, &net.server, net.server.v4, port);
    // The agent sees no cgroup2 mount: the kernel's cgroup ids then name
    // nothing it can read, and the owner's v1 cgroup must stand in.
    let hide_cgroup2 = match cgroup2_mount_if_any() {
        Some(unified) => format!("umount {} && exec \"$@\"", unified.display()),
        None => "exec \"$@\"".to_owned(),
    };
    let port_arg = port.to_string();
    let (mut agent, _) = Agent::start_wrapped(
        &[
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            &hide_cgroup2,
            "sh",
        ],
        &["tcp", "--port", &port_arg],
        &["sock/inet_sock_set_state"],
    );
    let client = Peer::connect_with(
        PEER,
        &net.client,
        net.server.v4,
        port,
        &ConnectOptions {
            send_every_ms: Some(50),
            join_cgroup: Some(cgroup.dir().to_owned()),
            ..ConnectOptions::default()
        },
    );
    let rec = agent.wait_for("the client's connect", max_wait(), |r| {
        record::is_type(r, "tcp_state")
            && r["dport"] == json!(port)
            && r["new_state"] == "ESTABLISHED"
            && r["pid"] == json!(client.pid())
    });
    assert_eq!(rec["cgroup"], json!(cgroup.rel()), "{rec}");
    assert_eq!(rec["container_id"], json!(null), "{rec}");
    agent.stop_ok();
}
