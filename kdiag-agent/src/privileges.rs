//! Checks, before touching the kernel, that the agent may load and attach
//! BPF programs, so that a missing privilege is one clear message instead of
//! an EPERM from deep inside the loader; and once everything is attached,
//! gives up root, every capability the rest of the run does not need, and
//! every system call it does not make (a seccomp filter), or stops.

use std::{fs, os::fd::BorrowedFd, thread, time::Duration};

use crate::{
    output::record::Degraded,
    sys::{
        self, SyscallError,
        caps::{self, CapsError},
        ids::{self, UserIds},
        seccomp::SeccompError,
    },
};

const CAP_DAC_OVERRIDE: u32 = 1;
const CAP_SETGID: u32 = 6;
const CAP_SETUID: u32 = 7;
const CAP_SETPCAP: u32 = 8;
const CAP_SYS_PTRACE: u32 = 19;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Capabilities that must be gone from the effective, permitted and
/// bounding sets once the agent runs: with any of them a compromised agent
/// could read or write any file, or any process's memory, or reconfigure
/// the kernel.
const FORBIDDEN: u64 = (1 << CAP_SYS_ADMIN) | (1 << CAP_SYS_PTRACE) | (1 << CAP_DAC_OVERRIDE);

/// What the agent may keep after attaching, if the kernel needs it (see
/// [`bpf_needs_capability`]): CAP_BPF, for the bpf() commands on the maps
/// and programs it already holds (map reads for agent_stats' losses, the
/// programs' run counts and the classes' tables; writes of the budget's
/// gates). Ring and perf buffers are already
/// mapped, detaching is closing descriptors (and an ioctl on a perf event):
/// none needs a capability.
const MAY_KEEP: u64 = 1 << CAP_BPF;

/// Capability names by number (linux/capability.h), for messages and
/// `agent_start`.
const NAMES: [&str; 41] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// The names of the capabilities in `mask`, lowest number first; unknown
/// ones as `CAP_<n>`.
pub(crate) fn cap_names(mask: u64) -> Vec<String> {
    (0..64)
        .filter(|bit| mask & (1 << bit) != 0)
        .map(|bit| {
            NAMES
                .get(bit as usize)
                .map_or_else(|| format!("CAP_{bit}"), |n| (*n).to_owned())
        })
        .collect()
}

#[derive(Debug, thiserror::Error)]
#[error(
    "missing privileges: kdiag-agent needs CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN) \
     to load and attach its kernel programs; it has {have}. Run it as root (sudo kdiag-agent ...) \
     or grant those capabilities"
)]
pub(crate) struct MissingPrivileges {
    have: String,
}

/// Ok when the effective capabilities allow loading tracepoint programs.
pub(crate) fn check() -> Result<(), MissingPrivileges> {
    let caps = ProcStatus::of_self().cap_eff;
    if allowed(caps) {
        return Ok(());
    }
    let have = [
        (CAP_BPF, "CAP_BPF"),
        (CAP_PERFMON, "CAP_PERFMON"),
        (CAP_SYS_ADMIN, "CAP_SYS_ADMIN"),
    ]
    .iter()
    .filter(|(bit, _)| caps & (1 << bit) != 0)
    .map(|(_, name)| *name)
    .collect::<Vec<_>>();
    Err(MissingPrivileges {
        have: if have.is_empty() {
            "none of them".to_owned()
        } else {
            format!("only {}", have.join(", "))
        },
    })
}

fn allowed(caps: u64) -> bool {
    let has = |bit: u32| caps & (1 << bit) != 0;
    has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON))
}

/// The user named by `--user`, which the agent becomes once attached.
#[derive(Debug, Clone)]
pub(crate) struct RunAs {
    name: String,
    ids: UserIds,
}

/// Why `--user` names no user the agent can run as: usage errors.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UserError {
    #[error("--user {0}: no such user")]
    NoSuchUser(String),
    #[error(
        "--user {0}: that is root (uid 0); the agent gives up root once attached, so name an \
         unprivileged user (the default is nobody)"
    )]
    Root(String),
    #[error("--user {name}: cannot look the user up")]
    Lookup {
        name: String,
        #[source]
        source: SyscallError,
    },
}

impl RunAs {
    /// Looks the user up (before anything is loaded: a user that does not
    /// exist is a usage error).
    pub(crate) fn lookup(name: &str) -> Result<Self, UserError> {
        let ids = ids::lookup_user(name)
            .map_err(|source| UserError::Lookup {
                name: name.to_owned(),
                source,
            })?
            .ok_or_else(|| UserError::NoSuchUser(name.to_owned()))?;
        if ids.uid == 0 {
            return Err(UserError::Root(name.to_owned()));
        }
        Ok(Self {
            name: name.to_owned(),
            ids,
        })
    }
}

/// Why the agent cannot give up what it must, before it loads anything or
/// once attached. Either way it stops (exit code 1) rather than run with
/// more privileges than it should.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DropError {
    #[error(
        "cannot become user {user} after attaching: changing the user and group ids needs {missing}"
    )]
    CannotSwitch { user: String, missing: String },
    #[error(
        "cannot give up {caps} after attaching: the bounding set holds them, and only \
         CAP_SETPCAP can remove them from it; run the agent without them, or with CAP_SETPCAP"
    )]
    CannotDropBounding { caps: String },
    #[error("the process has {0} threads; capabilities and ids would change for one of them only")]
    Threads(u32),
    #[error("cannot clear the ambient capabilities")]
    Ambient(#[source] CapsError),
    #[error("cannot drop capability {cap} from the bounding set")]
    Bounding {
        cap: u32,
        #[source]
        source: CapsError,
    },
    #[error("cannot become user {user}")]
    Switch {
        user: String,
        #[source]
        source: SyscallError,
    },
    #[error("cannot make the process not dumpable")]
    Dumpable(#[source] SyscallError),
    #[error("cannot set no_new_privs")]
    NoNewPrivs(#[source] SyscallError),
    #[error("cannot reduce the effective and permitted capabilities")]
    Reduce(#[source] CapsError),
    #[error("cannot install the seccomp filter")]
    Seccomp(#[source] SeccompError),
    #[error("privileges remain after dropping them: {0}")]
    Remain(String),
}

/// Ok when the agent, as it is now, will be able to become `user` and give
/// up the forbidden capabilities once attached; checked before loading, so
/// that it does not attach only to stop.
pub(crate) fn check_drop(user: &RunAs) -> Result<(), DropError> {
    let status = ProcStatus::of_self();
    let missing: Vec<String> = if ids::running_as(user.ids) {
        Vec::new()
    } else {
        cap_names(((1 << CAP_SETUID) | (1 << CAP_SETGID)) & !status.cap_eff)
    };
    if !missing.is_empty() {
        return Err(DropError::CannotSwitch {
            user: user.name.clone(),
            missing: missing.join(" and "),
        });
    }
    if status.cap_bnd & FORBIDDEN != 0 && status.cap_eff & (1 << CAP_SETPCAP) == 0 {
        return Err(DropError::CannotDropBounding {
            caps: cap_names(status.cap_bnd & FORBIDDEN).join(", "),
        });
    }
    Ok(())
}

/// Who the agent is once [`drop_after_attach`] succeeded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Dropped {
    pub uid: u32,
    pub gid: u32,
    /// The capabilities it holds (effective and permitted alike).
    pub caps: u64,
    /// What it cannot do for want of a capability it was not given.
    pub degraded: Vec<Degraded>,
}

/// Gives up what the rest of the run does not need, in this order: every
/// capability but those of [`MAY_KEEP`] the kernel still requires (probed
/// with `probe_fd`, a BPF program or map the agent holds) from every set,
/// and from the bounding set where CAP_SETPCAP allows; root, for `user`'s
/// ids and no supplementary groups; then makes the process not dumpable,
/// sets no_new_privs and installs the seccomp filter (which lets it accept
/// connections when `serving` metrics). Checks the outcome in /proc/self/status: a forbidden
/// capability anywhere, uid 0 or no filter is an error, and the caller
/// stops.
pub(crate) fn drop_after_attach(
    user: &RunAs,
    probe_fd: Option<BorrowedFd<'_>>,
    serving: bool,
) -> Result<Dropped, DropError> {
    sys::process::read_auxiliary_vector();
    let bpf = probe_fd.map_or(BpfCommands::MayBecomeGated, bpf_commands);
    let keep_wanted = if bpf == BpfCommands::Free {
        0
    } else {
        MAY_KEEP
    };
    let threads = wait_single_threaded();
    if threads != 1 {
        return Err(DropError::Threads(threads));
    }
    let status = ProcStatus::of_self();
    let keep = keep_wanted & status.cap_prm;
    let mut degraded = Vec::new();
    if bpf == BpfCommands::Gated && keep & (1 << CAP_BPF) == 0 {
        degraded.push(Degraded {
            what: "capabilities".to_owned(),
            why: "this kernel refuses bpf() commands without CAP_BPF, which the agent was not \
                  given (CAP_SYS_ADMIN, which it gives up, stood in for it): once attached it \
                  cannot read its maps (agent_stats losses and run counts, softirq and \
                  memory summaries) nor apply its CPU budget"
                .to_owned(),
        });
    }
    caps::clear_ambient().map_err(DropError::Ambient)?;
    // Dropping from the bounding set needs CAP_SETPCAP, which goes last,
    // and comes before the ids change, which empties the effective set.
    if status.cap_eff & (1 << CAP_SETPCAP) != 0 {
        let last = fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .unwrap_or(40)
            .min(caps::last_known());
        for cap in (0..=last).filter(|c| keep & (1 << c) == 0 && *c != CAP_SETPCAP) {
            caps::drop_bounding(cap).map_err(|source| DropError::Bounding { cap, source })?;
        }
        if keep & (1 << CAP_SETPCAP) == 0 {
            caps::drop_bounding(CAP_SETPCAP).map_err(|source| DropError::Bounding {
                cap: CAP_SETPCAP,
                source,
            })?;
        }
    }
    let switch_ids = !ids::running_as(user.ids);
    if switch_ids {
        let switch = |source| DropError::Switch {
            user: user.name.clone(),
            source,
        };
        // From uid 0 to another, the kernel empties the permitted set
        // unless told to keep it (the effective set empties anyway).
        ids::keep_capabilities(true).map_err(switch)?;
        ids::switch_to(user.ids).map_err(switch)?;
        ids::keep_capabilities(false).map_err(switch)?;
    }
    // Other processes of the same user must not ptrace the agent (and so
    // take its descriptors).
    sys::process::set_not_dumpable().map_err(DropError::Dumpable)?;
    caps::set_no_new_privs().map_err(DropError::NoNewPrivs)?;
    caps::limit_to(keep).map_err(DropError::Reduce)?;
    sys::seccomp::install(serving).map_err(DropError::Seccomp)?;
    let after = ProcStatus::of_self();
    after.confirm_dropped(user.ids, keep, switch_ids)?;
    Ok(Dropped {
        uid: user.ids.uid,
        gid: user.ids.gid,
        caps: after.cap_eff,
        degraded,
    })
}

/// Whether bpf() commands on descriptors the agent already holds need
/// CAP_BPF (see [`bpf_commands`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BpfCommands {
    /// The kernel allows them without it.
    Free,
    /// The kernel refuses them without it.
    Gated,
    /// They work without it now, but unprivileged BPF is enabled, and on
    /// kernels that check every command, disabling it later (as an
    /// administrator may at any time) would refuse them.
    MayBecomeGated,
}

/// Whether bpf() commands on descriptors the agent already holds (`fd`, a
/// program) need CAP_BPF: tried on a thread of its own whose effective set
/// is empty (capabilities are per thread), so the agent's own stay as they
/// are. Kernels before 6.5 check every bpf() command when
/// `kernel.unprivileged_bpf_disabled` is set (`__sys_bpf` in
/// kernel/bpf/syscall.c: `if (sysctl_unprivileged_bpf_disabled &&
/// !bpf_capable()) return -EPERM;`); 6.5 and later check at map creation
/// and program load only, and a descriptor's holder may use it. When the
/// sysctl is 0 the try cannot tell the two apart.
fn bpf_commands(fd: BorrowedFd<'_>) -> BpfCommands {
    let unprivileged_bpf_disabled =
        fs::read_to_string("/proc/sys/kernel/unprivileged_bpf_disabled")
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok());
    if unprivileged_bpf_disabled.is_none_or(|v| v == 0) {
        return BpfCommands::MayBecomeGated;
    }
    let without_capabilities = thread::scope(|scope| {
        scope
            .spawn(|| {
                caps::clear_effective().ok()?;
                Some(sys::bpf::query_object(fd).is_ok())
            })
            .join()
    });
    match without_capabilities {
        Ok(Some(true)) => BpfCommands::Free,
        _ => BpfCommands::Gated,
    }
}

/// The number of threads, once a thread that just ended is gone: the kernel
/// counts an exiting thread until it is released, a moment after a join
/// returns.
fn wait_single_threaded() -> u32 {
    let mut threads = ProcStatus::of_self().threads;
    for _ in 0..100 {
        if threads == 1 {
            break;
        }
        thread::sleep(Duration::from_millis(2));
        threads = ProcStatus::of_self().threads;
    }
    threads
}

/// The lines of /proc/PID/status that say what a process may do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ProcStatus {
    /// Real, effective, saved and file system ids.
    pub uids: Vec<u32>,
    pub gids: Vec<u32>,
    pub groups: Vec<u32>,
    pub cap_inh: u64,
    pub cap_prm: u64,
    pub cap_eff: u64,
    pub cap_bnd: u64,
    pub cap_amb: u64,
    pub no_new_privs: bool,
    /// 0 none, 1 strict, 2 filter.
    pub seccomp: u32,
    pub threads: u32,
}

impl ProcStatus {
    /// This process's; all-empty (no capabilities) if unreadable.
    pub(crate) fn of_self() -> Self {
        Self::parse(&fs::read_to_string("/proc/self/status").unwrap_or_default())
    }

    pub(crate) fn parse(text: &str) -> Self {
        let mut s = Self::default();
        for line in text.lines() {
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            let hex = || u64::from_str_radix(value, 16).unwrap_or(0);
            let ids = || {
                value
                    .split_whitespace()
                    .filter_map(|v| v.parse().ok())
                    .collect()
            };
            match key {
                "Uid" => s.uids = ids(),
                "Gid" => s.gids = ids(),
                "Groups" => s.groups = ids(),
                "CapInh" => s.cap_inh = hex(),
                "CapPrm" => s.cap_prm = hex(),
                "CapEff" => s.cap_eff = hex(),
                "CapBnd" => s.cap_bnd = hex(),
                "CapAmb" => s.cap_amb = hex(),
                "NoNewPrivs" => s.no_new_privs = value == "1",
                "Seccomp" => s.seccomp = value.parse().unwrap_or(0),
                "Threads" => s.threads = value.parse().unwrap_or(0),
                _ => {}
            }
        }
        s
    }

    /// Ok when this is a process that runs as `ids` (with no supplementary
    /// groups if `switched` to them), unprivileged, with at most `keep`,
    /// none of the forbidden capabilities even in its bounding set,
    /// no_new_privs and a seccomp filter.
    fn confirm_dropped(&self, ids: UserIds, keep: u64, switched: bool) -> Result<(), DropError> {
        let mut wrong = Vec::new();
        if self.uids.len() != 4 || self.uids.iter().any(|&u| u != ids.uid || u == 0) {
            wrong.push(format!("uids {:?}", self.uids));
        }
        if self.gids.len() != 4 || self.gids.iter().any(|&g| g != ids.gid) {
            wrong.push(format!("gids {:?}", self.gids));
        }
        if switched && !self.groups.is_empty() {
            wrong.push(format!("supplementary groups {:?}", self.groups));
        }
        for (set, mask) in [
            ("effective", self.cap_eff),
            ("permitted", self.cap_prm),
            ("inheritable", self.cap_inh),
            ("ambient", self.cap_amb),
        ] {
            if mask & !keep != 0 {
                wrong.push(format!("{set} {}", cap_names(mask & !keep).join(",")));
            }
        }
        if self.cap_bnd & FORBIDDEN != 0 {
            wrong.push(format!(
                "bounding {}",
                cap_names(self.cap_bnd & FORBIDDEN).join(",")
            ));
        }
        if !self.no_new_privs {
            wrong.push("no_new_privs unset".to_owned());
        }
        if self.seccomp != 2 {
            wrong.push(format!("seccomp mode {}", self.seccomp));
        }
        if wrong.is_empty() {
            Ok(())
        } else {
            Err(DropError::Remain(wrong.join("; ")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Name:\tkdiag-agent\nUid:\t65534\t65534\t65534\t65534\n\
        Gid:\t65534\t65534\t65534\t65534\nGroups:\t\nThreads:\t1\n\
        CapInh:\t0000000000000000\nCapPrm:\t0000008000000000\nCapEff:\t0000008000000000\n\
        CapBnd:\t0000008000000000\nCapAmb:\t0000000000000000\nNoNewPrivs:\t1\nSeccomp:\t2\n";

    #[test]
    fn reads_status() {
        let s = ProcStatus::parse(STATUS);
        assert_eq!(s.uids, [65534; 4]);
        assert_eq!(s.gids, [65534; 4]);
        assert!(s.groups.is_empty());
        assert_eq!(s.cap_eff, 1 << CAP_BPF);
        assert_eq!(s.cap_bnd, 1 << CAP_BPF);
        assert!(s.no_new_privs);
        assert_eq!((s.seccomp, s.threads), (2, 1));
        let odd = ProcStatus::parse("CapEff:\tzz\nUid:\tx\n");
        assert_eq!(odd.cap_eff, 0);
        assert!(odd.uids.is_empty());
        assert_eq!(ProcStatus::parse(""), ProcStatus::default());
    }

    #[test]
    fn confirms_only_a_dropped_process() {
        let nobody = UserIds {
            uid: 65534,
            gid: 65534,
        };
        let good = ProcStatus::parse(STATUS);
        assert!(good.confirm_dropped(nobody, MAY_KEEP, true).is_ok());
        // CAP_BPF held but not to be kept.
        assert!(good.confirm_dropped(nobody, 0, true).is_err());
        let mut s = good.clone();
        s.cap_bnd |= 1 << CAP_SYS_PTRACE;
        assert!(s.confirm_dropped(nobody, MAY_KEEP, true).is_err());
        // Other capabilities may stay in the bounding set (no_new_privs and
        // the filter keep an exec from gaining them).
        let mut s = good.clone();
        s.cap_bnd |= 1 << CAP_PERFMON;
        assert!(s.confirm_dropped(nobody, MAY_KEEP, true).is_ok());
        let mut s = good.clone();
        s.uids[2] = 0;
        assert!(s.confirm_dropped(nobody, MAY_KEEP, true).is_err());
        let mut s = good.clone();
        s.seccomp = 0;
        assert!(s.confirm_dropped(nobody, MAY_KEEP, true).is_err());
        let mut s = good.clone();
        s.groups = vec![4];
        assert!(s.confirm_dropped(nobody, MAY_KEEP, true).is_err());
        assert!(s.confirm_dropped(nobody, MAY_KEEP, false).is_ok());
        let mut s = good;
        s.no_new_privs = false;
        assert!(s.confirm_dropped(nobody, MAY_KEEP, true).is_err());
        let root = UserIds { uid: 0, gid: 0 };
        let mut s = ProcStatus::parse(STATUS);
        s.uids = vec![0; 4];
        s.gids = vec![0; 4];
        assert!(s.confirm_dropped(root, MAY_KEEP, true).is_err());
    }

    #[test]
    fn names_capabilities() {
        assert_eq!(
            cap_names((1 << CAP_BPF) | (1 << 2)),
            ["CAP_DAC_READ_SEARCH", "CAP_BPF"]
        );
        assert_eq!(cap_names(1 << 63), ["CAP_63"]);
        assert!(cap_names(0).is_empty());
        assert_eq!(NAMES[CAP_SYS_ADMIN as usize], "CAP_SYS_ADMIN");
        assert_eq!(NAMES[CAP_SETPCAP as usize], "CAP_SETPCAP");
        assert_eq!(NAMES[CAP_PERFMON as usize], "CAP_PERFMON");
    }

    #[test]
    fn needs_bpf_and_perfmon_or_sys_admin() {
        assert!(allowed(1 << CAP_SYS_ADMIN));
        assert!(allowed((1 << CAP_BPF) | (1 << CAP_PERFMON)));
        assert!(!allowed(1 << CAP_BPF));
        assert!(!allowed(0));
    }
}
