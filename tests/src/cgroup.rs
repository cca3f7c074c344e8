//! Test cgroups in the cgroup v2 hierarchy (or a v1 one), removed in Drop.
//! Membership is all the tests need, so this works also where the v2
//! hierarchy has no controllers (hybrid hosts).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::env;

static NEXT_CGROUP: AtomicU32 = AtomicU32::new(0);

/// How long a removed cgroup may stay busy: the tasks of a process just
/// killed and reaped leave it asynchronously.
const RMDIR_TIMEOUT: Duration = Duration::from_secs(2);

/// A cgroup directory this test created.
#[derive(Debug)]
pub struct TestCgroup {
    /// The mount of its hierarchy.
    mount: PathBuf,
    dir: PathBuf,
    rel: String,
}

impl TestCgroup {
    /// A new cgroup directly under the root, named uniquely for this test
    /// run (pid + counter, as namespace names).
    pub fn new() -> TestCgroup {
        TestCgroup::new_in(cgroup2_mount())
    }

    /// `new` in the hierarchy mounted at `mount` (a v1 one, say).
    pub fn new_in(mount: PathBuf) -> TestCgroup {
        let n = NEXT_CGROUP.fetch_add(1, Ordering::Relaxed);
        TestCgroup::create(mount, &format!("/kdiagt{}-{n}", std::process::id()))
    }

    /// A cgroup whose name is this one's plus `suffix`: a sibling the
    /// string prefix of whose path is this one's path.
    pub fn sibling_with_suffix(&self, suffix: &str) -> TestCgroup {
        TestCgroup::create(self.mount.clone(), &format!("{}{suffix}", self.rel))
    }

    /// A cgroup below this one. Drop it before this one (declare it after).
    pub fn child(&self, name: &str) -> TestCgroup {
        TestCgroup::create(self.mount.clone(), &format!("{}/{name}", self.rel))
    }

    /// Creates `rel` (relative to `mount`, starting with `/`).
    fn create(mount: PathBuf, rel: &str) -> TestCgroup {
        env::require_root();
        let cgroup = TestCgroup {
            dir: mount.join(rel.trim_start_matches('/')),
            rel: rel.to_owned(),
            mount,
        };
        std::fs::create_dir(&cgroup.dir)
            .unwrap_or_else(|e| panic!("creating cgroup {}: {e}", cgroup.dir.display()));
        cgroup
    }

    /// The full path of its directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Its path relative to its hierarchy's mount (`/name`), as the agent's
    /// records show it.
    pub fn rel(&self) -> &str {
        &self.rel
    }

    /// Pids of the processes in it (not in its children).
    pub fn procs(&self) -> Vec<u32> {
        let path = self.dir.join("cgroup.procs");
        std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }
}

impl Default for TestCgroup {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // No panic here: Drop may run while a test is already unwinding.
        // Processes still inside (a peer not killed yet) go back to the root
        // so the directory can go.
        let root_procs = self.mount.join("cgroup.procs");
        let procs = std::fs::read_to_string(self.dir.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.lines() {
            let _ = std::fs::write(&root_procs, pid);
        }
        let deadline = Instant::now() + RMDIR_TIMEOUT;
        loop {
            match std::fs::remove_dir(&self.dir) {
                Ok(()) => return,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
                Err(e) if Instant::now() >= deadline => {
                    eprintln!("cleanup: rmdir {}: {e}", self.dir.display());
                    return;
                }
                Err(_) => thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

/// The cgroup2 mount point, from /proc/self/mountinfo: the fifth field of
/// the line whose file system type (first field after ` - `) is cgroup2.
pub fn cgroup2_mount() -> PathBuf {
    cgroup2_mount_if_any()
        .unwrap_or_else(|| panic!("no cgroup2 file system mounted (/proc/self/mountinfo)"))
}

/// [`cgroup2_mount`], or `None` on a host without one.
pub fn cgroup2_mount_if_any() -> Option<PathBuf> {
    find_mount(|fstype, _| fstype == "cgroup2")
}

/// The mount of the v1 hierarchy with `option` (a controller, or
/// `name=...`) among its super options, if there is one.
pub fn v1_mount(option: &str) -> Option<PathBuf> {
    find_mount(|fstype, options| fstype == "cgroup" && options.split(',').any(|o| o == option))
}

/// The mount point of the first mount whose file system type and super
/// options `wanted` accepts.
fn find_mount(wanted: impl Fn(&str, &str) -> bool) -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").expect("/proc/self/mountinfo");
    text.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let mut right = right.split_whitespace();
        let (fstype, _source, options) = (right.next()?, right.next()?, right.next()?);
        wanted(fstype, options).then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
    })
}
