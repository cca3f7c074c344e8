//! Runs the agent under test and reads its JSON Lines.

use std::cell::{Cell, RefCell};
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::identity::{self, Identity};
use crate::lines::LineLog;
use crate::record::{self, assert_envelope};
use crate::{bpf, cmd, env, max_wait};

/// How long the agent may take to exit after being asked to, on a real
/// host.
const EXIT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the agent may take to exit after being asked to, here
/// ([`EXIT_TIMEOUT`] on a real host).
pub fn exit_timeout() -> Duration {
    crate::on_this_machine(EXIT_TIMEOUT)
}

/// How long the kernel may take to free the agent's programs after it exits.
const UNLOAD_TIMEOUT: Duration = Duration::from_millis(1500);

/// A running `$KDIAG_AGENT <args>` (or its shared copy, run as another
/// identity); killed in Drop if still running.
pub struct Agent {
    // Cells so that `fail` (on &self) can still collect the exit status of
    // an agent that died, which is most of the diagnosis.
    child: RefCell<Child>,
    pid: u32,
    path: PathBuf,
    /// Who it runs as, for messages.
    who: String,
    args: Vec<String>,
    stdout: LineLog,
    stderr: LineLog,
    status: Cell<Option<ExitStatus>>,
    /// Ids of the kdiag programs it held once started (see `wait_start`).
    programs: BTreeSet<u32>,
}

impl Agent {
    /// Runs `$KDIAG_AGENT args…` as root, as the tests do unless they say
    /// otherwise.
    pub fn spawn(args: &[&str]) -> Agent {
        let path = env::agent_path();
        Agent::spawn_command(Command::new(&path), path, "root".to_owned(), args)
    }

    /// Runs the agent as `who` (another user, or fewer capabilities): a copy
    /// every user can reach (`identity::shared_agent`), since the built
    /// agent may be in a checkout only root can enter.
    pub fn spawn_as(who: &Identity, args: &[&str]) -> Agent {
        let copy = identity::shared_agent();
        let command = who.command(copy);
        Agent::spawn_command(command, copy.path().to_owned(), who.to_string(), args)
    }

    fn spawn_command(mut command: Command, path: PathBuf, who: String, args: &[&str]) -> Agent {
        // The CPU budget sheds detail by how busy the machine is, which no
        // test controls: a test sees full detail unless it sets a budget.
        if !args.iter().any(|a| a.starts_with("--max-cpu")) {
            command.args(["--max-cpu", "0"]);
        }
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {} {args:?} as {who}: {e}", path.display()));
        Agent {
            stdout: LineLog::spawn(child.stdout.take().expect("piped stdout")),
            stderr: LineLog::spawn(child.stderr.take().expect("piped stderr")),
            pid: child.id(),
            child: RefCell::new(child),
            path,
            who,
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            status: Cell::new(None),
            programs: BTreeSet::new(),
        }
    }

    /// Spawns the agent on `args`, waits for its `agent_start` and checks
    /// that every tracepoint of `needs` ("group/name") is attached.
    pub fn start(args: &[&str], needs: &[&str]) -> (Agent, Value) {
        Agent::spawn(args).started(needs)
    }

    /// [`Agent::start`], checking that `agent_start` says each of the
    /// `tracepoints` (which have a BTF tracepoint entry) attached as `args`
    /// ask: as a classic tracepoint under `--attach classic`, else as a BTF
    /// tracepoint, which every kernel the agent supports has (5.5+ built
    /// with BTF, as the distributions' kernels are).
    pub fn start_attached(args: &[&str], tracepoints: &[&str]) -> (Agent, Value) {
        let (agent, start) = Agent::start(args, tracepoints);
        let how = if args.windows(2).any(|w| w == ["--attach", "classic"]) {
            "tracepoint"
        } else {
            "tp_btf"
        };
        for tp in tracepoints {
            assert_eq!(start["attached_as"][tp], how, "{tp} in {start}");
        }
        (agent, start)
    }

    /// [`Agent::start`] through `wrapper`: a command that ends by running
    /// its arguments (the agent and `args`) in its own place, with `exec`
    /// (e.g. in a mount namespace of its own), so that the agent keeps its
    /// pid.
    pub fn start_wrapped(wrapper: &[&str], args: &[&str], needs: &[&str]) -> (Agent, Value) {
        let path = env::agent_path();
        let mut command = Command::new(wrapper[0]);
        command.args(&wrapper[1..]).arg(&path);
        Agent::spawn_command(command, path, "root".to_owned(), args).started(needs)
    }

    /// [`Agent::start`], unless the agent refuses `args` with a usage error
    /// (exit 2) before writing anything: then its stderr, for the test to
    /// tell a kernel that cannot do what `args` ask from a bug.
    pub fn start_or_refusal(args: &[&str], needs: &[&str]) -> Result<(Agent, Value), String> {
        let mut agent = Agent::spawn(args);
        if agent
            .stdout
            .wait(max_wait(), |lines| lines.first().cloned())
            .is_err()
        {
            let status = agent.wait_exit(exit_timeout());
            if status.code() == Some(2) && agent.records().is_empty() {
                return Err(agent.stderr());
            }
            agent.fail(&format!("exited ({status}) without a first line"));
        }
        Ok(agent.started(needs))
    }

    fn started(mut self, needs: &[&str]) -> (Agent, Value) {
        let start = self.wait_start();
        let attached = start["attached"].as_array().expect("checked by wait_start");
        for tracepoint in needs {
            if !attached.iter().any(|a| a == tracepoint) {
                self.fail(&format!("{tracepoint} not attached: {start}"));
            }
        }
        (self, start)
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Checks that `start` (this agent's `agent_start`) reports nothing
    /// degraded but what this kernel cannot give, as seen from outside the
    /// agent, and that it does report that: where the kernel does not count
    /// recursion misses of the tracepoint programs the agent holds (before
    /// 6.7), `bpf/recursion_misses`; where the agent attached `skb/kfree_skb`
    /// and the kernel gives no drop reasons (before 5.17),
    /// `tracepoint/skb/kfree_skb.reason`. In any order.
    pub fn assert_only_kernel_limits(&self, start: &Value) {
        let mut limits = Vec::new();
        if bpf::counts_recursion_misses(self.pid) == Some(false) {
            limits.push("bpf/recursion_misses");
        }
        let attached = start["attached"].as_array();
        if attached.is_some_and(|a| a.iter().any(|tp| tp == "skb/kfree_skb"))
            && !bpf::kernel_gives_drop_reasons()
        {
            limits.push("tracepoint/skb/kfree_skb.reason");
        }
        limits.sort_unstable();
        let mut degraded: Vec<&str> = start["degraded"]
            .as_array()
            .unwrap_or_else(|| self.fail(&format!("no degraded list in {start}")))
            .iter()
            .map(|d| d["what"].as_str().unwrap_or_default())
            .collect();
        degraded.sort_unstable();
        if degraded != limits {
            self.fail(&format!(
                "degraded {degraded:?}, where this kernel lacks {limits:?}: {start}"
            ));
        }
    }

    /// Runs the agent as root with `args` to its exit, which must come
    /// before it writes any record (usage errors); returns the exit code
    /// and stderr.
    pub fn run_to_exit(args: &[&str]) -> (i32, String) {
        Agent::spawn(args).exit_before_records()
    }

    /// `run_to_exit` as `who` (e.g. missing privileges).
    pub fn run_to_exit_as(who: &Identity, args: &[&str]) -> (i32, String) {
        Agent::spawn_as(who, args).exit_before_records()
    }

    fn exit_before_records(mut self) -> (i32, String) {
        let status = self.wait_exit(exit_timeout());
        let Some(code) = status.code() else {
            self.fail(&format!("killed by a signal ({status}) instead of exiting"));
        };
        if !self.records().is_empty() {
            self.fail("printed records although it must not start");
        }
        (code, self.stderr())
    }

    /// Waits for the first line, which must be `agent_start`, checks it
    /// against the contract, and records which kdiag programs the agent
    /// holds (for `assert_programs_released`). Panics showing the agent's
    /// stderr otherwise.
    pub fn wait_start(&mut self) -> Value {
        let first = self.wait_first_line();
        let start: Value = serde_json::from_str(&first)
            .unwrap_or_else(|e| self.fail(&format!("first line is not JSON ({e}): {first}")));
        if !record::is_type(&start, "agent_start") {
            self.fail(&format!("first line is not agent_start: {first}"));
        }
        assert_envelope(&start);
        assert_eq!(record::str_field(&start, "version"), "0.1.0", "in {start}");
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("osrelease");
        assert_eq!(
            record::str_field(&start, "kernel"),
            release.trim(),
            "in {start}"
        );
        let transport = record::str_field(&start, "transport");
        assert!(
            ["ringbuf", "perf"].contains(&transport),
            "bad transport in {start}"
        );
        for key in ["attached", "degraded"] {
            assert!(
                start.get(key).is_some_and(Value::is_array),
                "{key:?} is not an array in {start}"
            );
        }
        // Says how each attached tracepoint is attached, and nothing else.
        let attached_as = start["attached_as"]
            .as_object()
            .unwrap_or_else(|| self.fail(&format!("no attached_as object in {start}")));
        let attached: BTreeSet<&str> = start["attached"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        let described: BTreeSet<&str> = attached_as.keys().map(String::as_str).collect();
        assert_eq!(described, attached, "attached_as vs attached in {start}");
        for (tp, how) in attached_as {
            // tcp_destroy_sock is the one raw tracepoint program.
            let expected: &[&str] = if tp == "tcp/tcp_destroy_sock" {
                &["raw_tracepoint"]
            } else {
                &["tp_btf", "tracepoint"]
            };
            assert!(
                how.as_str().is_some_and(|h| expected.contains(&h)),
                "{tp} attached as {how} in {start}"
            );
        }
        self.record_programs();
        start
    }

    /// `wait_start` for `-o text`: the first line must be a `#` comment
    /// saying what was attached; returns it.
    pub fn wait_start_text(&mut self) -> String {
        let first = self.wait_first_line();
        if !(first.starts_with('#') && first.contains("attached")) {
            self.fail(&format!(
                "first line is not a `# ... attached ...` comment: {first}"
            ));
        }
        self.record_programs();
        first
    }

    fn wait_first_line(&self) -> String {
        self.stdout
            .wait(max_wait(), |lines| lines.first().cloned())
            .unwrap_or_else(|ended| self.fail(&format!("no first line ({ended:?})")))
    }

    fn record_programs(&mut self) {
        let held = bpf::program_ids_held_by(self.pid());
        let loaded = bpf::loaded_programs();
        let kdiag: BTreeSet<u32> = loaded
            .iter()
            .filter(|(id, name)| held.contains(id) && bpf::is_kdiag_program(name))
            .map(|(id, _)| *id)
            .collect();
        if !kdiag.is_empty() {
            self.programs = kdiag;
            return;
        }
        // Held, then gone before bpftool listed them: the agent released
        // them in between, as one started with a short --duration can (the
        // listing takes seconds in an emulated guest). They are still the
        // programs that must be unloaded at the end.
        let released = !held.is_empty() && !loaded.iter().any(|(id, _)| held.contains(id));
        if released {
            self.programs = held;
            return;
        }
        self.fail(&format!(
            "agent started but holds no kdiag BPF program (it holds ids {held:?}; loaded: {loaded:?})"
        ));
    }

    /// The first line matching `pred`, waiting up to `timeout`; panics with
    /// `what` and the agent's output if none comes (or the agent exits).
    pub fn wait_for(&self, what: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        self.wait_for_n(what, 1, timeout, pred).remove(0)
    }

    /// The first `n` lines matching `pred`, waiting up to `timeout`.
    pub fn wait_for_n(
        &self,
        what: &str,
        n: usize,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Vec<Value> {
        self.wait_matching(what, n, None, timeout, pred)
    }

    /// Like [`Agent::wait_for_n`], but also returns fewer once `quiet`
    /// `agent_stats` records have come since the last match (or since the
    /// call, before any): for records the kernel may never cause, such as
    /// the `tcp_conn` of a socket whose every change it skipped, so that the
    /// test accounts for the shortfall instead of timing out on it.
    pub fn wait_for_up_to_n(
        &self,
        what: &str,
        n: usize,
        quiet: usize,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Vec<Value> {
        self.wait_matching(what, n, Some(quiet), timeout, pred)
    }

    fn wait_matching(
        &self,
        what: &str,
        n: usize,
        quiet: Option<usize>,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Vec<Value> {
        // Only the lines new since the last look are parsed: parsing every
        // line at each wakeup is quadratic, and under churn (tens of
        // thousands of records arriving in small batches) it alone outlasts
        // the timeout.
        let mut parsed = 0;
        let mut matching = Vec::with_capacity(n);
        // Quiet counts only the `agent_stats` written after the call.
        let at_call = self.stdout.lines().len();
        let mut stats_since_match = 0;
        let found = self.stdout.wait(timeout, |lines| {
            let first = parsed;
            parsed = lines.len();
            match parse_all(&lines[first..]) {
                Ok(recs) => {
                    for (line, rec) in (first..).zip(recs) {
                        if matching.len() == n {
                            break;
                        }
                        if pred(&rec) {
                            matching.push(rec);
                            stats_since_match = 0;
                        } else if line >= at_call && record::is_type(&rec, "agent_stats") {
                            stats_since_match += 1;
                        }
                    }
                    let done = matching.len() == n || quiet.is_some_and(|q| stats_since_match >= q);
                    done.then(|| Ok(std::mem::take(&mut matching)))
                }
                Err(bad) => Some(Err(bad)),
            }
        });
        match found {
            Ok(Ok(recs)) => recs,
            Ok(Err(bad)) => self.fail(&bad),
            Err(ended) => self.fail(&format!("waiting for {what}: {ended:?}")),
        }
    }

    /// The first `n` raw lines (for `-o text`) matching `pred`, waiting up
    /// to `timeout`.
    pub fn wait_for_lines(
        &self,
        what: &str,
        n: usize,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Vec<String> {
        self.stdout
            .wait(timeout, |lines| {
                let matching: Vec<String> =
                    lines.iter().filter(|l| pred(l)).take(n).cloned().collect();
                (matching.len() == n).then_some(matching)
            })
            .unwrap_or_else(|ended| self.fail(&format!("waiting for {what}: {ended:?}")))
    }

    /// All lines so far, parsed; panics on a line that is not JSON.
    pub fn records(&self) -> Vec<Value> {
        parse_all(&self.stdout.lines()).unwrap_or_else(|bad| self.fail(&bad))
    }

    /// All lines so far, as text.
    pub fn lines(&self) -> Vec<String> {
        self.stdout.lines()
    }

    /// Sends `signal` to the agent.
    pub fn signal(&self, signal: libc::c_int) {
        assert!(self.status.get().is_none(), "agent already exited");
        let pid = libc::pid_t::try_from(self.pid()).expect("pid fits pid_t");
        // SAFETY: kill has no memory-safety preconditions; the child is not
        // reaped yet (status is None), so the pid still names it.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(
            rc,
            0,
            "kill({pid}, {signal}): {}",
            std::io::Error::last_os_error()
        );
    }

    /// SIGINT, then waits for the exit: returns the status and all lines.
    pub fn stop(&mut self) -> (ExitStatus, Vec<Value>) {
        self.stop_with(libc::SIGINT)
    }

    /// Events the kernel skipped instead of running the agent's programs
    /// named `programs` (full names, e.g. "softirq_entry") on them, summed
    /// (see `bpf::recursion_misses`); the agent cannot count those itself.
    /// Read it while the agent runs: its programs go when it exits.
    pub fn recursion_misses(&self, programs: &[&str]) -> u64 {
        assert!(self.status.get().is_none(), "agent already exited");
        assert!(
            !self.programs.is_empty(),
            "wait_start was not called: no programs recorded"
        );
        let ids: BTreeSet<u32> = bpf::kdiag_programs_among(&self.programs)
            .into_iter()
            .filter(|(_, shown)| programs.iter().any(|p| bpf::is_entry_of(p, shown)))
            .map(|(id, _)| id)
            .collect();
        if ids.is_empty() {
            self.fail(&format!("holds none of the programs {programs:?}"));
        }
        bpf::recursion_misses(&ids)
    }

    /// The kernel's own run time of the agent's programs (see
    /// `bpf::kernel_run_time_ns`): it grows only while the kernel's BPF
    /// statistics are on. Read it while the agent runs.
    pub fn kernel_run_time_ns(&self) -> u64 {
        assert!(self.status.get().is_none(), "agent already exited");
        assert!(
            !self.programs.is_empty(),
            "wait_start was not called: no programs recorded"
        );
        bpf::kernel_run_time_ns(&self.programs)
    }

    /// SIGINT, then checks the exit: status 0, every line with the
    /// envelope, the last one the final `agent_stats`. Returns all lines.
    pub fn stop_ok(&mut self) -> Vec<Value> {
        let (status, recs) = self.stop();
        self.check_exit_ok(status);
        recs.iter().for_each(assert_envelope);
        if !recs
            .last()
            .is_some_and(|r| record::is_type(r, "agent_stats"))
        {
            self.fail("last line is not agent_stats");
        }
        recs
    }

    /// Sends `signal` and waits for the exit: returns the status and all
    /// lines.
    pub fn stop_with(&mut self, signal: libc::c_int) -> (ExitStatus, Vec<Value>) {
        let status = self.terminate(signal);
        (status, self.records())
    }

    /// `stop_ok` for `-o text`: SIGINT, then checks the agent exits 0;
    /// returns all lines.
    pub fn stop_text_ok(&mut self) -> Vec<String> {
        let status = self.terminate(libc::SIGINT);
        self.check_exit_ok(status);
        self.lines()
    }

    fn check_exit_ok(&self, status: ExitStatus) {
        if status.code() != Some(0) {
            self.fail(&format!("exit status {status} after SIGINT, expected 0"));
        }
    }

    fn terminate(&mut self, signal: libc::c_int) -> ExitStatus {
        self.signal(signal);
        self.wait_exit(exit_timeout())
    }

    /// Waits for the agent to exit on its own; panics after `timeout`. All of
    /// its output has been read when this returns.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let Some(status) = self.poll_exit(timeout) else {
            self.fail(&format!("did not exit within {timeout:?}"));
        };
        // The pipes reach EOF right after the exit (unless closed by us).
        self.stdout.wait_eof(Duration::from_secs(2));
        self.stderr.wait_eof(Duration::from_secs(2));
        status
    }

    /// The exit status, waiting up to `timeout` for it; None while running.
    fn poll_exit(&self, timeout: Duration) -> Option<ExitStatus> {
        if self.status.get().is_none() {
            self.status
                .set(cmd::wait_timeout(&mut self.child.borrow_mut(), timeout));
        }
        self.status.get()
    }

    /// Closes our end of the agent's stdout, as a consumer that goes away
    /// (`kdiag-agent … | head -1`) does.
    pub fn close_stdout(&self) {
        self.stdout.close();
    }

    pub fn stderr(&self) -> String {
        self.stderr.text()
    }

    /// After the exit: waits briefly until none of the kdiag programs the
    /// agent held (recorded by `wait_start`) is loaded any more.
    pub fn assert_programs_released(&self) {
        assert!(self.status.get().is_some(), "agent still running");
        assert!(
            !self.programs.is_empty(),
            "wait_start was not called: no programs recorded"
        );
        bpf::assert_unloaded(&self.programs, UNLOAD_TIMEOUT);
    }

    /// Panics with `msg` and everything known about the agent.
    pub fn fail(&self, msg: &str) -> ! {
        // A failed wait often means the agent died: give it a moment to be
        // reaped so the status is part of the message.
        self.poll_exit(Duration::from_millis(300));
        let threads = if self.status.get().is_none() {
            threads_state(self.pid())
        } else {
            String::new()
        };
        panic!(
            "{msg}\nagent: {} {}\nas: {}\npid: {}, exit: {:?}\n{threads}--- stdout ---\n{}\n--- stderr ---\n{}",
            self.path.display(),
            self.args.join(" "),
            self.who,
            self.pid(),
            self.status.get(),
            self.stdout.text(),
            self.stderr.text()
        )
    }
}

/// Where each thread of a running agent is, for a failed wait on it: its
/// name, state and CPU time (from /proc/PID/task/TID/stat, in clock ticks),
/// wait channel and kernel stack.
fn threads_state(pid: u32) -> String {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return String::new();
    };
    let mut out =
        String::from("--- threads (name, state, utime, stime; wchan; kernel stack) ---\n");
    for task in tasks.filter_map(Result::ok) {
        let dir = task.path();
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
        let stat = read("stat");
        // After the parenthesised name: state is field 3, utime and stime
        // fields 14 and 15.
        let (name, rest) = stat.rsplit_once(") ").unwrap_or((&stat, ""));
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let field = |i: usize| fields.get(i - 3).copied().unwrap_or("?");
        out += &format!(
            "{}) {} {} {}; {}\n{}",
            name,
            field(3),
            field(14),
            field(15),
            read("wchan"),
            read("stack")
        );
    }
    out
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.status.get().is_none() {
            let child = self.child.get_mut();
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn parse_all(lines: &[String]) -> Result<Vec<Value>, String> {
    lines
        .iter()
        .map(|l| {
            serde_json::from_str(l).map_err(|e| format!("agent printed a non-JSON line ({e}): {l}"))
        })
        .collect()
}
