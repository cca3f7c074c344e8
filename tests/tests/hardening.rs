//! How the agent behaves when the host is not what it hoped for, and what it
//! keeps once running: a missing tracepoint, capabilities after attach.

use std::{fs, path::Path, time::Duration};

use kdiag_tests::{agent::Agent, env::require_root, max_wait, tempdir::TempDir};

/// `--duration` of the agents these tests let end on their own: long enough
/// that `wait_start` still finds the agent holding its programs (it runs
/// bpftool, which takes over a second in an emulated vm-test guest).
const RUN_SECS: &str = "3";
use serde_json::Value;

/// Where the real formats are. The agent mounts tracefs if nobody has, so
/// one short agent run makes sure it is there.
fn tracefs() -> &'static Path {
    let mounted = || {
        ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
            .into_iter()
            .map(Path::new)
            .find(|p| p.join("events").is_dir())
    };
    if let Some(p) = mounted() {
        return p;
    }
    let mut probe = Agent::spawn(&["retrans", "-d", RUN_SECS]);
    probe.wait_start();
    probe.wait_exit(max_wait());
    mounted().expect("tracefs is still not mounted after an agent run")
}

/// A directory laid out like tracefs with only these tracepoints' formats.
struct FakeFormats(TempDir);

impl FakeFormats {
    fn with(tag: &str, tracepoints: &[&str]) -> Self {
        let dir = TempDir::new(tag);
        for tp in tracepoints {
            let src = tracefs().join("events").join(tp).join("format");
            let dst = dir.path().join("events").join(tp);
            fs::create_dir_all(&dst).unwrap();
            fs::copy(&src, dst.join("format"))
                .unwrap_or_else(|e| panic!("copy {}: {e}", src.display()));
        }
        FakeFormats(dir)
    }

    fn arg(&self) -> String {
        self.0.path().display().to_string()
    }
}

#[test]
fn missing_optional_tracepoint_runs_degraded() {
    require_root();

    let formats = FakeFormats::with(
        "degraded",
        &["tcp/tcp_retransmit_skb", "sock/inet_sock_set_state"],
    );
    let dir = formats.arg();
    let mut agent = Agent::spawn(&["retrans", "--formats-from", &dir, "-d", RUN_SECS]);
    let start = agent.wait_start();
    let attached: Vec<&str> = start["attached"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(
        attached,
        ["tcp/tcp_retransmit_skb", "sock/inet_sock_set_state"],
        "{start}"
    );
    let degraded = start["degraded"].as_array().unwrap();
    let synack: Vec<&Value> = degraded
        .iter()
        .filter(|d| d["what"] == "tcp/tcp_retransmit_synack")
        .collect();
    assert_eq!(synack.len(), 1, "{start}");
    assert!(
        synack[0]["why"]
            .as_str()
            .unwrap()
            .contains("does not exist"),
        "{start}"
    );
    let status = agent.wait_exit(max_wait());
    assert_eq!(status.code(), Some(0), "{}", agent.stderr());
}

#[test]
fn missing_required_tracepoint_fails_clearly() {
    require_root();

    let formats = FakeFormats::with("required", &["sock/inet_sock_set_state"]);
    let dir = formats.arg();
    let mut agent = Agent::spawn(&["retrans", "--formats-from", &dir]);
    let status = agent.wait_exit(Duration::from_secs(5));
    assert_eq!(status.code(), Some(1), "{}", agent.stderr());
    let stderr = agent.stderr();
    assert!(
        stderr.contains("tcp/tcp_retransmit_skb") && stderr.contains("does not exist"),
        "{stderr}"
    );
    assert!(
        agent.records().is_empty(),
        "wrote output: {:?}",
        agent.records()
    );
}

#[test]
fn capabilities_are_dropped_after_attach() {
    require_root();
    let mut agent = Agent::spawn(&["retrans"]);
    let start = agent.wait_start();
    let status = fs::read_to_string(format!("/proc/{}/status", agent.pid())).unwrap();
    let field = |name: &str| -> &str {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in {status}"))
            .trim()
    };
    let caps = |name: &str| -> u64 { u64::from_str_radix(field(name), 16).unwrap() };
    // At most CAP_BPF (39), which kernels before 6.5 check on every bpf()
    // call; root held CAP_SETPCAP, so the bounding set is down to it too.
    let kept = caps("CapEff:");
    assert_eq!(kept & !(1 << 39), 0, "CapEff in\n{status}");
    for set in ["CapPrm:", "CapBnd:"] {
        assert_eq!(caps(set), kept, "{set} in\n{status}");
    }
    assert_eq!(caps("CapInh:"), 0);
    assert_eq!(caps("CapAmb:"), 0);
    let expected: &[&str] = if kept == 0 { &[] } else { &["CAP_BPF"] };
    assert_eq!(
        start["capabilities"],
        serde_json::json!(expected),
        "{start}"
    );
    // The default --user: nobody (65534 on Debian), with no supplementary
    // groups.
    let uids: Vec<&str> = field("Uid:").split_whitespace().collect();
    assert_eq!(uids, ["65534"; 4], "{status}");
    assert_eq!(start["uid"], 65534, "{start}");
    assert_eq!(field("Groups:"), "", "{status}");
    assert_eq!(field("NoNewPrivs:"), "1", "{status}");
    assert_eq!(field("Seccomp:"), "2", "{status}");
    agent.stop_ok();
    agent.assert_programs_released();
}

/// `max_entries` of every BPF ring buffer (map type 27) process `pid` holds,
/// from /proc/PID/fdinfo.
fn ring_buffer_sizes(pid: u32) -> Vec<u64> {
    let dir = format!("/proc/{pid}/fdinfo");
    fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {dir}: {e}"))
        .filter_map(|entry| fs::read_to_string(entry.ok()?.path()).ok())
        .filter(|info| {
            info.lines()
                .any(|l| l.split_whitespace().eq(["map_type:", "27"]))
        })
        .filter_map(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("max_entries:")?.trim().parse().ok())
        })
        .collect()
}

/// Sizes in bytes of the perf buffers process `pid` has mapped.
fn perf_buffer_mappings(pid: u32) -> Vec<u64> {
    let maps = fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    maps.lines()
        .filter(|l| l.ends_with("[perf_event]"))
        .filter_map(|l| {
            let (start, end) = l.split_whitespace().next()?.split_once('-')?;
            let parse = |hex| u64::from_str_radix(hex, 16).ok();
            Some(parse(end)? - parse(start)?)
        })
        .collect()
}

#[test]
fn buffer_mib_sizes_the_buffers() {
    require_root();
    let mib = 1 << 20;
    for (args, expected) in [
        (&["retrans"][..], 4 * mib),
        (&["retrans", "--buffer-mib", "16"], 16 * mib),
        (&["tcp", "--buffer-mib", "2"], 2 * mib),
    ] {
        let mut agent = Agent::spawn(args);
        let start = agent.wait_start();
        assert_eq!(ring_buffer_sizes(agent.pid()), [expected], "{args:?}");
        assert_eq!(
            start["buffer_mib"].as_u64(),
            Some(expected >> 20),
            "{start}"
        );
        // Sized from no rate: given, or no class records state changes.
        assert_eq!(start["buffer_opens_per_sec"], Value::Null, "{start}");
        agent.stop_ok();
    }
    // With the tcp class and no --buffer-mib, sized from the rate TCP
    // connections open at start (src/kernel/transport/sizing.rs has the
    // arithmetic): 4 MiB up to 64, whatever else runs on the host.
    let mut agent = Agent::spawn(&["tcp"]);
    let start = agent.wait_start();
    let sized = start["buffer_mib"].as_u64().expect("buffer_mib");
    assert!(
        sized.is_power_of_two() && (4..=64).contains(&sized),
        "{start}"
    );
    assert!(start["buffer_opens_per_sec"].is_u64(), "{start}");
    assert_eq!(ring_buffer_sizes(agent.pid()), [sized * mib]);
    agent.stop_ok();

    // Perf: 2 MiB shared out among the CPUs, a power of two of pages each,
    // and the kernel's header page on top of each.
    let mut agent = Agent::spawn(&["retrans", "--transport", "perf", "--buffer-mib", "2"]);
    agent.wait_start();
    let buffers = perf_buffer_mappings(agent.pid());
    assert!(!buffers.is_empty(), "no perf buffer mapped");
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
    let pages = (2 * mib / buffers.len() as u64 / page).max(1);
    let pages = 1 << pages.ilog2();
    assert!(
        buffers.iter().all(|&b| b == (pages + 1) * page),
        "{buffers:?}, expected {} bytes each",
        (pages + 1) * page
    );
    agent.stop_ok();
}
