//! `reclaim`: threads stalled in direct reclaim (the zone was under its
//! watermark) or memcg reclaim (their memory cgroup was at its limit), with
//! per-process summaries and the host's vmstat and PSI beside them.

use aya::Ebpf;
use clap::Args;
use kdiag_common::{
    ClassId, EventKind,
    memory::{FIELD_ABSENT, ReclaimConfig, StallEvent, StallFilter, StallKind},
};

use super::{
    MEMCG_QUERIES, MemoryScope, ProcessStalls, StallStatsReader, decode_stall, order,
    stall_map_sizes,
};
use crate::{
    attribution::owner::comm_str,
    class::{BtfQueries, Class, ClassError, Context, Global, KernelTypes, MapSize, Tracepoint},
    classes::{StackArgs, StackThreshold},
    kernel::wire::trailing_stack,
    output::record::{Cgroup, Degraded, Reclaim, ReclaimSummary},
    services::{Hierarchy, Services},
};

/// Options of `reclaim`.
#[derive(Debug, Args)]
pub(crate) struct ReclaimArgs {
    /// Which reclaim to trace.
    #[arg(long, value_enum, default_value = "all")]
    pub kind: ReclaimKind,
    /// Write `reclaim` records only for stalls of at least N microseconds;
    /// shorter ones are counted in the kernel and still appear in the
    /// summaries.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub min_latency_us: u64,
    #[command(flatten)]
    pub stack: StackArgs,
}

/// Which reclaim `--kind` traces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum ReclaimKind {
    /// Global direct reclaim.
    Direct,
    /// Reclaim against a memory cgroup's limit.
    Memcg,
    /// Both.
    All,
}

const fn tp(name: &'static str, program: &'static str) -> Tracepoint {
    Tracepoint {
        group: "vmscan",
        name,
        program,
        btf_program: None,
        btf_check: None,
        required: true,
    }
}

const DIRECT: [Tracepoint; 2] = [
    tp("mm_vmscan_direct_reclaim_begin", "direct_reclaim_begin"),
    tp("mm_vmscan_direct_reclaim_end", "direct_reclaim_end"),
];
const MEMCG: [Tracepoint; 2] = [
    tp("mm_vmscan_memcg_reclaim_begin", "memcg_reclaim_begin"),
    tp("mm_vmscan_memcg_reclaim_end", "memcg_reclaim_end"),
];
const ALL: [Tracepoint; 4] = [DIRECT[0], DIRECT[1], MEMCG[0], MEMCG[1]];

pub(crate) struct ReclaimClass {
    scope: MemoryScope,
    kind: ReclaimKind,
    min_latency_ns: u64,
    /// Stalls sent that are at least this long carry their kernel stack.
    stack_min_latency_ns: u64,
    cgroups: Hierarchy,
    stats: StallStatsReader,
}

impl ReclaimClass {
    pub(crate) fn new(
        scope: MemoryScope,
        kind: ReclaimKind,
        min_latency_us: u64,
        stack: StackThreshold,
        services: &mut Services,
    ) -> Self {
        Self {
            cgroups: services.cgroup_hierarchy(scope.mount()),
            scope,
            kind,
            min_latency_ns: min_latency_us.saturating_mul(1000),
            stack_min_latency_ns: services.stack_threshold_ns(stack.micros()),
            stats: StallStatsReader::new(),
        }
    }

    fn kinds(&self) -> &'static [StallKind] {
        match self.kind {
            ReclaimKind::Direct => &[StallKind::Direct],
            ReclaimKind::Memcg => &[StallKind::Memcg],
            ReclaimKind::All => &[StallKind::Direct, StallKind::Memcg],
        }
    }
}

fn kind_name(kind: StallKind) -> &'static str {
    match kind {
        StallKind::Memcg => "memcg",
        _ => "direct",
    }
}

/// The record of one reclaim stall; `cgroup` is its memory cgroup's path.
pub(crate) fn reclaim_record(ev: &StallEvent, cgroup: Cgroup) -> Reclaim {
    let kind = StallKind::from_u32(ev.kind).unwrap_or(StallKind::Direct);
    Reclaim {
        kind: kind_name(kind),
        pid: Some(ev.tgid),
        tid: ev.tid,
        comm: Some(comm_str(&ev.comm)),
        cgroup,
        latency_ns: ev.latency_ns,
        nr_reclaimed: ev.nr_reclaimed,
        // The allocation order is direct reclaim's; memcg reclaim has none.
        order: if kind == StallKind::Direct {
            order(ev.order)
        } else {
            None
        },
        stack: None,
    }
}

/// The summary of one process's reclaim stalls over `interval_ns`.
pub(crate) fn reclaim_summary(
    p: &ProcessStalls,
    cgroup: Cgroup,
    interval_ns: u64,
) -> ReclaimSummary {
    ReclaimSummary {
        kind: kind_name(p.kind),
        pid: Some(p.tgid),
        comm: Some(p.comm.clone()),
        cgroup,
        latency: p.latencies.summary(),
        nr_reclaimed: p.nr_reclaimed,
        interval_ns,
    }
}

impl Class for ReclaimClass {
    fn name(&self) -> &'static str {
        "reclaim"
    }

    fn id(&self) -> ClassId {
        ClassId::Reclaim
    }

    fn tracepoints(&self) -> &'static [Tracepoint] {
        match self.kind {
            ReclaimKind::Direct => &DIRECT,
            ReclaimKind::Memcg => &MEMCG,
            ReclaimKind::All => &ALL,
        }
    }

    fn btf_queries(&self) -> &'static [BtfQueries] {
        &[MEMCG_QUERIES]
    }

    fn map_sizes(&self) -> Vec<MapSize> {
        stall_map_sizes("RECLAIM_STATS")
    }

    fn configure(
        &mut self,
        kernel: &KernelTypes,
        degraded: &mut Vec<Degraded>,
    ) -> Result<Vec<Global>, ClassError> {
        let at = |program: &str, field: &str| {
            kernel
                .formats
                .get(program)
                .and_then(|f| f.field(field))
                .map_or(FIELD_ABSENT, |f| f.offset)
        };
        let cfg = ReclaimConfig {
            filter: StallFilter {
                stack_min_latency_ns: self.stack_min_latency_ns,
                ..self
                    .scope
                    .filter(self.kinds(), self.min_latency_ns, &kernel.btf, degraded)?
            },
            direct_order: at("direct_reclaim_begin", "order"),
            direct_nr_reclaimed: at("direct_reclaim_end", "nr_reclaimed"),
            memcg_nr_reclaimed: at("memcg_reclaim_end", "nr_reclaimed"),
            ..ReclaimConfig::DEFAULT
        };
        Ok(vec![Global::new("RECLAIM_CONFIG", &cfg)])
    }

    fn on_loaded(&mut self, ebpf: &mut Ebpf) -> Result<(), ClassError> {
        self.stats.take(ebpf, "RECLAIM_STATS")
    }

    fn housekeeping(&mut self) {
        self.stats.prune();
    }

    fn handles(&self, kind: EventKind) -> bool {
        kind == EventKind::Reclaim
    }

    fn on_event(&mut self, data: &[u8], cx: &mut Context<'_>) -> Result<u64, ClassError> {
        let ev = decode_stall(data, EventKind::Reclaim)?;
        let cgroup = cx.services.event_cgroup(self.cgroups, ev.cgroup_id)?;
        let record = Reclaim {
            stack: cx.services.stack(trailing_stack::<StallEvent>(data)),
            ..reclaim_record(&ev, cgroup)
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
            .write_summaries(self.cgroups, now_ns, interval_ns, cx, reclaim_summary)
    }
}

#[cfg(test)]
mod tests {
    use kdiag_common::EventHeader;

    use super::*;
    use crate::classes::hist::Latencies;

    fn event(kind: StallKind) -> StallEvent {
        let mut comm = [0; 16];
        comm[..2].copy_from_slice(b"dd");
        StallEvent {
            header: EventHeader {
                kind: EventKind::Reclaim as u32,
                cpu: 0,
                ts_ns: 1,
            },
            tgid: 100,
            tid: 101,
            kind: kind as u32,
            order: 3,
            cgroup_id: 5,
            latency_ns: 250_000,
            nr_reclaimed: 32,
            status: 0,
            mode: 0,
            comm,
        }
    }

    #[test]
    fn records_have_the_contract_fields() {
        let r = reclaim_record(
            &event(StallKind::Direct),
            Cgroup(Some(crate::attribution::cgroup::cgroup_name("/kdt"))),
        );
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            serde_json::json!({
                "kind": "direct", "pid": 100, "tid": 101, "comm": "dd", "cgroup": "/kdt",
                "container_id": null, "pod_uid": null,
                "latency_ns": 250_000, "nr_reclaimed": 32, "order": 3
            })
        );
        let r = reclaim_record(&event(StallKind::Memcg), Cgroup::default());
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["kind"], "memcg");
        assert!(v["order"].is_null() && v["cgroup"].is_null());
    }

    #[test]
    fn stack_absent_null_or_listed() {
        let base = reclaim_record(&event(StallKind::Memcg), Cgroup::default());
        let frames = vec!["try_to_free_mem_cgroup_pages+0x21d".to_owned()];
        let cases = [
            (None, None, ""),
            (Some(None), Some(serde_json::Value::Null), " at -"),
            (
                Some(Some(frames.clone())),
                Some(serde_json::json!(frames)),
                " at try_to_free_mem_cgroup_pages+0x21d",
            ),
        ];
        for (stack, json, text_end) in cases {
            let r = Reclaim {
                stack,
                ..base.clone()
            };
            assert_eq!(
                serde_json::to_value(&r).unwrap().get("stack"),
                json.as_ref()
            );
            let row = crate::output::record::Record::text_row(&r, "T");
            // ORDER (null: `-`), then the innermost frame.
            assert!(row.ends_with(&format!("-{text_end}")), "{row:?}");
        }
    }

    #[test]
    fn summary_fields() {
        let mut latencies = Latencies::default();
        latencies.merge(&Latencies {
            count: 2,
            total_ns: 300,
            max_ns: 200,
            ..Latencies::default()
        });
        let p = ProcessStalls {
            kind: StallKind::Memcg,
            tgid: 7,
            comm: "dd".into(),
            cgroup_id: 1,
            latencies,
            nr_reclaimed: 64,
        };
        let v = serde_json::to_value(reclaim_summary(
            &p,
            Cgroup(Some(crate::attribution::cgroup::cgroup_name("/a"))),
            10,
        ))
        .unwrap();
        let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "cgroup",
                "comm",
                "container_id",
                "count",
                "interval_ns",
                "kind",
                "max_ns",
                "nr_reclaimed",
                "p50_ns",
                "p99_ns",
                "pid",
                "pod_uid",
                "total_ns"
            ]
        );
        assert_eq!(
            (v["count"].as_u64(), v["nr_reclaimed"].as_u64()),
            (Some(2), Some(64))
        );
    }
}
