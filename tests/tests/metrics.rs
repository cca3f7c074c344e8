//! `--metrics-addr` scraped by a real Prometheus: what it stores equals
//! what the agent wrote as JSON, and `promtool check metrics` accepts the
//! endpoint's text.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kdiag_tests::agent::Agent;
use kdiag_tests::bpf::kernel_gives_drop_reasons;
use kdiag_tests::netns::{NetnsPair, unique_port};
use kdiag_tests::peer::Peer;
use kdiag_tests::prometheus::{self, Prometheus};
use kdiag_tests::record::{self, str_field, u64_field};
use serde_json::{Value, json};

const PEER: &str = env!("CARGO_BIN_EXE_kdiag-peer");

/// SYN retransmits provoked: the client is killed after the second (the
/// third would come about 4 s later).
const RETRANSMITS: usize = 2;
/// Scrapes a second, intervals a second: a few of each.
const SCRAPED_WITHIN: Duration = Duration::from_secs(20);

/// A series as Prometheus names it: metric name and labels.
type SeriesKey = (String, BTreeMap<String, String>);

#[test]
fn prometheus_scrapes_what_the_stream_says() {
    let net = NetnsPair::new();
    let (port, traffic_port) = (unique_port(), unique_port());
    net.drop_server_port(port);
    let metrics = SocketAddr::from(([127, 0, 0, 1], unique_port()));
    let (port_arg, metrics_arg) = (port.to_string(), metrics.to_string());
    let (mut agent, _) = Agent::start(
        &[
            "run",
            "--port",
            &port_arg,
            "-i",
            "1",
            "--metrics-addr",
            &metrics_arg,
        ],
        &["tcp/tcp_retransmit_skb", "irq/softirq_entry"],
    );
    let prometheus = Prometheus::start(unique_port(), metrics);

    // NET_RX softirqs: data every 10 ms on a connection the TCP classes
    // leave out (it is not on --port).
    let _listener = Peer::listen(PEER, &net.server, net.server.v4, traffic_port);
    let sender = Peer::connect(PEER, &net.client, net.server.v4, traffic_port, Some(10));
    sender.wait_connected();
    let client = Peer::connect(PEER, &net.client, net.server.v4, port, None);
    let retransmit = |r: &Value| record::is_type(r, "retrans") && r["dport"] == json!(port);
    agent.wait_for_n(
        "SYN retransmits",
        RETRANSMITS,
        Duration::from_secs(15),
        retransmit,
    );
    client.kill();
    // Its close, then an interval's end after it: from there on the
    // metrics hold every record of the test's connection.
    agent.wait_for("the connection's close", kdiag_tests::max_wait(), |r| {
        record::is_type(r, "tcp_conn") && r["dport"] == json!(port)
    });
    let recs = agent.records();
    let closed_at = recs
        .iter()
        .position(|r| record::is_type(r, "tcp_conn") && r["dport"] == json!(port))
        .expect("waited for");
    let needed = 1 + recs[..closed_at]
        .iter()
        .filter(|r| record::is_type(r, "agent_stats"))
        .count() as u64;
    wait_scraped(&prometheus, needed);

    let (intervals, snapshot) = last_scrape(&prometheus);
    assert!(intervals >= needed, "{intervals} < {needed}");
    let recs = agent.records();
    let stream = through_interval(&recs, intervals);
    let value = |name: &str, labels: &[(&str, &str)]| -> f64 {
        let key = (
            name.to_owned(),
            labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        );
        snapshot.get(&key).copied().unwrap_or(0.0)
    };

    // Retransmits: only the test's (--port), exactly as many as records.
    let mut retrans: BTreeMap<(String, String), u64> = BTreeMap::new();
    for r in stream.iter().filter(|r| record::is_type(r, "retrans")) {
        let key = (
            str_field(r, "state").to_owned(),
            str_field(r, "kind").to_owned(),
        );
        *retrans.entry(key).or_default() += 1;
    }
    assert_eq!(
        retrans,
        BTreeMap::from([(
            ("SYN_SENT".to_owned(), "syn".to_owned()),
            RETRANSMITS as u64
        )]),
        "retrans records of the test's connection"
    );
    assert_eq!(
        sum_of(&snapshot, "kdiag_tcp_retransmits_total"),
        RETRANSMITS as f64
    );
    assert_eq!(
        value(
            "kdiag_tcp_retransmits_total",
            &[("state", "SYN_SENT"), ("kind", "syn")]
        ),
        RETRANSMITS as f64
    );
    assert_eq!(
        sum_of(&snapshot, "kdiag_tcp_pod_retransmits_total"),
        RETRANSMITS as f64
    );

    // Drops: the drop_summary records summed, by reason and protocol. The
    // test's SYNs are dropped by the server's rule, one more than their
    // retransmits.
    let mut drops: BTreeMap<(String, String), u64> = BTreeMap::new();
    for r in stream.iter().filter(|r| record::is_type(r, "drop_summary")) {
        let reason = r["reason"].as_str().unwrap_or("none").to_owned();
        let key = (reason, str_field(r, "protocol").to_owned());
        *drops.entry(key).or_default() += record::u64_field(r, "count");
    }
    for ((reason, protocol), count) in &drops {
        assert_eq!(
            value(
                "kdiag_packet_drops_total",
                &[("reason", reason), ("protocol", protocol)]
            ),
            *count as f64,
            "{reason} {protocol}"
        );
    }
    assert_eq!(
        sum_of(&snapshot, "kdiag_packet_drops_total"),
        drops.values().sum::<u64>() as f64
    );
    // A kernel without drop reasons (before 5.17) counts them among the
    // drops without one.
    let reason = if kernel_gives_drop_reasons() {
        "NETFILTER_DROP"
    } else {
        "none"
    };
    let netfilter = drops
        .get(&(reason.to_owned(), "tcp".to_owned()))
        .copied()
        .unwrap_or(0);
    assert!(
        netfilter > RETRANSMITS as u64,
        "{netfilter} {reason} tcp drops for {RETRANSMITS} SYN retransmits"
    );

    // Closed connections by role.
    let mut roles: BTreeMap<String, u64> = BTreeMap::new();
    for r in stream.iter().filter(|r| record::is_type(r, "tcp_conn")) {
        let role = r["role"].as_str().unwrap_or("unknown").to_owned();
        *roles.entry(role).or_default() += 1;
    }
    assert_eq!(roles.get("active"), Some(&1), "{roles:?}");
    for (role, n) in &roles {
        assert_eq!(
            value("kdiag_tcp_connections_closed_total", &[("role", role)]),
            *n as f64,
            "role {role}"
        );
    }
    assert_eq!(
        sum_of(&snapshot, "kdiag_tcp_connections_closed_total"),
        roles.values().sum::<u64>() as f64
    );

    // Softirqs: per vector, the summaries' counts and service times.
    let mut softirqs: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for r in stream
        .iter()
        .filter(|r| record::is_type(r, "softirq_summary"))
    {
        let e = softirqs.entry(str_field(r, "vec").to_owned()).or_default();
        e.0 += u64_field(r, "count");
        e.1 += u64_field(r, "service_total_ns");
    }
    assert!(
        softirqs.get("NET_RX").is_some_and(|(n, _)| *n > 0),
        "no NET_RX in {softirqs:?}"
    );
    for (vec, (count, total_ns)) in &softirqs {
        let labels = [("vec", vec.as_str())];
        assert_eq!(
            value("kdiag_softirq_service_seconds_count", &labels),
            *count as f64,
            "{vec}"
        );
        assert_eq!(
            value(
                "kdiag_softirq_service_seconds_bucket",
                &[("vec", vec.as_str()), ("le", "+Inf")]
            ),
            *count as f64,
            "{vec}"
        );
        let sum = value("kdiag_softirq_service_seconds_sum", &labels);
        let want = *total_ns as f64 / 1e9;
        assert!((sum - want).abs() <= want * 1e-12, "{vec}: {sum} != {want}");
    }
    assert_eq!(
        sum_of(&snapshot, "kdiag_softirq_service_seconds_count"),
        softirqs.values().map(|(n, _)| n).sum::<u64>() as f64
    );

    // The agent's own accounting: agent_stats summed.
    for class in ["retrans", "tcp", "softirq", "reclaim", "compact", "drop"] {
        let totals = record::class_totals(stream, class);
        let labels = [("class", class)];
        assert_eq!(
            value("kdiag_agent_events_total", &labels),
            totals.events as f64,
            "{class}"
        );
        assert_eq!(
            value("kdiag_agent_dropped_total", &labels),
            totals.dropped as f64
        );
        assert_eq!(value("kdiag_agent_lost_total", &labels), totals.lost as f64);
    }
    assert_eq!(
        value("kdiag_agent_events_total", &[("class", "retrans")]),
        RETRANSMITS as f64
    );

    promtool_accepts(metrics);
    agent.stop_ok();
}

/// Waits until Prometheus stored a scrape holding `intervals` intervals.
fn wait_scraped(prometheus: &Prometheus, intervals: u64) {
    let deadline = Instant::now() + SCRAPED_WITHIN;
    loop {
        let scraped = prometheus
            .query("kdiag_agent_intervals_total")
            .first()
            .and_then(|s| s["value"][1].as_str()?.parse::<u64>().ok());
        if scraped.is_some_and(|n| n >= intervals) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no scrape of {intervals} intervals within {SCRAPED_WITHIN:?} (last: {scraped:?})"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Every kdiag series of Prometheus' last scrape, and its
/// `kdiag_agent_intervals_total`: the samples of one scrape share its
/// timestamp, so they are taken at the newest timestamp of that series.
fn last_scrape(prometheus: &Prometheus) -> (u64, BTreeMap<SeriesKey, f64>) {
    let result = prometheus.query("{__name__=~\"kdiag_.+\"}[10s]");
    let samples = |series: &Value| -> Vec<(f64, f64)> {
        series["values"]
            .as_array()
            .expect("a range query's values")
            .iter()
            .map(|p| {
                let t = p[0].as_f64().expect("timestamp");
                let v = p[1].as_str().and_then(|v| v.parse().ok()).expect("value");
                (t, v)
            })
            .collect()
    };
    let intervals_series = result
        .iter()
        .find(|s| s["metric"]["__name__"] == "kdiag_agent_intervals_total")
        .expect("kdiag_agent_intervals_total scraped");
    let (at, intervals) = *samples(intervals_series).last().expect("a sample");
    let mut snapshot = BTreeMap::new();
    for series in &result {
        let Some(&(_, v)) = samples(series).iter().find(|(t, _)| *t == at) else {
            continue;
        };
        let mut labels: BTreeMap<String, String> = series["metric"]
            .as_object()
            .expect("labels")
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
            .collect();
        let name = labels.remove("__name__").expect("a name");
        labels.remove("job");
        labels.remove("instance");
        snapshot.insert((name, labels), v);
    }
    (intervals as u64, snapshot)
}

/// The records up to and including the `n`-th `agent_stats`.
fn through_interval(recs: &[Value], n: u64) -> &[Value] {
    let mut seen = 0;
    for (i, r) in recs.iter().enumerate() {
        if record::is_type(r, "agent_stats") {
            seen += 1;
            if seen == n {
                return &recs[..=i];
            }
        }
    }
    panic!("the stream has {seen} agent_stats records, Prometheus saw {n}");
}

fn sum_of(snapshot: &BTreeMap<SeriesKey, f64>, name: &str) -> f64 {
    snapshot
        .iter()
        .filter(|((n, _), _)| n == name)
        .map(|(_, v)| v)
        .sum()
}

/// `promtool check metrics` on what the endpoint serves.
fn promtool_accepts(metrics: SocketAddr) {
    let (status, body) = prometheus::get(metrics, "/metrics")
        .unwrap_or_else(|e| panic!("GET http://{metrics}/metrics: {e}"));
    assert_eq!(status, 200);
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run promtool: {e}"));
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(&body)
        .expect("writing to promtool");
    let out = child.wait_with_output().expect("promtool's output");
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn an_address_it_cannot_serve_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("a loopback port");
    let addr = taken.local_addr().expect("its address").to_string();
    let (code, stderr) = Agent::run_to_exit(&["--metrics-addr", &addr, "retrans"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains(&format!("--metrics-addr {addr}")) && stderr.contains("in use"),
        "{stderr}"
    );
    // No address of this host: a usage error, as is --interval 0.
    let (code, stderr) = Agent::run_to_exit(&["--metrics-addr", "192.0.2.1:9464", "retrans"]);
    assert_eq!(code, 2, "{stderr}");
    let (code, stderr) =
        Agent::run_to_exit(&["--metrics-addr", &addr, "--interval", "0", "retrans"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--interval"), "{stderr}");
}
