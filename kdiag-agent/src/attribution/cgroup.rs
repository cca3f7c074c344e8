//! cgroup ids to paths.
//!
//! A cgroup's id (its kernfs node id: what `bpf_get_current_cgroup_id`
//! returns on cgroup v2, and `cgroup->kn->id` on any hierarchy) is the inode
//! number of its directory in the hierarchy's mount, so one walk of the
//! mount maps every id to its path. New cgroups appear all the time (containers, systemd units), so
//! an unknown id triggers a new walk, at most once per `RESCAN_EVERY`. The
//! walk runs off the event loop (see `background`): the loop waits for it
//! at most `WALK_DEADLINE`, then names the cgroup as unknown and takes the
//! walk's table when it is done.

use std::{
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use foldhash::{HashMap, HashSet};

use crate::{
    attribution::{background::Pending, container::identify},
    output::record::{Cgroup, CgroupName},
};

const RESCAN_EVERY: Duration = Duration::from_secs(1);
/// How long the event loop waits for a walk it starts before it goes on
/// without it. A walk of a few thousand cgroups takes milliseconds on a
/// real host, so it is usually done by then; when it is not, the events
/// that asked are held until it is (see [`CgroupPaths::name_when_walked`]),
/// not written without their cgroup: a walk of tens of cgroups took over
/// a second in an emulated guest.
const WALK_DEADLINE: Duration = Duration::from_millis(20);
/// How long events wait for a walk before they are written without their
/// cgroup (the walk goes on, and names the cgroups of later events).
const HOLD_AT_MOST: Duration = Duration::from_secs(5);
/// An id a walk did not find (a cgroup removed since the event, or one the
/// walk's bound left out) triggers no new walk for this long: without it, a
/// stream of events from dead cgroups would walk the hierarchy every second.
const UNKNOWN_FOR: Duration = Duration::from_secs(30);
/// Bounds the ids remembered as unknown; cleared when full. This is the
/// one negative cache of cgroup ids: every class and the owner resolver
/// name cgroups through these tables.
const MAX_UNKNOWN: usize = 4096;
/// Bounds the walk on hosts with very many cgroups.
const MAX_CGROUPS: usize = 100_000;

#[derive(Debug, Default)]
pub(crate) struct CgroupPaths {
    mount: Option<PathBuf>,
    /// Shared with the records that name them: a path is cloned per
    /// record, and that is a reference count, not an allocation.
    paths: HashMap<u64, Arc<CgroupName>>,
    /// Ids not found by a walk made after they were first asked for, and
    /// when that walk was.
    unknown: HashMap<u64, Instant>,
    last_scan: Option<Instant>,
    /// A walk still running, the ids asked for since it started, and when
    /// it started.
    walking: Option<(Pending<Table>, HashSet<u64>, Instant)>,
}

/// One walk's result.
type Table = HashMap<u64, Arc<CgroupName>>;

/// What is known of a cgroup id.
enum Lookup {
    Found(Arc<CgroupName>),
    /// Not in the hierarchy (or not walked for now: see `RESCAN_EVERY`).
    Unknown,
    /// A walk that will tell is running.
    Walking,
}

impl CgroupPaths {
    /// Paths in the hierarchy mounted at `mount`.
    pub(crate) fn with_mount(mount: Option<PathBuf>) -> Self {
        Self {
            mount,
            ..Self::default()
        }
    }

    /// The mount of the hierarchy.
    pub(crate) fn mount(&self) -> Option<&Path> {
        self.mount.as_deref()
    }

    /// Cgroup `id` as records name it: its path relative to the hierarchy's
    /// root (`/` for the root itself) and the container and pod it shows;
    /// unknown ids name none.
    pub(crate) fn name(&mut self, id: u64) -> Cgroup {
        self.name_when_walked(id, false).unwrap_or(Cgroup(None))
    }

    /// [`CgroupPaths::name`]; if the caller `wait`s, `None` while a walk
    /// that will tell whether `id` exists is still running: the caller
    /// holds its event and asks again later, so that records of a cgroup
    /// created since the last walk name it even when walks are slow.
    pub(crate) fn name_when_walked(&mut self, id: u64, wait: bool) -> Option<Cgroup> {
        match self.lookup(id) {
            Lookup::Found(name) => Some(Cgroup(Some(name))),
            Lookup::Walking if wait => None,
            Lookup::Unknown | Lookup::Walking => Some(Cgroup(None)),
        }
    }

    fn lookup(&mut self, id: u64) -> Lookup {
        if id == 0 {
            return Lookup::Unknown;
        }
        if let Some(p) = self.paths.get(&id) {
            return Lookup::Found(p.clone());
        }
        let now = Instant::now();
        if self
            .unknown
            .get(&id)
            .is_some_and(|since| now.duration_since(*since) < UNKNOWN_FOR)
        {
            return Lookup::Unknown;
        }
        let started = self.walking.is_none() && self.start_walk(now);
        let Some((walk, asked, started_at)) = &mut self.walking else {
            return Lookup::Unknown;
        };
        let held_long = now.duration_since(*started_at) >= HOLD_AT_MOST;
        // One walk at a time; it will tell whether this id exists.
        if asked.len() < MAX_UNKNOWN {
            asked.insert(id);
        }
        let done = if started {
            // A short wait, for the usual walk done in milliseconds.
            walk.wait(WALK_DEADLINE).map(Ok)
        } else {
            walk.poll()
        };
        match done {
            Some(done) => {
                self.walked(done.ok().map(|(table, _)| table), now);
                match self.paths.get(&id) {
                    Some(p) => Lookup::Found(p.clone()),
                    None => Lookup::Unknown,
                }
            }
            None if held_long => Lookup::Unknown,
            None => Lookup::Walking,
        }
    }

    /// Starts a walk of the hierarchy unless one was made less than
    /// `RESCAN_EVERY` ago; whether one runs now.
    fn start_walk(&mut self, now: Instant) -> bool {
        let stale = self
            .last_scan
            .is_none_or(|t| now.duration_since(t) >= RESCAN_EVERY);
        let Some(mount) = self.mount.clone().filter(|_| stale) else {
            return false;
        };
        self.last_scan = Some(now);
        let walk = Pending::start("kdiag-cgroups", move || {
            let mut table = Table::default();
            walk(&mount, &mount, &mut table);
            table
        });
        self.walking = walk.map(|w| (w, HashSet::default(), now));
        self.walking.is_some()
    }

    /// A walk is over: its table replaces the old one, and the ids asked
    /// for while it ran that it did not find are unknown for a while.
    fn walked(&mut self, table: Option<Table>, now: Instant) {
        let Some((_, asked, _)) = self.walking.take() else {
            return;
        };
        let Some(table) = table else { return };
        self.paths = table;
        for id in asked {
            if !self.paths.contains_key(&id) {
                if self.unknown.len() >= MAX_UNKNOWN {
                    self.unknown.clear();
                }
                self.unknown.insert(id, now);
            }
        }
    }
}

/// A `--cgroup` argument as a path relative to `mount`: full paths under
/// the mount are shortened, relative ones kept.
pub(crate) fn relative_to(mount: Option<&Path>, path: &str) -> String {
    let rel = mount
        .and_then(|m| {
            Path::new(path)
                .strip_prefix(m)
                .ok()
                .map(|r| format!("/{}", r.display()))
        })
        .unwrap_or_else(|| path.to_owned());
    if rel.is_empty() { "/".to_owned() } else { rel }
}

/// Where memory cgroups live on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum MemoryHierarchy {
    /// The v1 memory controller is mounted here (on hybrid hosts the
    /// unified hierarchy then has no memory controller: the limits that
    /// matter are in this one).
    V1(PathBuf),
    /// cgroup v2 only.
    Unified(PathBuf),
    None,
}

impl MemoryHierarchy {
    pub(crate) fn detect() -> Self {
        let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        parse_memory_hierarchy(&text)
    }

    pub(crate) fn mount(&self) -> Option<&Path> {
        match self {
            Self::V1(m) | Self::Unified(m) => Some(m),
            Self::None => None,
        }
    }
}

fn parse_memory_hierarchy(mountinfo: &str) -> MemoryHierarchy {
    match (v1_mount(mountinfo, MEMORY), parse_cgroup2_mount(mountinfo)) {
        (Some(m), _) => MemoryHierarchy::V1(m),
        (None, Some(m)) => MemoryHierarchy::Unified(m),
        (None, None) => MemoryHierarchy::None,
    }
}

/// The mount of the v1 hierarchy with `controller` (a controller, or a
/// named hierarchy's `name=...`) among its options.
fn v1_mount(mountinfo: &str, controller: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let mut right = right.split_whitespace();
        let (fstype, _source, options) = (right.next()?, right.next()?, right.next()?);
        (fstype == "cgroup" && options.split(',').any(|o| o == controller))
            .then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
    })
}

/// The v1 memory controller, in mount options and /proc/<pid>/cgroup.
const MEMORY: &str = "memory";
/// systemd's named v1 hierarchy, where it (and the container runtimes
/// that ask it) place units, scopes and containers.
const SYSTEMD: &str = "name=systemd";

/// The hierarchy whose paths name the owners of sockets (the TCP records'
/// `cgroup`): the unified one, whose ids the kernel programs capture; on a
/// host without a cgroup2 mount, where those ids all name the root, a v1
/// hierarchy, from the owner's /proc/<pid>/cgroup: systemd's
/// (`name=systemd`), which has every unit, scope and container, else the
/// memory controller's, as the memory classes use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum OwnerHierarchy {
    Unified(PathBuf),
    V1 {
        mount: PathBuf,
        /// Its name in /proc/<pid>/cgroup's controller lists.
        controller: &'static str,
    },
    None,
}

impl OwnerHierarchy {
    pub(crate) fn detect() -> Self {
        let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        parse_owner_hierarchy(&text)
    }

    pub(crate) fn mount(&self) -> Option<&Path> {
        match self {
            Self::Unified(m) | Self::V1 { mount: m, .. } => Some(m),
            Self::None => None,
        }
    }
}

fn parse_owner_hierarchy(mountinfo: &str) -> OwnerHierarchy {
    if let Some(m) = parse_cgroup2_mount(mountinfo) {
        return OwnerHierarchy::Unified(m);
    }
    [SYSTEMD, MEMORY]
        .into_iter()
        .find_map(|controller| {
            let mount = v1_mount(mountinfo, controller)?;
            Some(OwnerHierarchy::V1 { mount, controller })
        })
        .unwrap_or(OwnerHierarchy::None)
}

/// The path in the v1 hierarchy of `controller` that a /proc/<pid>/cgroup
/// text gives (lines `id:controller,controller:path`).
pub(crate) fn v1_path<'a>(proc_cgroup: &'a str, controller: &str) -> Option<&'a str> {
    proc_cgroup.lines().find_map(|line| {
        let mut fields = line.splitn(3, ':');
        let (_id, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
        controllers
            .split(',')
            .any(|c| c == controller)
            .then_some(path)
    })
}

/// How long a process's v1 cgroup is taken as known: processes move (a
/// container runtime places its child after the fork) and pids are
/// reused.
const PROC_CGROUP_FOR: Duration = Duration::from_secs(10);
/// Bounds the processes remembered; cleared when full.
const MAX_PROC_CGROUPS: usize = 4096;

/// Processes' cgroups in one v1 hierarchy, from /proc/<pid>/cgroup, cached
/// for [`PROC_CGROUP_FOR`].
#[derive(Debug)]
pub(crate) struct ProcCgroups {
    controller: &'static str,
    cache: HashMap<u32, (Cgroup, Instant)>,
}

impl ProcCgroups {
    pub(crate) fn new(controller: &'static str) -> Self {
        Self {
            controller,
            cache: HashMap::default(),
        }
    }

    /// Process `pid`'s cgroup, unknown once it has exited.
    pub(crate) fn of(&mut self, pid: u32) -> Cgroup {
        let now = Instant::now();
        if let Some((cgroup, since)) = self.cache.get(&pid)
            && now.duration_since(*since) < PROC_CGROUP_FOR
        {
            return cgroup.clone();
        }
        let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        let cgroup = Cgroup(v1_path(&text, self.controller).map(cgroup_name));
        if self.cache.len() >= MAX_PROC_CGROUPS {
            self.cache.clear();
        }
        self.cache.insert(pid, (cgroup.clone(), now));
        cgroup
    }
}

/// A `--cgroup` argument resolved in the hierarchy mounted at `mount`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CgroupTarget {
    /// Relative to the mount, `/` for the root.
    pub path: String,
    /// Its id (the directory's inode number).
    pub id: u64,
    /// Its depth: 0 for the root.
    pub level: u32,
}

/// Why a `--cgroup` argument names no cgroup.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CgroupError {
    #[error("{}: {source}", dir.display())]
    Unreadable {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is not a cgroup directory", .0.display())]
    NotADirectory(PathBuf),
}

/// Resolves `arg`, a path relative to the mount or a full path under it.
pub(crate) fn resolve_in(mount: &Path, arg: &Path) -> Result<CgroupTarget, CgroupError> {
    let rel = arg.strip_prefix(mount).unwrap_or(arg);
    let parts: Vec<&str> = rel
        .components()
        .filter_map(|c| match c {
            std::path::Component::Normal(p) => p.to_str(),
            _ => None,
        })
        .collect();
    let dir = parts.iter().fold(mount.to_path_buf(), |d, p| d.join(p));
    let meta = match fs::metadata(&dir) {
        Ok(meta) => meta,
        Err(source) => return Err(CgroupError::Unreadable { dir, source }),
    };
    if !meta.is_dir() {
        return Err(CgroupError::NotADirectory(dir));
    }
    Ok(CgroupTarget {
        path: format!("/{}", parts.join("/")),
        id: meta.ino(),
        level: parts.len() as u32,
    })
}

/// Why a `--container` names no single cgroup.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ContainerError {
    #[error("no container's cgroup has that id (or a name of that prefix)")]
    NotFound,
    #[error("the prefix matches several containers: {0}")]
    Ambiguous(String),
}

/// The cgroup of the container `id` in the hierarchy mounted at `mount`,
/// relative to it: the one whose path shows that container id (a prefix of
/// at least 12 characters of a 64-hex id will do, as `docker ps` prints
/// them). A container's cgroups below its own (systemd-nspawn's payload
/// subtree) are its, not others.
pub(crate) fn find_container(mount: &Path, id: &str) -> Result<PathBuf, ContainerError> {
    let matches = |have: &str| have == id || (id.len() >= 12 && have.starts_with(id));
    let mut all = HashMap::default();
    walk(mount, mount, &mut all);
    let mut found: Vec<(Arc<str>, Arc<str>)> = all
        .into_values()
        .filter_map(|c| {
            let have = c.container_id.clone()?;
            matches(&have).then(|| (have, c.path.clone()))
        })
        .collect();
    // The outermost cgroup of each container.
    found.sort_by_key(|(_, path)| path.len());
    let mut ids: Vec<&Arc<str>> = found.iter().map(|(id, _)| id).collect();
    ids.sort();
    ids.dedup();
    match ids.len() {
        0 => Err(ContainerError::NotFound),
        1 => Ok(PathBuf::from(&*found[0].1)),
        _ => Err(ContainerError::Ambiguous(
            ids.iter().map(|i| &***i).collect::<Vec<_>>().join(", "),
        )),
    }
}

fn walk(root: &Path, dir: &Path, out: &mut Table) {
    if out.len() >= MAX_CGROUPS {
        return;
    }
    let Ok(meta) = fs::metadata(dir) else { return };
    let rel = dir.strip_prefix(root).unwrap_or(Path::new(""));
    out.insert(meta.ino(), cgroup_name(&format!("/{}", rel.display())));
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            walk(root, &entry.path(), out);
        }
    }
}

/// A cgroup's name in records, from its path relative to the mount.
pub(crate) fn cgroup_name(path: &str) -> Arc<CgroupName> {
    let identity = identify(path);
    Arc::new(CgroupName {
        path: path.into(),
        container_id: identity.container_id.map(Arc::from),
        pod_uid: identity.pod_uid.map(Arc::from),
    })
}

/// The cgroup2 mount point, from /proc/self/mountinfo (field 5 is the mount
/// point; the filesystem type follows the ` - ` separator).
pub(crate) fn find_cgroup2_mount() -> Option<PathBuf> {
    let text = fs::read_to_string("/proc/self/mountinfo").ok()?;
    parse_cgroup2_mount(&text)
}

pub(crate) fn parse_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        (right.split_whitespace().next()? == "cgroup2")
            .then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_hierarchy_prefers_the_v1_controller() {
        let hybrid =
            "30 25 0:26 / /sys/fs/cgroup/memory rw,relatime shared:11 - cgroup cgroup rw,memory
29 25 0:25 / /sys/fs/cgroup/cpu rw,relatime shared:10 - cgroup cgroup rw,cpu
31 25 0:27 / /sys/fs/cgroup/unified rw,relatime shared:12 - cgroup2 cgroup2 rw
";
        assert_eq!(
            parse_memory_hierarchy(hybrid),
            MemoryHierarchy::V1("/sys/fs/cgroup/memory".into())
        );
        let pure = "31 25 0:27 / /sys/fs/cgroup rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(
            parse_memory_hierarchy(pure),
            MemoryHierarchy::Unified("/sys/fs/cgroup".into())
        );
        assert_eq!(parse_memory_hierarchy(""), MemoryHierarchy::None);
    }

    #[test]
    fn finds_containers_by_id_or_prefix() {
        let root = std::env::temp_dir().join(format!("kdiag-ct-{}", std::process::id()));
        let a = format!("{}{}", "ab12cd34ef56", "0".repeat(52));
        let b = format!("{}{}", "ab12cd34ef56", "1".repeat(52));
        let c = format!("{}{}", "ffff", "2".repeat(60));
        let pod = "kubepods-burstable-pod1b2c3d4e_5f60_4a1b_8c2d_3e4f5a6b7c8d.slice";
        for dir in [
            format!("kubepods.slice/{pod}/cri-containerd-{a}.scope"),
            format!("system.slice/docker-{b}.scope"),
            format!("system.slice/docker-{c}.scope/inner"),
        ] {
            fs::create_dir_all(root.join(dir)).unwrap();
        }
        let found = |id: &str| find_container(&root, id);
        assert_eq!(
            found(&a).unwrap(),
            PathBuf::from(format!("/kubepods.slice/{pod}/cri-containerd-{a}.scope"))
        );
        // A container's own cgroup, not the ones below it.
        assert_eq!(
            found(&c[..12]).unwrap(),
            PathBuf::from(format!("/system.slice/docker-{c}.scope"))
        );
        assert!(matches!(found(&a[..12]), Err(ContainerError::Ambiguous(_))));
        assert!(matches!(found(&c[..11]), Err(ContainerError::NotFound)));
        assert!(matches!(found("nope"), Err(ContainerError::NotFound)));
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn resolves_cgroup_arguments() {
        let root = std::env::temp_dir().join(format!("kdiag-cg-{}", std::process::id()));
        fs::create_dir_all(root.join("a/b")).unwrap();
        let ino = fs::metadata(root.join("a/b")).unwrap().ino();
        for arg in ["/a/b", "a/b/", "/a/b/"] {
            let t = resolve_in(&root, Path::new(arg)).unwrap();
            assert_eq!((t.path.as_str(), t.id, t.level), ("/a/b", ino, 2), "{arg}");
        }
        let full = resolve_in(&root, &root.join("a")).unwrap();
        assert_eq!((full.path.as_str(), full.level), ("/a", 1));
        let top = resolve_in(&root, Path::new("/")).unwrap();
        assert_eq!((top.path.as_str(), top.level), ("/", 0));
        assert!(resolve_in(&root, Path::new("/nope")).is_err());
        fs::remove_dir_all(&root).unwrap();
    }

    /// An event's cgroup is named once the walk that looks for it is
    /// done, however long that takes; an id asked for within
    /// `RESCAN_EVERY` of that walk is unknown at once, without a new walk.
    #[test]
    fn events_wait_for_the_walk_that_names_their_cgroup() {
        let root = std::env::temp_dir().join(format!("kdiag-cw-{}", std::process::id()));
        fs::create_dir_all(root.join("pod/ctr")).unwrap();
        let ino = fs::metadata(root.join("pod/ctr")).unwrap().ino();
        let mut paths = CgroupPaths::with_mount(Some(root.clone()));
        let named = loop {
            if let Some(cgroup) = paths.name_when_walked(ino, true) {
                break cgroup;
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        assert_eq!(named.path(), Some("/pod/ctr"));
        let unknown = paths.name_when_walked(u64::MAX, true);
        assert!(unknown.is_some_and(|c| c.path().is_none()));
        assert!(paths.walking.is_none());
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn owners_from_a_v1_hierarchy_without_cgroup2() {
        let systemd =
            "25 24 0:22 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,xattr,name=systemd\n";
        let memory = "30 25 0:26 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n";
        let unified = "31 25 0:27 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            parse_owner_hierarchy(&format!("{memory}{systemd}")),
            OwnerHierarchy::V1 {
                mount: "/sys/fs/cgroup/systemd".into(),
                controller: "name=systemd"
            }
        );
        assert_eq!(
            parse_owner_hierarchy(memory),
            OwnerHierarchy::V1 {
                mount: "/sys/fs/cgroup/memory".into(),
                controller: "memory"
            }
        );
        // With a cgroup2 mount, the ids the programs capture name the owner.
        assert_eq!(
            parse_owner_hierarchy(&format!("{memory}{systemd}{unified}")),
            OwnerHierarchy::Unified("/sys/fs/cgroup/unified".into())
        );
        assert_eq!(parse_owner_hierarchy(""), OwnerHierarchy::None);
    }

    #[test]
    fn v1_paths_from_proc_pid_cgroup() {
        // A process in a Kubernetes pod on a cgroup v1 node (cgroupfs
        // driver), as /proc/<pid>/cgroup lists it.
        let id = "0123456789abcdef".repeat(4);
        let text = format!(
            "12:memory:/kubepods/burstable/pod1b2c3d4e-5f60-4a1b-8c2d-3e4f5a6b7c8d/{id}\n\
             4:cpu,cpuacct:/kubepods/burstable/pod1b2c3d4e-5f60-4a1b-8c2d-3e4f5a6b7c8d/{id}\n\
             1:name=systemd:/system.slice/containerd.service/kubepods-x.slice:cri-containerd:{id}\n\
             0::/\n"
        );
        assert_eq!(
            v1_path(&text, "memory"),
            Some(
                format!("/kubepods/burstable/pod1b2c3d4e-5f60-4a1b-8c2d-3e4f5a6b7c8d/{id}")
                    .as_str()
            )
        );
        // A path may hold colons: only the first two separate fields.
        assert_eq!(
            v1_path(&text, "name=systemd"),
            Some(
                format!("/system.slice/containerd.service/kubepods-x.slice:cri-containerd:{id}")
                    .as_str()
            )
        );
        assert_eq!(
            v1_path(&text, "cpuacct").map(|p| p.len()),
            v1_path(&text, "memory").map(|p| p.len())
        );
        assert_eq!(v1_path("0::/\n", "memory"), None);
        let name = cgroup_name(v1_path(&text, "memory").unwrap());
        assert_eq!(name.container_id.as_deref(), Some(id.as_str()));
        assert_eq!(
            name.pod_uid.as_deref(),
            Some("1b2c3d4e-5f60-4a1b-8c2d-3e4f5a6b7c8d")
        );
    }

    #[test]
    fn a_processes_v1_cgroup_is_read_once_then_cached() {
        let pid = std::process::id();
        let text = fs::read_to_string("/proc/self/cgroup").unwrap();
        let mut cgroups = ProcCgroups::new(MEMORY);
        let first = cgroups.of(pid);
        assert_eq!(first.path(), v1_path(&text, MEMORY));
        // The same shared name, from the cache.
        let again = cgroups.of(pid);
        assert!(match (&first.0, &again.0) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (a, b) => a.is_none() && b.is_none(),
        });
        // A process that is gone has none.
        assert_eq!(cgroups.of(u32::MAX).path(), None);
    }

    #[test]
    fn finds_cgroup2_mount_on_hybrid_hosts() {
        let text =
            "30 25 0:26 / /sys/fs/cgroup/memory rw,relatime shared:11 - cgroup cgroup rw,memory
31 25 0:27 / /sys/fs/cgroup/unified rw,relatime shared:12 - cgroup2 cgroup2 rw
";
        assert_eq!(
            parse_cgroup2_mount(text),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(parse_cgroup2_mount("garbage\n - \n"), None);
    }
}
