//! `cargo xtask bench [--quick]`: kdiag against libbpf-tools and bpftrace
//! under loads the benchmark generates itself. Each tracer is measured
//! alone under the same load, several runs interleaved; the result is one
//! table of medians with min-max, printed and written into
//! docs/BENCHMARKS.md with the machine and the exact commands.
//!
//! Kernel cost comes from the kernel's BPF statistics (run_time_ns /
//! run_cnt per program, enabled for the benchmark's life and restored
//! after), CPU time from /proc, memory from /proc/PID/status and the maps'
//! fdinfo.

mod load;
mod probe;
mod report;
mod scenarios;
mod tracer;

pub(crate) use self::load::hold;

use std::{
    collections::BTreeMap,
    fs,
    path::Path,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use self::{
    load::{Churn, Held, IperfServer, Load},
    probe::Sysctl,
    report::{Rows, Unit},
    scenarios::{Comparison, SCENARIOS},
    tracer::{Running, Tracer},
};
use crate::{build, setup, util};

/// Binaries the benchmark runs, with the Debian package providing each.
const BENCH_TOOLS: &[(&str, &str)] = &[
    ("softirqs", "libbpf-tools"),
    ("bpftrace", "bpftrace"),
    ("iperf3", "iperf3"),
];

/// Between a tracer reporting attached and the start of a measurement:
/// lets it finish whatever it does once at start (kdiag resolves existing
/// sockets from /proc).
const SETTLE: Duration = Duration::from_millis(300);

const MIB: f64 = 1024.0 * 1024.0;

/// Where the table goes, between these markers; the rest of the file is
/// prose kept as it is.
const DOC: &str = "docs/BENCHMARKS.md";
const BEGIN: &str = "<!-- cargo xtask bench: begin -->";
const END: &str = "<!-- cargo xtask bench: end -->";

/// How much of everything: `--quick` for routine use, the full run for
/// figures to publish.
struct Plan {
    quick: bool,
    /// Interleaved rounds of the per-event and per-record measurements.
    rounds: usize,
    /// Seconds each tracer is measured for its kernel cost. BPF run time is
    /// counted in ns, so a short window only sees fewer events: thousands a
    /// second under churn and bulk, a few hundred under retransmits.
    cost_window_secs: u64,
    /// Seconds each tracer is measured where CPU time is read from /proc,
    /// in 10 ms ticks (overhead, per record).
    window_secs: u64,
    /// Rounds of (no tracer, kdiag, libbpf-tools) under bulk load.
    pairs: usize,
    /// Seconds of bulk load per round of kdiag `run` with its default
    /// budget: long enough for it to step down and see the result.
    budget_window_secs: u64,
    startup_runs: usize,
    held_connections: usize,
}

impl Plan {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                quick,
                rounds: 3,
                cost_window_secs: 1,
                window_secs: 2,
                pairs: 5,
                budget_window_secs: 8,
                startup_runs: 3,
                held_connections: 100_000,
            }
        } else {
            Self {
                quick,
                rounds: 5,
                cost_window_secs: 5,
                window_secs: 5,
                pairs: 7,
                budget_window_secs: 15,
                startup_runs: 7,
                held_connections: 100_000,
            }
        }
    }

    fn cost_window(&self) -> Duration {
        Duration::from_secs(self.cost_window_secs)
    }

    fn window(&self) -> Duration {
        Duration::from_secs(self.window_secs)
    }

    /// `--max-sockets` for kdiag while the connections are held: room for
    /// both ends of each.
    fn held_max_sockets(&self) -> usize {
        (2 * self.held_connections).next_power_of_two()
    }
}

pub(crate) fn run(quick: bool, only: &[String]) -> Result<()> {
    if !util::is_root() {
        bail!(
            "`cargo xtask bench` loads eBPF programs, sets kernel.bpf_stats_enabled and \
             creates network namespaces: run it as root"
        );
    }
    if let Some(unknown) = only
        .iter()
        .find(|c| !SCENARIOS.iter().any(|s| s.class == c.as_str()))
    {
        let classes: Vec<&str> = SCENARIOS.iter().map(|s| s.class).collect();
        bail!(
            "--only {unknown}: no such class in the benchmark; it has {}",
            classes.join(", ")
        );
    }
    let started = Instant::now();
    let tools = setup::ensure()?;
    setup::ensure_debian_packages(BENCH_TOOLS)?;
    let agent = build::release_agent(&tools)?;
    let plan = Plan::new(quick);

    // Restored on every way out, including errors.
    let _stats = Sysctl::set("kernel/bpf_stats_enabled", "1")?;
    let mut rows = Rows::default();
    if !only.is_empty() {
        for scenario in SCENARIOS
            .iter()
            .filter(|s| only.iter().any(|c| c == s.class))
        {
            per_event(&plan, scenario, &agent, &mut rows)?;
        }
        println!("{}", rows.markdown());
        eprintln!(
            "bench: done in {:.0}s; {DOC} left as it is (--only)",
            started.elapsed().as_secs_f64()
        );
        return Ok(());
    }
    for scenario in SCENARIOS {
        per_event(&plan, scenario, &agent, &mut rows)?;
    }
    overhead(&plan, &agent, &mut rows)?;
    budget(&plan, &agent, &mut rows)?;
    per_record(&plan, &agent, &mut rows)?;
    startup(&plan, &agent, &mut rows)?;
    memory(&plan, &agent, &mut rows)?;

    let doc = document(&plan, &agent, &rows, started.elapsed());
    println!("{doc}");
    write_doc(&doc)?;
    eprintln!(
        "bench: done in {:.0}s; table written to {DOC}",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

const PER_EVENT: &str = "1 kernel cost";

/// Each tracer alone under the scenario's load: kernel time per program
/// run and, where the kernel counts the scenario's events, per event.
fn per_event(
    plan: &Plan,
    scenario: &scenarios::Scenario,
    agent: &Path,
    rows: &mut Rows,
) -> Result<()> {
    eprintln!(
        "bench: kernel cost, {} ({})",
        scenario.class,
        scenario.load.describe()
    );
    let _load = scenario.load.start()?;
    let tracers = scenario.tracers(agent);
    let measure = format!("ns per run, {} load", scenario.class);
    let rate = format!("runs/s, {} load", scenario.class);
    let count = || scenario.events.as_ref().map(|e| (e.total)()).transpose();
    for _ in 0..plan.rounds {
        for (i, tracer) in tracers.iter().enumerate() {
            let running = tracer.start()?;
            thread::sleep(SETTLE);
            // The kernel's count is read inside the programs' window, which
            // is longer only by the reads themselves.
            let before = running.bpf()?;
            let counted_before = count()?;
            thread::sleep(plan.cost_window());
            let counted_after = count()?;
            let after = running.bpf()?;
            let names = probe::program_names()?;
            running.stop()?;
            for (id, a) in &after.programs {
                let b = before.programs.get(id).copied().unwrap_or_default();
                let runs = a.run_cnt.saturating_sub(b.run_cnt);
                if runs == 0 {
                    continue;
                }
                let name = names.get(id).map_or("?", String::as_str);
                let judged = i == 0 && scenario.judges(name);
                let who = format!("{}: {name}", tracer.label);
                let ns = a.run_time_ns.saturating_sub(b.run_time_ns) as f64 / runs as f64;
                let target = scenario.target_ns.filter(|_| judged);
                rows.add(PER_EVENT, &measure, &who, Unit::Ns, target, ns);
                if judged {
                    let per_sec = runs as f64 / plan.cost_window_secs as f64;
                    rows.add(PER_EVENT, &rate, &who, Unit::PerSec, None, per_sec);
                }
                let misses = a.recursion_misses.saturating_sub(b.recursion_misses);
                if misses > 0 {
                    let m = format!("recursion misses, {} load", scenario.class);
                    rows.add(PER_EVENT, &m, &who, Unit::Count, None, misses as f64);
                }
            }
            if let (Some(events), Some(c0), Some(c1)) =
                (&scenario.events, counted_before, counted_after)
            {
                let m = format!(
                    "ns per {} (all programs), {} load",
                    events.name, scenario.class
                );
                let ns = after.run_time_ns().saturating_sub(before.run_time_ns()) as f64
                    / c1.saturating_sub(c0).max(1) as f64;
                rows.add(PER_EVENT, &m, &tracer.label, Unit::Ns, None, ns);
            }
        }
    }
    Ok(())
}

const OVERHEAD: &str = "2 overhead, bulk";

/// Loopback bulk transfer with nothing, kdiag `run`, or libbpf-tools
/// attached: the observers' share of the machine's busy CPU (their BPF run
/// time plus their own CPU time) and the throughput.
fn overhead(plan: &Plan, agent: &Path, rows: &mut Rows) -> Result<()> {
    eprintln!("bench: overhead under {}", Load::Bulk.describe());
    let server = IperfServer::start(None)?;
    let observers = observers(agent);
    for round in 0..plan.pairs {
        // Alternate the order, so drift over time favours no one.
        let order: Vec<usize> = if round % 2 == 0 {
            vec![0, 1, 2]
        } else {
            vec![2, 1, 0]
        };
        let mut bps = [0.0f64; 3];
        for &i in &order {
            let (label, target, tracers) = &observers[i];
            let running = tracers
                .iter()
                .map(Tracer::start)
                .collect::<Result<Vec<_>>>()?;
            thread::sleep(SETTLE);
            let (busy0, own0) = (probe::machine_busy_ns()?, observer_ns(&running)?);
            bps[i] = server.measure(plan.window_secs)?;
            let (busy1, own1) = (probe::machine_busy_ns()?, observer_ns(&running)?);
            for r in running {
                r.stop()?;
            }
            if !tracers.is_empty() {
                let share = 100.0 * own1.saturating_sub(own0) as f64
                    / busy1.saturating_sub(busy0).max(1) as f64;
                let measure = "observer share of busy CPU";
                rows.add(OVERHEAD, measure, label, Unit::Percent, *target, share);
            }
            rows.add(
                OVERHEAD,
                "throughput",
                label,
                Unit::Gbps,
                None,
                bps[i] / 1e9,
            );
        }
        for (i, (label, _, _)) in observers.iter().enumerate().skip(1) {
            let measure = "throughput ratio with/without";
            rows.add(OVERHEAD, measure, label, Unit::Ratio, None, bps[i] / bps[0]);
        }
    }
    Ok(())
}

/// kdiag `run` with its default budget (`--max-cpu 1`) and 1 s intervals
/// under the bulk transfer: its share of the busy CPU over the budget's
/// window, the interval after which the budget first stepped down, and the
/// step it ended at. The overhead rows above run with `-i 0`, where the
/// budget looks only every 10 s, longer than their window: full detail.
fn budget(plan: &Plan, agent: &Path, rows: &mut Rows) -> Result<()> {
    eprintln!("bench: default budget under {}", Load::Bulk.describe());
    let server = IperfServer::start(None)?;
    let tracer = budget_tracer(agent);
    for _ in 0..plan.rounds {
        let running = tracer.start()?;
        thread::sleep(SETTLE);
        let (busy0, own0) = (probe::machine_busy_ns()?, observer_ns(&[&running])?);
        server.measure(plan.budget_window_secs)?;
        let (busy1, own1) = (probe::machine_busy_ns()?, observer_ns(&[&running])?);
        let finished = running.stop()?;
        let share =
            100.0 * own1.saturating_sub(own0) as f64 / busy1.saturating_sub(busy0).max(1) as f64;
        let label = &tracer.label;
        let measure = "observer share of busy CPU, default budget";
        rows.add(OVERHEAD, measure, label, Unit::Percent, Some(1.0), share);
        // An interval with no step counts as one past the window.
        let first = finished
            .first_step_down()
            .unwrap_or(plan.budget_window_secs as usize + 1);
        let measure = "first budget step after interval (1 s each)";
        rows.add(OVERHEAD, measure, label, Unit::Count, None, first as f64);
        let measure = "budget step at exit";
        let last = finished.last_step() as f64;
        rows.add(OVERHEAD, measure, label, Unit::Count, None, last);
    }
    Ok(())
}

/// kdiag `run` with its default budget, deciding every second.
fn budget_tracer(agent: &Path) -> Tracer {
    Tracer::kdiag_every(agent, 1, &["run"])
}

/// What the overhead section attaches in turn, with kdiag's target for the
/// observer share: nothing, kdiag `run`, and the libbpf-tools covering the
/// same events.
fn observers(agent: &Path) -> [(&'static str, Option<f64>, Vec<Tracer>); 3] {
    [
        ("no tracer", None, vec![]),
        (
            "kdiag-agent run",
            Some(1.0),
            vec![Tracer::kdiag(agent, &["run"])],
        ),
        (
            "libbpf-tools softirqs + tcpstates",
            None,
            vec![Tracer::libbpf("softirqs"), Tracer::libbpf("tcpstates")],
        ),
    ]
}

/// CPU time of the tracers plus the kernel time of their programs.
fn observer_ns<R: std::borrow::Borrow<Running>>(running: &[R]) -> Result<u64> {
    let mut total = 0;
    for r in running.iter().map(std::borrow::Borrow::borrow) {
        total += r.cpu_ns()? + r.bpf()?.run_time_ns();
    }
    Ok(total)
}

const PER_RECORD: &str = "3 userspace, churn";

/// Connection churn at full speed: userspace CPU per record written, and
/// losses; then the agent is stopped for a while to show losses counted.
fn per_record(plan: &Plan, agent: &Path, rows: &mut Rows) -> Result<()> {
    eprintln!("bench: userspace cost under {}", Load::Churn.describe());
    let overflows0 = probe::listen_overflows()?;
    let churn = Churn::start(None);
    let tracers = [Tracer::kdiag(agent, &["tcp"]), Tracer::libbpf("tcpstates")];
    for _ in 0..plan.rounds {
        for (i, tracer) in tracers.iter().enumerate() {
            let running = tracer.start()?;
            thread::sleep(SETTLE);
            let (cpu0, lines0, conns0) = (running.cpu_ns()?, running.lines(), churn.connections());
            let t0 = Instant::now();
            thread::sleep(plan.window());
            let (cpu1, lines1, conns1) = (running.cpu_ns()?, running.lines(), churn.connections());
            let secs = t0.elapsed().as_secs_f64();
            let finished = running.stop()?;
            let label = &tracer.label;
            let records = lines1.saturating_sub(lines0);
            let conn_rate = conns1.saturating_sub(conns0) as f64 / secs;
            rows.add(
                PER_RECORD,
                "connections/s",
                label,
                Unit::PerSec,
                None,
                conn_rate,
            );
            rows.add(
                PER_RECORD,
                "records/s",
                label,
                Unit::PerSec,
                None,
                records as f64 / secs,
            );
            let per_record = cpu1.saturating_sub(cpu0) as f64 / records.max(1) as f64;
            let target = (i == 0).then_some(1000.0);
            rows.add(
                PER_RECORD,
                "CPU per record",
                label,
                Unit::Ns,
                target,
                per_record,
            );
            if i == 0 {
                let lost = finished.class_total("dropped") + finished.class_total("lost");
                let measure = "dropped + lost (agent_stats), whole run";
                rows.add(
                    PER_RECORD,
                    measure,
                    label,
                    Unit::Count,
                    Some(0.0),
                    lost as f64,
                );
            }
        }
    }
    if churn.errors() > 0 {
        eprintln!("bench: {} churn connects failed", churn.errors());
    }
    let overflows = probe::listen_overflows()?.saturating_sub(overflows0);
    if overflows > 0 {
        // Each one stalls a client for a second (SYN retransmit): the
        // connection rates above are then the generator's, not the tracers'.
        eprintln!("bench: warning: {overflows} SYNs dropped by a full accept queue during churn");
    }

    // This machine cannot churn faster than the agent reads, so losses are
    // provoked by stopping the agent: the ring buffer fills, the kernel
    // programs count each event they cannot write.
    let stopped = Duration::from_secs(2);
    let running = Tracer::kdiag(agent, &["tcp"]).start()?;
    thread::sleep(SETTLE);
    running.signal(libc::SIGSTOP);
    thread::sleep(stopped);
    running.signal(libc::SIGCONT);
    thread::sleep(Duration::from_secs(1));
    let label = running.label.clone();
    let finished = running.stop()?;
    let measure = "agent stopped 2 s: events written (agent_stats)";
    let events = finished.class_total("events") as f64;
    rows.add(PER_RECORD, measure, &label, Unit::Count, None, events);
    let measure = "agent stopped 2 s: dropped (agent_stats)";
    let dropped = finished.class_total("dropped") as f64;
    rows.add(PER_RECORD, measure, &label, Unit::Count, None, dropped);
    Ok(())
}

const STARTUP: &str = "4 start-up";
const MEMORY: &str = "5 memory";
const MAP_MEMORY: &str = "BPF map memory";

/// Exec to attached (kdiag: to its agent_start line), then peak RSS and map
/// memory at rest, for every class, `run`, and the comparison tools.
fn startup(plan: &Plan, agent: &Path, rows: &mut Rows) -> Result<()> {
    eprintln!("bench: start-up and memory at rest");
    let mut tracers: Vec<(Tracer, Option<f64>)> = SCENARIOS
        .iter()
        .map(|s| (s.kdiag(agent), Some(50.0)))
        .collect();
    tracers.push((Tracer::kdiag(agent, &["run"]), Some(150.0)));
    let kdiag = tracers.len();
    tracers.extend(
        SCENARIOS
            .iter()
            .flat_map(|s| s.comparisons)
            .map(Comparison::tracer)
            .map(|t| (t, None)),
    );
    // kdiag's ring buffer by tracer: its map memory target is its peer's
    // plus the ring.
    let mut rings = BTreeMap::new();
    for _ in 0..plan.startup_runs {
        for (i, (tracer, target)) in tracers.iter().enumerate() {
            let running = tracer.start()?;
            let ms = running.startup.as_secs_f64() * 1e3;
            thread::sleep(SETTLE);
            let hwm = probe::vm_bytes(running.pid, "VmHWM")? as f64 / MIB;
            let bpf = running.bpf()?;
            let maps = bpf.map_bytes as f64 / MIB;
            rings.insert(tracer.label.clone(), bpf.ring_bytes as f64 / MIB);
            running.stop()?;
            let label = &tracer.label;
            rows.add(STARTUP, "exec to attached", label, Unit::Ms, *target, ms);
            let rss_target = (i < kdiag).then_some(16.0);
            rows.add(
                MEMORY,
                "peak RSS, at rest",
                label,
                Unit::MiB,
                rss_target,
                hwm,
            );
            rows.add(MEMORY, MAP_MEMORY, label, Unit::MiB, None, maps);
        }
    }
    for scenario in SCENARIOS {
        let kdiag = scenario.kdiag(agent).label;
        let peer = rows.median(MEMORY, MAP_MEMORY, &scenario.memory_peer.tracer().label);
        if let (Some(peer), Some(ring)) = (peer, rings.get(&kdiag)) {
            rows.set_target(MEMORY, MAP_MEMORY, &kdiag, peer + ring);
        }
    }
    Ok(())
}

/// kdiag `run` while many connections are open: peak RSS and map memory.
/// Its socket map sized at start would hold the few sockets there are
/// then; an operator expecting these many gives `--max-sockets`.
fn memory(plan: &Plan, agent: &Path, rows: &mut Rows) -> Result<()> {
    let n = plan.held_connections;
    eprintln!("bench: memory with {n} open connections");
    let sockets = plan.held_max_sockets().to_string();
    let running = Tracer::kdiag(agent, &["run", "--max-sockets", &sockets]).start()?;
    thread::sleep(SETTLE);
    let opening = Instant::now();
    let held = Held::open(n)?;
    let opened = opening.elapsed();
    // Until the agent has read every state change of the new connections.
    probe::poll(Duration::from_secs(30), Duration::from_millis(100), || {
        let lines = running.lines();
        thread::sleep(Duration::from_millis(200));
        (running.lines() == lines).then_some(())
    });
    eprintln!(
        "bench: {} connections open in {:.1}s, agent done reading {:.1}s later",
        held.len(),
        opened.as_secs_f64(),
        (opening.elapsed() - opened).as_secs_f64()
    );
    let hwm = probe::vm_bytes(running.pid, "VmHWM")? as f64 / MIB;
    let maps = running.bpf()?.map_bytes as f64 / MIB;
    let label = running.label.clone();
    let measure = format!("peak RSS, {} connections open", held.len());
    rows.add(MEMORY, &measure, &label, Unit::MiB, Some(32.0), hwm);
    let measure = format!("BPF map memory, {} connections open", held.len());
    rows.add(MEMORY, &measure, &label, Unit::MiB, None, maps);
    // What the agent could not take in while they opened (and closed) says
    // how many of the connections it actually followed.
    let measure = format!(
        "dropped + lost (agent_stats), {} connections opened and closed",
        held.len()
    );
    drop(held);
    let finished = running.stop()?;
    let lost = finished.class_total("dropped") + finished.class_total("lost");
    rows.add(MEMORY, &measure, &label, Unit::Count, None, lost as f64);
    Ok(())
}

/// The machine, the tools, the loads and the commands, then the table.
fn document(plan: &Plan, agent: &Path, rows: &Rows, took: Duration) -> String {
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find_map(|l| {
                Some(
                    l.strip_prefix("model name")?
                        .trim_start_matches([' ', '\t', ':'])
                        .to_owned(),
                )
            })
        })
        .unwrap_or_else(|| "unknown".into());
    let mem_gib = probe_meminfo_gib();
    let command = if plan.quick {
        "cargo xtask bench --quick"
    } else {
        "cargo xtask bench"
    };
    let mut doc = format!(
        "Measured {date} with `{command}` ({took:.0} s).\n\n\
         Machine: {cpus} CPUs ({cpu}), {mem_gib:.0} GiB RAM, kernel {kernel}.\n\
         Tools: libbpf-tools {libbpf}, bpftrace {bpftrace}, iperf3 {iperf}.\n\n\
         Each tracer runs alone under the load, {rounds} rounds interleaved, \
         {cost_window} s per kernel cost measurement and {window} s per other \
         measurement ({pairs} rounds for the bulk overhead, {startup} start-ups \
         each).\n\n",
        date = output_of("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        took = took.as_secs_f64(),
        cpus = thread::available_parallelism().map_or(0, |n| n.get()),
        kernel = output_of("uname", &["-r"]),
        libbpf = output_of("dpkg-query", &["-W", "-f", "${Version}", "libbpf-tools"]),
        bpftrace = output_of("bpftrace", &["--version"])
            .trim_start_matches("bpftrace v")
            .to_owned(),
        iperf = output_of("iperf3", &["--version"])
            .split_whitespace()
            .nth(1)
            .unwrap_or("?")
            .to_owned(),
        rounds = plan.rounds,
        cost_window = plan.cost_window_secs,
        window = plan.window_secs,
        pairs = plan.pairs,
        startup = plan.startup_runs,
    );
    doc.push_str("Loads:\n");
    for load in [Load::Bulk, Load::Churn, Load::Retransmits] {
        doc.push_str(&format!("- {}\n", load.describe()));
    }
    doc.push_str(&format!(
        "- {} loopback connections held open (memory), both ends, spread over child \
         processes within the open-file limit, under `kdiag-agent run --max-sockets {}`\n\n\
         Tracers (stdout read and counted by the benchmark):\n",
        plan.held_connections,
        plan.held_max_sockets()
    ));
    let tracers = SCENARIOS
        .iter()
        .flat_map(|s| s.tracers(agent))
        .chain(observers(agent).into_iter().flat_map(|(_, _, t)| t))
        .chain([budget_tracer(agent)]);
    let mut seen = Vec::new();
    for t in tracers {
        let line = t
            .command_line()
            .replace(&agent.display().to_string(), "kdiag-agent");
        if !seen.contains(&line) {
            doc.push_str(&format!("- `{line}`\n"));
            seen.push(line);
        }
    }
    doc.push('\n');
    doc.push_str(&rows.markdown());
    doc
}

fn probe_meminfo_gib() -> f64 {
    fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / MIB)
}

fn output_of(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_owned()
        })
        .unwrap_or_else(|| "?".into())
}

/// Replaces the generated part of docs/BENCHMARKS.md, keeping the prose
/// around it.
fn write_doc(generated: &str) -> Result<()> {
    let path = util::workspace_root().join(DOC);
    let old = fs::read_to_string(&path).unwrap_or_default();
    let block = format!("{BEGIN}\n{generated}{END}\n");
    let new = match (old.find(BEGIN), old.find(END)) {
        (Some(b), Some(e)) if b < e => {
            format!(
                "{}{block}{}",
                &old[..b],
                old[e + END.len()..].trim_start_matches('\n')
            )
        }
        _ => format!("# Benchmarks\n\n{block}\n{old}"),
    };
    fs::write(&path, new).with_context(|| format!("writing {}", path.display()))
}
