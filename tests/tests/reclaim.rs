//! Acceptance tests of `kdiag-agent reclaim` against the real kernel. Each
//! test has its own memory cgroup, sparse file and reader processes, and
//! filters the agent on them. Those that put memory under pressure run one
//! at a time (see `PRESSURE`); the others run beside them.

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use kdiag_tests::agent::{Agent, exit_timeout};
use kdiag_tests::bpf::{map_entries, maps_held_by};
use kdiag_tests::env::skip_unless;
use kdiag_tests::memory::{
    Gated, MemoryCgroup, SparseFile, assert_latency_order, assert_one_vmstat,
    assert_summary_matches, dd, mem_total, of_pid,
};
use kdiag_tests::record::{self, ClassTotals, class_totals, pid_of, str_field, u64_field};
use serde_json::{Value, json};

const MIB: u64 = 1 << 20;
/// The memory cgroup limit of the memcg tests.
const LIMIT: u64 = 64 * MIB;
/// Each memcg reader reads this much: 8 times its cgroup's limit, so it
/// reclaims hundreds of times (about a second of reading).
const READ_MIB: u64 = 512;
/// Reading 512 MiB of a sparse file takes about a second; slack for a busy
/// 2-core machine.
const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// In a vm-test guest, whose emulated CPU is tens of times slower, the
/// readers take seconds (the four reclaim tests 9 to 19 s together), and
/// took over 30 s once while other work kept the host's two cores busy.
const GUEST_READ_TIMEOUT: Duration = Duration::from_secs(180);

/// The tracepoints of `reclaim --kind memcg` and of `--kind direct`.
const MEMCG: &[&str] = &[
    "vmscan/mm_vmscan_memcg_reclaim_begin",
    "vmscan/mm_vmscan_memcg_reclaim_end",
];
const DIRECT: &[&str] = &[
    "vmscan/mm_vmscan_direct_reclaim_begin",
    "vmscan/mm_vmscan_direct_reclaim_end",
];

/// Held by each test that puts memory under pressure, so that they run one
/// at a time. Side by side, in a guest of 512 MiB, their readers and agents
/// put the whole machine under pressure too (some 5-9% in
/// /proc/pressure/memory), and a memcg reader was seen running in the
/// kernel for minutes without reading a byte (6.1: 147 s of system time, 92
/// MB read of 512, none in the second measured); each test alone reads its
/// 512 MiB in seconds.
static PRESSURE: Mutex<()> = Mutex::new(());

fn alone() -> MutexGuard<'static, ()> {
    PRESSURE.lock().unwrap_or_else(PoisonError::into_inner)
}

fn run_readers(readers: &mut [&mut Gated]) {
    for r in readers.iter_mut() {
        r.go();
    }
    let timeout = if kdiag_tests::env::in_emulated_guest() {
        GUEST_READ_TIMEOUT
    } else {
        READ_TIMEOUT
    };
    for r in readers.iter_mut() {
        let status = r.wait(timeout);
        assert!(status.success(), "reader {} failed: {status}", r.pid());
    }
}

/// Checks one memcg `reclaim` record of a reader in `cgroup`.
fn assert_memcg_record(rec: &Value, pid: u32, cgroup: &str) {
    let want = json!({
        "kind": "memcg", "pid": pid, "tid": pid, "comm": "dd", "cgroup": cgroup, "order": null,
        // An ordinary cgroup shows no container.
        "container_id": null, "pod_uid": null,
    });
    for (key, value) in want.as_object().expect("object") {
        assert_eq!(rec.get(key), Some(value), "{key:?} in {rec}");
    }
    assert!(u64_field(rec, "latency_ns") > 0, "latency_ns in {rec}");
    u64_field(rec, "nr_reclaimed");
}

/// A reader in a cgroup shaped like a Kubernetes container's (kubelet's
/// systemd driver, containerd): its records name the container and the pod,
/// `--container` selects it, and its statistics, pruned from the kernel map
/// once it exited, still make its summary at exit.
/// A `reclaim --kind memcg` agent with the cgroup filter `option value`,
/// or `None` (the test's half skipped by name) where the kernel's
/// tracepoint programs cannot test a task's ancestor cgroups, which the
/// agent then refuses as a usage error.
fn memcg_agent_filtered_by(option: &str, value: &str) -> Option<Agent> {
    match Agent::start_or_refusal(
        &["reclaim", "--kind", "memcg", option, value, "-i", "0"],
        MEMCG,
    ) {
        Ok((agent, _)) => Some(agent),
        Err(refusal) => {
            assert!(
                refusal.contains("bpf_get_current_ancestor_cgroup_id"),
                "the agent refused {option}: {refusal}"
            );
            skip_unless(false, &format!("its {option} half: {}", refusal.trim()));
            None
        }
    }
}

#[test]
fn records_name_the_container_and_pod_of_the_cgroup() {
    let _alone = alone();
    const ID: &str = "6d3b1f0a9e8c7b6a5f4e3d2c1b0a99887766554433221100ffeeddccbbaa9988";
    const UID: &str = "1b2c3d4e-5f60-4a1b-8c2d-3e4f5a6b7c8d";
    let pod = format!("kubepods-burstable-pod{}.slice", UID.replace('-', "_"));
    let container = format!("cri-containerd-{ID}.scope");
    let file = SparseFile::new(READ_MIB * MIB);
    let cg = MemoryCgroup::nested(LIMIT, &[&pod, &container]);
    let mut reader = cg.reader(&file, 0, READ_MIB);
    let pid = reader.pid();
    let pid_arg = pid.to_string();
    let (mut agent, _) = Agent::start(
        &["reclaim", "--kind", "memcg", "--pid", &pid_arg, "-i", "0"],
        MEMCG,
    );
    // The container's own stalls by its id, as `docker ps` abbreviates it:
    // a kernel filter on the task's ancestor cgroups, which some kernels'
    // tracepoint programs cannot do (then the agent refuses the option).
    let mut by_container = memcg_agent_filtered_by("--container", &ID[..12]);
    let stats_map = maps_held_by(agent.pid())
        .into_iter()
        .find(|m| m.name == "RECLAIM_STATS")
        .expect("the agent holds RECLAIM_STATS");
    run_readers(&mut [&mut reader]);
    // With `--interval 0` the summaries come at exit only, yet the exited
    // reader's statistics leave the kernel map while the agent runs (else a
    // long run fills it and new stalls are dropped; housekeeping runs every
    // 10 s) and still count in its summary at exit (checked below).
    let deadline = Instant::now() + Duration::from_secs(15);
    while map_entries(stats_map.id) > 0 {
        assert!(
            Instant::now() < deadline,
            "the exited reader's entry is still in RECLAIM_STATS after 15 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let recs = agent.stop_ok();
    let container_recs = by_container.as_mut().map(Agent::stop_ok);
    // Each agent times the stalls itself: compare what identifies them.
    let stalls = |recs: &[Value]| {
        recs.iter()
            .filter(|r| record::is_type(r, "reclaim"))
            .map(|r| {
                (
                    pid_of(r),
                    r["container_id"].clone(),
                    u64_field(r, "nr_reclaimed"),
                )
            })
            .collect::<Vec<_>>()
    };
    assert!(!stalls(&recs).is_empty(), "no reclaim records for {pid}");
    if let Some(container_recs) = container_recs {
        assert_eq!(
            stalls(&container_recs),
            stalls(&recs),
            "--container {} and --pid {pid} write the same stalls",
            &ID[..12]
        );
    }
    let ours: Vec<&Value> = recs
        .iter()
        .filter(|r| {
            (record::is_type(r, "reclaim") || record::is_type(r, "reclaim_summary"))
                && pid_of(r) == Some(u64::from(pid))
        })
        .collect();
    assert!(
        ours.iter().any(|r| record::is_type(r, "reclaim_summary")),
        "no reclaim_summary for {pid}: {ours:?}"
    );
    for rec in &ours {
        assert_eq!(rec["cgroup"], json!(cg.path()), "cgroup of {rec}");
        assert_eq!(rec["container_id"], json!(ID), "container_id of {rec}");
        assert_eq!(rec["pod_uid"], json!(UID), "pod_uid of {rec}");
    }
    // The pruned statistics still make the summary at exit.
    let events: Vec<Value> = ours
        .iter()
        .filter(|r| record::is_type(r, "reclaim"))
        .map(|r| (*r).clone())
        .collect();
    let summaries: Vec<&&Value> = ours
        .iter()
        .filter(|r| record::is_type(r, "reclaim_summary"))
        .collect();
    assert_eq!(summaries.len(), 1, "summaries of {pid}: {summaries:?}");
    assert_summary_matches(summaries[0], &events);
}

#[test]
fn memcg_reclaim_of_the_filtered_reader_only() {
    let _alone = alone();
    let file = SparseFile::new(2 * READ_MIB * MIB);
    let cg = MemoryCgroup::new(LIMIT);
    let mut first = cg.reader(&file, 0, READ_MIB);
    let mut second = cg.reader(&file, READ_MIB, READ_MIB);
    let (p1, p2) = (first.pid(), second.pid());
    let pid_arg = p1.to_string();
    let (mut by_pid, _) = Agent::start(
        &["reclaim", "--kind", "memcg", "--pid", &pid_arg, "-i", "0"],
        MEMCG,
    );
    // The same stalls through the kernel's cgroup filter, given as a full
    // path: both readers, nothing else.
    let cg_arg = cg.dir().to_str().expect("utf-8 path").to_owned();
    let mut by_cgroup = memcg_agent_filtered_by("--cgroup", &cg_arg);
    run_readers(&mut [&mut first, &mut second]);
    let recs = by_pid.stop_ok();
    let cg_recs = by_cgroup.as_mut().map(Agent::stop_ok);

    let events: Vec<Value> = recs
        .iter()
        .filter(|r| record::is_type(r, "reclaim"))
        .cloned()
        .collect();
    assert!(!events.is_empty(), "no reclaim records for {p1}");
    for rec in &events {
        assert_memcg_record(rec, p1, &cg.path());
    }
    let summaries: Vec<&Value> = recs
        .iter()
        .filter(|r| record::is_type(r, "reclaim_summary"))
        .collect();
    assert_eq!(summaries.len(), 1, "summaries: {summaries:?}");
    let summary = summaries[0];
    for (key, value) in [
        ("kind", json!("memcg")),
        ("pid", json!(p1)),
        ("comm", json!("dd")),
        ("cgroup", json!(cg.path())),
    ] {
        assert_eq!(summary.get(key), Some(&value), "{key:?} in {summary}");
    }
    assert_summary_matches(summary, &events);
    let pages: u64 = events.iter().map(|e| u64_field(e, "nr_reclaimed")).sum();
    assert_eq!(u64_field(summary, "nr_reclaimed"), pages, "in {summary}");
    assert_one_vmstat(&recs);
    assert_eq!(
        class_totals(&recs, "reclaim").none_skipped_as_uncounted(),
        ClassTotals {
            events: events.len() as u64,
            ..ClassTotals::default()
        },
        "agent_stats: events = reclaim records, nothing dropped, lost, failed, skipped, \
         undecodable or filtered"
    );

    // The cgroup-filtered agent saw both readers, and only them.
    let Some(cg_recs) = cg_recs else {
        return;
    };
    let cg_events: Vec<&Value> = cg_recs
        .iter()
        .filter(|r| record::is_type(r, "reclaim"))
        .collect();
    for pid in [p1, p2] {
        let mine: Vec<&Value> = cg_events
            .iter()
            .copied()
            .filter(|r| pid_of(r) == Some(pid.into()))
            .collect();
        assert!(!mine.is_empty(), "no reclaim of reader {pid} via --cgroup");
        mine.iter()
            .for_each(|r| assert_memcg_record(r, pid, &cg.path()));
    }
    assert_eq!(
        cg_events.len(),
        of_pid(&cg_recs, "reclaim", p1).len() + of_pid(&cg_recs, "reclaim", p2).len(),
        "records of other processes via --cgroup"
    );
}

#[test]
fn min_latency_keeps_events_in_the_kernel_but_counts_them() {
    let _alone = alone();
    let file = SparseFile::new(READ_MIB * MIB);
    let cg = MemoryCgroup::new(LIMIT);
    let mut reader = cg.reader(&file, 0, READ_MIB);
    let pid = reader.pid().to_string();
    // 10 s: above any reclaim latency.
    let (mut agent, _) = Agent::start(
        &[
            "reclaim",
            "--kind",
            "memcg",
            "--pid",
            &pid,
            "--min-latency-us",
            "10000000",
            "-i",
            "0",
        ],
        MEMCG,
    );
    run_readers(&mut [&mut reader]);
    let recs = agent.stop_ok();
    let events: Vec<&Value> = recs
        .iter()
        .filter(|r| record::is_type(r, "reclaim"))
        .collect();
    assert!(events.is_empty(), "records under the threshold: {events:?}");
    let summaries = of_pid(&recs, "reclaim_summary", reader.pid());
    assert_eq!(summaries.len(), 1, "summaries: {summaries:?}");
    let s = summaries[0];
    assert_eq!(str_field(s, "kind"), "memcg", "in {s}");
    assert!(u64_field(s, "count") > 0, "stalls not counted: {s}");
    assert!(u64_field(s, "nr_reclaimed") > 0, "pages not counted: {s}");
    assert_latency_order(s);
    assert_eq!(
        class_totals(&recs, "reclaim").none_skipped_as_uncounted(),
        ClassTotals::default()
    );
}

#[test]
fn pid_of_no_process_is_a_usage_error() {
    // A pid that existed and is gone (reaped): nothing reuses it this fast.
    let mut child = std::process::Command::new("true")
        .spawn()
        .expect("spawn true");
    let gone = child.id().to_string();
    child.wait().expect("reap");
    let cases: [&[&str]; 3] = [
        &["reclaim", "--pid", &gone],
        &["reclaim", "--cgroup", "/kdiag-no-such-cgroup"],
        &["reclaim", "--container", "0123456789abcdef0123"],
    ];
    for args in cases {
        let mut agent = Agent::spawn(args);
        let status = agent.wait_exit(exit_timeout());
        assert_eq!(status.code(), Some(2), "{args:?}: {}", agent.stderr());
        let stderr = agent.stderr();
        assert!(
            stderr.contains(args[2]),
            "{args:?}: message does not name {}: {stderr}",
            args[2]
        );
    }
}

/// Global direct reclaim, for real: readers of a sparse file totalling more
/// than the machine's memory fill the page cache until allocations have to
/// reclaim themselves. Slow: it reads until the agent has reported direct
/// reclaim of a reader (at most 1.5x RAM), which takes as long as filling
/// the free memory; on a VM whose free memory the host has taken back that
/// runs at a few hundred MB/s (about 75 s for 21 GiB free of 24 GiB). It
/// evicts the host's page cache; the file's own cache is dropped at the end.
#[test]
fn direct_reclaim_of_readers_filling_memory() {
    let _alone = alone();
    const READERS: u64 = 2;
    const DEADLINE: Duration = Duration::from_secs(180);
    let total = mem_total() * 3 / 2;
    let per_reader_mib = total / READERS / MIB + 1;
    let file = SparseFile::new(per_reader_mib * READERS * MIB);
    let mut readers: Vec<Gated> = (0..READERS)
        .map(|i| Gated::spawn(None, &dd(&file, i * per_reader_mib, per_reader_mib)))
        .collect();
    let pids: Vec<String> = readers.iter().map(|r| r.pid().to_string()).collect();
    let mut args = vec!["reclaim", "--kind", "direct", "-i", "0"];
    for pid in &pids {
        args.extend(["--pid", pid.as_str()]);
    }
    let (mut agent, _) = Agent::start(&args, DIRECT);
    let started = Instant::now();
    readers.iter_mut().for_each(Gated::go);
    let first = agent.wait_for("a direct reclaim of a reader", DEADLINE, |r| {
        record::is_type(r, "reclaim")
    });
    let took = started.elapsed();
    // Enough seen: stop reading (Drop kills the readers) and let go of the
    // file's page cache before anything else.
    drop(readers);
    file.drop_cache();
    let recs = agent.stop_ok();
    eprintln!("first direct reclaim after {took:?}");

    let events: Vec<&Value> = recs
        .iter()
        .filter(|r| record::is_type(r, "reclaim"))
        .collect();
    assert!(events.contains(&&first));
    for rec in &events {
        assert_eq!(str_field(rec, "kind"), "direct", "in {rec}");
        let pid = pid_of(rec).expect("pid").to_string();
        assert!(
            pids.contains(&pid),
            "pid of {rec} is not a reader's ({pids:?})"
        );
        assert_eq!(str_field(rec, "comm"), "dd", "in {rec}");
        assert!(u64_field(rec, "latency_ns") > 0, "in {rec}");
        // Page cache pages: order 0 (the allocation's order is reported).
        assert!(rec["order"].as_u64().is_some(), "order in {rec}");
    }
    for s in recs
        .iter()
        .filter(|r| record::is_type(r, "reclaim_summary"))
    {
        assert_eq!(str_field(s, "kind"), "direct", "in {s}");
        let pid = pid_of(s).expect("pid") as u32;
        let mine: Vec<Value> = of_pid(&recs, "reclaim", pid).into_iter().cloned().collect();
        assert_summary_matches(s, &mine);
    }
}
