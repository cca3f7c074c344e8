//! `--metrics-addr`: the figures the records carry, as Prometheus metrics.
//!
//! The classes update the registry where they write their records, with
//! what those records say (a `retrans` record is one retransmit counted, a
//! `softirq_summary` adds its interval's histogram), so that the metrics
//! are cumulative sums of the JSON stream and never disagree with it. The
//! registry is published as text once per interval, right after that
//! interval's `agent_stats` record: a scrape sees exactly the records up to
//! the last `agent_stats` written (`kdiag_agent_intervals_total` says how
//! many), never half an interval. The HTTP server (`serve`) only hands out
//! the last published text; it never touches the registry, so a scrape
//! costs the event loop nothing but a copy of a reference.
//!
//! Histogram buckets are those of the kernel's log2 scales
//! (`kdiag_common::log2::Scale`): upper bounds 2^e - 1 ns, the largest value
//! the kernel's buckets below 2^e hold, in seconds. The sub-buckets of the
//! memory scale are summed into their power of two, so every bound is one
//! the kernel's histogram has and no count is moved across a bound.
//!
//! Cardinality is bounded: each metric holds at most `max_series` label
//! sets, and the per-cgroup memory breakdown at most `cgroups` cgroups.
//! What would exceed a bound is counted under the label value `other`, and
//! the update is counted in `kdiag_metrics_series_folded_total{metric}`.

mod serve;
mod text;

use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use kdiag_common::log2::Scale;

pub(crate) use serve::{BindError, Server};

use crate::output::record::AgentStats;

/// The label value of what a bound folded.
pub(crate) const OTHER: &str = "other";
/// The `uid` label of sockets owned outside any pod (or by no one known).
const NO_POD: &str = "none";
/// The `reason` label of drops the kernel gives no reason for.
const NO_REASON: &str = "none";

/// Buckets of the TCP timing histograms, which userspace fills from the
/// kernel's timestamps: log2 from 1 µs (bucket 0 is below 1024 ns) to
/// 2^43 ns (2.4 hours) and over.
pub(crate) const TCP_SCALE: Scale = Scale::new(10, 0, 43);

/// Bounds of the registry (the `--metrics-*` options).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub max_series: usize,
    pub cgroups: usize,
    /// The softirq histograms per CPU as well as per vector.
    pub softirq_cpus: bool,
}

/// The last text published, shared with the HTTP server.
#[derive(Debug, Clone, Default)]
pub(crate) struct Exposition(Arc<Mutex<Bytes>>);

impl Exposition {
    pub(crate) fn get(&self) -> Bytes {
        self.0.lock().map(|b| b.clone()).unwrap_or_default()
    }

    fn set(&self, text: Bytes) {
        if let Ok(mut b) = self.0.lock() {
            *b = text;
        }
    }
}

/// The metrics registry, or nothing without `--metrics-addr`: then every
/// update returns at once.
#[derive(Debug, Default)]
pub(crate) struct Metrics(Option<Box<Registry>>);

impl Metrics {
    /// A registry bounded by `limits`, publishing to the returned
    /// exposition.
    pub(crate) fn new(limits: Limits) -> (Self, Exposition) {
        let exposition = Exposition::default();
        let registry = Registry::new(limits, exposition.clone());
        (Self(Some(Box::new(registry))), exposition)
    }

    /// One `retrans` record, of a socket owned in the Kubernetes pod
    /// `pod_uid` if any.
    pub(crate) fn retransmit(&mut self, state: &str, kind: &str, pod_uid: Option<&str>) {
        if let Some(r) = &mut self.0 {
            *r.retransmits.entry(&[state, kind]) += 1;
            *r.pod_retransmits.entry(&[pod_uid.unwrap_or(NO_POD)]) += 1;
        }
    }

    /// One `drop_summary` record: `count` drops of `protocol` for
    /// `reason` (`"none"` where the kernel names none).
    pub(crate) fn packet_drops(&mut self, reason: Option<&str>, protocol: &str, count: u64) {
        if let Some(r) = &mut self.0 {
            *r.packet_drops
                .entry(&[reason.unwrap_or(NO_REASON), protocol]) += count;
        }
    }

    /// One `tcp_conn` record.
    pub(crate) fn connection_closed(
        &mut self,
        role: Option<&str>,
        handshake_ns: Option<u64>,
        duration_ns: Option<u64>,
    ) {
        let Some(r) = &mut self.0 else { return };
        *r.closed.entry(&[role.unwrap_or("unknown")]) += 1;
        if let Some(ns) = handshake_ns {
            r.handshake.entry(&[]).observe(ns);
        }
        if let Some(ns) = duration_ns {
            r.duration.entry(&[]).observe(ns);
        }
    }

    /// One `reclaim_summary` or `compact_summary` record: `count` stalls of
    /// `kind` taking `total_ns`, bucketed on `scale` in `buckets`, by
    /// processes of `cgroup`.
    pub(crate) fn memory_stalls(&mut self, kind: &str, cgroup: Option<&str>, stalls: Buckets<'_>) {
        let Some(r) = &mut self.0 else { return };
        r.stalls.entry(&[kind]).add(stalls);
        let cgroup = cgroup.unwrap_or("unknown");
        let cgroup = if r.cgroups_seen.contains(cgroup) {
            cgroup
        } else if r.cgroups_seen.len() < r.limits.cgroups {
            r.cgroups_seen.insert(cgroup.to_owned());
            cgroup
        } else {
            r.stalls_by_cgroup.folded += 1;
            OTHER
        };
        r.stalls_by_cgroup.entry(&[kind, cgroup]).add(stalls);
    }

    /// One `softirq_summary` record: the interval's service-time and delay
    /// buckets of vector `vec` on `cpu`, on `scale`, and its total service
    /// time.
    pub(crate) fn softirqs(
        &mut self,
        cpu: u32,
        vec: &str,
        scale: &Scale,
        service: &[u64],
        service_total_ns: u64,
        delay: &[u64],
    ) {
        let Some(r) = &mut self.0 else { return };
        let cpu = cpu.to_string();
        let labels: &[&str] = if r.limits.softirq_cpus {
            &[vec, &cpu]
        } else {
            &[vec]
        };
        let count = service.iter().sum();
        r.softirq_service.entry(labels).add(Buckets {
            scale,
            buckets: service,
            count,
            total_ns: Some(service_total_ns),
        });
        let count = delay.iter().sum();
        r.softirq_delay.entry(labels).add(Buckets {
            scale,
            buckets: delay,
            count,
            total_ns: None,
        });
    }

    /// One `agent_stats` record, which ends an interval, and the CPU
    /// budget's step then: added up, then everything is published.
    pub(crate) fn end_interval(&mut self, stats: &AgentStats, budget_step: usize) {
        let Some(r) = &mut self.0 else { return };
        r.agent.add(stats);
        r.agent.budget_step = budget_step as u64;
        r.publish();
    }

    /// Publishes the registry as it is (at start: every metric at zero).
    pub(crate) fn publish(&mut self) {
        if let Some(r) = &mut self.0 {
            r.publish();
        }
    }
}

/// Histogram input: `count` values bucketed on `scale` in `buckets` (one
/// count per bucket of the scale), summing to `total_ns` where known.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Buckets<'a> {
    pub scale: &'a Scale,
    pub buckets: &'a [u64],
    pub count: u64,
    pub total_ns: Option<u64>,
}

#[derive(Debug)]
struct Registry {
    limits: Limits,
    exposition: Exposition,
    retransmits: Family<u64>,
    /// By the `uid` of the owner's pod, named as kube-state-metrics names
    /// it in `kube_pod_info`, for a join that gives the pod's name.
    pod_retransmits: Family<u64>,
    closed: Family<u64>,
    handshake: Family<Histogram>,
    duration: Family<Histogram>,
    stalls: Family<Histogram>,
    stalls_by_cgroup: Family<Histogram>,
    /// The cgroups that have a series of their own in `stalls_by_cgroup`.
    cgroups_seen: BTreeSet<String>,
    softirq_service: Family<Histogram>,
    softirq_delay: Family<Histogram>,
    packet_drops: Family<u64>,
    agent: AgentTotals,
}

impl Registry {
    fn new(limits: Limits, exposition: Exposition) -> Self {
        let max = limits.max_series;
        let memory = || Histogram::new(&kdiag_common::memory::HIST);
        let softirq = || Histogram::new(&kdiag_common::softirq::HIST);
        let tcp = || Histogram::new(&TCP_SCALE);
        // The CPU last: past the series bound, CPUs fold, not vectors.
        let softirq_labels: &'static [&'static str] = if limits.softirq_cpus {
            &["vec", "cpu"]
        } else {
            &["vec"]
        };
        let mut registry = Self {
            limits,
            exposition,
            retransmits: Family::new(&["state", "kind"], max, || 0),
            pod_retransmits: Family::new(&["uid"], max, || 0),
            closed: Family::new(&["role"], max, || 0),
            handshake: Family::new(&[], max, tcp),
            duration: Family::new(&[], max, tcp),
            stalls: Family::new(&["kind"], max, memory),
            stalls_by_cgroup: Family::new(&["kind", "cgroup"], max, memory),
            cgroups_seen: BTreeSet::new(),
            softirq_service: Family::new(softirq_labels, max, softirq),
            softirq_delay: Family::new(softirq_labels, max, softirq),
            packet_drops: Family::new(&["reason", "protocol"], max, || 0),
            agent: AgentTotals::new(max),
        };
        // Always there, so that a dashboard shows 0 rather than no data.
        registry.handshake.entry(&[]);
        registry.duration.entry(&[]);
        registry
    }

    fn publish(&mut self) {
        self.exposition.set(Bytes::from(text::render(self)));
    }
}

/// The `agent_stats` records summed.
#[derive(Debug)]
struct AgentTotals {
    intervals: u64,
    events: Family<u64>,
    dropped: Family<u64>,
    lost: Family<u64>,
    program_runs: Family<u64>,
    program_run_ns: Family<u64>,
    decode_errors: u64,
    cpu_ns: u64,
    rss_bytes: u64,
    /// The `--max-cpu` budget's step at the last interval's end.
    budget_step: u64,
}

impl AgentTotals {
    fn new(max: usize) -> Self {
        let counter = |labels| Family::new(labels, max, || 0);
        Self {
            intervals: 0,
            events: counter(&["class"]),
            dropped: counter(&["class"]),
            lost: counter(&["class"]),
            program_runs: counter(&["program"]),
            program_run_ns: counter(&["program"]),
            decode_errors: 0,
            cpu_ns: 0,
            rss_bytes: 0,
            budget_step: 0,
        }
    }

    fn add(&mut self, stats: &AgentStats) {
        self.intervals += 1;
        for (class, s) in &stats.classes {
            *self.events.entry(&[class]) += s.events;
            // An unreadable counter is null; the next read covers it.
            *self.dropped.entry(&[class]) += s.dropped.unwrap_or(0);
            *self.lost.entry(&[class]) += s.lost.unwrap_or(0);
        }
        for p in &stats.programs {
            *self.program_runs.entry(&[&p.name]) += p.run_cnt;
            *self.program_run_ns.entry(&[&p.name]) += p.run_time_ns;
        }
        self.decode_errors += stats.decode_errors;
        self.cpu_ns += stats.cpu_ns;
        if let Some(rss) = stats.rss_bytes {
            self.rss_bytes = rss;
        }
    }
}

/// The series of one metric, by label values (in the order of `labels`),
/// at most `cap` of them; past that, new label sets have their last label
/// folded into [`OTHER`].
#[derive(Debug)]
struct Family<V> {
    labels: &'static [&'static str],
    series: Vec<(Vec<String>, V)>,
    cap: usize,
    /// Updates folded into `other`.
    folded: u64,
    new: fn() -> V,
}

impl<V> Family<V> {
    /// `new` makes a series' first value.
    fn new(labels: &'static [&'static str], cap: usize, new: fn() -> V) -> Self {
        Self {
            labels,
            series: Vec::new(),
            cap,
            folded: 0,
            new,
        }
    }

    /// The series of `values` (one per label), created if new; linear, as
    /// families are small and bounded.
    fn entry(&mut self, values: &[&str]) -> &mut V {
        debug_assert_eq!(values.len(), self.labels.len());
        let find = |series: &[(Vec<String>, V)], values: &[&str]| {
            series.iter().position(|(have, _)| have.iter().eq(values))
        };
        let i = match find(&self.series, values) {
            Some(i) => i,
            None => {
                let mut key: Vec<String> = values.iter().map(|v| (*v).to_owned()).collect();
                if self.series.len() >= self.cap
                    && let Some(last) = key.last_mut()
                {
                    self.folded += 1;
                    *last = OTHER.to_owned();
                }
                let other: Vec<&str> = key.iter().map(String::as_str).collect();
                match find(&self.series, &other) {
                    Some(i) => i,
                    None => {
                        self.series.push((key, (self.new)()));
                        self.series.len() - 1
                    }
                }
            }
        };
        &mut self.series[i].1
    }
}

/// A histogram on the power-of-two bounds of a kernel scale: `counts[i]`
/// values of at most `bounds[i]` ns (and over the one before), the last
/// count over every bound.
#[derive(Debug, Clone)]
struct Histogram {
    bounds: Vec<u64>,
    counts: Vec<u64>,
    count: u64,
    sum_ns: Option<u64>,
}

impl Histogram {
    fn new(scale: &Scale) -> Self {
        let bounds: Vec<u64> = (scale.min_exp..=scale.max_exp)
            .map(|e| (1u64 << e) - 1)
            .collect();
        Self {
            counts: vec![0; bounds.len() + 1],
            bounds,
            count: 0,
            sum_ns: Some(0),
        }
    }

    /// The bucket of a value of at most `max_ns`.
    fn bucket_of(&self, max_ns: u64) -> usize {
        self.bounds.partition_point(|&b| b < max_ns)
    }

    fn observe(&mut self, ns: u64) {
        let i = self.bucket_of(ns);
        self.counts[i] += 1;
        self.count += 1;
        self.sum_ns = self.sum_ns.map(|s| s.saturating_add(ns));
    }

    /// Adds kernel buckets: bucket `b` of the scale holds values up to
    /// `scale.bucket_max(b)`, a power-of-two bound or below the next one.
    fn add(&mut self, s: Buckets<'_>) {
        for (b, &n) in s.buckets.iter().enumerate() {
            if n > 0 {
                let i = self.bucket_of(s.scale.bucket_max(b));
                self.counts[i] += n;
            }
        }
        self.count += s.count;
        self.sum_ns = match (self.sum_ns, s.total_ns) {
            (Some(sum), Some(t)) => Some(sum.saturating_add(t)),
            _ => None,
        };
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use kdiag_common::{memory, softirq};

    use super::*;
    use crate::output::record::ClassStats;

    fn registry(max_series: usize, cgroups: usize) -> (Metrics, Exposition) {
        Metrics::new(Limits {
            max_series,
            cgroups,
            softirq_cpus: false,
        })
    }

    /// The samples of the published text: `name{labels}` -> value.
    fn samples(e: &Exposition) -> BTreeMap<String, String> {
        let text = String::from_utf8(e.get().to_vec()).unwrap();
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| {
                let (k, v) = l.rsplit_once(' ').unwrap();
                (k.to_owned(), v.to_owned())
            })
            .collect()
    }

    #[test]
    fn bounds_are_the_kernels_powers_of_two() {
        let h = Histogram::new(&softirq::HIST);
        assert_eq!(h.bounds.len(), 31);
        assert_eq!((h.bounds[0], h.bounds[10]), (1, 2047));
        assert_eq!(*h.bounds.last().unwrap(), (1 << 31) - 1);
        let h = Histogram::new(&memory::HIST);
        assert_eq!(
            (h.bounds[0], *h.bounds.last().unwrap()),
            (1023, (1 << 33) - 1)
        );
        // Every bound is the top of a kernel bucket, so no kernel bucket
        // straddles one.
        for scale in [softirq::HIST, memory::HIST] {
            let h = Histogram::new(&scale);
            for b in &h.bounds {
                assert_eq!(scale.bucket_max(scale.bucket(*b)), *b, "{scale:?} {b}");
            }
        }
    }

    #[test]
    fn kernel_buckets_land_under_their_bound() {
        let scale = memory::HIST;
        let mut buckets = vec![0u64; memory::HIST_BUCKETS];
        // 1500 ns and 2047 ns are under 2^11 - 1; 2048 ns is over it.
        for ns in [1500, 2047, 2048, 500, u64::MAX] {
            buckets[scale.bucket(ns)] += 1;
        }
        let mut h = Histogram::new(&scale);
        h.add(Buckets {
            scale: &scale,
            buckets: &buckets,
            count: 5,
            total_ns: Some(6095),
        });
        assert_eq!(&h.counts[..3], &[1, 2, 1]);
        assert_eq!(*h.counts.last().unwrap(), 1, "past the last bound");
        assert_eq!((h.count, h.sum_ns), (5, Some(6095)));
        // Values observed one by one fall in the same buckets.
        let mut o = Histogram::new(&scale);
        for ns in [1500, 2047, 2048, 500, u64::MAX] {
            o.observe(ns);
        }
        assert_eq!(o.counts, h.counts);
    }

    #[test]
    fn publishes_cumulative_records_per_interval() {
        let (mut m, e) = registry(100, 10);
        m.publish();
        let s = samples(&e);
        assert_eq!(s["kdiag_agent_intervals_total"], "0");
        assert_eq!(s["kdiag_tcp_handshake_seconds_count"], "0");
        m.retransmit("SYN_SENT", "syn", None);
        m.retransmit("SYN_SENT", "syn", Some("1b2c"));
        m.connection_closed(Some("active"), Some(3000), Some(2_000_000_000));
        m.connection_closed(None, None, Some(5));
        // Nothing shows before the interval ends.
        assert!(
            !samples(&e)
                .contains_key("kdiag_tcp_retransmits_total{state=\"SYN_SENT\",kind=\"syn\"}")
        );
        let mut stats = AgentStats {
            interval_ns: 1,
            classes: BTreeMap::from([(
                "retrans",
                ClassStats {
                    events: 2,
                    dropped: Some(1),
                    lost: Some(0),
                    failed: Some(0),
                    map_full: Some(0),
                    skipped: Some(0),
                    undecodable: 0,
                    filtered: 0,
                    partial: Some(0),
                },
            )]),
            programs: Vec::new(),
            decode_errors: 0,
            malformed_records: 0,
            output_dropped: 0,
            rss_bytes: Some(4096),
            cpu_ns: 1_500_000_000,
        };
        m.end_interval(&stats, 0);
        stats.cpu_ns = 500_000_000;
        m.end_interval(&stats, 0);
        let s = samples(&e);
        assert_eq!(
            s["kdiag_tcp_retransmits_total{state=\"SYN_SENT\",kind=\"syn\"}"],
            "2"
        );
        assert_eq!(s["kdiag_tcp_pod_retransmits_total{uid=\"1b2c\"}"], "1");
        assert_eq!(s["kdiag_tcp_pod_retransmits_total{uid=\"none\"}"], "1");
        assert_eq!(
            s["kdiag_tcp_connections_closed_total{role=\"unknown\"}"],
            "1"
        );
        assert_eq!(s["kdiag_tcp_handshake_seconds_count"], "1");
        assert_eq!(s["kdiag_tcp_handshake_seconds_sum"], "0.000003");
        assert_eq!(
            s["kdiag_tcp_handshake_seconds_bucket{le=\"0.000004095\"}"],
            "1"
        );
        assert_eq!(
            s["kdiag_tcp_handshake_seconds_bucket{le=\"0.000002047\"}"],
            "0"
        );
        assert_eq!(s["kdiag_tcp_connection_duration_seconds_count"], "2");
        assert_eq!(s["kdiag_agent_intervals_total"], "2");
        assert_eq!(s["kdiag_agent_events_total{class=\"retrans\"}"], "4");
        assert_eq!(s["kdiag_agent_dropped_total{class=\"retrans\"}"], "2");
        assert_eq!(s["kdiag_agent_cpu_seconds_total"], "2");
        assert_eq!(s["kdiag_agent_resident_memory_bytes"], "4096");
    }

    #[test]
    fn softirq_delays_have_no_sum() {
        let (mut m, e) = registry(100, 10);
        let mut service = [0; softirq::HIST_BUCKETS];
        let mut delay = [0; softirq::HIST_BUCKETS];
        service[softirq::HIST.bucket(1500)] = 3;
        delay[softirq::HIST.bucket(90)] = 2;
        m.softirqs(1, "NET_RX", &softirq::HIST, &service, 4500, &delay);
        m.softirqs(0, "NET_RX", &softirq::HIST, &service, 4500, &delay);
        m.publish();
        let s = samples(&e);
        // Both CPUs in one series.
        assert_eq!(
            s["kdiag_softirq_service_seconds_count{vec=\"NET_RX\"}"],
            "6"
        );
        assert_eq!(
            s["kdiag_softirq_service_seconds_sum{vec=\"NET_RX\"}"],
            "0.000009"
        );
        assert_eq!(s["kdiag_softirq_delay_seconds_count{vec=\"NET_RX\"}"], "4");
        assert_eq!(
            s["kdiag_softirq_delay_seconds_bucket{vec=\"NET_RX\",le=\"0.000000127\"}"],
            "4"
        );
        assert!(!s.contains_key("kdiag_softirq_delay_seconds_sum{vec=\"NET_RX\"}"));
        // Per CPU, on request.
        let (mut m, e) = Metrics::new(Limits {
            max_series: 100,
            cgroups: 10,
            softirq_cpus: true,
        });
        m.softirqs(1, "NET_RX", &softirq::HIST, &service, 4500, &delay);
        m.publish();
        let s = samples(&e);
        assert_eq!(
            s["kdiag_softirq_service_seconds_count{vec=\"NET_RX\",cpu=\"1\"}"],
            "3"
        );
        assert!(!s.contains_key("kdiag_softirq_service_seconds_count{vec=\"NET_RX\"}"));
    }

    #[test]
    fn cgroups_and_series_past_their_bounds_fold_into_other() {
        let (mut m, e) = registry(3, 2);
        let buckets = [0; memory::HIST_BUCKETS];
        let stalls = |count| Buckets {
            scale: &memory::HIST,
            buckets: &buckets,
            count,
            total_ns: Some(count * 1000),
        };
        for cgroup in ["/a", "/b", "/c", "/a", "/d"] {
            m.memory_stalls("memcg", Some(cgroup), stalls(1));
        }
        // A label value with characters the format escapes.
        for pod in ["p1", "p2", "p3", "p\"4\\"] {
            m.retransmit("ESTABLISHED", "data", Some(pod));
        }
        m.publish();
        let s = samples(&e);
        let by = |cgroup: &str| {
            s[&format!(
                "kdiag_memory_stall_cgroup_seconds_count{{kind=\"memcg\",cgroup=\"{cgroup}\"}}"
            )]
                .clone()
        };
        assert_eq!(
            (by("/a"), by("/b"), by("other")),
            ("2".into(), "1".into(), "2".into())
        );
        assert_eq!(s["kdiag_memory_stall_seconds_count{kind=\"memcg\"}"], "5");
        assert_eq!(
            s["kdiag_metrics_series_folded_total{metric=\"kdiag_memory_stall_cgroup_seconds\"}"],
            "2"
        );
        assert_eq!(s["kdiag_tcp_pod_retransmits_total{uid=\"other\"}"], "1");
        assert_eq!(
            s["kdiag_metrics_series_folded_total{metric=\"kdiag_tcp_pod_retransmits_total\"}"],
            "1"
        );
        let (mut m, e) = registry(10, 10);
        m.retransmit("ESTABLISHED", "data", Some("p\"4\\\n"));
        m.publish();
        assert_eq!(
            samples(&e)["kdiag_tcp_pod_retransmits_total{uid=\"p\\\"4\\\\\\n\"}"],
            "1"
        );
    }

    #[test]
    fn disabled_metrics_keep_nothing() {
        let mut m = Metrics::default();
        m.retransmit("SYN_SENT", "syn", None);
        m.publish();
        assert!(m.0.is_none());
    }
}
