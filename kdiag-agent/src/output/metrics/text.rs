//! The Prometheus text exposition format (version 0.0.4), which Prometheus
//! and every OpenMetrics scraper read: `# HELP` and `# TYPE` lines, then
//! one sample per line; histograms as cumulative `_bucket{le=...}` series,
//! `_sum` and `_count`.

use std::fmt::Write as _;

use super::{Family, Histogram, Registry};

/// The content type of what [`render`] writes.
pub(crate) const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

pub(super) fn render(r: &Registry) -> String {
    let mut out = String::with_capacity(64 * 1024);
    let w = &mut out;
    counter(
        w,
        "kdiag_tcp_retransmits_total",
        "TCP retransmits: the `retrans` records, by the socket's state and the kind of segment.",
        &r.retransmits,
    );
    counter(
        w,
        "kdiag_tcp_pod_retransmits_total",
        "TCP retransmits by the Kubernetes pod of the socket's owner (uid as in kube_pod_info; \
         \"none\" outside pods).",
        &r.pod_retransmits,
    );
    counter(
        w,
        "kdiag_packet_drops_total",
        "TCP and UDP packets the kernel dropped: the `drop_summary` records summed, by the \
         kernel's drop reason (\"none\" on kernels without reasons) and protocol.",
        &r.packet_drops,
    );
    counter(
        w,
        "kdiag_tcp_connections_closed_total",
        "TCP connections closed: the `tcp_conn` records, by role (active, passive, unknown).",
        &r.closed,
    );
    histogram(
        w,
        "kdiag_tcp_handshake_seconds",
        "Handshake time of the closed connections whose `tcp_conn` record has a handshake_ns.",
        &r.handshake,
    );
    histogram(
        w,
        "kdiag_tcp_connection_duration_seconds",
        "Lifetime of the closed connections whose `tcp_conn` record has a duration_ns.",
        &r.duration,
    );
    histogram(
        w,
        "kdiag_memory_stall_seconds",
        "Memory stalls (direct and memcg reclaim, compaction): the `reclaim_summary` and \
         `compact_summary` records summed.",
        &r.stalls,
    );
    histogram(
        w,
        "kdiag_memory_stall_cgroup_seconds",
        "kdiag_memory_stall_seconds by the stalling process's cgroup, for the first \
         --metrics-cgroups cgroups to stall; the others under cgroup=\"other\".",
        &r.stalls_by_cgroup,
    );
    histogram(
        w,
        "kdiag_softirq_service_seconds",
        "Softirq handler run time (entry to exit), by vector: the `softirq_summary` records summed.",
        &r.softirq_service,
    );
    histogram(
        w,
        "kdiag_softirq_delay_seconds",
        "Softirq queueing delay (raise to entry), by vector; no _sum: the kernel keeps no total.",
        &r.softirq_delay,
    );
    let a = &r.agent;
    scalar(
        w,
        "kdiag_agent_intervals_total",
        "counter",
        "`agent_stats` records written: these metrics hold every record up to the last one.",
        a.intervals,
    );
    counter(
        w,
        "kdiag_agent_events_total",
        "Records written per class (`agent_stats` events, summed).",
        &a.events,
    );
    counter(
        w,
        "kdiag_agent_dropped_total",
        "Events the kernel programs could not send for a full buffer, per class.",
        &a.dropped,
    );
    counter(
        w,
        "kdiag_agent_lost_total",
        "Perf samples the kernel reported lost, per class.",
        &a.lost,
    );
    counter(
        w,
        "kdiag_agent_program_runs_total",
        "Runs of each kernel program, as the programs count them.",
        &a.program_runs,
    );
    seconds_counter(
        w,
        "kdiag_agent_program_run_seconds_total",
        "Kernel time spent in each program; divided by kdiag_agent_program_runs_total, \
         the cost of one run.",
        &a.program_run_ns,
    );
    scalar(
        w,
        "kdiag_agent_decode_errors_total",
        "counter",
        "Events that did not decode.",
        a.decode_errors,
    );
    header(
        w,
        "kdiag_agent_cpu_seconds_total",
        "counter",
        "CPU time of the agent (user and system).",
    );
    let _ = writeln!(w, "kdiag_agent_cpu_seconds_total {}", seconds(a.cpu_ns));
    scalar(
        w,
        "kdiag_agent_resident_memory_bytes",
        "gauge",
        "Resident memory of the agent at the last interval's end.",
        a.rss_bytes,
    );
    scalar(
        w,
        "kdiag_agent_budget_step",
        "gauge",
        "Steps of detail the --max-cpu budget shed during the last interval (0: full \
         detail; budget records name them).",
        a.budget_step,
    );
    header(
        w,
        "kdiag_metrics_series_folded_total",
        "counter",
        "Updates of a metric that found it at its series bound and went to the label value \
         \"other\".",
    );
    let families: [(&str, u64); 15] = [
        ("kdiag_tcp_retransmits_total", r.retransmits.folded),
        ("kdiag_tcp_pod_retransmits_total", r.pod_retransmits.folded),
        ("kdiag_tcp_connections_closed_total", r.closed.folded),
        ("kdiag_packet_drops_total", r.packet_drops.folded),
        ("kdiag_memory_stall_seconds", r.stalls.folded),
        (
            "kdiag_memory_stall_cgroup_seconds",
            r.stalls_by_cgroup.folded,
        ),
        ("kdiag_softirq_service_seconds", r.softirq_service.folded),
        ("kdiag_softirq_delay_seconds", r.softirq_delay.folded),
        ("kdiag_agent_events_total", a.events.folded),
        ("kdiag_agent_dropped_total", a.dropped.folded),
        ("kdiag_agent_lost_total", a.lost.folded),
        ("kdiag_agent_program_runs_total", a.program_runs.folded),
        (
            "kdiag_agent_program_run_seconds_total",
            a.program_run_ns.folded,
        ),
        ("kdiag_tcp_handshake_seconds", r.handshake.folded),
        ("kdiag_tcp_connection_duration_seconds", r.duration.folded),
    ];
    for (metric, folded) in families {
        let _ = writeln!(
            w,
            "kdiag_metrics_series_folded_total{{metric=\"{metric}\"}} {folded}"
        );
    }
    out
}

fn header(w: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(w, "# HELP {name} {}", escape_help(help));
    let _ = writeln!(w, "# TYPE {name} {kind}");
}

fn scalar(w: &mut String, name: &str, kind: &str, help: &str, value: u64) {
    header(w, name, kind, help);
    let _ = writeln!(w, "{name} {value}");
}

fn counter(w: &mut String, name: &str, help: &str, family: &Family<u64>) {
    header(w, name, "counter", help);
    for (values, n) in sorted(family) {
        let _ = writeln!(w, "{name}{} {n}", labels(family.labels, values, None));
    }
}

/// A counter kept in nanoseconds, written in seconds.
fn seconds_counter(w: &mut String, name: &str, help: &str, family: &Family<u64>) {
    header(w, name, "counter", help);
    for (values, ns) in sorted(family) {
        let _ = writeln!(
            w,
            "{name}{} {}",
            labels(family.labels, values, None),
            seconds(*ns)
        );
    }
}

fn histogram(w: &mut String, name: &str, help: &str, family: &Family<Histogram>) {
    header(w, name, "histogram", help);
    for (values, h) in sorted(family) {
        // A bucket read while the kernel added to it can run one value
        // ahead of the count: cumulative counts never exceed `_count`.
        let mut cumulative = 0u64;
        for (bound, n) in h.bounds.iter().zip(&h.counts) {
            cumulative += n;
            let le = seconds(*bound);
            let _ = writeln!(
                w,
                "{name}_bucket{} {}",
                labels(family.labels, values, Some(&le)),
                cumulative.min(h.count)
            );
        }
        let _ = writeln!(
            w,
            "{name}_bucket{} {}",
            labels(family.labels, values, Some("+Inf")),
            h.count
        );
        let plain = labels(family.labels, values, None);
        if let Some(sum) = h.sum_ns {
            let _ = writeln!(w, "{name}_sum{plain} {}", seconds(sum));
        }
        let _ = writeln!(w, "{name}_count{plain} {}", h.count);
    }
}

/// Series in label order, so that scrapes list them alike.
fn sorted<V>(family: &Family<V>) -> Vec<(&Vec<String>, &V)> {
    let mut series: Vec<_> = family.series.iter().map(|(k, v)| (k, v)).collect();
    series.sort_by(|a, b| a.0.cmp(b.0));
    series
}

/// `{a="x",b="y"}` (with `le` last for a bucket), or nothing without labels.
fn labels(names: &[&str], values: &[String], le: Option<&str>) -> String {
    let mut pairs: Vec<String> = names
        .iter()
        .zip(values)
        .map(|(n, v)| format!("{n}=\"{}\"", escape_value(v)))
        .collect();
    if let Some(le) = le {
        pairs.push(format!("le=\"{le}\""));
    }
    if pairs.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", pairs.join(","))
    }
}

/// Nanoseconds as seconds, in the shortest decimal that reads back the
/// same (2047 ns is `0.000002047`).
fn seconds(ns: u64) -> String {
    let s = ns as f64 / 1e9;
    format!("{s}")
}

fn escape_value(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}
