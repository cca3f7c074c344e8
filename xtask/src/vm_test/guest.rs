//! One guest run: write the plan, boot the kernel under QEMU, wait (bounded)
//! for it to power off, and read back what the guest wrote.
//!
//! The guest can only report through files in the results share, and the
//! host believes nothing else: a run counts only when the plan's final
//! marker carries this run's nonce and every planned step left an exit code.
//! A guest that panics, hangs, or stops early therefore always fails.

use std::{
    fs,
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, anyhow, bail, ensure};
use serde_json::Value;

use super::{excerpt, kernel::Kernel};
use crate::util::describe;

/// QEMU settings measured on the CI machines: their KVM has no vmx/svm, so
/// stock kernels only run under TCG. 2 vCPUs keep the tests' cross-CPU
/// cases; 512 MiB leaves room for the agent's BTF parse (about 22 MiB at
/// peak per agent) with several agents and test peers running at once.
///
/// `thread=single` runs both vCPUs on one host thread. With one thread per
/// vCPU (`thread=multi`), a vCPU can keep running its translation of code
/// another vCPU has just patched: attaching a tracepoint patches its site
/// through an int3, and the 6.1 guest was seen looping on that int3 in
/// `handle_softirqs` for over 300 s while the guest's memory there already
/// held the finished jump (the kernel's own `Code:` dump shows it), with
/// int3 oopses of the same kind on 6.12 and 7.3. One thread costs the
/// parallelism of two host cores, which the tests, mostly waiting on the
/// network and timers, barely use.
const QEMU_ARGS: &[&str] = &[
    "-accel",
    "tcg,thread=single",
    "-cpu",
    "max",
    "-smp",
    "2",
    "-m",
    "512",
    "-nodefaults",
    "-no-user-config",
    "-display",
    "none",
    "-serial",
    "stdio",
    "-no-reboot",
];

/// Size of the guest's scratch disk (a sparse file on the host, so it
/// costs only what the guest writes): room for the memory tests' sparse
/// files, which are 1.5 times the guest's memory at most.
const SCRATCH_BYTES: u64 = 4 << 30;

/// `panic=-1`: a kernel panic (e.g. init exiting) reboots at once, which
/// `-no-reboot` turns into QEMU exiting, instead of a hang until the timeout;
/// `softlockup_panic=1` makes a CPU stuck in the kernel such a panic.
/// `watchdog_thresh=60` (the largest) reports a CPU as stuck after 120 s,
/// not 20: an emulated CPU gets no time while the host is busy, and 5.10
/// once spent 22 s clearing pages for a reader that way on a loaded host.
/// `loglevel=5`: warnings and their backtraces (a soft lockup's, a
/// verifier WARN's) reach the console log, the boot's notices do not.
const KERNEL_CMDLINE: &str =
    "console=ttyS0 loglevel=5 softlockup_panic=1 watchdog_thresh=60 panic=-1";

/// How long one test binary may run in a guest: three times the slowest
/// one's time on a quiet host (retrans in 5.10, about 200 s, most of it
/// waiting for the kernel's retransmit timers), since a busy host slows the
/// emulated CPUs down; small enough that a stuck binary leaves the guest's
/// own timeout time to run the others.
const BINARY_LIMIT_SECS: u64 = 600;
/// How long before that limit a binary still running is examined.
const STUCK_DUMP_BEFORE_SECS: u64 = 20;
/// A guest whose console has been silent this long is stuck: every binary
/// prints its result when it ends or its limit ends it. Guests are judged
/// by this, not by their total time, which grows with whatever else runs
/// on the host (the emulated CPUs are threads of the host's); `--timeout`
/// only bounds the whole run.
const SILENT_LIMIT: Duration = Duration::from_secs(BINARY_LIMIT_SECS + 60);
/// The line in `<name>.stuck` between the processes and the kernel's log.
pub(super) const KERNEL_DUMP_MARK: &str = "vm-test: the kernel's blocked tasks and CPUs:";
/// `timeout`'s exit code when it ended the command.
pub(super) const TIMED_OUT: i32 = 124;

/// A test binary of kdiag-tests, as cargo built it on the host.
pub(super) struct TestBinary {
    /// The test target's name (`retrans` for tests/tests/retrans.rs).
    pub name: String,
    pub path: PathBuf,
}

/// What to run in the guest.
pub(super) struct Plan<'a> {
    pub series: &'a str,
    pub agent: &'a Path,
    /// The directory cargo runs the tests in (the kdiag-tests package).
    pub cwd: &'a Path,
    pub binaries: &'a [TestBinary],
    /// Arguments for every test binary (threads, filters).
    pub test_args: &'a [String],
    pub timeout: Duration,
}

/// What one guest run showed.
pub(super) struct Outcome {
    pub wall: Duration,
    /// The `agent_start` line of `kdiag-agent run` in the guest, or why
    /// there is none.
    pub probe: Result<Value, String>,
    pub binaries: Vec<BinaryOutcome>,
}

pub(super) struct BinaryOutcome {
    pub name: String,
    pub rc: i32,
    pub counts: Option<Counts>,
    /// `SKIP <test>: <reason>` lines, without the prefix.
    pub skips: Vec<String>,
    /// An excerpt of libtest's report of the failed tests.
    pub failures: Vec<String>,
    /// When it ran into its time limit: the tests libtest saw running long
    /// and the guest's state shortly before the limit.
    pub stuck: Vec<String>,
    pub secs: u64,
}

/// libtest's final `test result:` line.
#[derive(Default, Debug, PartialEq, Eq, Clone, Copy)]
pub(super) struct Counts {
    pub passed: u32,
    pub failed: u32,
    pub ignored: u32,
    pub filtered_out: u32,
}

impl Outcome {
    pub(super) fn ok(&self) -> bool {
        self.probe.is_ok()
            && self
                .binaries
                .iter()
                .all(|b| b.rc == 0 && b.counts.is_some_and(|c| c.failed == 0))
            && self.total().passed > 0
    }

    pub(super) fn total(&self) -> Counts {
        self.binaries
            .iter()
            .filter_map(|b| b.counts)
            .fold(Counts::default(), |a, c| Counts {
                passed: a.passed + c.passed,
                failed: a.failed + c.failed,
                ignored: a.ignored + c.ignored,
                filtered_out: a.filtered_out + c.filtered_out,
            })
    }

    pub(super) fn skips(&self) -> impl Iterator<Item = &str> {
        self.binaries
            .iter()
            .flat_map(|b| b.skips.iter().map(String::as_str))
    }
}

/// Boots `kernel` with `plan`; fails when the guest did not carry the plan
/// out to the end (its tests failing is reported in the [`Outcome`]).
pub(super) fn run(qemu: &Path, kernel: &Kernel, plan: &Plan, results: &Path) -> Result<Outcome> {
    if results.exists() {
        fs::remove_dir_all(results).with_context(|| format!("removing {}", results.display()))?;
    }
    fs::create_dir_all(results)?;
    let nonce = nonce();
    fs::write(results.join("run.sh"), script(plan, &nonce))?;
    // Next to the results share, not in it: the guest formats it itself.
    let scratch = results
        .parent()
        .context("results directory has no parent")?
        .join(format!("{}-scratch.img", plan.series));
    fs::File::create(&scratch)
        .and_then(|f| f.set_len(SCRATCH_BYTES))
        .with_context(|| format!("creating {}", scratch.display()))?;

    let mut cmd = Command::new(qemu);
    cmd.args(QEMU_ARGS)
        .arg("-kernel")
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(&kernel.initramfs)
        .args(["-append", KERNEL_CMDLINE])
        // The host's root, read-only: the guest runs the host's test
        // binaries, agent, ip, nft and bpftool from it.
        .args([
            "-virtfs",
            "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        ])
        .arg("-virtfs")
        .arg(format!(
            "local,path={},mount_tag=results,security_model=none,multidevs=remap",
            results.display()
        ))
        // cache=unsafe: the disk is scratch, thrown away after the run.
        .arg("-drive")
        .arg(format!(
            "file={},format=raw,if=virtio,cache=unsafe",
            scratch.display()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    eprintln!("vm-test: {}", describe(&cmd));
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("could not start {}", qemu.display()))?;
    let console = child.stdout.take().expect("piped stdout");
    let log_path = results.join("console.log");
    let mut log = fs::File::create(&log_path)?;
    let prefix = format!("[{}] ", plan.series);
    // When the console last printed, in milliseconds after `start`.
    let printed = Arc::new(AtomicU64::new(0));
    let echo = thread::spawn({
        let printed = printed.clone();
        move || {
            for line in BufReader::new(console).lines() {
                let Ok(line) = line else { break };
                printed.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
                let _ = writeln!(log, "{line}");
                eprintln!("{prefix}{line}");
            }
        }
    });
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        let silent = start
            .elapsed()
            .saturating_sub(Duration::from_millis(printed.load(Ordering::Relaxed)));
        let why = if silent >= SILENT_LIMIT {
            Some(format!("printed nothing for {}s", silent.as_secs()))
        } else if start.elapsed() >= plan.timeout {
            Some(format!("did not finish within {:?}", plan.timeout))
        } else {
            None
        };
        if let Some(why) = why {
            let _ = child.kill();
            let _ = child.wait();
            let _ = echo.join();
            bail!(
                "the {} guest {why}; console: {}\n{}",
                plan.series,
                log_path.display(),
                console_excerpt(&log_path)
            );
        }
        thread::sleep(Duration::from_millis(200));
    };
    let _ = echo.join();
    let wall = start.elapsed();
    let _ = fs::remove_file(&scratch);
    collect(results, plan, &nonce, wall, &kernel.release).map_err(|e| {
        anyhow!(
            "the {} guest (QEMU {status}): {e:#}; console: {}\n{}",
            plan.series,
            log_path.display(),
            console_excerpt(&log_path)
        )
    })
}

fn console_excerpt(log: &Path) -> String {
    let text = fs::read_to_string(log).unwrap_or_default();
    excerpt::console(&text)
        .iter()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Reads back what the guest wrote for the run with `nonce`.
fn collect(
    results: &Path,
    plan: &Plan,
    nonce: &str,
    wall: Duration,
    release: &str,
) -> Result<Outcome> {
    let done = fs::read_to_string(results.join("done")).unwrap_or_default();
    ensure!(
        done.trim() == nonce,
        "the guest stopped before the end of its plan"
    );
    let probe = probe(results, release).map_err(|e| format!("{e:#}"));
    let binaries = plan
        .binaries
        .iter()
        .map(|b| binary_outcome(results, &b.name))
        .collect::<Result<_>>()?;
    Ok(Outcome {
        wall,
        probe,
        binaries,
    })
}

/// The `agent_start` line of the guest's `kdiag-agent run` probe, which
/// must have exited 0 and seen the guest's kernel.
fn probe(results: &Path, release: &str) -> Result<Value> {
    let rc = read_rc(results, "probe")?;
    let stderr = fs::read_to_string(results.join("probe.stderr")).unwrap_or_default();
    ensure!(
        rc == 0,
        "kdiag-agent run in the guest exited with {rc}: {}",
        stderr.trim()
    );
    let stdout = fs::read_to_string(results.join("probe.jsonl"))?;
    let first = stdout.lines().next().unwrap_or_default();
    let start: Value = serde_json::from_str(first)
        .with_context(|| format!("the guest agent's first line is not JSON: {first:?}"))?;
    ensure!(
        start["type"] == "agent_start",
        "the guest agent's first line is not agent_start: {first}"
    );
    ensure!(
        start["kernel"] == release,
        "the guest agent reports kernel {}, expected {release}",
        start["kernel"]
    );
    Ok(start)
}

fn binary_outcome(results: &Path, name: &str) -> Result<BinaryOutcome> {
    let rc = read_rc(results, name)?;
    let out = fs::read_to_string(results.join(format!("{name}.out")))?;
    let secs = fs::read_to_string(results.join(format!("{name}.secs")))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    Ok(BinaryOutcome {
        name: name.to_owned(),
        rc,
        counts: out.lines().rev().find_map(parse_result_line),
        skips: out
            .lines()
            .filter_map(|l| l.strip_prefix("SKIP "))
            .map(str::to_owned)
            .collect(),
        failures: excerpt::test_failures(&out),
        stuck: match rc {
            TIMED_OUT => excerpt::stuck(
                &out,
                &fs::read_to_string(results.join(format!("{name}.stuck"))).unwrap_or_default(),
            ),
            _ => Vec::new(),
        },
        secs,
    })
}

fn read_rc(results: &Path, name: &str) -> Result<i32> {
    let path = results.join(format!("{name}.rc"));
    let text = fs::read_to_string(&path)
        .with_context(|| format!("the guest wrote no exit code for {name}"))?;
    text.trim()
        .parse()
        .with_context(|| format!("bad exit code in {}: {text:?}", path.display()))
}

/// Parses `test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 2
/// filtered out; finished in 1.23s`.
fn parse_result_line(line: &str) -> Option<Counts> {
    let rest = line.trim().strip_prefix("test result: ")?;
    let mut counts = Counts::default();
    for part in rest.split(';') {
        let mut words = part.split_whitespace().rev();
        let (Some(label), Some(n)) = (words.next(), words.next()) else {
            continue;
        };
        let (n, label) = match label {
            "out" => (words.next(), "filtered"),
            _ => (Some(n), label),
        };
        let Some(n) = n.and_then(|n| n.parse().ok()) else {
            continue;
        };
        match label {
            "passed" => counts.passed = n,
            "failed" => counts.failed = n,
            "ignored" => counts.ignored = n,
            "filtered" => counts.filtered_out = n,
            _ => {}
        }
    }
    Some(counts)
}

/// The guest's plan, run by the init script inside the guest (busybox sh).
/// Everything the host later reads comes from here.
fn script(plan: &Plan, nonce: &str) -> String {
    let env = [
        "/usr/bin/env".to_owned(),
        "-i".to_owned(),
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_owned(),
        "HOME=/root".to_owned(),
        // The host's /tmp is visible but read-only in the guest; the scratch
        // disk is writable (see init.sh).
        "TMPDIR=/var/tmp".to_owned(),
        "RUST_BACKTRACE=1".to_owned(),
        format!("KDIAG_AGENT={}", plan.agent.display()),
        // Lets tests skip (by name, counted) what this guest cannot provide.
        format!("KDIAG_VM_KERNEL={}", plan.series),
    ]
    .map(|a| quote(&a))
    .join(" ");
    let cwd = quote(&plan.cwd.display().to_string());
    let mut s = format!(
        "# Written by `cargo xtask vm-test` for one guest run.\n\
         R=/results\n\
         run_in_host() {{ chroot /host {env} /bin/sh -c 'cd \"$0\" && exec \"$@\"' {cwd} \"$@\"; }}\n\
         echo 'vm-test: probe: kdiag-agent run --duration 2'\n\
         run_in_host {agent} run --duration 2 > $R/probe.jsonl 2> $R/probe.stderr\n\
         echo $? > $R/probe.rc\n",
        agent = quote(&plan.agent.display().to_string()),
    );
    let args: String = plan
        .test_args
        .iter()
        .map(|a| format!(" {}", quote(a)))
        .collect();
    // A binary still running shortly before its limit leaves its processes
    // and the kernel's blocked tasks and CPU backtraces in `<name>.stuck`,
    // then `timeout` ends it, so one stuck test costs its binary, not the
    // guest, and says where it was stuck.
    s.push_str(&format!(
        "stuck() {{\n\
         \x20   {{ echo \"vm-test: $1 still running after {dump} s; its processes:\"\n\
         \x20     run_in_host ps --ppid 2 -p 2 --deselect -o pid,ppid,stat,wchan:32,etime,args\n\
         \x20     echo {mark}\n\
         \x20     echo 1 > /proc/sys/kernel/sysrq\n\
         \x20     echo w > /proc/sysrq-trigger; echo l > /proc/sysrq-trigger; sleep 1\n\
         \x20     dmesg | tail -n 200; }} > $R/$1.stuck 2>&1\n\
         }}\n",
        dump = BINARY_LIMIT_SECS - STUCK_DUMP_BEFORE_SECS,
        mark = quote(KERNEL_DUMP_MARK),
    ));
    for bin in plan.binaries {
        let name = &bin.name;
        s.push_str(&format!(
            "echo 'vm-test: running {name}'\n\
             t0=$(date +%s)\n\
             ( sleep {dump}; stuck {name} ) & wd=$!\n\
             {{ run_in_host timeout -k 10 {limit} {path}{args}; echo $? > $R/{name}.rc; }} 2>&1 | tee $R/{name}.out\n\
             kill $wd 2>/dev/null\n\
             echo $(( $(date +%s) - t0 )) > $R/{name}.secs\n",
            path = quote(&bin.path.display().to_string()),
            limit = BINARY_LIMIT_SECS,
            dump = BINARY_LIMIT_SECS - STUCK_DUMP_BEFORE_SECS,
        ));
    }
    s.push_str(&format!("echo {nonce} > $R/done\n"));
    s
}

/// Single-quotes `s` for sh.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Unique per run, so a results directory left over from an earlier run
/// can never pass for this one.
fn nonce() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    format!("{}-{}", now.as_nanos(), std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A results directory as a guest leaves it, removed on drop.
    struct Results(PathBuf);

    impl Results {
        fn new(tag: &str) -> Results {
            let dir = std::env::temp_dir().join(format!("vm-test-{tag}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            Results(dir)
        }

        fn write(&self, name: &str, text: &str) -> &Results {
            fs::write(self.0.join(name), text).unwrap();
            self
        }

        /// A complete run: the probe, one binary with `out` and `rc`, the
        /// marker with nonce "n1".
        fn complete(tag: &str, out: &str, rc: &str) -> Results {
            let r = Results::new(tag);
            r.write("probe.rc", "0\n")
                .write("probe.jsonl", r#"{"type":"agent_start","kernel":"6.1.0"}"#)
                .write("t.out", out)
                .write("t.rc", rc)
                .write("done", "n1\n");
            r
        }
    }

    impl Drop for Results {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn collect_in(r: &Results, nonce: &str) -> Result<Outcome> {
        let binaries = [TestBinary {
            name: "t".into(),
            path: "/t".into(),
        }];
        let plan = Plan {
            series: "6.1",
            agent: Path::new("/a"),
            cwd: Path::new("/"),
            binaries: &binaries,
            test_args: &[],
            timeout: Duration::ZERO,
        };
        collect(&r.0, &plan, nonce, Duration::ZERO, "6.1.0")
    }

    const PASSED: &str = "SKIP t::x: no disk (kernel 6.1)\n\
                          test result: ok. 2 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out\n";

    #[test]
    fn a_complete_passing_run_is_ok() {
        let r = Results::complete("ok", PASSED, "0\n");
        let outcome = collect_in(&r, "n1").unwrap();
        assert!(outcome.ok());
        assert_eq!(outcome.total().passed, 2);
        assert_eq!(
            outcome.skips().collect::<Vec<_>>(),
            ["t::x: no disk (kernel 6.1)"]
        );
    }

    #[test]
    fn a_run_that_did_not_happen_never_passes() {
        // Results of an earlier run (another nonce).
        let r = Results::complete("stale", PASSED, "0\n");
        assert!(collect_in(&r, "n2").is_err());
        // The guest stopped before the end.
        let r = Results::complete("early", PASSED, "0\n");
        fs::remove_file(r.0.join("done")).unwrap();
        assert!(collect_in(&r, "n1").is_err());
        // A planned binary left no exit code.
        let r = Results::complete("norc", PASSED, "0\n");
        fs::remove_file(r.0.join("t.rc")).unwrap();
        assert!(collect_in(&r, "n1").is_err());
    }

    #[test]
    fn a_failed_agent_probe_is_not_ok() {
        let r = Results::complete("probe", PASSED, "0\n");
        r.write("probe.rc", "1\n");
        assert!(!collect_in(&r, "n1").unwrap().ok());
        let r = Results::complete("kernel", PASSED, "0\n");
        r.write("probe.jsonl", r#"{"type":"agent_start","kernel":"6.18"}"#);
        assert!(!collect_in(&r, "n1").unwrap().ok());
    }

    #[test]
    fn failing_or_empty_test_runs_are_not_ok() {
        for (tag, out, rc) in [
            ("rc", PASSED, "101"),
            (
                "failed",
                "test result: FAILED. 1 passed; 1 failed; 0 ignored;\n",
                "0",
            ),
            (
                "none",
                "test result: ok. 0 passed; 0 failed; 0 ignored;\n",
                "0",
            ),
            ("noline", "running 2 tests\n", "0"),
        ] {
            let r = Results::complete(tag, out, rc);
            assert!(!collect_in(&r, "n1").unwrap().ok(), "{tag}");
        }
    }

    #[test]
    fn parses_libtest_result_lines() {
        let line = "test result: FAILED. 3 passed; 1 failed; 2 ignored; 0 measured; \
                    5 filtered out; finished in 12.34s";
        assert_eq!(
            parse_result_line(line),
            Some(Counts {
                passed: 3,
                failed: 1,
                ignored: 2,
                filtered_out: 5
            })
        );
        assert_eq!(parse_result_line("running 3 tests"), None);
    }

    #[test]
    fn quotes_for_sh() {
        assert_eq!(quote("a b"), "'a b'");
        assert_eq!(quote("it's"), r"'it'\''s'");
    }
}
