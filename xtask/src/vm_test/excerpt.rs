//! Short excerpts of what a failing guest printed, for the end of the run.
//!
//! CI keeps only the tail of a run's output, and the guests' consoles
//! scroll far above it; these excerpts put the cause of a failure (the
//! failing tests' panics, the kernel's oops or lockup report, where the
//! guest stopped) in the last lines printed.

use super::guest::KERNEL_DUMP_MARK;

/// Lines kept of one test binary's failure section.
const FAILURE_LINES: usize = 40;
/// Kernel trouble lines kept from a console.
const KERNEL_LINES: usize = 24;
/// Lines kept of a stuck binary's process list.
const PROCESS_LINES: usize = 24;
/// Last console lines kept.
const TAIL_LINES: usize = 12;

/// libtest's report of a failing binary: from its first `failures:` line
/// (each failed test's output, then their names) to the end, cut in the
/// middle when long, since the panics come first and the names last.
pub(super) fn test_failures(out: &str) -> Vec<String> {
    let lines: Vec<&str> = out
        .lines()
        .skip_while(|l| l.trim() != "failures:")
        .filter(|l| !l.trim().is_empty())
        .collect();
    cut_middle(&lines, FAILURE_LINES)
}

/// A binary that ran into its time limit: the tests libtest reported as
/// running long, then the guest's state the script took before the limit
/// (its processes, the kernel's blocked tasks and CPU backtraces).
pub(super) fn stuck(out: &str, dump: &str) -> Vec<String> {
    let mut kept: Vec<String> = out
        .lines()
        .filter(|l| l.contains("has been running for over"))
        .map(str::to_owned)
        .collect();
    let (processes, kernel) = dump.split_once(KERNEL_DUMP_MARK).unwrap_or((dump, ""));
    let processes: Vec<&str> = processes.lines().filter(|l| !l.trim().is_empty()).collect();
    kept.extend(cut_middle(&processes, PROCESS_LINES));
    // The blocked tasks' and the CPUs' headers, not their whole stacks:
    // those stay in the .stuck file and the console log.
    let kernel: Vec<&str> = kernel
        .lines()
        .filter(|l| kernel_trouble(l) || l.contains(" task:") || l.contains("NMI backtrace"))
        .collect();
    if !kernel.is_empty() {
        kept.push(KERNEL_DUMP_MARK.to_owned());
        kept.extend(cut_middle(&kernel, KERNEL_LINES));
    }
    kept
}

/// Where a guest that did not finish stopped: the last test binary it
/// started, the kernel's reports of trouble and the console's last lines.
pub(super) fn console(text: &str) -> Vec<String> {
    let mut kept = Vec::new();
    if let Some(running) = text
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("vm-test: running "))
    {
        kept.push(format!("it was running the {running} tests"));
    }
    let trouble: Vec<&str> = text.lines().filter(|l| kernel_trouble(l)).collect();
    if !trouble.is_empty() {
        kept.push("kernel reports:".to_owned());
        kept.extend(cut_middle(&trouble, KERNEL_LINES));
    }
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    kept.push("console, last lines:".to_owned());
    kept.extend(
        lines[lines.len().saturating_sub(TAIL_LINES)..]
            .iter()
            .map(|l| (*l).to_owned()),
    );
    kept
}

/// A kernel log line that says something went wrong, or locates it.
fn kernel_trouble(line: &str) -> bool {
    const MARKS: &[&str] = &[
        "BUG:",
        "WARNING:",
        "Oops",
        "Kernel panic",
        "soft lockup",
        "hard LOCKUP",
        "rcu_sched detected stall",
        "rcu: INFO",
        "hung_task",
        "blocked for more than",
        "RIP:",
        "Call Trace",
        "Out of memory",
        "invalid opcode",
        "general protection",
        "int3",
    ];
    MARKS.iter().any(|m| line.contains(m))
}

fn cut_middle(lines: &[&str], max: usize) -> Vec<String> {
    if lines.len() <= max {
        return lines.iter().map(|l| (*l).to_owned()).collect();
    }
    let head = max * 2 / 3;
    let tail = max - head;
    let mut kept: Vec<String> = lines[..head].iter().map(|l| (*l).to_owned()).collect();
    kept.push(format!("[… {} lines …]", lines.len() - max));
    kept.extend(lines[lines.len() - tail..].iter().map(|l| (*l).to_owned()));
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_failure_section_of_a_test_binary() {
        let out = "running 2 tests\ntest a ... ok\ntest b ... FAILED\n\nfailures:\n\n\
                   ---- b stdout ----\nthread 'b' panicked at x.rs:1:1:\nboom\n\n\
                   failures:\n    b\n\ntest result: FAILED. 1 passed; 1 failed;\n";
        assert_eq!(
            test_failures(out),
            [
                "failures:",
                "---- b stdout ----",
                "thread 'b' panicked at x.rs:1:1:",
                "boom",
                "failures:",
                "    b",
                "test result: FAILED. 1 passed; 1 failed;"
            ]
        );
        assert!(test_failures("test result: ok. 2 passed;\n").is_empty());
    }

    #[test]
    fn a_long_failure_section_keeps_its_start_and_end() {
        let mut out = "failures:\n".to_owned();
        for i in 0..100 {
            out.push_str(&format!("line {i}\n"));
        }
        let kept = test_failures(&out);
        assert_eq!(kept.len(), FAILURE_LINES + 1);
        assert_eq!(kept[0], "failures:");
        assert_eq!(kept.last().unwrap(), "line 99");
        assert!(kept.iter().any(|l| l.starts_with("[… ")));
    }

    #[test]
    fn a_stuck_binary_names_its_long_tests_then_the_dump() {
        let out = "running 3 tests\ntest a ... ok\n\
                   test b has been running for over 60 seconds\n";
        let dump = format!(
            "vm-test: b still running after 220 s; its processes:\n  PID STAT\n\
             {KERNEL_DUMP_MARK}\n[ 1.0] sysrq: Show Blocked State\n\
             [ 1.1] task:b state:D stack:0\n[ 1.2]  schedule+0x1/0x2\n\
             [ 1.3] NMI backtrace for cpu 1\n[ 1.4] RIP: 0010:halt+0x1/0x2\n"
        );
        assert_eq!(
            stuck(out, &dump),
            [
                "test b has been running for over 60 seconds",
                "vm-test: b still running after 220 s; its processes:",
                "  PID STAT",
                KERNEL_DUMP_MARK,
                "[ 1.1] task:b state:D stack:0",
                "[ 1.3] NMI backtrace for cpu 1",
                "[ 1.4] RIP: 0010:halt+0x1/0x2",
            ]
        );
    }

    #[test]
    fn a_stuck_guest_shows_where_it_was_and_what_the_kernel_said() {
        let log = "vm-test: running tcp\nrunning 8 tests\nvm-test: running softirq\n\
                       watchdog: BUG: soft lockup - CPU#1 stuck for 134s! [ksoftirqd/1:20]\n\
                       RIP: 0010:__do_softirq+0x9/0x2e0\nlast line\n";
        let kept = console(log);
        assert_eq!(kept[0], "it was running the softirq tests");
        assert!(kept.contains(&"kernel reports:".to_owned()));
        assert!(kept.iter().any(|l| l.contains("soft lockup")));
        assert!(kept.iter().any(|l| l.contains("RIP: 0010:__do_softirq")));
        assert_eq!(kept.last().unwrap(), "last line");
    }
}
