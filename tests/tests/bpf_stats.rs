//! The kernel's BPF run-time statistics are host-wide: while they are on,
//! every BPF program on the host pays for them. The agent turns them on only
//! in short windows, and never leaves them on: not after it exits, not
//! after SIGKILL. A bystander program of this test shows whether they are on.

use std::{
    thread,
    time::{Duration, Instant},
};

use kdiag_tests::{agent::Agent, bystander::Bystander, env::require_root, record::is_type};

const POKES: u32 = 50;

/// One test, not several: the statistics are one switch for the whole host,
/// and a second agent in a parallel test would turn them on for this one.
#[test]
fn statistics_are_on_only_in_windows_and_off_after_any_exit() {
    require_root();
    let bystander = Bystander::new();
    assert_eq!(
        bystander.counted_of(POKES),
        0,
        "BPF statistics are already on on this host (kernel.bpf_stats_enabled, or another \
         holder): nothing can be concluded"
    );

    // While it runs: some pokes land in a window, most do not.
    let (mut agent, _) = Agent::start(&["softirq", "--interval", "1"], &["irq/softirq_entry"]);
    let (mut pokes, mut counted) = (0u64, 0u64);
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        pokes += 1;
        counted += bystander.counted_of(1);
        thread::sleep(Duration::from_millis(5));
    }
    let recs = agent.stop_ok();
    assert!(
        counted > 0,
        "no poke of {pokes} was counted: no window opened"
    );
    assert!(
        counted * 4 < pokes,
        "{counted} of {pokes} pokes counted: statistics on more than a quarter of the time"
    );
    // Each full interval had one window of about 100 ms, and the programs'
    // figures come from it.
    let stats: Vec<_> = recs.iter().filter(|r| is_type(r, "agent_stats")).collect();
    assert!(stats.len() >= 3, "{} agent_stats in 3 s", stats.len());
    for s in &stats[..stats.len() - 1] {
        let sampled = s["programs_sampled_ns"]
            .as_u64()
            .expect("programs_sampled_ns");
        assert!(
            (50_000_000..=300_000_000).contains(&sampled),
            "programs_sampled_ns {sampled} in {s}"
        );
        let entry = s["programs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "softirq_entry")
            .unwrap_or_else(|| panic!("no softirq_entry in {s}"));
        assert!(
            entry["run_cnt"].as_u64().unwrap() > 0,
            "no runs in the window: {s}"
        );
    }
    assert_eq!(
        bystander.counted_of(POKES),
        0,
        "statistics still on after the agent exited"
    );

    // SIGKILL inside a window: the kernel closes the agent's descriptor.
    let (mut agent, _) = Agent::start(&["softirq", "--interval", "1"], &["irq/softirq_entry"]);
    let until = Instant::now() + Duration::from_secs(3);
    while bystander.counted_of(1) == 0 {
        assert!(Instant::now() < until, "no window opened in 3 s");
        thread::sleep(Duration::from_millis(2));
    }
    let (status, _) = agent.stop_with(libc::SIGKILL);
    assert_eq!(status.code(), None, "the agent was killed: {status}");
    assert_eq!(
        bystander.counted_of(POKES),
        0,
        "statistics still on after the agent was killed in a window"
    );
}
