//! A tracer under test (kdiag-agent or a comparison tool) as a child
//! process: started, known to be attached, its output counted line by line
//! (never stored, so a fast tracer is not slowed by its reader), stopped
//! with SIGINT like a person would, killed if it does not stop.

use std::{
    io::{BufRead, BufReader, Read},
    path::Path,
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use super::probe::{self, BpfObjects};

/// The line bpftrace scripts print from BEGIN, which runs once every probe
/// is attached.
const BPFTRACE_READY: &str = "kdiag-bench-ready";

/// How long any tracer may take to attach before the benchmark gives up.
const ATTACH_LIMIT: Duration = Duration::from_secs(30);

/// How often SIGINT is repeated until a tracer exits. bpftrace 0.17 looks
/// at its SIGINT flag only when the signal interrupts its epoll_wait, so a
/// SIGINT handled just after a wait timed out is lost, and a script whose
/// probes print nothing then runs on (fixed in bpftrace 0.19). kdiag and
/// libbpf-tools take a repeat as the same request.
const SIGINT_REPEAT: Duration = Duration::from_secs(1);

/// How a tracer shows it is attached.
#[derive(Debug, Clone, Copy)]
pub(super) enum Ready {
    /// It prints a line containing this once attached.
    Line(&'static str),
    /// It holds an attached BPF program (a link or perf event fd). For
    /// libbpf-tools, whose header line sits in stdio's buffer when stdout is
    /// a pipe.
    Attached,
}

#[derive(Debug, Clone)]
pub(super) struct Tracer {
    pub label: String,
    pub argv: Vec<String>,
    pub ready: Ready,
}

impl Tracer {
    /// `kdiag-agent <args>`, with summaries only at exit (`-i 0`).
    pub(super) fn kdiag(agent: &Path, args: &[&str]) -> Self {
        let mut tracer = Self::kdiag_every(agent, 0, args);
        tracer.label = format!("kdiag-agent {}", args.join(" "));
        tracer
    }

    /// `kdiag-agent -i <interval> <args>`: summaries, agent_stats and the
    /// budget's decisions every `interval` seconds.
    pub(super) fn kdiag_every(agent: &Path, interval: u64, args: &[&str]) -> Self {
        let mut argv = vec![
            agent.display().to_string(),
            "-i".into(),
            interval.to_string(),
        ];
        argv.extend(args.iter().map(|a| a.to_string()));
        Self {
            label: format!("kdiag-agent -i {interval} {}", args.join(" ")),
            argv,
            ready: Ready::Line("\"type\":\"agent_start\""),
        }
    }

    /// A libbpf-tools program, as Debian installs it.
    pub(super) fn libbpf(tool: &str) -> Self {
        Self {
            label: format!("libbpf-tools {tool}"),
            argv: vec![format!("/usr/sbin/{tool}")],
            ready: Ready::Attached,
        }
    }

    /// A bpftrace script; a BEGIN probe announces that it is attached.
    pub(super) fn bpftrace(label: &str, script: &str) -> Self {
        Self {
            label: format!("bpftrace {label}"),
            argv: vec![
                "bpftrace".into(),
                "-e".into(),
                format!("BEGIN {{ printf(\"{BPFTRACE_READY}\\n\"); }} {script}"),
            ],
            ready: Ready::Line(BPFTRACE_READY),
        }
    }

    pub(super) fn command_line(&self) -> String {
        self.argv
            .iter()
            .map(|a| {
                if a.contains(' ') {
                    format!("'{a}'")
                } else {
                    a.clone()
                }
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Starts it and waits until it is attached.
    pub(super) fn start(&self) -> Result<Running> {
        let started = Instant::now();
        let mut child = Command::new(&self.argv[0])
            .args(&self.argv[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", self.command_line()))?;
        let pid = child.id();
        let lines = Arc::new(AtomicU64::new(0));
        let stats = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = mpsc::channel();
        let stdout = child.stdout.take().context("child stdout")?;
        let marker = match self.ready {
            Ready::Line(marker) => Some(marker),
            Ready::Attached => None,
        };
        let reader = {
            let (lines, stats) = (lines.clone(), stats.clone());
            thread::spawn(move || count_lines(stdout, marker, ready_tx, &lines, &stats))
        };
        let stderr = child.stderr.take().context("child stderr")?;
        let stderr_reader = thread::spawn(move || head_of(stderr));
        let mut running = Running {
            label: self.label.clone(),
            child,
            pid,
            lines,
            stats,
            reader: Some(reader),
            stderr: Some(stderr_reader),
            startup: Duration::ZERO,
        };
        let attached = match self.ready {
            Ready::Line(_) => ready_rx.recv_timeout(ATTACH_LIMIT).ok(),
            Ready::Attached => probe::poll(ATTACH_LIMIT, Duration::from_millis(1), || {
                if running.exited() {
                    return Some(None);
                }
                probe::bpf_objects(pid)
                    .ok()
                    .filter(|o| o.attached)
                    .map(|_| Some(Instant::now()))
            })
            .flatten(),
        };
        match attached {
            Some(at) => {
                running.startup = at - started;
                Ok(running)
            }
            None => {
                let stderr = running.kill_and_stderr();
                bail!(
                    "{} did not attach within {}s: {}",
                    self.command_line(),
                    ATTACH_LIMIT.as_secs(),
                    stderr.trim()
                )
            }
        }
    }
}

/// Counts stdout lines; reports the first one containing `marker`; keeps
/// kdiag's agent_stats lines, which carry its loss counters, and its budget
/// lines, in the order written.
fn count_lines(
    stdout: impl Read,
    marker: Option<&str>,
    ready: mpsc::Sender<Instant>,
    lines: &AtomicU64,
    stats: &Mutex<Vec<String>>,
) {
    let mut reader = BufReader::with_capacity(256 * 1024, stdout);
    let mut line = Vec::with_capacity(1024);
    let mut marker = marker;
    while reader.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
        lines.fetch_add(1, Ordering::Relaxed);
        if let Some(m) = marker
            && contains(&line, m.as_bytes())
        {
            let _ = ready.send(Instant::now());
            marker = None;
        }
        if (line.starts_with(b"{\"v\":1,\"type\":\"agent_stats\"")
            || line.starts_with(b"{\"v\":1,\"type\":\"budget\""))
            && let Ok(mut stats) = stats.lock()
        {
            stats.push(String::from_utf8_lossy(&line).into_owned());
        }
        line.clear();
    }
}

/// The first 64 KiB of a stream, read to its end so the writer never
/// blocks on a full pipe.
fn head_of(mut stream: impl Read) -> String {
    let mut head = Vec::new();
    let mut chunk = [0u8; 4096];
    while let Ok(n @ 1..) = stream.read(&mut chunk) {
        if head.len() < 64 * 1024 {
            head.extend_from_slice(&chunk[..n]);
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

pub(super) struct Running {
    pub label: String,
    child: Child,
    pub pid: u32,
    lines: Arc<AtomicU64>,
    stats: Arc<Mutex<Vec<String>>>,
    reader: Option<JoinHandle<()>>,
    stderr: Option<JoinHandle<String>>,
    /// From spawn to attached.
    pub startup: Duration,
}

/// What a stopped tracer leaves behind.
pub(super) struct Finished {
    /// kdiag's agent_stats lines, parsed.
    pub agent_stats: Vec<serde_json::Value>,
    /// kdiag's budget lines, each with the number of agent_stats lines
    /// before it: the interval whose cost it answered (1 = the first).
    pub budget: Vec<(usize, serde_json::Value)>,
}

impl Finished {
    /// The interval after which the budget first stepped down, if it did.
    pub(super) fn first_step_down(&self) -> Option<usize> {
        self.budget
            .iter()
            .find(|(_, b)| b.get("change").and_then(|c| c.as_str()) == Some("down"))
            .map(|(interval, _)| *interval)
    }

    /// The budget's step at exit.
    pub(super) fn last_step(&self) -> u64 {
        self.budget
            .last()
            .and_then(|(_, b)| b.get("step")?.as_u64())
            .unwrap_or(0)
    }

    /// Sum of a per-class counter (`events`, `dropped`, `lost`) over every
    /// agent_stats line and class.
    pub(super) fn class_total(&self, counter: &str) -> u64 {
        self.agent_stats
            .iter()
            .filter_map(|s| s.get("classes")?.as_object())
            .flat_map(|classes| classes.values())
            .filter_map(|c| c.get(counter)?.as_u64())
            .sum()
    }
}

impl Running {
    /// Output lines so far.
    pub(super) fn lines(&self) -> u64 {
        self.lines.load(Ordering::Relaxed)
    }

    pub(super) fn cpu_ns(&self) -> Result<u64> {
        probe::process_cpu_ns(self.pid)
    }

    pub(super) fn bpf(&self) -> Result<BpfObjects> {
        probe::bpf_objects(self.pid)
    }

    fn exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    pub(super) fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child, which we have not reaped yet.
        unsafe { libc::kill(self.pid as i32, sig) };
    }

    /// SIGINT (repeated, see [`SIGINT_REPEAT`]), then waits for it to write
    /// its last lines and exit.
    pub(super) fn stop(mut self) -> Result<Finished> {
        self.signal(libc::SIGINT);
        let mut signalled = Instant::now();
        let exited = probe::poll(Duration::from_secs(10), Duration::from_millis(5), || {
            if self.exited() {
                return Some(());
            }
            if signalled.elapsed() >= SIGINT_REPEAT {
                self.signal(libc::SIGINT);
                signalled = Instant::now();
            }
            None
        });
        if exited.is_none() {
            let stderr = self.kill_and_stderr();
            bail!("{} did not stop on SIGINT: {}", self.label, stderr.trim());
        }
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        let lines = self.stats.lock().map(|s| s.clone()).unwrap_or_default();
        let mut finished = Finished {
            agent_stats: Vec::new(),
            budget: Vec::new(),
        };
        for line in lines {
            let Ok(record) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            if record.get("type").and_then(|t| t.as_str()) == Some("budget") {
                finished.budget.push((finished.agent_stats.len(), record));
            } else {
                finished.agent_stats.push(record);
            }
        }
        Ok(finished)
    }

    fn kill_and_stderr(&mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.stderr
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // Stopped tracers have exited already; anything else (an error
        // half-way) must not outlive the benchmark.
        if !self.exited() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
