//! What the benchmark reads from the kernel: CPU time from /proc, peak memory
//! from /proc/PID/status, each process's BPF programs and maps from
//! /proc/PID/fdinfo (the kernel prints `run_time_ns`, `run_cnt` and
//! `memlock` there for every BPF fd: kernel/bpf/syscall.c,
//! bpf_prog_show_fdinfo and bpf_map_show_fdinfo), and how many events of a
//! kind the kernel has seen, to divide the programs' time by.

use std::{collections::BTreeMap, fs, process::Command, time::Duration};

use anyhow::{Context, Result, ensure};

/// A sysctl set for the benchmark's life and restored when dropped, also
/// when the benchmark fails or panics.
pub(super) struct Sysctl {
    path: String,
    previous: String,
}

impl Sysctl {
    /// `name` in /proc/sys form, e.g. `kernel/bpf_stats_enabled`.
    pub(super) fn set(name: &str, value: &str) -> Result<Self> {
        let path = format!("/proc/sys/{name}");
        let previous = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        fs::write(&path, value).with_context(|| format!("writing {value} to {path}"))?;
        Ok(Self {
            path,
            previous: previous.trim().to_owned(),
        })
    }
}

impl Drop for Sysctl {
    fn drop(&mut self) {
        if let Err(e) = fs::write(&self.path, &self.previous) {
            eprintln!(
                "warning: could not restore {} to {}: {e}",
                self.path, self.previous
            );
        }
    }
}

/// Jiffies to nanoseconds: /proc reports CPU time in USER_HZ ticks.
fn tick_ns() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    1_000_000_000 / u64::try_from(hz).unwrap_or(100).max(1)
}

/// CPU time the whole machine spent busy (not idle, not waiting for I/O),
/// summed over CPUs, from the `cpu` line of /proc/stat.
pub(super) fn machine_busy_ns() -> Result<u64> {
    let stat = fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("/proc/stat has no cpu line")?;
    // user nice system idle iowait irq softirq steal (guest time is already
    // inside user).
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    ensure!(v.len() >= 8, "short cpu line in /proc/stat: {line}");
    let busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7];
    Ok(busy * tick_ns())
}

/// User + system CPU time of a process (all its threads).
pub(super) fn process_cpu_ns(pid: u32) -> Result<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name may contain spaces and parentheses: fields are
    // counted from the last ')'. utime and stime are fields 14 and 15.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("malformed /proc/PID/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| -> u64 { fields.get(i).and_then(|f| f.parse().ok()).unwrap_or(0) };
    // `rest` starts at field 3 (state).
    Ok((field(11) + field(12)) * tick_ns())
}

/// Softirqs run since boot, every vector on every CPU: the sum of
/// /proc/softirqs, which `handle_softirqs` (kernel/softirq.c) counts once
/// per handler run, right before it fires softirq_entry.
pub(super) fn softirqs_total() -> Result<u64> {
    let table = fs::read_to_string("/proc/softirqs").context("reading /proc/softirqs")?;
    Ok(kdiag_common::softirq::proc_softirqs_total(&table))
}

/// `TcpExt: ListenOverflows` of /proc/net/netstat: SYNs dropped because a
/// listener's accept queue was full.
pub(super) fn listen_overflows() -> Result<u64> {
    let path = "/proc/net/netstat";
    let text = fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    netstat_value(&text, "TcpExt:", "ListenOverflows")
        .with_context(|| format!("no TcpExt ListenOverflows in {path}"))
}

/// /proc/net/netstat holds pairs of lines, names then values, both starting
/// with the same prefix.
fn netstat_value(text: &str, prefix: &str, name: &str) -> Option<u64> {
    let mut lines = text.lines().filter(|l| l.starts_with(prefix));
    let (names, values) = (lines.next()?, lines.next()?);
    let at = names.split_whitespace().position(|n| n == name)?;
    values.split_whitespace().nth(at)?.parse().ok()
}

/// A `VmXxx:` line of /proc/PID/status, in bytes.
pub(super) fn vm_bytes(pid: u32, key: &str) -> Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .with_context(|| format!("no {key} in /proc/{pid}/status"))?;
    Ok(kib * 1024)
}

/// One BPF program's kernel statistics.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct ProgStat {
    pub run_cnt: u64,
    pub run_time_ns: u64,
    pub recursion_misses: u64,
}

/// The BPF objects a process holds open.
#[derive(Debug, Default)]
pub(super) struct BpfObjects {
    /// By program id.
    pub programs: BTreeMap<u32, ProgStat>,
    /// Whether any BPF link or perf event carries a program: attached.
    pub attached: bool,
    /// Kernel memory charged to its maps (what `bpftool map show` reports
    /// as bytes_memlock), each map once.
    pub map_bytes: u64,
    /// Of `map_bytes`, what its BPF ring buffers take.
    pub ring_bytes: u64,
}

impl BpfObjects {
    pub(super) fn run_time_ns(&self) -> u64 {
        self.programs.values().map(|p| p.run_time_ns).sum()
    }
}

/// `map_type` of a BPF ring buffer in fdinfo (include/uapi/linux/bpf.h).
const BPF_MAP_TYPE_RINGBUF: u64 = 27;

pub(super) fn bpf_objects(pid: u32) -> Result<BpfObjects> {
    let dir = format!("/proc/{pid}/fdinfo");
    let mut objects = BpfObjects::default();
    let mut maps = BTreeMap::new();
    for entry in fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        // An fd closed while we look is simply gone.
        let Ok(info) = fs::read_to_string(entry?.path()) else {
            continue;
        };
        let field = |key: &str| -> Option<u64> {
            info.lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
                .and_then(|v| v.trim().parse().ok())
        };
        if let Some(id) = field("map_id") {
            let ring = field("map_type") == Some(BPF_MAP_TYPE_RINGBUF);
            maps.insert(id, (field("memlock").unwrap_or(0), ring));
        } else if field("link_id").is_some() {
            objects.attached = true;
        } else if let (Some(id), Some(run_cnt)) = (field("prog_id"), field("run_cnt")) {
            objects.programs.insert(
                id as u32,
                ProgStat {
                    run_cnt,
                    run_time_ns: field("run_time_ns").unwrap_or(0),
                    recursion_misses: field("recursion_misses").unwrap_or(0),
                },
            );
        }
    }
    // Tools attaching through perf_event_open + PERF_EVENT_IOC_SET_BPF hold
    // no link fd; a perf event fd next to loaded programs means attached.
    if !objects.attached && !objects.programs.is_empty() {
        objects.attached = fs::read_dir(format!("/proc/{pid}/fd"))?.any(|e| {
            e.ok()
                .and_then(|e| fs::read_link(e.path()).ok())
                .is_some_and(|t| t.to_string_lossy() == "anon_inode:[perf_event]")
        });
    }
    objects.map_bytes = maps.values().map(|(bytes, _)| bytes).sum();
    objects.ring_bytes = maps
        .values()
        .filter(|(_, ring)| *ring)
        .map(|(bytes, _)| bytes)
        .sum();
    Ok(objects)
}

/// Program names by id, from `bpftool prog show -j` (fdinfo has no names).
pub(super) fn program_names() -> Result<BTreeMap<u32, String>> {
    let out = Command::new("bpftool")
        .args(["prog", "show", "--json"])
        .output()
        .context("running bpftool prog show")?;
    ensure!(
        out.status.success(),
        "bpftool prog show failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let progs: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("parsing bpftool's JSON")?;
    Ok(progs
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| {
            Some((
                u32::try_from(p.get("id")?.as_u64()?).ok()?,
                p.get("name")?.as_str()?.to_owned(),
            ))
        })
        .collect())
}

/// Polls `f` every `every` until it returns `Some`, for at most `limit`.
pub(super) fn poll<T>(
    limit: Duration,
    every: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> Option<T> {
    let start = std::time::Instant::now();
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if start.elapsed() >= limit {
            return None;
        }
        std::thread::sleep(every);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netstat_values_by_name() {
        let text = "TcpExt: SyncookiesSent ListenOverflows ListenDrops\n\
                    TcpExt: 0 17 17\n\
                    IpExt: InNoRoutes\n\
                    IpExt: 3\n";
        assert_eq!(netstat_value(text, "TcpExt:", "ListenOverflows"), Some(17));
        assert_eq!(netstat_value(text, "IpExt:", "InNoRoutes"), Some(3));
        assert_eq!(netstat_value(text, "TcpExt:", "Missing"), None);
    }

    #[test]
    fn softirqs_summed_over_vectors_and_cpus() {
        let table = "        CPU0    CPU1\n\
                     HI:           0       2\n\
                     TIMER:   376352  301398\n\
                     NET_RX:      10       7\n";
        assert_eq!(
            kdiag_common::softirq::proc_softirqs_total(table),
            2 + 376352 + 301398 + 10 + 7
        );
    }
}
