//! Which BPF programs a process holds, and whether they are gone: after the
//! agent exits, none of its programs may stay loaded.

use std::collections::BTreeSet;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::cmd;

/// Names of kdiag's kernel programs (the eBPF functions): the classic
/// tracepoint entries, and the BTF tracepoint entries of those that have
/// one (`<program>_btf`, see [`is_entry_of`]).
pub const KDIAG_PROGRAMS: &[&str] = &[
    "retransmit_skb",
    "retransmit_synack",
    "inet_sock_set_state",
    "tcp_destroy_sock",
    "softirq_raise",
    "softirq_entry",
    "softirq_exit",
    "direct_reclaim_begin",
    "direct_reclaim_end",
    "memcg_reclaim_begin",
    "memcg_reclaim_end",
    "compaction_begin",
    "compaction_end",
    "try_to_compact_pages",
    "softirq_raise_btf",
    "softirq_entry_btf",
    "softirq_exit_btf",
    "inet_sock_set_state_btf",
    "retransmit_skb_btf",
    "retransmit_synack_btf",
];

/// The kernel keeps at most 15 bytes of a program name (BPF_OBJ_NAME_LEN
/// - 1); bpftool shows that, or the full name when it finds it in BTF.
const BPF_NAME_MAX: usize = 15;

/// Whether a name as shown by bpftool is one of kdiag's programs.
pub fn is_kdiag_program(shown: &str) -> bool {
    KDIAG_PROGRAMS.iter().any(|full| shows_as(full, shown))
}

/// Whether bpftool may show program `program` as `shown`, by either of its
/// entries: the classic tracepoint one (`program`) or the BTF tracepoint
/// one (`<program>_btf`), of which the agent loads one.
pub fn is_entry_of(program: &str, shown: &str) -> bool {
    shows_as(program, shown) || shows_as(&format!("{program}_btf"), shown)
}

/// Whether bpftool may show the program named `full` as `shown`.
pub fn shows_as(full: &str, shown: &str) -> bool {
    shown == full || shown == &full[..full.len().min(BPF_NAME_MAX)]
}

/// Loaded programs as (id, name), from `bpftool prog show -j`.
pub fn loaded_programs() -> Vec<(u32, String)> {
    prog_show()
        .iter()
        .map(|p| {
            let id = p
                .get("id")
                .and_then(Value::as_u64)
                .expect("bpftool prog without id");
            let name = p.get("name").and_then(Value::as_str).unwrap_or("");
            (
                u32::try_from(id).expect("prog id fits u32"),
                name.to_owned(),
            )
        })
        .collect()
}

/// Every loaded program, as `bpftool prog show -j` describes it.
fn prog_show() -> Vec<Value> {
    let json = cmd::run("bpftool", &["prog", "show", "-j"]);
    let progs: Value = serde_json::from_str(&json)
        .unwrap_or_else(|e| panic!("bpftool prog show -j printed invalid JSON ({e}): {json}"));
    match progs {
        Value::Array(progs) => progs,
        _ => panic!("bpftool prog show -j did not print an array: {json}"),
    }
}

/// How often the kernel skipped the programs `ids` instead of running them,
/// summed (bpftool's `recursion_misses`, absent when 0). A classic
/// tracepoint skips every program attached to it when it fires on a CPU
/// where a tracing program is already running (kernel/trace/bpf_trace.c,
/// trace_call_bpf and bpf_prog_active), e.g. in a softirq that interrupted
/// one: such events never reach the programs, and only this counter knows.
pub fn recursion_misses(ids: &BTreeSet<u32>) -> u64 {
    sum_of(ids, "recursion_misses")
}

/// bpftool's `field` of the programs `ids`, summed (absent counts as 0).
fn sum_of(ids: &BTreeSet<u32>, field: &str) -> u64 {
    prog_show()
        .iter()
        .filter(|p| {
            p.get("id")
                .and_then(Value::as_u64)
                .is_some_and(|id| u32::try_from(id).is_ok_and(|id| ids.contains(&id)))
        })
        .filter_map(|p| p.get(field).and_then(Value::as_u64))
        .sum()
}

/// The kernel's run time of the programs `ids`, summed: bpftool's
/// `run_time_ns`, which grows only while the kernel's BPF statistics are
/// on (`kernel.bpf_stats_enabled`, or a `BPF_ENABLE_STATS` descriptor held
/// by any process) and is absent while it is 0.
pub fn kernel_run_time_ns(ids: &BTreeSet<u32>) -> u64 {
    sum_of(ids, "run_time_ns")
}

/// The kernel's BPF run-time statistics held on for the whole host through
/// a `BPF_ENABLE_STATS` descriptor, as a tool that uses them does, until
/// dropped (the kernel turns them off when the last such descriptor closes).
pub struct StatsEnabled {
    /// Held only to be closed on drop.
    _fd: std::os::fd::OwnedFd,
}

impl StatsEnabled {
    pub fn hold() -> StatsEnabled {
        use std::os::fd::FromRawFd as _;
        /// `bpf(2)` command BPF_ENABLE_STATS (include/uapi/linux/bpf.h).
        const BPF_ENABLE_STATS: libc::c_long = 32;
        // union bpf_attr's enable_stats: { __u32 type }, BPF_STATS_RUN_TIME
        // is 0; the rest of the attribute must be zero.
        let attr = [0u32; 2];
        // SAFETY: bpf() reads size_of_val(&attr) bytes from a valid buffer
        // and returns a new descriptor or -1.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_ENABLE_STATS,
                attr.as_ptr(),
                std::mem::size_of_val(&attr),
            )
        };
        assert!(
            fd >= 0,
            "BPF_ENABLE_STATS: {}",
            std::io::Error::last_os_error()
        );
        let fd = i32::try_from(fd).expect("a descriptor fits an int");
        // SAFETY: a descriptor bpf() just opened for us and nothing else owns.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        StatsEnabled { _fd: fd }
    }
}

/// Whether the kernel counts the recursion misses of the tracepoint
/// programs process `pid` holds: their program fds' fdinfo has the line
/// (5.12 on), and the kernel is 6.7 or later (before, that line reads 0
/// for tracepoint programs whatever the kernel skipped). `None` when the
/// process holds no program fd.
pub fn counts_recursion_misses(pid: u32) -> Option<bool> {
    let dir = format!("/proc/{pid}/fdinfo");
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("reading {dir}: {e}"));
    let programs: Vec<String> = entries
        .filter_map(|entry| std::fs::read_to_string(entry.ok()?.path()).ok())
        .filter(|info| info.lines().any(|l| l.starts_with("prog_type:")))
        .collect();
    if programs.is_empty() {
        return None;
    }
    let line = programs
        .iter()
        .any(|info| info.lines().any(|l| l.starts_with("recursion_misses:")));
    Some(line && kernel_counts_tracepoint_misses())
}

/// Whether the kernel counts the runs of classic tracepoint programs it
/// skips (6.7 on, in `trace_call_bpf`): before, `agent_stats`' `skipped`
/// is null for a class with such a program.
pub fn kernel_counts_tracepoint_misses() -> bool {
    kernel_at_least(6, 7)
}

/// Whether the kernel's `skb/kfree_skb` tracepoint gives a drop reason
/// (5.17 on): a `reason` field in its format. Without it the agent's `drop`
/// class runs degraded, with no reasons to test.
pub fn kernel_gives_drop_reasons() -> bool {
    kfree_skb_has_field("reason")
}

/// Whether the kernel's `skb/kfree_skb` tracepoint names the socket that
/// was to receive a dropped packet (`rx_sk`, 6.11 on). Before, a UDP
/// datagram dropped at an unconnected socket carries no socket
/// (`skb->sk` is only set once it is queued), so its drop has no owner.
pub fn kfree_skb_names_the_receiving_socket() -> bool {
    kfree_skb_has_field("rx_sk")
}

fn kfree_skb_has_field(name: &str) -> bool {
    let path = "/sys/kernel/tracing/events/skb/kfree_skb/format";
    let format = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let declared = format!(" {name};");
    format
        .lines()
        .any(|l| l.trim_start().starts_with("field:") && l.contains(&declared))
}

/// Whether the running kernel's release is `major.minor` or later.
fn kernel_at_least(major: u32, minor: u32) -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("osrelease");
    let mut parts = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse::<u32>().unwrap_or(0));
    let version = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    version >= (major, minor)
}

/// Ids of the BPF programs process `pid` holds through a program or link fd,
/// from the `prog_id:` lines of /proc/PID/fdinfo. Ids are specific to this
/// process, unlike names: parallel tests run other agents with the same
/// program names at the same time.
pub fn program_ids_held_by(pid: u32) -> BTreeSet<u32> {
    let dir = format!("/proc/{pid}/fdinfo");
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("reading {dir}: {e}"));
    entries
        .filter_map(|entry| std::fs::read_to_string(entry.ok()?.path()).ok())
        .flat_map(|info| {
            info.lines()
                .filter_map(|l| l.strip_prefix("prog_id:")?.trim().parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

/// A BPF map as `bpftool map show -j` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapInfo {
    pub id: u64,
    /// As the kernel keeps it: at most 15 bytes.
    pub name: String,
    pub max_entries: u64,
    /// The kernel's estimate of the map's memory.
    pub bytes_memlock: u64,
}

/// The maps process `pid` holds, from the `map_id:` lines of its fdinfo
/// and bpftool.
pub fn maps_held_by(pid: u32) -> Vec<MapInfo> {
    let dir = format!("/proc/{pid}/fdinfo");
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("reading {dir}: {e}"));
    let ids: BTreeSet<u64> = entries
        .filter_map(|entry| std::fs::read_to_string(entry.ok()?.path()).ok())
        .filter_map(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("map_id:")?.trim().parse().ok())
        })
        .collect();
    ids.into_iter()
        .map(|id| {
            let json = cmd::run("bpftool", &["map", "show", "id", &id.to_string(), "-j"]);
            let map: Value = serde_json::from_str(&json)
                .unwrap_or_else(|e| panic!("bpftool map show printed invalid JSON ({e}): {json}"));
            let number = |key: &str| {
                map.get(key)
                    .and_then(Value::as_u64)
                    .unwrap_or_else(|| panic!("no {key} in {json}"))
            };
            MapInfo {
                id,
                name: map
                    .get("name")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned(),
                max_entries: number("max_entries"),
                bytes_memlock: number("bytes_memlock"),
            }
        })
        .collect()
}

/// How many entries map `id` holds now (`bpftool map dump`).
pub fn map_entries(id: u64) -> usize {
    let json = cmd::run("bpftool", &["map", "dump", "id", &id.to_string(), "-j"]);
    let entries: Value = serde_json::from_str(&json)
        .unwrap_or_else(|e| panic!("bpftool map dump printed invalid JSON ({e}): {json}"));
    entries
        .as_array()
        .unwrap_or_else(|| panic!("bpftool map dump did not print an array: {json}"))
        .len()
}

/// The kdiag programs among `held` (ids), with their names.
pub fn kdiag_programs_among(held: &BTreeSet<u32>) -> Vec<(u32, String)> {
    loaded_programs()
        .into_iter()
        .filter(|(id, name)| held.contains(id) && is_kdiag_program(name))
        .collect()
}

/// Waits up to `timeout` until none of the programs `ids` is loaded (the
/// kernel frees programs asynchronously after the last fd closes); panics
/// listing the ones that remain.
pub fn assert_unloaded(ids: &BTreeSet<u32>, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let remaining: Vec<(u32, String)> = loaded_programs()
            .into_iter()
            .filter(|(id, _)| ids.contains(id))
            .collect();
        if remaining.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "BPF programs still loaded {timeout:?} after the agent exited: {remaining:?}"
        );
        thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::is_kdiag_program;

    #[test]
    fn names_match_truncated_or_full() {
        assert!(is_kdiag_program("retransmit_skb"));
        assert!(is_kdiag_program("retransmit_syna"));
        assert!(is_kdiag_program("retransmit_synack"));
        assert!(is_kdiag_program("inet_sock_set_s"));
        assert!(!is_kdiag_program("inet_sock"));
        assert!(!is_kdiag_program("sd_devices"));
    }
}
