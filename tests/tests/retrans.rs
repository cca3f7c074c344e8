//! Acceptance tests of `kdiag-agent retrans` against the real kernel. Each
//! test has its own namespaces, ports and cgroups and filters the agent on
//! its own ports, because every agent traces every namespace and tests run
//! in parallel.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use kdiag_tests::agent::Agent;
use kdiag_tests::cgroup::TestCgroup;
use kdiag_tests::identity::Identity;
use kdiag_tests::max_wait;
use kdiag_tests::netns::{Family, NetnsPair, unique_port};
use kdiag_tests::peer::{ConnectOptions, ListenOptions, PEER_COMM, Peer};
use kdiag_tests::record::{self, assert_envelope, is_rfc3339_utc_nanos, port_field, u64_field};
use serde_json::{Value, json};

const PEER: &str = env!("CARGO_BIN_EXE_kdiag-peer");

/// Exit code for a usage error (as clap's).
const EXIT_USAGE: i32 = 2;
/// Exit code for missing privileges (sysexits' EX_NOPERM).
const EXIT_NOPERM: i32 = 77;

/// Sends 100 bytes this often on ESTABLISHED test connections.
const SEND_EVERY_MS: u64 = 50;

/// Retransmits waited for per connection: two show that `conn_retrans`
/// counts, and come within ~3 s even for SYNs (retried at ~1 s intervals).
const PER_CONN: usize = 2;

/// `retrans --port P…` (one `--port` per element of `ports`) followed by
/// `extra`.
fn retrans_args(ports: &[u16], extra: &[&str]) -> Vec<String> {
    let mut args = vec!["retrans".to_owned()];
    for port in ports {
        args.extend(["--port".to_owned(), port.to_string()]);
    }
    args.extend(extra.iter().map(|a| (*a).to_owned()));
    args
}

/// `global` options followed by `retrans_args(ports, &[])`.
fn with_globals(global: &[&str], ports: &[u16]) -> Vec<String> {
    let mut args: Vec<String> = global.iter().map(|a| (*a).to_owned()).collect();
    args.extend(retrans_args(ports, &[]));
    args
}

/// Spawns the agent on `args` and waits for its `agent_start`.
fn start_agent(args: &[String]) -> (Agent, Value) {
    start_needing(args, &["tcp/tcp_retransmit_skb"])
}

/// `start_agent`, checking that every tracepoint of `needs` is attached,
/// as `args` ask (see `Agent::start_attached`; every TCP tracepoint has a
/// BTF tracepoint entry but tcp_destroy_sock, which `retrans` does not
/// use).
fn start_needing(args: &[String], needs: &[&str]) -> (Agent, Value) {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Agent::start_attached(&args, needs)
}

/// Matches the retransmit records of connections to `port`.
fn retrans_to(port: u16) -> impl Fn(&Value) -> bool {
    move |rec| record::is_type(rec, "retrans") && rec.get("dport") == Some(&json!(port))
}

/// What every retransmit record of one test connection must say.
struct Expected {
    family: Family,
    state: &'static str,
    kind: &'static str,
    saddr: IpAddr,
    /// The local port, when known (not for a client's connect still in
    /// SYN_SENT, unless the test asked the kernel with `ss`).
    sport: Option<u16>,
    daddr: IpAddr,
    dport: u16,
    /// The owner.
    pid: u32,
    /// The owner's cgroup when the test put it in one; else the record may
    /// say any path or null.
    cgroup: Option<String>,
}

impl Expected {
    /// A client stuck in SYN_SENT, retransmitting its SYN.
    fn syn(net: &NetnsPair, family: Family, port: u16, client: &Peer) -> Expected {
        Expected {
            family,
            state: "SYN_SENT",
            kind: "syn",
            saddr: net.client.addr(family),
            sport: None,
            daddr: net.server.addr(family),
            dport: port,
            pid: client.pid(),
            cgroup: None,
        }
    }

    /// An established IPv4 client retransmitting data from port `sport`.
    fn data(net: &NetnsPair, port: u16, client: &Peer, sport: u16) -> Expected {
        Expected {
            family: Family::V4,
            state: "ESTABLISHED",
            kind: "data",
            saddr: net.client.v4.into(),
            sport: Some(sport),
            daddr: net.server.v4.into(),
            dport: port,
            pid: client.pid(),
            cgroup: None,
        }
    }

    /// An IPv4 server retransmitting data on a connection it accepted on
    /// `port` from the client's `client_port`.
    fn server_data(net: &NetnsPair, port: u16, server: &Peer, client_port: u16) -> Expected {
        Expected {
            family: Family::V4,
            state: "ESTABLISHED",
            kind: "data",
            saddr: net.server.v4.into(),
            sport: Some(port),
            daddr: net.client.v4.into(),
            dport: client_port,
            pid: server.pid(),
            cgroup: None,
        }
    }

    /// An IPv4 listener on `port` retransmitting its SYN-ACK to the client's
    /// `client_port`.
    fn synack(net: &NetnsPair, port: u16, server: &Peer, client_port: u16) -> Expected {
        Expected {
            state: "SYN_RECV",
            kind: "synack",
            ..Expected::server_data(net, port, server, client_port)
        }
    }

    fn with_sport(self, sport: u16) -> Expected {
        Expected {
            sport: Some(sport),
            ..self
        }
    }

    fn in_cgroup(self, cgroup: &TestCgroup) -> Expected {
        Expected {
            cgroup: Some(cgroup.rel().to_owned()),
            ..self
        }
    }

    /// The fields every record of the connection has, `conn_retrans` aside.
    fn fields(&self) -> serde_json::Map<String, Value> {
        let mut want = json!({
            "type": "retrans",
            "family": self.family.as_str(),
            "saddr": self.saddr.to_string(),
            "daddr": self.daddr.to_string(),
            "dport": self.dport,
            "state": self.state,
            "kind": self.kind,
            "pid": self.pid,
            "comm": PEER_COMM,
        });
        let want = want.as_object_mut().expect("object");
        if let Some(sport) = self.sport {
            want.insert("sport".into(), json!(sport));
        }
        if let Some(cgroup) = &self.cgroup {
            want.insert("cgroup".into(), json!(cgroup));
        }
        want.clone()
    }

    /// Whether `rec` is a retransmit of this connection, exactly as
    /// expected apart from `conn_retrans`.
    fn matches(&self, rec: &Value) -> bool {
        self.fields()
            .iter()
            .all(|(key, value)| rec.get(key) == Some(value))
    }

    /// Whether `rec` is a retransmit on this connection's addresses and
    /// ports, whatever its other fields say (they are what `check` checks).
    fn selects(&self, rec: &Value) -> bool {
        record::is_type(rec, "retrans")
            && rec.get("saddr") == Some(&json!(self.saddr.to_string()))
            && rec.get("daddr") == Some(&json!(self.daddr.to_string()))
            && rec.get("dport") == Some(&json!(self.dport))
            && self
                .sport
                .is_none_or(|sport| rec.get("sport") == Some(&json!(sport)))
    }

    /// Checks the consecutive retransmit records of the connection: all
    /// fields as expected, one source port throughout, and `conn_retrans`
    /// counting 1, 2, … (one retransmit per record, none before the first).
    fn check(&self, recs: &[Value]) {
        let want = self.fields();
        let sport = port_field(&recs[0], "sport");
        for (i, rec) in recs.iter().enumerate() {
            assert_envelope(rec);
            for (key, value) in &want {
                assert_eq!(rec.get(key), Some(value), "{key:?} of record {i}: {rec}");
            }
            assert_eq!(
                port_field(rec, "sport"),
                sport,
                "sport of record {i}: {rec}"
            );
            let cgroup = rec.get("cgroup");
            assert!(
                cgroup.is_some_and(|c| c.is_string() || c.is_null()),
                "cgroup of record {i}: {rec}"
            );
            assert_eq!(
                u64_field(rec, "conn_retrans"),
                i as u64 + 1,
                "conn_retrans of record {i}: {rec}"
            );
        }
    }

    /// Waits for the connection's first `PER_CONN` retransmits in `agent`'s
    /// output and checks them.
    fn wait(&self, agent: &Agent) -> Vec<Value> {
        let what = format!(
            "{PER_CONN} {} retransmits {}:{} -> {}:{} (pid {})",
            self.kind,
            self.saddr,
            self.sport.map_or("?".to_owned(), |p| p.to_string()),
            self.daddr,
            self.dport,
            self.pid
        );
        let recs = agent.wait_for_n(&what, PER_CONN, max_wait(), |r| self.selects(r));
        self.check(&recs);
        recs
    }
}

/// Stops the agent and checks that each of its `retrans` records is one of
/// `conns`.
fn stop_keeping_only(agent: &mut Agent, conns: &[&Expected]) {
    let recs = agent.stop_ok();
    let strays: Vec<&Value> = recs
        .iter()
        .filter(|r| record::is_type(r, "retrans") && !conns.iter().any(|c| c.matches(r)))
        .collect();
    if !strays.is_empty() {
        agent.fail(&format!(
            "records of other connections or owners than expected: {strays:?}"
        ));
    }
}

/// Filters that split one set of connections: each agent, started with a
/// different filter, must report its own connections and nothing else.
/// They all run at once, so the records one reports prove that the
/// retransmits the others must leave out did happen while they ran.
fn assert_each_reports_only(views: &mut [(&mut Agent, Vec<&Expected>)]) {
    for (agent, conns) in views.iter() {
        for conn in conns {
            conn.wait(agent);
        }
    }
    for (agent, conns) in views.iter_mut() {
        stop_keeping_only(agent, conns);
    }
}

/// The SYN_SENT scenario: agent on `retrans --port P <extra>`, then a client
/// connecting to P, which the server drops. Returns the `agent_start` line.
fn syn_sent(family: Family, extra: &[&str]) -> Value {
    let net = NetnsPair::new();
    let port = unique_port();
    net.drop_server_port(port);
    let (mut agent, start) = start_agent(&retrans_args(&[port], extra));
    let client = Peer::connect(PEER, &net.client, net.server.addr(family), port, None);
    Expected::syn(&net, family, port, &client).wait(&agent);
    agent.stop_ok();
    start
}

#[test]
fn syn_sent_ipv4() {
    let start = syn_sent(Family::V4, &[]);
    // On this kernel `auto` must pick the ring buffer.
    assert_eq!(
        start["transport"], "ringbuf",
        "default transport in {start}"
    );
}

#[test]
fn syn_sent_ipv6() {
    syn_sent(Family::V6, &[]);
}

/// The programs on classic tracepoints, the fallback where the kernel has
/// no BTF tracepoints, give the same records (the default attaches them as
/// BTF tracepoints, which read the connection from the socket instead of
/// the trace record).
#[test]
fn syn_sent_classic() {
    syn_sent(Family::V4, &["--attach", "classic"]);
    syn_sent(Family::V6, &["--attach", "classic"]);
}

#[test]
fn perf_transport_gives_the_same_records() {
    // A global option after the subcommand, as the CLI allows.
    let start = syn_sent(Family::V4, &["--transport", "perf"]);
    assert_eq!(start["transport"], "perf", "transport in {start}");
}

/// The ESTABLISHED scenario: a client sending every 50 ms to a listener,
/// the agent started before the connection or only after it is established
/// (then it must find the socket's owner in /proc), then the server drops
/// the port so the client retransmits its data. `extra`: the agent's
/// options.
fn established(agent_before_connect: bool, extra: &[&str]) {
    let net = NetnsPair::new();
    let port = unique_port();
    let _listener = Peer::listen(PEER, &net.server, net.server.v4, port);
    let args = retrans_args(&[port], extra);
    let early = agent_before_connect.then(|| start_agent(&args).0);
    let client = Peer::connect(PEER, &net.client, net.server.v4, port, Some(SEND_EVERY_MS));
    let local = client.wait_connected();
    let mut agent = early.unwrap_or_else(|| start_agent(&args).0);
    net.drop_server_port(port);
    // RTO-driven: ~0.2 s, then doubling.
    Expected::data(&net, port, &client, local.port()).wait(&agent);
    agent.stop_ok();
}

#[test]
fn established_data_retransmits() {
    established(true, &[]);
}

#[test]
fn established_data_retransmits_classic() {
    established(true, &["--attach", "classic"]);
}

#[test]
fn preexisting_connection_is_attributed() {
    established(false, &[]);
}

#[test]
fn pid_filter_keeps_only_that_process() {
    let net = NetnsPair::new();
    let port = unique_port();
    let _listener = Peer::listen(PEER, &net.server, net.server.v4, port);
    // The pids must be known before the agents start, so the clients connect
    // first; established connections then retransmit quickly (RTO ~0.2 s,
    // doubling) once the port is dropped.
    let clients: Vec<(Peer, u16)> = (0..2)
        .map(|_| {
            let client = Peer::connect(PEER, &net.client, net.server.v4, port, Some(SEND_EVERY_MS));
            let sport = client.wait_connected().port();
            (client, sport)
        })
        .collect();
    let conns: Vec<Expected> = clients
        .iter()
        .map(|(client, sport)| Expected::data(&net, port, client, *sport))
        .collect();
    // One agent per client, each filtered on its pid.
    let mut agents: Vec<Agent> = clients
        .iter()
        .map(|(client, _)| {
            let pid = client.pid().to_string();
            start_agent(&with_globals(&["--pid", &pid], &[port])).0
        })
        .collect();
    net.drop_server_port(port);
    let mut views: Vec<(&mut Agent, Vec<&Expected>)> = agents
        .iter_mut()
        .zip(&conns)
        .map(|(a, c)| (a, vec![c]))
        .collect();
    assert_each_reports_only(&mut views);
}

/// The comm a renamed listener takes after listen().
const RENAMED: &str = "renamed-peer";

/// A listener on `port` in `net`'s server namespace that sends every 50 ms
/// on what it accepts, renaming itself right after listen() if asked to.
fn sending_listener(net: &NetnsPair, port: u16, rename: Option<&str>) -> Peer {
    let opts = ListenOptions {
        send_every_ms: Some(SEND_EVERY_MS),
        rename_after_listen: rename.map(str::to_owned),
        ..ListenOptions::default()
    };
    Peer::listen_with(PEER, &net.server, net.server.v4, port, &opts)
}

/// A client connected to `port` of `net`'s server, and its port.
fn connected_client(net: &NetnsPair, port: u16) -> (Peer, u16) {
    let client = Peer::connect(PEER, &net.client, net.server.v4, port, None);
    let client_port = client.wait_connected().port();
    (client, client_port)
}

#[test]
fn accepted_socket_is_owned_by_its_listener() {
    let net = NetnsPair::new();
    let port = unique_port();
    // Started before the listen(), so the kernel programs record the
    // listener's owner there and hand it to the sockets it accepts.
    let (mut agent, _) = start_agent(&retrans_args(&[port], &[]));
    let server = sending_listener(&net, port, Some(RENAMED));
    let (_client, client_port) = connected_client(&net, port);
    // /proc now names the server differently from when it listened: an
    // owner looked up there, not carried over from the listener by the
    // kernel programs, would say RENAMED instead of PEER_COMM.
    assert_eq!(server.comm(), RENAMED, "the listener did not rename itself");
    net.drop_from_server_port(port);
    // RTO-driven: ~0.2 s, then doubling.
    let conn = Expected::server_data(&net, port, &server, client_port);
    conn.wait(&agent);
    // The client receives nothing, so it has nothing to retransmit.
    stop_keeping_only(&mut agent, &[&conn]);
}

#[test]
fn listeners_on_one_port_in_two_namespaces_keep_their_owners() {
    let port = unique_port();
    let nets = [NetnsPair::new(), NetnsPair::new()];
    // Before the listeners: both are recorded by the kernel programs, under
    // the same port and family; only the network namespace tells them apart.
    let (mut agent, _) = start_agent(&retrans_args(&[port], &[]));
    // Both listen before either accepts: were they told apart by port and
    // family alone, the second listener would own both connections. Renamed,
    // so that owners from /proc instead of the listeners would show too.
    let servers: Vec<Peer> = nets
        .iter()
        .map(|net| sending_listener(net, port, Some(RENAMED)))
        .collect();
    let clients: Vec<(Peer, u16)> = nets.iter().map(|net| connected_client(net, port)).collect();
    for net in &nets {
        net.drop_from_server_port(port);
    }
    // Each pair has its own addresses: a record's saddr tells which server
    // sent it, and its pid must be that server's.
    let expected: Vec<Expected> = nets
        .iter()
        .zip(servers.iter().zip(&clients))
        .map(|(net, (server, (_, client_port)))| {
            Expected::server_data(net, port, server, *client_port)
        })
        .collect();
    assert_each_reports_only(&mut [(&mut agent, expected.iter().collect())]);
}

#[test]
fn synack_retransmits_are_the_listeners() {
    synack_retransmits(&[]);
}

#[test]
fn synack_retransmits_are_the_listeners_classic() {
    synack_retransmits(&["--attach", "classic"]);
}

/// SYN-ACKs the server resends, and the SYNs of the client, with the
/// agent's `extra` options.
fn synack_retransmits(extra: &[&str]) {
    let net = NetnsPair::new();
    let port = unique_port();
    net.drop_synacks_from_server_port(port);
    // Before the listen(): the listener's owner is recorded there.
    let (mut agent, _) = start_needing(
        &retrans_args(&[port], extra),
        &[
            "tcp/tcp_retransmit_skb",
            "tcp/tcp_retransmit_synack",
            "sock/inet_sock_set_state",
        ],
    );
    let server = Peer::listen(PEER, &net.server, net.server.v4, port);
    let client = Peer::connect(PEER, &net.client, net.server.v4, port, None);
    // The client's port as the kernel shows it: the SYN-ACKs go to it.
    let client_port = net
        .client
        .wait_syn_sent_port(SocketAddr::new(net.server.v4.into(), port));
    // The server resends its SYN-ACK when its timer fires (~1 s, doubling)
    // and whenever the client's retransmitted SYN (~1 s apart) arrives; all
    // count on the one request socket.
    let synack = Expected::synack(&net, port, &server, client_port);
    let syn = Expected::syn(&net, Family::V4, port, &client).with_sport(client_port);
    assert_each_reports_only(&mut [(&mut agent, vec![&synack, &syn])]);
}

#[test]
fn text_output_has_a_header_and_a_row_per_retransmit() {
    let net = NetnsPair::new();
    let port = unique_port();
    net.drop_server_port(port);
    let args = with_globals(&["-o", "text"], &[port]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut agent = Agent::spawn(&args);
    let first = agent.wait_start_text();
    assert!(
        first.contains("tcp/tcp_retransmit_skb"),
        "first line does not list tcp/tcp_retransmit_skb: {first}"
    );
    let client = Peer::connect(PEER, &net.client, net.server.v4, port, None);
    let server = SocketAddr::new(net.server.v4.into(), port);
    let local = SocketAddr::new(net.client.v4.into(), net.client.wait_syn_sent_port(server));
    let is_row = |l: &str| !l.starts_with('#') && !l.starts_with("TIME");
    let rows = agent.wait_for_lines("2 text rows", PER_CONN, max_wait(), is_row);
    let lines = agent.lines();
    // Comment lines (`#`) may follow the first (degraded features); the
    // header comes before the first row.
    let header = lines
        .iter()
        .find(|l| !l.starts_with('#'))
        .expect("rows were found");
    let columns: Vec<&str> = header.split_whitespace().collect();
    assert_eq!(columns.first(), Some(&"TIME"), "header: {header}");
    let cell_at = |name: &str| {
        columns
            .iter()
            .position(|c| *c == name)
            .unwrap_or_else(|| panic!("no {name} column in header {header:?}"))
    };
    for (i, row) in rows.iter().enumerate() {
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(
            cells.len(),
            columns.len(),
            "row {i} {row:?} does not fit header {header:?}"
        );
        let cell = |name: &str| cells[cell_at(name)];
        assert!(is_rfc3339_utc_nanos(cell("TIME")), "TIME of row {i}: {row}");
        assert_eq!(
            cell("PID"),
            client.pid().to_string(),
            "PID of row {i}: {row}"
        );
        assert_eq!(cell("COMM"), PEER_COMM, "COMM of row {i}: {row}");
        assert_eq!(cell("STATE"), "SYN_SENT", "STATE of row {i}: {row}");
        // The sender's state: a SYN has no RTT sample yet (srtt_us 0),
        // and a congestion window and slow-start threshold of its own.
        assert_eq!(cell("SRTT_MS"), "0.000", "SRTT_MS of row {i}: {row}");
        for column in ["CWND", "SSTHRESH"] {
            assert!(
                cell(column).parse::<u64>().is_ok_and(|n| n >= 1),
                "{column} of row {i}: {row}"
            );
        }
        for endpoint in [local, server] {
            assert!(
                cells.contains(&endpoint.to_string().as_str()),
                "{endpoint} not in row {i}: {row}"
            );
        }
    }
    let lines = agent.stop_text_ok();
    let headers = lines.iter().filter(|l| l.starts_with("TIME")).count();
    assert_eq!(headers, 1, "header not printed exactly once: {lines:#?}");
    assert!(
        lines.iter().all(|l| !l.starts_with('{')),
        "JSON in text output: {lines:#?}"
    );
    assert!(
        lines.last().is_some_and(|l| l.starts_with('#')),
        "last line is not the final stats comment: {lines:#?}"
    );
}

/// SYN_SENT clients from `net`'s client namespace, one to each of `ports`
/// (all dropped by the server), the one to `ports[i]` joining `cgroups[i]`
/// first when given. Returns each client with what its records must say.
fn syn_clients(
    net: &NetnsPair,
    family: Family,
    ports: &[u16],
    cgroups: &[&TestCgroup],
) -> Vec<(Peer, Expected)> {
    ports
        .iter()
        .enumerate()
        .map(|(i, &port)| {
            net.drop_server_port(port);
            let cgroup = cgroups.get(i);
            let opts = ConnectOptions {
                join_cgroup: cgroup.map(|c| c.dir().to_owned()),
                ..ConnectOptions::default()
            };
            let server = net.server.addr(family);
            let client = Peer::connect_with(PEER, &net.client, server, port, &opts);
            let sport = net.client.wait_syn_sent_port(SocketAddr::new(server, port));
            let mut conn = Expected::syn(net, family, port, &client).with_sport(sport);
            if let Some(cgroup) = cgroup {
                // Joined before connect() (which the SYN_SENT socket shows).
                assert!(
                    cgroup.procs().contains(&client.pid()),
                    "client {} is not in {}",
                    client.pid(),
                    cgroup.rel()
                );
                conn = conn.in_cgroup(cgroup);
            }
            (client, conn)
        })
        .collect()
}

#[test]
fn cgroup_filter_keeps_that_cgroup_and_below() {
    let net = NetnsPair::new();
    let ports = [unique_port(), unique_port(), unique_port()];
    let kept = TestCgroup::new();
    let below = kept.child("below");
    // Its path starts with the kept one's as a string, but it is not below.
    let sibling = kept.sibling_with_suffix("x");
    // One agent takes the path relative to the cgroup2 mount, the other the
    // full path; before the clients connect, so the kernel programs record
    // the cgroups there.
    let sibling_dir = sibling.dir().display().to_string();
    let (mut agent_kept, _) = start_agent(&with_globals(&["--cgroup", kept.rel()], &ports));
    let (mut agent_sibling, _) = start_agent(&with_globals(&["--cgroup", &sibling_dir], &ports));
    let clients = syn_clients(&net, Family::V4, &ports, &[&kept, &below, &sibling]);
    let [kept_conn, below_conn, sibling_conn] = [0, 1, 2].map(|i| &clients[i].1);
    assert_each_reports_only(&mut [
        (&mut agent_kept, vec![kept_conn, below_conn]),
        (&mut agent_sibling, vec![sibling_conn]),
    ]);
}

#[test]
fn family_filters_keep_only_their_family() {
    let net = NetnsPair::new();
    let port = unique_port();
    let (mut agent_v4, _) = start_agent(&retrans_args(&[port], &["-4"]));
    let (mut agent_v6, _) = start_agent(&retrans_args(&[port], &["-6"]));
    let v4 = syn_clients(&net, Family::V4, &[port], &[]);
    let v6 = syn_clients(&net, Family::V6, &[port], &[]);
    assert_each_reports_only(&mut [
        (&mut agent_v4, vec![&v4[0].1]),
        (&mut agent_v6, vec![&v6[0].1]),
    ]);
}

#[test]
fn port_filter_takes_several_ports() {
    let net = NetnsPair::new();
    let ports = [unique_port(), unique_port(), unique_port()];
    let (mut agent_two, _) = start_agent(&retrans_args(&ports[..2], &[]));
    let (mut agent_third, _) = start_agent(&retrans_args(&ports[2..], &[]));
    let clients = syn_clients(&net, Family::V4, &ports, &[]);
    let [first, second, third] = [0, 1, 2].map(|i| &clients[i].1);
    assert_each_reports_only(&mut [
        (&mut agent_two, vec![first, second]),
        (&mut agent_third, vec![third]),
    ]);
}

/// An agent filtered on an unused port: started, but with nothing to report.
fn idle_agent(extra: &[&str]) -> Agent {
    start_agent(&retrans_args(&[unique_port()], extra)).0
}

/// Checks an agent ended normally: exit 0, `agent_stats` as last line, and
/// its programs unloaded.
fn assert_clean_exit(agent: &Agent, status: std::process::ExitStatus, how: &str) {
    if status.code() != Some(0) {
        agent.fail(&format!("exit status {status} after {how}, expected 0"));
    }
    let recs = agent.records();
    if !recs
        .last()
        .is_some_and(|r| record::is_type(r, "agent_stats"))
    {
        agent.fail(&format!("last line after {how} is not agent_stats"));
    }
    recs.iter().for_each(assert_envelope);
    agent.assert_programs_released();
}

/// The contract: SIGINT and SIGTERM end the agent with 0 within a second
/// (detaching, draining and the final records included).
fn exits_cleanly_on(signal: libc::c_int, how: &str) {
    let mut agent = idle_agent(&[]);
    let sent = std::time::Instant::now();
    let (status, _) = agent.stop_with(signal);
    let took = sent.elapsed();
    assert_clean_exit(&agent, status, how);
    let bound = if kdiag_tests::env::in_emulated_guest() {
        Duration::from_secs(15)
    } else {
        Duration::from_secs(1)
    };
    assert!(
        took < bound,
        "{how}: exited {took:?} after the signal, over {bound:?}"
    );
}

#[test]
fn sigint_exits_0() {
    exits_cleanly_on(libc::SIGINT, "SIGINT");
}

#[test]
fn sigterm_exits_0() {
    exits_cleanly_on(libc::SIGTERM, "SIGTERM");
}

#[test]
fn duration_exits_0() {
    let mut agent = idle_agent(&["--duration", "1"]);
    let status = agent.wait_exit(Duration::from_secs(3));
    assert_clean_exit(&agent, status, "--duration 1");
}

#[test]
fn closed_stdout_exits_0() {
    let net = NetnsPair::new();
    let port = unique_port();
    net.drop_server_port(port);
    let (mut agent, _) = start_agent(&retrans_args(&[port], &[]));
    let _client = Peer::connect(PEER, &net.client, net.server.v4, port, None);
    agent.wait_for("a first SYN retransmit", max_wait(), retrans_to(port));
    agent.close_stdout();
    // The next SYN retransmit, ~2 s after the first, gives the agent a write
    // that fails even if it does not watch its stdout.
    let status = agent.wait_exit(Duration::from_secs(4));
    if status.code() != Some(0) {
        agent.fail(&format!(
            "exit status {status} after stdout closed, expected 0"
        ));
    }
    agent.assert_programs_released();
}

#[test]
fn sigkill_leaves_no_programs() {
    let mut agent = idle_agent(&[]);
    agent.stop_with(libc::SIGKILL);
    agent.assert_programs_released();
}

#[test]
fn usage_errors_exit_2() {
    let cases: &[&[&str]] = &[
        &["retrans", "--no-such-flag"],
        &["--no-such-flag", "retrans"],
        &["--pid", "0", "retrans"],
        &["retrans", "--pid", "abc"],
        &["-p", "abc", "retrans"],
        // A cgroup that does not exist would match no process: refused,
        // whether or not the host has a cgroup v2 hierarchy to look in.
        &["retrans", "--cgroup", "/kdiag-no-such-cgroup"],
        &["-c", "/kdiag-no-such-cgroup", "tcp"],
        // Once attached it runs as --user: one that exists, and not root.
        &["--user", "kdiag-no-such-user", "retrans"],
        &["retrans", "--user", "root"],
    ];
    for args in cases {
        let (code, stderr) = Agent::run_to_exit(args);
        assert_eq!(
            code,
            EXIT_USAGE,
            "`kdiag-agent {}`: stderr: {stderr}",
            args.join(" ")
        );
        assert!(
            !stderr.trim().is_empty(),
            "`kdiag-agent {}`: no message on stderr",
            args.join(" ")
        );
    }
}

#[test]
fn unprivileged_exits_77() {
    let nobody = Identity::nobody();
    let (code, stderr) = Agent::run_to_exit_as(&nobody, &["retrans"]);
    assert_eq!(code, EXIT_NOPERM, "as {nobody}: stderr: {stderr}");
    assert!(
        stderr.contains("CAP_BPF"),
        "as {nobody}: stderr does not mention CAP_BPF: {stderr}"
    );
}
