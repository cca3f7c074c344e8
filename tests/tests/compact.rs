//! Acceptance tests of `kdiag-agent compact` against the real kernel: a
//! shell of the test's own writes /proc/sys/vm/compact_memory, and the
//! agent, filtered on that shell, must report each zone's compaction run.

use kdiag_tests::agent::Agent;
use kdiag_tests::max_wait;
use kdiag_tests::memory::{
    Gated, assert_one_vmstat, assert_summary_matches, memory_cgroup_of, of_pid, populated_zones,
};
use kdiag_tests::record::{class_totals, str_field, u64_field};
use serde_json::{Value, json};

/// mm_compaction_end's status names (enum compact_result).
const STATUSES: &[&str] = &[
    "not_suitable_zone",
    "skipped",
    "deferred",
    "no_suitable_page",
    "continue",
    "complete",
    "partial_skipped",
    "contended",
    "success",
];

#[test]
fn compact_memory_write_shows_the_writer() {
    let mut shell = Gated::spawn(None, "echo 1 > /proc/sys/vm/compact_memory");
    let pid = shell.pid();
    let pid_arg = pid.to_string();
    let (mut agent, _) = Agent::start(
        &["compact", "--pid", &pid_arg, "-i", "0"],
        &[
            "compaction/mm_compaction_begin",
            "compaction/mm_compaction_end",
        ],
    );
    shell.go();
    assert!(
        shell.wait(max_wait()).success(),
        "writing compact_memory failed"
    );
    // compact_node() runs compact_zone() once per populated zone.
    let zones = populated_zones();
    agent.wait_for_n("a compaction run per zone", zones, max_wait(), |r| {
        of_pid(std::slice::from_ref(r), "compact", pid).len() == 1
    });
    let recs = agent.stop_ok();

    let events: Vec<Value> = of_pid(&recs, "compact", pid).into_iter().cloned().collect();
    assert_eq!(
        events.len(),
        zones,
        "one run per populated zone: {events:?}"
    );
    // The shell runs in this test's memory cgroup.
    let cgroup = memory_cgroup_of(std::process::id());
    for rec in &events {
        let want = json!({
            "pid": pid, "tid": pid, "comm": "sh", "cgroup": cgroup,
            // compact_node() runs MIGRATE_SYNC, for no allocation.
            "mode": "sync", "order": null,
        });
        for (key, value) in want.as_object().expect("object") {
            assert_eq!(rec.get(key), Some(value), "{key:?} in {rec}");
        }
        assert!(u64_field(rec, "latency_ns") > 0, "latency_ns in {rec}");
        let status = str_field(rec, "status");
        assert!(STATUSES.contains(&status), "status {status:?} in {rec}");
    }
    let summaries = of_pid(&recs, "compact_summary", pid);
    assert_eq!(summaries.len(), 1, "summaries: {summaries:?}");
    assert_eq!(str_field(summaries[0], "comm"), "sh");
    assert_summary_matches(summaries[0], &events);
    assert_one_vmstat(&recs);
    let totals = class_totals(&recs, "compact");
    assert_eq!((totals.dropped, totals.lost), (0, 0), "{totals:?}");
    assert_eq!(totals.events, events.len() as u64, "only the shell's runs");
}
