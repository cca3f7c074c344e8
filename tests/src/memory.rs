//! Memory pressure for the memory-stall tests: sparse files on a disk file
//! system (reading them fills the page cache with clean pages, which
//! reclaim can always drop: no OOM risk), memory cgroups with a small limit,
//! and reader processes gated so their pids are known before the agent
//! starts. Every fixture undoes itself in Drop.

use std::fs::{self, File};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use serde_json::Value;

use crate::{cmd, env, record};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A name unique to this test process and call: `kdt-<pid>-<n>`.
fn unique_name() -> String {
    format!(
        "kdt-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Where sparse files go: a disk file system (reading a sparse file on
/// tmpfs allocates no page cache to reclaim).
const SPARSE_DIR: &str = "/var/tmp";
const TMPFS_MAGIC: i64 = 0x0102_1994;

/// A sparse file; its page cache is dropped and the file deleted in Drop.
pub struct SparseFile {
    path: PathBuf,
}

impl SparseFile {
    pub fn new(bytes: u64) -> SparseFile {
        assert_not_tmpfs(Path::new(SPARSE_DIR));
        let path = Path::new(SPARSE_DIR).join(unique_name());
        let file = File::create(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        file.set_len(bytes)
            .unwrap_or_else(|e| panic!("truncate {}: {e}", path.display()));
        SparseFile { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Drops this file's pages from the page cache (and only these).
    pub fn drop_cache(&self) {
        if let Ok(file) = File::open(&self.path) {
            // SAFETY: a valid fd; offset 0 and length 0 mean the whole file.
            unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        }
    }
}

impl Drop for SparseFile {
    fn drop(&mut self) {
        self.drop_cache();
        let _ = fs::remove_file(&self.path);
    }
}

fn assert_not_tmpfs(dir: &Path) {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).expect("no NUL");
    // SAFETY: an all-zero statfs is valid; statfs fills it.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and out pointer.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    assert_eq!(rc, 0, "statfs {}", dir.display());
    assert!(
        st.f_type as i64 != TMPFS_MAGIC,
        "{} is tmpfs: the memory tests need a disk file system there",
        dir.display()
    );
}

/// The memory controller's hierarchy on this host: the v1 memory mount if
/// there is one (hybrid hosts), else cgroup v2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hierarchy {
    V1(PathBuf),
    V2(PathBuf),
}

impl Hierarchy {
    pub fn detect() -> Hierarchy {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
        let mount = |want: &dyn Fn(&str, &str) -> bool| {
            mountinfo.lines().find_map(|line| {
                let (left, right) = line.split_once(" - ")?;
                let mut right = right.split_whitespace();
                let (fstype, _, options) = (right.next()?, right.next()?, right.next()?);
                want(fstype, options).then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
            })
        };
        if let Some(m) = mount(&|t, o| t == "cgroup" && o.split(',').any(|o| o == "memory")) {
            return Hierarchy::V1(m);
        }
        let m = mount(&|t, _| t == "cgroup2").expect("no cgroup hierarchy with memory is mounted");
        let controllers = fs::read_to_string(m.join("cgroup.controllers")).unwrap_or_default();
        assert!(
            controllers.split_whitespace().any(|c| c == "memory"),
            "cgroup v2 at {} has no memory controller",
            m.display()
        );
        // Children of the root get memory.max only if the root delegates it.
        fs::write(m.join("cgroup.subtree_control"), "+memory")
            .unwrap_or_else(|e| panic!("enabling the memory controller: {e}"));
        Hierarchy::V2(m)
    }

    fn mount(&self) -> &Path {
        match self {
            Hierarchy::V1(m) | Hierarchy::V2(m) => m,
        }
    }
}

/// A memory cgroup with a limit; removed in Drop (after its readers).
pub struct MemoryCgroup {
    dir: PathBuf,
    name: String,
    /// Every directory created, outermost first.
    created: Vec<PathBuf>,
}

impl MemoryCgroup {
    pub fn new(limit_bytes: u64) -> MemoryCgroup {
        Self::nested(limit_bytes, &[])
    }

    /// A cgroup at `<unique>/<below...>`, the limit on the innermost: to
    /// give it the shape of a container runtime's path.
    pub fn nested(limit_bytes: u64, below: &[&str]) -> MemoryCgroup {
        env::require_root();
        let hierarchy = Hierarchy::detect();
        let mut name = unique_name();
        let mut dir = hierarchy.mount().join(&name);
        let mut created = Vec::new();
        for part in std::iter::once(None).chain(below.iter().map(Some)) {
            if let Some(part) = part {
                dir.push(part);
                name = format!("{name}/{part}");
            }
            if let (Hierarchy::V2(_), Some(parent)) = (&hierarchy, created.last()) {
                // cgroup v2 gives a child memory.max only where its parent
                // delegates the memory controller.
                let control = Path::new(parent).join("cgroup.subtree_control");
                fs::write(&control, "+memory")
                    .unwrap_or_else(|e| panic!("{}: {e}", control.display()));
            }
            fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
            created.push(dir.clone());
        }
        let cg = MemoryCgroup { dir, name, created };
        let limit_file = match hierarchy {
            Hierarchy::V1(_) => "memory.limit_in_bytes",
            Hierarchy::V2(_) => "memory.max",
        };
        fs::write(cg.dir.join(limit_file), limit_bytes.to_string())
            .unwrap_or_else(|e| panic!("{limit_file}: {e}"));
        cg
    }

    /// The path the agent reports: relative to the hierarchy's mount.
    pub fn path(&self) -> String {
        format!("/{}", self.name)
    }

    /// The path the agent's `--cgroup` takes.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A `dd` reading `count_mib` MiB of `file` from `skip_mib`, in this
    /// cgroup, waiting for `Gated::go`.
    pub fn reader(&self, file: &SparseFile, skip_mib: u64, count_mib: u64) -> Gated {
        Gated::spawn(
            Some(&self.dir.join("cgroup.procs")),
            &dd(file, skip_mib, count_mib),
        )
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        // The readers are gone by now (fields and locals drop first); the
        // kernel may need a moment to let go of an exited task's cgroup.
        for dir in self.created.iter().rev() {
            let removed = (0..50).any(|_| {
                let gone = fs::remove_dir(dir).is_ok() || !dir.exists();
                if !gone {
                    std::thread::sleep(Duration::from_millis(20));
                }
                gone
            });
            if !removed {
                eprintln!("could not remove cgroup {}", dir.display());
                return;
            }
        }
    }
}

/// `dd` reading `count_mib` MiB of `file` from `skip_mib`, for `Gated`.
pub fn dd(file: &SparseFile, skip_mib: u64, count_mib: u64) -> String {
    format!(
        "exec dd if={} of=/dev/null bs=1M skip={skip_mib} count={count_mib} status=none",
        file.path().display()
    )
}

/// A shell that first joins a cgroup (optionally), then waits for a line on
/// stdin before running `command`, so its pid is known (and passed to the
/// agent) before it does anything. With `exec` the command keeps the pid.
/// Killed in Drop.
pub struct Gated {
    child: Child,
    gate: Option<ChildStdin>,
}

impl Gated {
    pub fn spawn(procs: Option<&Path>, command: &str) -> Gated {
        let join = procs
            .map(|p| format!("echo $$ > {} || exit 99; ", p.display()))
            .unwrap_or_default();
        let mut child = Command::new("sh")
            .args(["-c", &format!("{join}read go; {command}")])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn sh");
        let gate = child.stdin.take();
        Gated { child, gate }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Lets it run.
    pub fn go(&mut self) {
        let mut gate = self.gate.take().expect("go called once");
        gate.write_all(b"go\n").expect("gate");
    }

    /// Waits for it to finish; panics after `timeout`, saying where it is.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        cmd::wait_timeout(&mut self.child, timeout).unwrap_or_else(|| {
            panic!(
                "pid {} still running after {timeout:?}\n{}",
                self.pid(),
                stuck_reader(self.pid())
            )
        })
    }
}

/// What a reader that did not finish in time is doing: its state and
/// kernel stack, how far it read (and in the second since), and the memory
/// pressure on it and on the whole machine: a slow reader is told from a
/// stuck one, and memcg thrashing from a starved machine.
fn stuck_reader(pid: u32) -> String {
    let read = |what: &str| {
        fs::read_to_string(format!("/proc/{pid}/{what}"))
            .unwrap_or_else(|e| format!("({e})"))
            .trim_end()
            .to_owned()
    };
    let rchar = || {
        read("io")
            .lines()
            .find_map(|l| l.strip_prefix("rchar: ")?.parse::<u64>().ok())
    };
    let before = rchar();
    std::thread::sleep(Duration::from_secs(1));
    let after = rchar();
    let hierarchy = Hierarchy::detect();
    let cgroup_dir = memory_cgroup_in(pid, &hierarchy)
        .map(|path| hierarchy.mount().join(path.trim_start_matches('/')));
    let cgroup_file = |name: &str| {
        cgroup_dir
            .as_ref()
            .map(|d| fs::read_to_string(d.join(name)).unwrap_or_else(|e| format!("({e})")))
            .unwrap_or_default()
    };
    format!(
        "stat: {}\nwchan: {}\nstack:\n{}\nbytes read: {before:?}, a second later {after:?}\n\
         cgroup {cgroup_dir:?} memory.events:\n{}memory.pressure:\n{}\
         /proc/pressure/memory:\n{}",
        read("stat"),
        read("wchan"),
        read("stack"),
        cgroup_file("memory.events"),
        cgroup_file("memory.pressure"),
        fs::read_to_string("/proc/pressure/memory").unwrap_or_else(|e| format!("({e})\n")),
    )
}

impl Drop for Gated {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The memory cgroup path of a process as the agent reports it: the v1
/// memory line of /proc/PID/cgroup on a hybrid host, else the v2 line.
pub fn memory_cgroup_of(pid: u32) -> String {
    memory_cgroup_in(pid, &Hierarchy::detect()).expect("no memory cgroup line")
}

/// [`memory_cgroup_of`] in `hierarchy`; `None` for a process gone, or
/// without the line.
fn memory_cgroup_in(pid: u32, hierarchy: &Hierarchy) -> Option<String> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let line = |pred: &dyn Fn(&str) -> bool| {
        text.lines().find_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            pred(controllers).then(|| path.to_owned())
        })
    };
    match hierarchy {
        Hierarchy::V1(_) => line(&|c| c.split(',').any(|c| c == "memory")),
        Hierarchy::V2(_) => line(&|c| c.is_empty()),
    }
}

/// MemTotal in bytes.
pub fn mem_total() -> u64 {
    let text = fs::read_to_string("/proc/meminfo").expect("/proc/meminfo");
    text.lines()
        .find_map(|l| {
            l.strip_prefix("MemTotal:")?
                .trim()
                .strip_suffix(" kB")?
                .parse::<u64>()
                .ok()
        })
        .expect("MemTotal")
        * 1024
}

/// Zones with pages (as populated_zone() in the kernel counts them): one
/// compaction run each when /proc/sys/vm/compact_memory is written.
pub fn populated_zones() -> usize {
    let text = fs::read_to_string("/proc/zoneinfo").expect("/proc/zoneinfo");
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("present")?.trim().parse::<u64>().ok())
        .filter(|&present| present > 0)
        .count()
}

/// Checks a `reclaim_summary` or `compact_summary` against the stall
/// records of the same process it summarizes, when every stall was written
/// (no threshold, one interval): the counts and sums are then exact, and
/// so is the maximum (the kernel keeps each thread's exact maximum).
pub fn assert_summary_matches(summary: &Value, events: &[Value]) {
    let field = |k| record::u64_field(summary, k);
    let lat: Vec<u64> = events
        .iter()
        .map(|e| record::u64_field(e, "latency_ns"))
        .collect();
    assert_eq!(field("count"), events.len() as u64, "count in {summary}");
    assert_eq!(
        field("total_ns"),
        lat.iter().sum::<u64>(),
        "total_ns in {summary}"
    );
    assert_eq!(
        field("max_ns"),
        lat.iter().copied().max().unwrap_or(0),
        "max_ns in {summary}"
    );
    assert_latency_order(summary);
}

/// p50 <= p99 <= max <= total, and a positive interval.
pub fn assert_latency_order(summary: &Value) {
    let field = |k| record::u64_field(summary, k);
    assert!(
        field("p50_ns") <= field("p99_ns")
            && field("p99_ns") <= field("max_ns")
            && field("max_ns") <= field("total_ns"),
        "p50 <= p99 <= max <= total violated in {summary}"
    );
    assert!(field("interval_ns") > 0, "interval_ns in {summary}");
}

/// The records of `ty` whose `pid` is `pid`.
pub fn of_pid<'a>(recs: &'a [Value], ty: &str, pid: u32) -> Vec<&'a Value> {
    recs.iter()
        .filter(|r| record::is_type(r, ty) && record::pid_of(r) == Some(pid.into()))
        .collect()
}

/// The one `vmstat` record of a run with `--interval 0`, checked for its
/// fields: integer counter deltas (or null), PSI averages number or null.
pub fn assert_one_vmstat(recs: &[Value]) {
    let vmstats: Vec<&Value> = recs
        .iter()
        .filter(|r| record::is_type(r, "vmstat"))
        .collect();
    assert_eq!(vmstats.len(), 1, "vmstat records: {vmstats:?}");
    let v = vmstats[0];
    for key in [
        "allocstall",
        "pgscan_direct",
        "pgsteal_direct",
        "compact_stall",
        "compact_fail",
        "compact_success",
    ] {
        assert!(
            v.get(key).is_some_and(|x| x.is_u64() || x.is_null()),
            "{key} in {v}"
        );
    }
    for key in ["psi_some_avg10", "psi_full_avg10"] {
        assert!(
            v.get(key)
                .is_some_and(|x| x.is_f64() || x.is_u64() || x.is_null()),
            "{key} in {v}"
        );
    }
    assert!(record::u64_field(v, "interval_ns") > 0, "{v}");
}
