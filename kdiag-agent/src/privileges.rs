//! Checks, before touching the kernel, that the agent may load and attach
//! BPF programs, so that a missing privilege is one clear message instead of
//! an EPERM from deep inside the loader.

use std::fs;

const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

#[derive(Debug, thiserror::Error)]
#[error(
    "missing privileges: kdiag-agent needs CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN) \
     to load and attach its kernel programs; it has {have}. Run it as root (sudo kdiag-agent ...) \
     or grant those capabilities"
)]
pub struct MissingPrivileges {
    have: String,
}

/// Ok when the effective capabilities allow loading tracepoint programs.
pub fn check() -> Result<(), MissingPrivileges> {
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

fn allowed(caps: u64) -> bool {
    let has = |bit: u32| caps & (1 << bit) != 0;
    has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON))
}

/// The `CapEff:` mask of /proc/self/status.
fn effective_caps(status: &str) -> Option<u64> {
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
