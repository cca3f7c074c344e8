//! `compact`: compaction runs (one per zone) with their latency, status,
//! mode and, for direct compaction, the allocation's order, attributed to
//! the thread that ran them: the allocating task, kcompactd, or whoever
//! wrote /proc/sys/vm/compact_memory.

use aya::Ebpf;
use clap::Args;
use kdiag_common::{
    ClassId, EventKind,
    memory::{CompactConfig, FIELD_ABSENT, MigrateMode, StallEvent, StallFilter, StallKind},
};

use super::{
    MAX_STALLS_IN_FLIGHT, MEMCG_QUERIES, MemoryScope, ProcessStalls, StallStatsReader,
    decode_stall, order, stall_map_sizes,
};
use crate::{
    attribution::owner::comm_str,
    class::{BtfQueries, Class, ClassError, Context, Global, KernelTypes, MapSize, Tracepoint},
    classes::{StackArgs, StackThreshold},
    kernel::wire::trailing_stack,
    output::record::{Cgroup, Compact, CompactSummary, Degraded},
    services::{Hierarchy, Services},
};

/// Options of `compact`.
#[derive(Debug, Args)]
pub(crate) struct CompactArgs {
    /// Write `compact` records only for runs of at least N microseconds;
    /// shorter ones still appear in the summaries.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub min_latency_us: u64,
    #[command(flatten)]
    pub stack: StackArgs,
}

const TRACEPOINTS: &[Tracepoint] = &[
    Tracepoint {
        group: "compaction",
        name: "mm_compaction_begin",
        program: "compaction_begin",
        btf_program: None,
        btf_check: None,
        required: true,
    },
    Tracepoint {
        group: "compaction",
        name: "mm_compaction_end",
        program: "compaction_end",
        btf_program: None,
        btf_check: None,
        required: true,
    },
    // Only for the order of direct compaction; without it order is null.
    Tracepoint {
        group: "compaction",
        name: "mm_compaction_try_to_compact_pages",
        program: "try_to_compact_pages",
        btf_program: None,
        btf_check: None,
        required: false,
    },
];

/// enum compact_result's names as mm_compaction_end prints them on 6.x
/// (include/trace/events/compaction.h), for a format file without them.
const STATUS_NAMES: &[(i64, &str)] = &[
    (0, "not_suitable_zone"),
    (1, "skipped"),
    (2, "deferred"),
    (3, "no_suitable_page"),
    (4, "continue"),
    (5, "complete"),
    (6, "partial_skipped"),
    (7, "contended"),
    (8, "success"),
];

pub(crate) struct CompactClass {
    scope: MemoryScope,
    min_latency_ns: u64,
    /// Runs sent that are at least this long carry their kernel stack.
    stack_min_latency_ns: u64,
    cgroups: Hierarchy,
    stats: StallStatsReader,
    /// Status names from the running kernel's format file.
    status_names: Vec<(i64, String)>,
}

/// `task_struct.flags`, for PF_MEMALLOC (direct compaction) and the
/// synchronous modes.
const TASK_FLAGS: BtfQueries = BtfQueries {
    members: &[("task_struct", "flags")],
    enumerators: &[],
    enums: &[],
};

impl CompactClass {
    pub(crate) fn new(
        scope: MemoryScope,
        min_latency_us: u64,
        stack: StackThreshold,
        services: &mut Services,
    ) -> Self {
        Self {
            cgroups: services.cgroup_hierarchy(scope.mount()),
            scope,
            min_latency_ns: min_latency_us.saturating_mul(1000),
            stack_min_latency_ns: services.stack_threshold_ns(stack.micros()),
            stats: StallStatsReader::new(),
            status_names: Vec::new(),
        }
    }
}

/// The name of a compaction status: the kernel's, or the number.
pub(crate) fn status_name(names: &[(i64, String)], status: i32) -> String {
    let status = i64::from(status);
    names
        .iter()
        .map(|(v, n)| (*v, n.as_str()))
        .chain(STATUS_NAMES.iter().copied())
        .find(|(v, _)| *v == status)
        .map_or_else(|| status.to_string(), |(_, n)| n.to_owned())
}

pub(crate) fn mode_name(mode: u32) -> &'static str {
    match MigrateMode::from_u32(mode) {
        Some(MigrateMode::Async) => "async",
        Some(MigrateMode::SyncLight) => "sync_light",
        _ => "sync",
    }
}

/// The record of one compaction run.
pub(crate) fn compact_record(ev: &StallEvent, cgroup: Cgroup, status: String) -> Compact {
    Compact {
        pid: Some(ev.tgid),
        tid: ev.tid,
        comm: Some(comm_str(&ev.comm)),
        cgroup,
        latency_ns: ev.latency_ns,
        status,
        mode: mode_name(ev.mode),
        order: order(ev.order),
        stack: None,
    }
}

pub(crate) fn compact_summary(
    p: &ProcessStalls,
    cgroup: Cgroup,
    interval_ns: u64,
) -> CompactSummary {
    CompactSummary {
        pid: Some(p.tgid),
        comm: Some(p.comm.clone()),
        cgroup,
        latency: p.latencies.summary(),
        interval_ns,
    }
}

impl Class for CompactClass {
    fn name(&self) -> &'static str {
        "compact"
    }

    fn id(&self) -> ClassId {
        ClassId::Compact
    }

    fn tracepoints(&self) -> &'static [Tracepoint] {
        TRACEPOINTS
    }

    fn btf_queries(&self) -> &'static [BtfQueries] {
        &[MEMCG_QUERIES, TASK_FLAGS]
    }

    fn map_sizes(&self) -> Vec<MapSize> {
        let mut sizes = stall_map_sizes("COMPACT_STATS");
        // The order of each thread's latest direct compaction request: one
        // per thread about to stall.
        sizes.push(MapSize {
            map: "TRY_ORDER",
            entries: MAX_STALLS_IN_FLIGHT,
        });
        sizes
    }

    fn configure(
        &mut self,
        kernel: &KernelTypes,
        degraded: &mut Vec<Degraded>,
    ) -> Result<Vec<Global>, ClassError> {
        let formats = &kernel.formats;
        let at = |program: &str, field: &str| {
            formats
                .get(program)
                .and_then(|f| f.field(field))
                .map_or(FIELD_ABSENT, |f| f.offset)
        };
        if let Some(end) = formats.get("compaction_end") {
            self.status_names = end.symbols("status");
        }
        let task_flags = match kernel.btf.offset("task_struct", "flags") {
            Ok(offset) => offset,
            Err(why) => {
                degraded.push(Degraded {
                    what: "btf/task_struct.flags".to_owned(),
                    why: format!(
                        "direct compaction has no order and synchronous runs all show as \"sync\": {why}"
                    ),
                });
                0
            }
        };
        let cfg = CompactConfig {
            filter: StallFilter {
                stack_min_latency_ns: self.stack_min_latency_ns,
                ..self.scope.filter(
                    &[StallKind::Compact],
                    self.min_latency_ns,
                    &kernel.btf,
                    degraded,
                )?
            },
            end_status: at("compaction_end", "status"),
            end_sync: at("compaction_end", "sync"),
            try_order: at("try_to_compact_pages", "order"),
            task_flags,
            ..CompactConfig::DEFAULT
        };
        Ok(vec![Global::new("COMPACT_CONFIG", &cfg)])
    }

    fn on_loaded(&mut self, ebpf: &mut Ebpf) -> Result<(), ClassError> {
        self.stats.take(ebpf, "COMPACT_STATS")
    }

    fn housekeeping(&mut self) {
        self.stats.prune();
    }

    fn handles(&self, kind: EventKind) -> bool {
        kind == EventKind::Compact
    }

    fn on_event(&mut self, data: &[u8], cx: &mut Context<'_>) -> Result<u64, ClassError> {
        let ev = decode_stall(data, EventKind::Compact)?;
        let cgroup = cx.services.event_cgroup(self.cgroups, ev.cgroup_id)?;
        let status = status_name(&self.status_names, ev.status);
        let record = Compact {
            stack: cx.services.stack(trailing_stack::<StallEvent>(data)),
            ..compact_record(&ev, cgroup, status)
        };
        cx.out.write(ev.header.ts_ns, &record)?;
        Ok(1)
    }

    fn on_interval(
        &mut self,
        now_ns: u64,
        interval_ns: u64,
        cx: &mut Context<'_>,
    ) -> Result<(), ClassError> {
        self.stats
            .write_summaries(self.cgroups, now_ns, interval_ns, cx, compact_summary)
    }
}

#[cfg(test)]
mod tests {
    use kdiag_common::EventHeader;

    use super::*;

    #[test]
    fn status_from_format_then_table_then_number() {
        let names = vec![(8, "success_from_format".to_owned())];
        assert_eq!(status_name(&names, 8), "success_from_format");
        assert_eq!(status_name(&names, 5), "complete");
        assert_eq!(status_name(&[], 0), "not_suitable_zone");
        assert_eq!(status_name(&[], 42), "42");
    }

    #[test]
    fn record_fields() {
        let mut comm = [0; 16];
        comm[..2].copy_from_slice(b"sh");
        let ev = StallEvent {
            header: EventHeader {
                kind: EventKind::Compact as u32,
                cpu: 0,
                ts_ns: 1,
            },
            tgid: 42,
            tid: 42,
            kind: StallKind::Compact as u32,
            order: -1,
            cgroup_id: 0,
            latency_ns: 17_000_000,
            nr_reclaimed: 0,
            status: 5,
            mode: MigrateMode::Sync as u32,
            comm,
        };
        let r = compact_record(&ev, Cgroup::default(), status_name(&[], ev.status));
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            serde_json::json!({
                "pid": 42, "tid": 42, "comm": "sh", "cgroup": null, "container_id": null,
                "pod_uid": null, "latency_ns": 17_000_000,
                "status": "complete", "mode": "sync", "order": null
            })
        );
        assert_eq!(mode_name(0), "async");
        assert_eq!(mode_name(1), "sync_light");
    }
}
