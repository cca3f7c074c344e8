//! The host-wide memory pressure written beside the memory stalls: deltas
//! of the /proc/vmstat counters that count the same stalls the tracepoints
//! see, and the PSI memory averages (/proc/pressure/memory; absent when PSI
//! is compiled out or disabled with `psi=0` on the kernel command line).

use std::{collections::HashMap, fs};

use crate::output::record::{Vmstat, VmstatCounters as Counters};

pub(crate) fn parse_vmstat(text: &str) -> Counters {
    let values: HashMap<&str, u64> = text
        .lines()
        .filter_map(|l| {
            let (name, value) = l.split_once(' ')?;
            Some((name, value.trim().parse().ok()?))
        })
        .collect();
    let allocstall = values
        .iter()
        .filter(|(name, _)| **name == "allocstall" || name.starts_with("allocstall_"))
        .map(|(_, v)| *v)
        .reduce(|a, b| a + b);
    let get = |name: &str| values.get(name).copied();
    Counters {
        allocstall,
        pgscan_direct: get("pgscan_direct"),
        pgsteal_direct: get("pgsteal_direct"),
        compact_stall: get("compact_stall"),
        compact_fail: get("compact_fail"),
        compact_success: get("compact_success"),
    }
}

/// `avg10` of the `some` and `full` lines of /proc/pressure/memory.
pub(crate) fn parse_psi(text: &str) -> (Option<f64>, Option<f64>) {
    let avg10 = |kind: &str| {
        text.lines()
            .find(|l| l.split_whitespace().next() == Some(kind))?
            .split_whitespace()
            .find_map(|f| f.strip_prefix("avg10="))?
            .parse()
            .ok()
    };
    (avg10("some"), avg10("full"))
}

/// Takes the deltas from one interval to the next.
#[derive(Debug, Default)]
pub(crate) struct VmstatSampler {
    last: Counters,
}

impl VmstatSampler {
    /// Starts counting from now.
    pub(crate) fn new() -> Self {
        Self {
            last: read_counters(),
        }
    }

    /// The record for the interval since the last sample.
    pub(crate) fn sample(&mut self, interval_ns: u64) -> Vmstat {
        let now = read_counters();
        let psi = fs::read_to_string("/proc/pressure/memory")
            .map(|t| parse_psi(&t))
            .unwrap_or((None, None));
        let record = vmstat_record(&self.last, &now, psi, interval_ns);
        self.last = now;
        record
    }
}

fn read_counters() -> Counters {
    parse_vmstat(&fs::read_to_string("/proc/vmstat").unwrap_or_default())
}

/// Deltas from `last` to `now`; a counter missing from either is null.
pub(crate) fn vmstat_record(
    last: &Counters,
    now: &Counters,
    (psi_some_avg10, psi_full_avg10): (Option<f64>, Option<f64>),
    interval_ns: u64,
) -> Vmstat {
    let d = |a: Option<u64>, b: Option<u64>| Some(b?.saturating_sub(a?));
    Vmstat {
        counters: Counters {
            allocstall: d(last.allocstall, now.allocstall),
            pgscan_direct: d(last.pgscan_direct, now.pgscan_direct),
            pgsteal_direct: d(last.pgsteal_direct, now.pgsteal_direct),
            compact_stall: d(last.compact_stall, now.compact_stall),
            compact_fail: d(last.compact_fail, now.compact_fail),
            compact_success: d(last.compact_success, now.compact_success),
        },
        psi_some_avg10,
        psi_full_avg10,
        interval_ns,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VMSTAT: &str = "nr_free_pages 5000
allocstall_dma 0
allocstall_dma32 2
allocstall_normal 5
allocstall_movable 1
pgsteal_direct 100
pgscan_direct 300
pgscan_direct_throttle 0
compact_stall 7
compact_fail 3
compact_success 4
garbage
";

    #[test]
    fn parses_and_sums_allocstall() {
        let c = parse_vmstat(VMSTAT);
        assert_eq!(c.allocstall, Some(8));
        assert_eq!(c.pgscan_direct, Some(300));
        assert_eq!(c.pgsteal_direct, Some(100));
        assert_eq!(
            (c.compact_stall, c.compact_fail, c.compact_success),
            (Some(7), Some(3), Some(4))
        );
        assert_eq!(parse_vmstat(""), Counters::default());
    }

    #[test]
    fn deltas_and_missing_counters() {
        let last = parse_vmstat(VMSTAT);
        let mut now = last.clone();
        now.allocstall = Some(10);
        now.compact_stall = None;
        let r = vmstat_record(&last, &now, (Some(1.5), None), 42);
        assert_eq!(r.counters.allocstall, Some(2));
        assert_eq!(r.counters.pgscan_direct, Some(0));
        assert_eq!(r.counters.compact_stall, None);
        // The counters sit at the record's top level, as the contract has them.
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["allocstall"], 2);
        assert!(json["compact_stall"].is_null());
        assert_eq!((r.psi_some_avg10, r.psi_full_avg10), (Some(1.5), None));
        assert_eq!(r.interval_ns, 42);
    }

    #[test]
    fn psi_lines() {
        let text = "some avg10=12.34 avg60=1.00 avg300=0.00 total=123\n\
                    full avg10=0.50 avg60=0.00 avg300=0.00 total=45\n";
        assert_eq!(parse_psi(text), (Some(12.34), Some(0.5)));
        assert_eq!(parse_psi(""), (None, None));
        assert_eq!(parse_psi("some avg10=x\n"), (None, None));
    }
}
