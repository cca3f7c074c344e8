//! cgroup v2 ids (from `bpf_get_current_cgroup_id`) to paths.
//!
//! On cgroup v2 a cgroup's id is the inode number of its directory in the
//! cgroup2 mount (kernfs node id), so one walk of the mount maps every id to
//! its path. New cgroups appear all the time (containers, systemd units), so
//! an unknown id triggers a new walk, at most once per `RESCAN_EVERY`.

use std::{
    collections::HashMap,
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

const RESCAN_EVERY: Duration = Duration::from_secs(1);
/// Bounds the walk on hosts with very many cgroups.
const MAX_CGROUPS: usize = 100_000;

#[derive(Debug, Default)]
pub struct CgroupPaths {
    mount: Option<PathBuf>,
    paths: HashMap<u64, String>,
    last_scan: Option<Instant>,
}

impl CgroupPaths {
    pub fn new() -> Self {
        Self {
            mount: find_cgroup2_mount(),
            ..Self::default()
        }
    }

    /// The path of cgroup `id` relative to the cgroup2 root (`/` for the
    /// root itself), or `None` when unknown.
    pub fn path(&mut self, id: u64) -> Option<String> {
        if id == 0 {
            return None;
        }
        if let Some(p) = self.paths.get(&id) {
            return Some(p.clone());
        }
        let stale = self.last_scan.is_none_or(|t| t.elapsed() >= RESCAN_EVERY);
        if stale && let Some(mount) = self.mount.clone() {
            self.paths.clear();
            walk(&mount, &mount, &mut self.paths);
            self.last_scan = Some(Instant::now());
        }
        self.paths.get(&id).cloned()
    }
}

/// A `--cgroup` argument as a path relative to the cgroup2 mount: full
/// paths under the mount are shortened, relative ones kept.
pub fn relative_to_mount(path: &str) -> String {
    let rel = find_cgroup2_mount()
        .and_then(|m| {
            Path::new(path)
                .strip_prefix(m)
                .ok()
                .map(|r| format!("/{}", r.display()))
        })
        .unwrap_or_else(|| path.to_owned());
    if rel.is_empty() { "/".to_owned() } else { rel }
}

fn walk(root: &Path, dir: &Path, out: &mut HashMap<u64, String>) {
    if out.len() >= MAX_CGROUPS {
        return;
    }
    let Ok(meta) = fs::metadata(dir) else { return };
    let rel = dir.strip_prefix(root).unwrap_or(Path::new(""));
    out.insert(meta.ino(), format!("/{}", rel.display()));
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            walk(root, &entry.path(), out);
        }
    }
}

/// The cgroup2 mount point, from /proc/self/mountinfo (field 5 is the mount
/// point; the filesystem type follows the ` - ` separator).
fn find_cgroup2_mount() -> Option<PathBuf> {
    let text = fs::read_to_string("/proc/self/mountinfo").ok()?;
    parse_cgroup2_mount(&text)
}

pub fn parse_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
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
