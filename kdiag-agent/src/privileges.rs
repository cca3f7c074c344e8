//! Checks, before touching the kernel, that the agent may load and attach
//! BPF programs, so that a missing privilege is one clear message instead of
//! an EPERM from deep inside the loader; and once everything is attached,
//! gives up every capability the rest of the run does not need.

use std::fs;

use crate::sys::{
    SyscallError,
    caps::{self, CapsError},
};

const CAP_DAC_READ_SEARCH: u32 = 2;
const CAP_SETPCAP: u32 = 8;
const CAP_SYS_PTRACE: u32 = 19;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

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
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let caps = effective_caps(&status).unwrap_or(0);
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

/// What the agent keeps after attaching: CAP_BPF for map reads and program
/// statistics on kernels that still gate every bpf() command on it (before
/// 6.5, with unprivileged BPF disabled); CAP_SYS_PTRACE and
/// CAP_DAC_READ_SEARCH to read other users' /proc/PID/fd when looking up the
/// owner of a socket older than the agent. Ring and perf buffers are already
/// mapped and need nothing.
pub(crate) const KEPT_AFTER_ATTACH: u64 =
    (1 << CAP_BPF) | (1 << CAP_SYS_PTRACE) | (1 << CAP_DAC_READ_SEARCH);

/// Which step of giving up capabilities failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DropError {
    #[error("cannot clear the ambient capabilities")]
    Ambient(#[source] CapsError),
    #[error("cannot drop capability {cap} from the bounding set")]
    Bounding {
        cap: u32,
        #[source]
        source: CapsError,
    },
    #[error("cannot set no_new_privs")]
    NoNewPrivs(#[source] SyscallError),
    #[error("cannot reduce the effective and permitted capabilities")]
    Reduce(#[source] CapsError),
}

/// Drops every capability but [`KEPT_AFTER_ATTACH`] from the effective,
/// permitted, inheritable, ambient and bounding sets, and sets
/// no_new_privs, so nothing can bring them back.
pub(crate) fn drop_after_attach() -> Result<(), DropError> {
    let last = fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .unwrap_or(40)
        .min(caps::last_known());
    caps::clear_ambient().map_err(DropError::Ambient)?;
    // Dropping from the bounding set needs CAP_SETPCAP, which goes last.
    let has_setpcap = effective_caps(&fs::read_to_string("/proc/self/status").unwrap_or_default())
        .is_some_and(|c| c & (1 << CAP_SETPCAP) != 0);
    if has_setpcap {
        for cap in (0..=last).filter(|c| KEPT_AFTER_ATTACH & (1 << c) == 0) {
            caps::drop_bounding(cap).map_err(|source| DropError::Bounding { cap, source })?;
        }
    }
    caps::set_no_new_privs().map_err(DropError::NoNewPrivs)?;
    let keep = KEPT_AFTER_ATTACH
        & effective_caps(&fs::read_to_string("/proc/self/status").unwrap_or_default()).unwrap_or(0);
    caps::limit_to(keep).map_err(DropError::Reduce)
}

fn allowed(caps: u64) -> bool {
    let has = |bit: u32| caps & (1 << bit) != 0;
    has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON))
}

/// The `CapEff:` mask of /proc/self/status.
pub(crate) fn effective_caps(status: &str) -> Option<u64> {
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_capeff() {
        let status = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert_eq!(effective_caps(status), Some(0x1ff_ffff_ffff));
        assert_eq!(effective_caps("CapEff:\tzz"), None);
        assert_eq!(effective_caps(""), None);
    }

    #[test]
    fn needs_bpf_and_perfmon_or_sys_admin() {
        assert!(allowed(1 << CAP_SYS_ADMIN));
        assert!(allowed((1 << CAP_BPF) | (1 << CAP_PERFMON)));
        assert!(!allowed(1 << CAP_BPF));
        assert!(!allowed(0));
    }
}
