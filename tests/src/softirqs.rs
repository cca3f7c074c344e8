//! `/proc/softirqs`: the kernel's own count of softirq handler runs per CPU
//! and vector (incremented in `handle_softirqs` right before
//! `trace_softirq_entry`), the ground truth for the agent's counts.

use std::collections::BTreeMap;

/// One read of /proc/softirqs: vector name -> count per CPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcSoftirqs {
    pub cpus: usize,
    pub counts: BTreeMap<String, Vec<u64>>,
}

impl ProcSoftirqs {
    pub fn read() -> ProcSoftirqs {
        let text = std::fs::read_to_string("/proc/softirqs")
            .unwrap_or_else(|e| panic!("reading /proc/softirqs: {e}"));
        parse(&text).unwrap_or_else(|e| panic!("/proc/softirqs: {e}:\n{text}"))
    }

    /// Count of `vec` on `cpu` (0 for a vector this kernel lacks).
    pub fn get(&self, vec: &str, cpu: usize) -> u64 {
        self.counts
            .get(vec)
            .and_then(|c| c.get(cpu).copied())
            .unwrap_or(0)
    }

    /// Runs between `earlier` and this read, per vector and CPU.
    pub fn since(&self, earlier: &ProcSoftirqs) -> ProcSoftirqs {
        let counts = self
            .counts
            .iter()
            .map(|(vec, now)| {
                let delta = now
                    .iter()
                    .enumerate()
                    .map(|(cpu, n)| n.saturating_sub(earlier.get(vec, cpu)))
                    .collect();
                (vec.clone(), delta)
            })
            .collect();
        ProcSoftirqs {
            cpus: self.cpus,
            counts,
        }
    }
}

/// The header names the CPUs (`CPU0 CPU1 …`); each line is `VEC: n n …`.
fn parse(text: &str) -> Result<ProcSoftirqs, String> {
    let mut lines = text.lines();
    let cpus = lines
        .next()
        .ok_or("empty")?
        .split_whitespace()
        .filter(|c| c.starts_with("CPU"))
        .count();
    let mut counts = BTreeMap::new();
    for line in lines {
        let (vec, rest) = line.split_once(':').ok_or("line without ':'")?;
        let per_cpu: Vec<u64> = rest
            .split_whitespace()
            .map(|n| n.parse().map_err(|e| format!("{n:?}: {e}")))
            .collect::<Result<_, _>>()?;
        if per_cpu.len() != cpus {
            return Err(format!("{} counts for {cpus} CPUs", per_cpu.len()));
        }
        counts.insert(vec.trim().to_owned(), per_cpu);
    }
    if cpus == 0 || counts.is_empty() {
        return Err("no CPUs or no vectors".to_owned());
    }
    Ok(ProcSoftirqs { cpus, counts })
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn parses_and_subtracts() {
        let a = parse("    CPU0  CPU1\n  HI:  0  1\n  NET_RX:  5  7\n").unwrap();
        let b = parse("    CPU0  CPU1\n  HI:  0  4\n  NET_RX:  9  7\n").unwrap();
        assert_eq!(a.cpus, 2);
        let d = b.since(&a);
        assert_eq!(
            (d.get("HI", 1), d.get("NET_RX", 0), d.get("NET_RX", 1)),
            (3, 4, 0)
        );
        assert!(parse("CPU0\nHI: 1 2\n").is_err());
    }
}
