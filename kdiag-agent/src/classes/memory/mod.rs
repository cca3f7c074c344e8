//! What the memory-stall classes (`reclaim`, `compact`) share: who to
//! trace and where their memory cgroup is, decoding stall events, and
//! turning the kernel's per-thread statistics into per-process summaries.

pub(crate) mod compact;
pub(crate) mod reclaim;

use std::{
    collections::{BTreeMap, HashMap},
    path::Path,
};

use aya::{
    Ebpf,
    maps::{HashMap as BpfHashMap, MapData},
};
use kdiag_common::{
    EventKind,
    memory::{
        CgroupSource, HIST, MAX_PIDS, MemcgOffsets, MigrateMode, NO_CGROUP_FILTER, StallEvent,
        StallFilter, StallKey, StallKind, StallStats,
    },
};

use crate::{
    attribution::cgroup::{CgroupTarget, MemoryHierarchy, resolve_in},
    attribution::owner::comm_str,
    class::{BtfQueries, ClassError, Context, MapSize},
    classes::hist::Latencies,
    kernel::btf,
    kernel::wire::{DecodeError, decode},
    output::metrics::Buckets,
    output::record::{Cgroup, Degraded, Record},
    services::Hierarchy,
};

/// Who the memory classes trace, and how the programs find a task's memory
/// cgroup: on a host with the v1 memory controller (hybrid), the v1 memory
/// cgroup, since that is the limit being hit; on a cgroup v2 host, the
/// unified cgroup.
#[derive(Debug)]
pub(crate) struct MemoryScope {
    hierarchy: MemoryHierarchy,
    pids: Vec<u32>,
    cgroup: Option<CgroupTarget>,
}

impl MemoryScope {
    /// `--pid`s and `--cgroup`; errors are usage errors.
    pub(crate) fn new(pids: &[u32], cgroup: Option<&Path>) -> Result<Self, ClassError> {
        Self::with_hierarchy(MemoryHierarchy::detect(), pids, cgroup)
    }

    fn with_hierarchy(
        hierarchy: MemoryHierarchy,
        pids: &[u32],
        cgroup: Option<&Path>,
    ) -> Result<Self, ClassError> {
        if pids.len() > MAX_PIDS {
            return Err(ClassError::Usage(format!(
                "--pid: at most {MAX_PIDS} processes for memory stalls, got {}",
                pids.len()
            )));
        }
        let cgroup = match cgroup {
            None => None,
            Some(arg) => {
                let Some(mount) = hierarchy.mount() else {
                    return Err(ClassError::Usage(
                        "--cgroup: no cgroup hierarchy is mounted".to_owned(),
                    ));
                };
                Some(resolve_in(mount, arg).map_err(|source| ClassError::Cgroup {
                    hierarchy: mount.to_path_buf(),
                    source,
                })?)
            }
        };
        Ok(Self {
            hierarchy,
            pids: pids.to_vec(),
            cgroup,
        })
    }

    /// The mount of the hierarchy the programs report cgroup ids of.
    pub(crate) fn mount(&self) -> Option<&Path> {
        self.hierarchy.mount()
    }

    /// The filter for the programs of `kinds`, dropping stalls shorter than
    /// `min_latency_ns` after counting them. On a v1 host the programs walk
    /// to the memory cgroup with offsets from `btf` (asked in
    /// [`MEMCG_QUERIES`]); without them a `--cgroup` cannot be honoured.
    pub(crate) fn filter(
        &self,
        kinds: &[StallKind],
        min_latency_ns: u64,
        btf: &btf::Answers,
        degraded: &mut Vec<Degraded>,
    ) -> Result<StallFilter, ClassError> {
        let offsets = match self.hierarchy {
            MemoryHierarchy::V1(_) => memcg_offsets(btf),
            _ => Ok(MemcgOffsets::default()),
        };
        if let (Some(_), Err(why)) = (&self.cgroup, &offsets) {
            return Err(ClassError::Usage(format!(
                "--cgroup: cannot find v1 memory cgroups in the kernel: {why}"
            )));
        }
        if self.cgroup.is_some()
            && matches!(self.hierarchy, MemoryHierarchy::Unified(_))
            && !tracepoints_have_ancestor_cgroup_helper()
        {
            return Err(ClassError::Usage(
                "--cgroup: this kernel does not let tracepoint programs call \
                 bpf_get_current_ancestor_cgroup_id, which the memory classes test the cgroup \
                 with (5.10 does not; 6.1 does)"
                    .to_owned(),
            ));
        }
        let mut f = StallFilter::DEFAULT;
        f.kinds = kinds.iter().fold(0, |bits, k| bits | k.bit());
        f.min_latency_ns = min_latency_ns;
        f.npids = self.pids.len() as u32;
        f.pids[..self.pids.len()].copy_from_slice(&self.pids);
        f.cgroup_source = match (&self.hierarchy, offsets) {
            (MemoryHierarchy::V1(_), Ok(offsets)) => {
                f.memcg = offsets;
                CgroupSource::V1Memory
            }
            (MemoryHierarchy::V1(_), Err(why)) => {
                degraded.push(Degraded {
                    what: "btf/memory cgroup".to_owned(),
                    why: format!("memory records have no cgroup: {why}"),
                });
                CgroupSource::None
            }
            (MemoryHierarchy::Unified(_), _) => CgroupSource::Unified,
            (MemoryHierarchy::None, _) => CgroupSource::None,
        } as u32;
        if let Some(target) = &self.cgroup {
            f.cgroup_id = target.id;
            f.cgroup_level = target.level;
        } else {
            f.cgroup_level = NO_CGROUP_FILTER;
        }
        Ok(f)
    }
}

/// Whether tracepoint programs may call bpf_get_current_ancestor_cgroup_id,
/// from a probe load of a program that calls it. A probe that cannot tell
/// (no privileges) says yes, and loading the programs then decides.
fn tracepoints_have_ancestor_cgroup_helper() -> bool {
    aya::sys::is_helper_supported(
        aya::programs::ProgramType::TracePoint,
        aya::sys::BpfHelper::BPF_FUNC_get_current_ancestor_cgroup_id,
    )
    .unwrap_or(true)
}

/// Threads in a stall at once, whose begin the programs keep until its end.
pub(crate) const MAX_STALLS_IN_FLIGHT: u32 = 10240;
/// Threads with stall statistics at once (per memory class); entries of
/// exited threads are deleted every interval.
pub(crate) const MAX_STALLING_THREADS: u32 = 16384;

/// The maps of a memory class's programs: stalls in flight (shared by the
/// memory classes) and its per-thread statistics, `stats_map`.
pub(crate) fn stall_map_sizes(stats_map: &'static str) -> Vec<MapSize> {
    vec![
        MapSize {
            map: "STALL_STARTS",
            entries: MAX_STALLS_IN_FLIGHT,
        },
        MapSize {
            map: stats_map,
            entries: MAX_STALLING_THREADS,
        },
    ]
}

/// What the v1 memory cgroup walk needs from the kernel's BTF.
pub(crate) const MEMCG_QUERIES: BtfQueries = BtfQueries {
    members: &[
        ("task_struct", "cgroups"),
        ("css_set", "subsys"),
        ("cgroup_subsys_state", "cgroup"),
        ("cgroup", "kn"),
        ("cgroup", "level"),
        ("cgroup", "ancestors"),
        ("kernfs_node", "id"),
    ],
    enumerators: &[("cgroup_subsys_id", "memory_cgrp_id")],
    enums: &[],
};

/// Offsets for `task->cgroups->subsys[memory_cgrp_id]->cgroup->kn->id` and
/// `cgroup->level`, `cgroup->ancestors[]`, from the kernel's BTF.
fn memcg_offsets(btf: &btf::Answers) -> Result<MemcgOffsets, btf::Unanswered> {
    let subsys = btf.offset("css_set", "subsys")?;
    let memory_id = btf.value("cgroup_subsys_id", "memory_cgrp_id")?;
    Ok(MemcgOffsets {
        task_cgroups: btf.offset("task_struct", "cgroups")?,
        css_set_memory: pointer_in(subsys, memory_id).ok_or(btf::Unanswered::NotFound(
            "enum",
            "cgroup_subsys_id",
            "memory_cgrp_id within css_set.subsys",
        ))?,
        css_cgroup: btf.offset("cgroup_subsys_state", "cgroup")?,
        cgroup_kn: btf.offset("cgroup", "kn")?,
        cgroup_level: btf.offset("cgroup", "level")?,
        cgroup_ancestors: btf.offset("cgroup", "ancestors")?,
        kn_id: btf.offset("kernfs_node", "id")?,
        _pad: 0,
    })
}

/// The offset of pointer `index` of the pointer array at `array`.
fn pointer_in(array: u32, index: i64) -> Option<u32> {
    u32::try_from(index)
        .ok()?
        .checked_mul(8)?
        .checked_add(array)
}

/// Decodes one stall event of `expected` kind, checking its fields.
pub(crate) fn decode_stall(data: &[u8], expected: EventKind) -> Result<StallEvent, DecodeError> {
    let ev: StallEvent = decode(data, expected)?;
    if StallKind::from_u32(ev.kind).is_none() {
        return Err(DecodeError::BadField {
            field: "kind",
            value: u64::from(ev.kind),
        });
    }
    if MigrateMode::from_u32(ev.mode).is_none() {
        return Err(DecodeError::BadField {
            field: "mode",
            value: u64::from(ev.mode),
        });
    }
    Ok(ev)
}

/// An order from the programs, null when they had none.
pub(crate) fn order(raw: i32) -> Option<i32> {
    (raw >= 0).then_some(raw)
}

/// One process's stalls of one kind over an interval.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ProcessStalls {
    pub kind: StallKind,
    pub tgid: u32,
    pub comm: String,
    pub cgroup_id: u64,
    pub latencies: Latencies,
    pub nr_reclaimed: u64,
}

/// What one thread added since the previous reading, or `None` if nothing.
/// The kernel's counters only grow; a count that went down means the entry
/// was deleted (its thread exited) and its tid reused, so it starts over.
///
/// The maximum is exact when the thread's all-time maximum rose in the
/// interval (the new maximum is then also the interval's); otherwise it is
/// the top of the interval's highest histogram bucket, capped at the
/// all-time maximum, so at most 12.5% above the true value.
pub(crate) fn thread_delta(
    prev: Option<&StallStats>,
    cur: &StallStats,
) -> Option<(Latencies, u64)> {
    let prev = prev.filter(|p| p.count <= cur.count);
    let zero = StallStats::ZERO;
    let prev = prev.unwrap_or(&zero);
    let count = cur.count - prev.count;
    if count == 0 {
        return None;
    }
    let mut lat = Latencies {
        count,
        total_ns: cur.total_ns.saturating_sub(prev.total_ns),
        ..Latencies::default()
    };
    for ((d, c), p) in lat
        .hist
        .iter_mut()
        .zip(cur.hist.iter())
        .zip(prev.hist.iter())
    {
        *d = u64::from(c.saturating_sub(*p));
    }
    lat.max_ns = if cur.max_ns > prev.max_ns {
        cur.max_ns
    } else {
        lat.hist_max().min(cur.max_ns)
    };
    Some((lat, cur.nr_reclaimed.saturating_sub(prev.nr_reclaimed)))
}

/// Threads' deltas summed per (kind, process). Comm and cgroup come from
/// the main thread when it stalled, else from the lowest tid.
pub(crate) fn per_process<'a>(
    deltas: impl IntoIterator<Item = (&'a StallKey, &'a StallStats, Latencies, u64)>,
) -> Vec<ProcessStalls> {
    let mut out: BTreeMap<(u32, u32), (u32, ProcessStalls)> = BTreeMap::new();
    for (key, cur, lat, nr) in deltas {
        let Some(kind) = StallKind::from_u32(key.kind) else {
            continue;
        };
        let entry = out.entry((key.kind, cur.tgid)).or_insert_with(|| {
            (
                key.tid,
                ProcessStalls {
                    kind,
                    tgid: cur.tgid,
                    comm: comm_str(&cur.comm),
                    cgroup_id: cur.cgroup_id,
                    latencies: Latencies::default(),
                    nr_reclaimed: 0,
                },
            )
        });
        let (owner_tid, p) = entry;
        let better = key.tid == cur.tgid || (*owner_tid != p.tgid && key.tid < *owner_tid);
        if better {
            *owner_tid = key.tid;
            p.comm = comm_str(&cur.comm);
            p.cgroup_id = cur.cgroup_id;
        }
        p.latencies.merge(&lat);
        p.nr_reclaimed += nr;
    }
    out.into_values().map(|(_, p)| p).collect()
}

/// The `kind` label of a stall in `kdiag_memory_stall_seconds`.
fn metric_kind(kind: StallKind) -> &'static str {
    match kind {
        StallKind::Direct => "direct",
        StallKind::Memcg => "memcg",
        StallKind::Compact => "compaction",
    }
}

/// Whether the thread of a statistics entry still runs.
fn thread_alive(key: &StallKey, stats: &StallStats) -> bool {
    Path::new(&format!("/proc/{}/task/{}", stats.tgid, key.tid)).exists()
}

/// Reads a class's per-thread statistics map every interval.
pub(crate) struct StallStatsReader {
    map: Option<BpfHashMap<MapData, StallKey, StallStats>>,
    prev: HashMap<StallKey, StallStats>,
    /// What threads that exited since the last `collect` stalled, taken
    /// out of the map by `prune`.
    exited: Vec<(StallKey, StallStats, Latencies, u64)>,
}

impl StallStatsReader {
    pub(crate) fn new() -> Self {
        Self {
            map: None,
            prev: HashMap::new(),
            exited: Vec::new(),
        }
    }

    /// Deletes the entries of threads that have exited, keeping what they
    /// stalled since the last `collect` for the next one. The map is not
    /// LRU (an evicted entry would lose counts), so without this a long run
    /// with `--interval 0` (summaries at exit only) would fill it with dead
    /// threads and count the stalls of new ones as dropped.
    pub(crate) fn prune(&mut self) {
        let Some(map) = &mut self.map else {
            return;
        };
        let current: Vec<(StallKey, StallStats)> = map.iter().filter_map(Result::ok).collect();
        for (key, cur) in current {
            if thread_alive(&key, &cur) {
                continue;
            }
            if let Some((lat, nr)) = thread_delta(self.prev.get(&key), &cur) {
                self.exited.push((key, cur, lat, nr));
            }
            self.prev.remove(&key);
            let _ = map.remove(&key);
        }
    }

    /// Takes the map `name` from the loaded programs.
    pub(crate) fn take(&mut self, ebpf: &mut Ebpf, name: &'static str) -> Result<(), ClassError> {
        let map = ebpf.take_map(name).ok_or(ClassError::MissingMap(name))?;
        self.map =
            Some(BpfHashMap::try_from(map).map_err(|source| ClassError::Map { name, source })?);
        Ok(())
    }

    /// Writes each process's summary of the interval, as `summary` makes it
    /// from its stalls, its cgroup's path in `hierarchy` and the interval,
    /// then the host's `vmstat` record beside them.
    pub(crate) fn write_summaries<R: Record>(
        &mut self,
        hierarchy: Hierarchy,
        now_ns: u64,
        interval_ns: u64,
        cx: &mut Context<'_>,
        summary: impl Fn(&ProcessStalls, Cgroup, u64) -> R,
    ) -> Result<(), ClassError> {
        let mut written = Vec::new();
        for p in self.collect() {
            let cgroup = cx.services.cgroup(hierarchy, p.cgroup_id);
            cx.out
                .write(now_ns, &summary(&p, cgroup.clone(), interval_ns))?;
            written.push((p, cgroup));
        }
        // The heaviest first: once the per-cgroup breakdown has all the
        // cgroups it may name, the stalls of new ones go to `other`.
        written.sort_by_key(|(p, _)| std::cmp::Reverse(p.latencies.total_ns));
        for (p, cgroup) in &written {
            let l = &p.latencies;
            cx.services.metrics().memory_stalls(
                metric_kind(p.kind),
                cgroup.path(),
                Buckets {
                    scale: &HIST,
                    buckets: &l.hist,
                    count: l.count,
                    total_ns: Some(l.total_ns),
                },
            );
        }
        cx.services.write_vmstat(now_ns, interval_ns, cx.out)?;
        Ok(())
    }

    /// Per-process stalls since the previous call. Entries of threads that
    /// have exited are deleted once read, so the map holds live threads
    /// only. (Should the tid be reused between the check and the delete, a
    /// stall of the new thread in that window is lost; tids are reused only
    /// after the pid space wraps.)
    pub(crate) fn collect(&mut self) -> Vec<ProcessStalls> {
        let Some(map) = &mut self.map else {
            return Vec::new();
        };
        let current: Vec<(StallKey, StallStats)> = map.iter().filter_map(Result::ok).collect();
        let live = current.iter().filter_map(|(key, cur)| {
            let (lat, nr) = thread_delta(self.prev.get(key), cur)?;
            Some((key, cur, lat, nr))
        });
        let exited = self
            .exited
            .iter()
            .map(|(key, cur, lat, nr)| (key, cur, lat.clone(), *nr));
        let summaries = per_process(live.chain(exited));
        self.exited.clear();
        self.prev.clear();
        for (key, cur) in current {
            if thread_alive(&key, &cur) {
                self.prev.insert(key, cur);
            } else {
                let _ = map.remove(&key);
            }
        }
        summaries
    }
}

#[cfg(test)]
mod tests {
    use kdiag_common::EventHeader;

    use super::*;

    #[test]
    fn memory_css_pointer_offset() {
        assert_eq!(pointer_in(0, 4), Some(32));
        assert_eq!(pointer_in(16, 1), Some(24));
        assert_eq!(pointer_in(0, -1), None);
        assert_eq!(pointer_in(u32::MAX - 8, 2), None);
    }

    fn stats(tgid: u32, comm: &str, latencies: &[u64]) -> StallStats {
        let mut s = StallStats {
            tgid,
            ..StallStats::ZERO
        };
        s.comm[..comm.len()].copy_from_slice(comm.as_bytes());
        add(&mut s, latencies);
        s
    }

    fn add(s: &mut StallStats, latencies: &[u64]) {
        for &l in latencies {
            s.count += 1;
            s.total_ns += l;
            s.max_ns = s.max_ns.max(l);
            s.nr_reclaimed += 32;
            s.hist[HIST.bucket(l)] += 1;
        }
    }

    #[test]
    fn deltas_of_cumulative_counters() {
        let first = stats(10, "dd", &[100_000, 300_000]);
        let (lat, nr) = thread_delta(None, &first).unwrap();
        assert_eq!(
            (lat.count, lat.total_ns, lat.max_ns, nr),
            (2, 400_000, 300_000, 64)
        );
        // Nothing new: no delta.
        assert!(thread_delta(Some(&first), &first).is_none());
        // A new, smaller stall: the maximum comes from its bucket, capped by
        // the all-time maximum, and within 12.5%.
        let mut second = first;
        add(&mut second, &[50_000]);
        let (lat, nr) = thread_delta(Some(&first), &second).unwrap();
        assert_eq!((lat.count, lat.total_ns, nr), (1, 50_000, 32));
        assert!(
            lat.max_ns >= 50_000 && lat.max_ns <= 56_250,
            "{}",
            lat.max_ns
        );
        assert_eq!(lat.summary().max_ns, 50_000, "capped at the total");
        // A new all-time maximum is exact.
        let mut third = second;
        add(&mut third, &[900_000, 10_000]);
        let (lat, _) = thread_delta(Some(&second), &third).unwrap();
        assert_eq!((lat.count, lat.max_ns), (2, 900_000));
    }

    #[test]
    fn reused_tid_starts_over() {
        let old = stats(10, "dd", &[1_000_000, 1_000_000, 1_000_000]);
        let new = stats(99, "cat", &[20_000]);
        let (lat, _) = thread_delta(Some(&old), &new).unwrap();
        assert_eq!((lat.count, lat.total_ns, lat.max_ns), (1, 20_000, 20_000));
    }

    #[test]
    fn threads_merge_into_processes_per_kind() {
        let key = |tid, kind: StallKind| StallKey {
            tid,
            kind: kind as u32,
        };
        let (k1, k2, k3, k4) = (
            key(11, StallKind::Memcg),
            key(10, StallKind::Memcg),
            key(10, StallKind::Direct),
            key(20, StallKind::Memcg),
        );
        let worker = stats(10, "worker", &[100_000]);
        let mut main = stats(10, "dd", &[200_000, 400_000]);
        main.cgroup_id = 7;
        let direct = stats(10, "dd", &[1_000_000]);
        let other = stats(20, "cat", &[5_000]);
        let rows: Vec<_> = [(&k1, &worker), (&k2, &main), (&k3, &direct), (&k4, &other)]
            .into_iter()
            .map(|(k, s)| {
                let (lat, nr) = thread_delta(None, s).unwrap();
                (k, s, lat, nr)
            })
            .collect();
        let out = per_process(rows);
        assert_eq!(out.len(), 3);
        let (direct, memcg, cat) = (&out[0], &out[1], &out[2]);
        assert_eq!(
            (direct.kind, direct.tgid, direct.latencies.count),
            (StallKind::Direct, 10, 1)
        );
        assert_eq!((memcg.kind, memcg.tgid), (StallKind::Memcg, 10));
        assert_eq!(memcg.comm, "dd", "the main thread names the process");
        assert_eq!(memcg.cgroup_id, 7);
        let s = memcg.latencies.summary();
        assert_eq!((s.count, s.total_ns, s.max_ns), (3, 700_000, 400_000));
        assert_eq!(memcg.nr_reclaimed, 96);
        assert!(s.p50_ns <= s.p99_ns && s.p99_ns <= s.max_ns && s.max_ns <= s.total_ns);
        assert_eq!((cat.tgid, cat.comm.as_str()), (20, "cat"));
    }

    fn event_bytes(ev: &StallEvent) -> Vec<u8> {
        crate::sys::pod::bytes_of(ev).to_vec()
    }

    #[test]
    fn decodes_and_rejects_stall_events() {
        let ev = StallEvent {
            header: EventHeader {
                kind: EventKind::Reclaim as u32,
                cpu: 0,
                ts_ns: 1,
            },
            tgid: 5,
            tid: 6,
            kind: StallKind::Memcg as u32,
            order: -1,
            cgroup_id: 9,
            latency_ns: 1000,
            nr_reclaimed: 32,
            status: 0,
            mode: 0,
            comm: [0; 16],
        };
        assert_eq!(decode_stall(&event_bytes(&ev), EventKind::Reclaim), Ok(ev));
        assert!(matches!(
            decode_stall(&event_bytes(&ev), EventKind::Compact),
            Err(DecodeError::WrongKind { .. })
        ));
        let b = event_bytes(&ev);
        assert!(matches!(
            decode_stall(&b[..b.len() - 1], EventKind::Reclaim),
            Err(DecodeError::Short { .. })
        ));
        let mut bad = ev;
        bad.kind = 3;
        assert!(decode_stall(&event_bytes(&bad), EventKind::Reclaim).is_err());
        let mut bad = ev;
        bad.mode = 3;
        assert!(decode_stall(&event_bytes(&bad), EventKind::Reclaim).is_err());
        assert_eq!((order(-1), order(0), order(9)), (None, Some(0), Some(9)));
    }

    #[test]
    fn scope_limits_and_filter() {
        let too_many: Vec<u32> = (1..=9).collect();
        assert!(MemoryScope::with_hierarchy(MemoryHierarchy::None, &too_many, None).is_err());
        assert!(
            MemoryScope::with_hierarchy(MemoryHierarchy::None, &[], Some(Path::new("/a"))).is_err()
        );
        let scope =
            MemoryScope::with_hierarchy(MemoryHierarchy::Unified("/".into()), &[4, 5], None)
                .unwrap();
        let mut degraded = Vec::new();
        let btf = btf::Answers::default();
        let f = scope
            .filter(
                &[StallKind::Direct, StallKind::Memcg],
                7,
                &btf,
                &mut degraded,
            )
            .unwrap();
        assert_eq!(f.kinds, 0b11);
        assert_eq!((f.npids, f.pids[0], f.pids[1]), (2, 4, 5));
        assert_eq!(f.min_latency_ns, 7);
        assert_eq!(f.cgroup_source, CgroupSource::Unified as u32);
        assert_eq!(f.cgroup_level, NO_CGROUP_FILTER);
        assert!(degraded.is_empty());
    }
}
