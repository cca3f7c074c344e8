//! What the matrix shows: the end-of-run summary, and docs/KERNELS.md, the
//! table of kernels the suite passed on (only ever written from a passing
//! run, one row per kernel series).

use std::{fs, path::Path};

use anyhow::{Context, Result};
use serde_json::Value;

use super::{
    guest::{self, Outcome},
    kernel::Kernel,
};

pub(super) struct KernelRun {
    /// The kernel series (`6.1`; `7.3` for `newest`).
    pub series: String,
    /// Whether it came from a series that moves on (`newest`).
    pub moving: bool,
    pub kernel: Kernel,
    pub outcome: Outcome,
}

/// Per kernel: the verdict, the guest's wall time, the test counts per
/// binary and every skip with its reason.
pub(super) fn print_summary(runs: &[(&str, Result<KernelRun>)]) {
    eprintln!("\nvm-test summary:");
    for (name, run) in runs {
        let run = match run {
            Ok(run) => run,
            Err(e) => {
                let e = format!("{e:#}");
                eprintln!("  {name:<6} FAILED   {}", e.lines().next().unwrap_or(""));
                continue;
            }
        };
        let series = &run.series;
        let out = &run.outcome;
        let total = out.total();
        eprintln!(
            "  {series:<6} {:<8} {} ({} {}): {:.0} s in the guest; {} passed, {} failed, {} ignored, {} skipped",
            if out.ok() { "ok" } else { "FAILED" },
            run.kernel.release,
            run.kernel.package,
            run.kernel.version,
            out.wall.as_secs_f64(),
            total.passed,
            total.failed,
            total.ignored,
            out.skips().count(),
        );
        for b in &out.binaries {
            let counts = b.counts.map_or_else(
                || "no test result line".to_owned(),
                |c| {
                    format!(
                        "{} passed, {} failed, {} ignored",
                        c.passed, c.failed, c.ignored
                    )
                },
            );
            eprintln!(
                "        {:<12} exit {:<3} {:>4} s  {counts}",
                b.name, b.rc, b.secs
            );
        }
        for skip in out.skips() {
            eprintln!("        skipped: {skip}");
        }
        match &out.probe {
            Ok(start) => eprintln!(
                "        transport {}; attached: {}; degraded: {}",
                start["transport"].as_str().unwrap_or("?"),
                attached(start),
                degraded(start),
            ),
            Err(e) => eprintln!("        agent probe FAILED: {e}"),
        }
    }
}

/// What failed on each failing kernel, in full: the guest's end when it
/// did not finish, else each failing binary's failed tests and the probe's
/// error. `None` when every kernel passed.
pub(super) fn failure_digest(runs: &[(&str, Result<KernelRun>)]) -> Option<String> {
    let mut text = String::new();
    for (name, run) in runs {
        match run {
            Err(e) => text.push_str(&format!("\n{name}: {e:#}")),
            Ok(run) if !run.outcome.ok() => {
                text.push_str(&format!("\n{name} ({}):", run.kernel.release));
                if let Err(e) = &run.outcome.probe {
                    text.push_str(&format!("\n  agent probe: {e}"));
                }
                for b in &run.outcome.binaries {
                    let failed = b.counts.is_none_or(|c| c.failed > 0);
                    if b.rc == 0 && !failed {
                        continue;
                    }
                    if b.rc == guest::TIMED_OUT {
                        text.push_str(&format!("\n  {} ran into its time limit:", b.name));
                    } else {
                        text.push_str(&format!("\n  {} exited {}:", b.name, b.rc));
                    }
                    for line in b.failures.iter().chain(&b.stuck) {
                        text.push_str(&format!("\n    {line}"));
                    }
                }
                if run.outcome.total().passed == 0 {
                    text.push_str("\n  no test passed");
                }
            }
            Ok(_) => {}
        }
    }
    (!text.is_empty()).then_some(text)
}

const KERNELS_MD_HEAD: &str = "\
# Supported kernels

Written by `cargo xtask vm-test` (see README, \"Supported kernels\") from its
last passing run of the whole integration suite on each kernel: Debian's
kernel package booted under QEMU, the tests running in it as root. Do not
edit by hand. `attached` and `degraded` are the agent's own `agent_start`
lines of `kdiag-agent run` in that guest; `tests` counts the passed tests
per test binary; `skipped` lists the tests that named what the guest could
not give them.

| series | kernel | Debian package | tested (UTC) | transport | attached | degraded | tests | skipped | guest time |
|---|---|---|---|---|---|---|---|---|---|
";

/// Replaces the rows of the series in `runs` (all passing), keeping the
/// rows of other series. `fixed` are the series that stay the same from
/// run to run; a row of any other series is an earlier run's newest kernel,
/// which a passing run of the newest replaces.
pub(super) fn update_kernels_md(path: &Path, runs: &[&KernelRun], fixed: &[&str]) -> Result<()> {
    let old = fs::read_to_string(path).unwrap_or_default();
    let date = time::OffsetDateTime::now_utc().date().to_string();
    let newest_ran = runs.iter().any(|r| r.moving);
    let ran: Vec<&str> = runs.iter().map(|r| r.series.as_str()).collect();
    let mut rows = kept_rows(&old, &ran, newest_ran, fixed);
    for run in runs {
        rows.push((run.series.clone(), row(run, &date)));
    }
    rows.sort_by_key(|(series, _)| version_key(series));
    let mut text = KERNELS_MD_HEAD.to_owned();
    for (_, row) in rows {
        text.push_str(&row);
        text.push('\n');
    }
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// The (series, row) of the table in `old` that a run of the series `ran`
/// keeps: the other fixed series, and the other moving one only when the
/// newest did not run.
fn kept_rows(old: &str, ran: &[&str], newest_ran: bool, fixed: &[&str]) -> Vec<(String, String)> {
    old.lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| series"))
        .filter_map(|l| {
            let series = l.split('|').nth(1)?.trim().to_owned();
            Some((series, l.to_owned()))
        })
        .filter(|(series, _)| !ran.contains(&series.as_str()))
        .filter(|(series, _)| !newest_ran || fixed.contains(&series.as_str()))
        .collect()
}

/// `5.10` before `6.1` before `6.12` before `7.3`.
fn version_key(series: &str) -> Vec<u32> {
    series.split('.').map(|n| n.parse().unwrap_or(0)).collect()
}

fn row(run: &KernelRun, date: &str) -> String {
    let out = &run.outcome;
    let start = out.probe.as_ref().unwrap_or(&Value::Null);
    let tests: Vec<String> = out
        .binaries
        .iter()
        .filter_map(|b| Some(format!("{} {}", b.name, b.counts?.passed)))
        .collect();
    let skips: Vec<&str> = out.skips().collect();
    let cells = [
        run.series.clone(),
        run.kernel.release.clone(),
        format!("{} {}", run.kernel.package, run.kernel.version),
        date.to_owned(),
        start["transport"].as_str().unwrap_or("?").to_owned(),
        attached(start),
        degraded(start),
        tests.join(", "),
        if skips.is_empty() {
            "none".to_owned()
        } else {
            skips.join("; ")
        },
        format!("{:.0} s", out.wall.as_secs_f64()),
    ];
    let cells: Vec<String> = cells.iter().map(|c| c.replace('|', "\\|")).collect();
    format!("| {} |", cells.join(" | "))
}

fn attached(start: &Value) -> String {
    let list: Vec<&str> = start["attached"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    list.join(", ")
}

fn degraded(start: &Value) -> String {
    let list: Vec<String> = start["degraded"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|d| {
                    format!(
                        "{} ({})",
                        d["what"].as_str().unwrap_or("?"),
                        d["why"].as_str().unwrap_or("?")
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    if list.is_empty() {
        "none".to_owned()
    } else {
        list.join("; ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OLD: &str = "# Supported kernels\n\n\
                       | series | kernel |\n|---|---|\n\
                       | 5.10 | 5.10.0-46-amd64 |\n\
                       | 6.1 | 6.1.0-56-amd64 |\n\
                       | 7.2 | 7.2.12+deb13-amd64 |\n";
    const FIXED: &[&str] = &["5.10", "6.1", "6.12"];

    fn series(rows: &[(String, String)]) -> Vec<&str> {
        rows.iter().map(|(s, _)| s.as_str()).collect()
    }

    #[test]
    fn a_run_replaces_its_own_rows_only() {
        assert_eq!(
            series(&kept_rows(OLD, &["6.1"], false, FIXED)),
            ["5.10", "7.2"]
        );
    }

    #[test]
    fn a_newer_newest_replaces_the_old_newest() {
        assert_eq!(
            series(&kept_rows(OLD, &["7.3"], true, FIXED)),
            ["5.10", "6.1"]
        );
    }

    #[test]
    fn series_sort_as_versions() {
        let mut s = vec!["7.3", "6.12", "5.10", "6.1", "10.0"];
        s.sort_by_key(|s| version_key(s));
        assert_eq!(s, ["5.10", "6.1", "6.12", "7.3", "10.0"]);
    }
}
