//! Running a program as another user, or as root with fewer capabilities:
//! the one way the tests do it ([`Identity::command`]).
//!
//! Such a process can only execute what it can reach. The checkout, and so
//! every binary built in it, may be in a directory other users cannot enter
//! (root's home, a `mktemp -d` directory): what runs under an [`Identity`]
//! is therefore always a [`SharedCopy`], a copy in a fresh directory every
//! user can reach. [`shared_agent`] is that copy of the agent under test.

use std::ffi::OsStr;
use std::fmt;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use crate::cmd;
use crate::env;
use crate::tempdir::TempDir;

/// The uid and gid of `nobody` and `nogroup` on Debian.
pub const NOBODY: u32 = 65534;

/// A capability an [`Identity`] may keep: those the agent uses (see
/// deploy/kdiag-agent.service).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cap {
    DacReadSearch,
    Setgid,
    Setuid,
    Setpcap,
    SysPtrace,
    SysAdmin,
    Perfmon,
    Bpf,
}

impl Cap {
    /// Every capability an [`Identity`] may keep.
    pub const ALL: [Cap; 8] = [
        Cap::DacReadSearch,
        Cap::Setgid,
        Cap::Setuid,
        Cap::Setpcap,
        Cap::SysPtrace,
        Cap::SysAdmin,
        Cap::Perfmon,
        Cap::Bpf,
    ];

    /// The capability named `name` (`CAP_BPF`), if an [`Identity`] may keep
    /// it.
    pub fn from_name(name: &str) -> Option<Cap> {
        Cap::ALL.into_iter().find(|cap| cap.name() == name)
    }

    /// Its number (linux/capability.h).
    pub fn bit(self) -> u32 {
        match self {
            Cap::DacReadSearch => 2,
            Cap::Setgid => 6,
            Cap::Setuid => 7,
            Cap::Setpcap => 8,
            Cap::SysPtrace => 19,
            Cap::SysAdmin => 21,
            Cap::Perfmon => 38,
            Cap::Bpf => 39,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Cap::DacReadSearch => "CAP_DAC_READ_SEARCH",
            Cap::Setgid => "CAP_SETGID",
            Cap::Setuid => "CAP_SETUID",
            Cap::Setpcap => "CAP_SETPCAP",
            Cap::SysPtrace => "CAP_SYS_PTRACE",
            Cap::SysAdmin => "CAP_SYS_ADMIN",
            Cap::Perfmon => "CAP_PERFMON",
            Cap::Bpf => "CAP_BPF",
        }
    }
}

/// Who a process runs as: user and group ids (no supplementary groups) and
/// exactly these capabilities.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    uid: u32,
    gid: u32,
    caps: Vec<Cap>,
    /// The locked-memory limit (soft and hard) to start with, as a unit's
    /// `LimitMEMLOCK=` sets it; `None` leaves the test's own.
    memlock: Option<libc::rlim_t>,
}

impl Identity {
    /// nobody: uid and gid 65534, no capabilities.
    pub fn nobody() -> Identity {
        Identity::user_with(NOBODY, NOBODY, &[])
    }

    /// Root's ids, but only `caps`, as a systemd unit running as root with
    /// a `CapabilityBoundingSet=` gets.
    pub fn root_with(caps: &[Cap]) -> Identity {
        Identity::user_with(0, 0, caps)
    }

    /// `uid` and `gid` with `caps`, as a systemd unit with `User=` and
    /// `AmbientCapabilities=` gets.
    pub fn user_with(uid: u32, gid: u32, caps: &[Cap]) -> Identity {
        Identity {
            uid,
            gid,
            caps: caps.to_vec(),
            memlock: None,
        }
    }

    /// This identity with a locked-memory limit of `bytes` (`None`: no
    /// limit), as `LimitMEMLOCK=` gives a unit.
    pub fn with_memlock_limit(mut self, bytes: Option<u64>) -> Identity {
        self.memlock = Some(bytes.unwrap_or(libc::RLIM_INFINITY));
        self
    }

    pub fn uid(&self) -> u32 {
        self.uid
    }

    pub fn gid(&self) -> u32 {
        self.gid
    }

    /// The capability mask (as /proc/PID/status shows it) of a process
    /// started by [`Identity::command`].
    pub fn cap_mask(&self) -> u64 {
        self.caps.iter().fold(0, |mask, cap| mask | 1 << cap.bit())
    }

    /// A command that runs `program` (a copy every user can reach) as this
    /// identity, from `/` (not from the test's working directory, in the
    /// checkout). The child switches before its exec, the way systemd
    /// applies `User=` and capabilities, so the exec itself is already done
    /// with only this identity's rights: its bounding, permitted,
    /// effective, inheritable and ambient sets are exactly the capabilities
    /// (the exec of a non-root user keeps them through the ambient set, that
    /// of root through the bounding set). The child is the program itself,
    /// under the pid `spawn` reports.
    pub fn command(&self, program: &SharedCopy) -> Command {
        let mut command = Command::new(program.path());
        command.current_dir("/");
        let (uid, gid, mask, memlock) = (self.uid, self.gid, self.cap_mask(), self.memlock);
        let last_cap = last_cap();
        // SAFETY: the closure runs between fork and exec and only makes
        // async-signal-safe calls (setrlimit, prctl, setgroups, setresgid,
        // setresuid, capset) on integers and stack data; it allocates
        // nothing.
        unsafe {
            command.pre_exec(move || {
                if let Some(limit) = memlock {
                    set_memlock_limit(limit);
                }
                switch(uid, gid, mask, last_cap)
            })
        };
        command
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "uid {} gid {} with ", self.uid, self.gid)?;
        if self.caps.is_empty() {
            return f.write_str("no capabilities");
        }
        let names: Vec<&str> = self.caps.iter().map(|c| c.name()).collect();
        f.write_str(&names.join(", "))
    }
}

/// The highest capability number the running kernel knows.
fn last_cap() -> u32 {
    let path = "/proc/sys/kernel/cap_last_cap";
    fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// In the child, still root. Raising a hard limit needs CAP_SYS_RESOURCE,
/// which root lacks in some containers: there the limit stays as it is, as
/// it would for a unit that a service manager starts in the same place.
fn set_memlock_limit(limit: libc::rlim_t) {
    let limit = libc::rlimit {
        rlim_cur: limit,
        rlim_max: limit,
    };
    // SAFETY: setrlimit with a valid rlimit on the stack.
    let _ = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &raw const limit) };
}

/// In the child, still root with every capability: takes the ids and
/// leaves exactly `mask` in every capability set.
fn switch(uid: u32, gid: u32, mask: u64, last_cap: u32) -> std::io::Result<()> {
    let check = |rc: libc::c_long| {
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    // prctl's arguments are unsigned longs to the kernel: passed as such
    // through the variadic call.
    let ulong = libc::c_ulong::from;
    let prctl = |option: libc::c_int, arg2: libc::c_ulong, arg3: libc::c_ulong| {
        // SAFETY: prctl with integer arguments only.
        check(unsafe { libc::prctl(option, arg2, arg3, ulong(0u32), ulong(0u32)) }.into())
    };
    // Needs CAP_SETPCAP, so before anything else is dropped.
    for cap in (0..=last_cap).filter(|c| mask & (1 << c) == 0) {
        prctl(libc::PR_CAPBSET_DROP, ulong(cap), 0)?;
    }
    // Keeps the permitted set across the change of uid.
    prctl(libc::PR_SET_KEEPCAPS, 1, 0)?;
    // SAFETY: setgroups with no groups, then plain id changes.
    unsafe {
        check(libc::setgroups(0, std::ptr::null()).into())?;
        check(libc::setresgid(gid, gid, gid).into())?;
        check(libc::setresuid(uid, uid, uid).into())?;
    }
    let header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let (low, high) = (mask as u32, (mask >> 32) as u32);
    let data = [
        CapData {
            effective: low,
            permitted: low,
            inheritable: low,
        },
        CapData {
            effective: high,
            permitted: high,
            inheritable: high,
        },
    ];
    // SAFETY: capset with a valid v3 header and two data words, both alive
    // for the call.
    check(unsafe { libc::syscall(libc::SYS_capset, &raw const header, data.as_ptr()) })?;
    // Ambient capabilities need to be permitted and inheritable: now they are.
    let raise = libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong;
    for cap in (0..=last_cap).filter(|c| mask & (1 << c) != 0) {
        prctl(libc::PR_CAP_AMBIENT, raise, ulong(cap))?;
    }
    Ok(())
}

/// `struct __user_cap_header_struct` (linux/capability.h).
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

/// `struct __user_cap_data_struct`.
#[repr(C)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// A copy of an executable that every user can run: in a fresh directory
/// of its own (mode 0755, owned by root, on a file system that allows
/// exec) whose every parent directory other users may enter; the copy has
/// mode 0755 and the original's file name (so the same comm). Removed in
/// Drop.
#[derive(Debug)]
pub struct SharedCopy {
    dir: TempDir,
    path: PathBuf,
}

impl SharedCopy {
    pub fn of(original: &Path) -> SharedCopy {
        env::require_root();
        let name = original
            .file_name()
            .unwrap_or_else(|| panic!("{} has no file name", original.display()));
        let dir = shared_dir();
        let path = dir.path().join(name);
        // Copied by a child process, not by us: while this process held the
        // copy open for writing, any child forked meanwhile by another test
        // thread would hold it too, and an exec of the copy could then fail
        // with ETXTBSY.
        cmd::run_command(
            Command::new("install")
                .args([OsStr::new("-m"), OsStr::new("0755"), OsStr::new("--")])
                .args([original.as_os_str(), path.as_os_str()]),
        );
        SharedCopy { dir, path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// The agent under test (`KDIAG_AGENT`) as a [`SharedCopy`]: made once per
/// test process, on first use, and removed when the process exits.
pub fn shared_agent() -> &'static SharedCopy {
    SHARED_AGENT.get_or_init(|| {
        let copy = SharedCopy::of(&env::agent_path());
        // SAFETY: registers a function that takes no arguments and does not
        // unwind; it only reads a static that is set by then.
        let rc = unsafe { libc::atexit(remove_shared_agent) };
        assert_eq!(rc, 0, "atexit failed: the copy of the agent would stay");
        copy
    })
}

/// Statics are never dropped: this removes the shared agent at exit.
static SHARED_AGENT: OnceLock<SharedCopy> = OnceLock::new();

extern "C" fn remove_shared_agent() {
    if let Some(copy) = SHARED_AGENT.get() {
        let _ = fs::remove_dir_all(copy.dir());
    }
}

/// A fresh directory (mode 0755) for shared copies in the first of the
/// temporary directory (`TMPDIR`), /var/tmp and /tmp that every user can
/// reach and run programs from. Panics naming why none fits.
fn shared_dir() -> TempDir {
    let mut bases = vec![std::env::temp_dir()];
    for base in ["/var/tmp", "/tmp"].map(PathBuf::from) {
        if !bases.contains(&base) {
            bases.push(base);
        }
    }
    let mut refused = Vec::new();
    for base in &bases {
        let created = everyone_can_run_from(base)
            .and_then(|()| TempDir::create_in(base, "shared", 0o755).map_err(|e| e.to_string()));
        match created {
            Ok(dir) => return dir,
            Err(why) => refused.push(format!("{}: {why}", base.display())),
        }
    }
    panic!(
        "no directory to put a copy of a test program in that every user can reach and run \
         programs from: {}",
        refused.join("; ")
    )
}

/// Ok when every user may enter `dir` and its parents and the file system
/// there allows exec.
pub fn everyone_can_run_from(dir: &Path) -> Result<(), String> {
    let dir = fs::canonicalize(dir).map_err(|e| e.to_string())?;
    for ancestor in dir.ancestors() {
        let mode = fs::metadata(ancestor)
            .map_err(|e| format!("{}: {e}", ancestor.display()))?
            .permissions()
            .mode();
        if mode & 0o001 == 0 {
            return Err(format!(
                "other users cannot enter {} (mode {:o})",
                ancestor.display(),
                mode & 0o7777
            ));
        }
    }
    let c_dir =
        std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: an all-zero statvfs is valid; statvfs fills it.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid NUL-terminated path and out pointer.
    if unsafe { libc::statvfs(c_dir.as_ptr(), &mut st) } != 0 {
        return Err(format!("statvfs: {}", std::io::Error::last_os_error()));
    }
    if st.f_flag & libc::ST_NOEXEC != 0 {
        return Err("mounted noexec".to_owned());
    }
    Ok(())
}
