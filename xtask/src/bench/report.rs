//! The one table: every measurement as median (min-max) of its runs, with
//! kdiag's target where it has one, as Markdown.

use std::fmt::Write as _;

#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Unit {
    Ns,
    Ms,
    MiB,
    Percent,
    Ratio,
    PerSec,
    Count,
    Gbps,
}

impl Unit {
    fn format(self, v: f64) -> String {
        match self {
            Unit::Ns => format!("{v:.0} ns"),
            Unit::Ms => format!("{v:.1} ms"),
            // Map memory differs from its target by tens of KiB.
            Unit::MiB => format!("{v:.2} MiB"),
            Unit::Percent => format!("{v:.3}%"),
            Unit::Ratio => format!("{v:.3}"),
            Unit::PerSec => format!("{v:.0}/s"),
            Unit::Count => format!("{v:.0}"),
            Unit::Gbps => format!("{v:.1} Gbit/s"),
        }
    }
}

pub(super) struct Row {
    pub section: &'static str,
    pub measure: String,
    pub tracer: String,
    pub unit: Unit,
    pub samples: Vec<f64>,
    /// kdiag's target: the median must be at most this.
    pub target: Option<f64>,
}

impl Row {
    pub(super) fn median(&self) -> f64 {
        let mut s = self.samples.clone();
        s.sort_by(f64::total_cmp);
        match s.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => s[n / 2],
            n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
        }
    }

    pub(super) fn holds(&self) -> Option<bool> {
        self.target.map(|t| self.median() <= t)
    }
}

#[derive(Default)]
pub(super) struct Rows(pub Vec<Row>);

impl Rows {
    /// Adds a sample to the row (section, measure, tracer), creating it.
    pub(super) fn add(
        &mut self,
        section: &'static str,
        measure: &str,
        tracer: &str,
        unit: Unit,
        target: Option<f64>,
        value: f64,
    ) {
        if let Some(i) = self.position(section, measure, tracer) {
            self.0[i].samples.push(value);
            return;
        }
        self.0.push(Row {
            section,
            measure: measure.to_owned(),
            tracer: tracer.to_owned(),
            unit,
            samples: vec![value],
            target,
        });
    }

    fn position(&self, section: &str, measure: &str, tracer: &str) -> Option<usize> {
        self.0
            .iter()
            .position(|r| r.section == section && r.measure == measure && r.tracer == tracer)
    }

    /// The median of the row (section, measure, tracer), if measured.
    pub(super) fn median(&self, section: &str, measure: &str, tracer: &str) -> Option<f64> {
        self.position(section, measure, tracer)
            .map(|i| self.0[i].median())
    }

    /// Sets the target of the row (section, measure, tracer), where it
    /// depends on other rows' figures; nothing if it was not measured.
    pub(super) fn set_target(&mut self, section: &str, measure: &str, tracer: &str, target: f64) {
        if let Some(i) = self.position(section, measure, tracer) {
            self.0[i].target = Some(target);
        }
    }

    pub(super) fn markdown(&self) -> String {
        let mut md = String::from(
            "| section | measure | tracer | median | min-max | runs | kdiag target |\n\
             |---|---|---|---:|---:|---:|---|\n",
        );
        // Sections in order; within one, rows as measured.
        let mut rows: Vec<&Row> = self.0.iter().collect();
        rows.sort_by_key(|r| r.section);
        for r in rows {
            let min = r.samples.iter().copied().fold(f64::INFINITY, f64::min);
            let max = r.samples.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let target = match (r.target, r.holds()) {
                (Some(t), Some(true)) => format!("<= {}: holds", r.unit.format(t)),
                (Some(t), _) => format!("<= {}: **misses**", r.unit.format(t)),
                (None, _) => String::new(),
            };
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} - {} | {} | {} |",
                r.section,
                r.measure,
                r.tracer,
                r.unit.format(r.median()),
                r.unit.format(min),
                r.unit.format(max),
                r.samples.len(),
                target
            );
        }
        md
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_target() {
        let mut rows = Rows::default();
        for v in [3.0, 1.0, 2.0, 10.0] {
            rows.add("s", "m", "t", Unit::Ns, Some(2.4), v);
        }
        let row = &rows.0[0];
        assert_eq!(row.samples.len(), 4);
        assert_eq!(row.median(), 2.5);
        assert_eq!(row.holds(), Some(false));
        let md = rows.markdown();
        assert!(
            md.contains("| s | m | t | 2 ns | 1 ns - 10 ns | 4 | <= 2 ns: **misses** |"),
            "{md}"
        );
    }

    /// A target set from another row's figure, after both are measured.
    #[test]
    fn target_from_another_row() {
        let mut rows = Rows::default();
        rows.add("s", "m", "peer", Unit::MiB, None, 2.0);
        rows.add("s", "m", "kdiag", Unit::MiB, None, 5.0);
        let peer = rows.median("s", "m", "peer").unwrap();
        rows.set_target("s", "m", "kdiag", peer + 4.0);
        rows.set_target("s", "m", "not measured", 1.0);
        assert_eq!(rows.median("s", "m", "not measured"), None);
        assert_eq!(rows.0[1].holds(), Some(true));
        assert_eq!(rows.0[0].target, None);
    }
}
