//! The calling thread's capabilities and its no_new_privs flag.
//!
//! Capabilities are given as numbers (CAP_BPF is 39), the way
//! /proc/PID/status and linux/capability.h count them; masks have bit `n`
//! set for capability `n`.

use caps::{CapSet, Capability, CapsHashSet};

pub(crate) use caps::errors::CapsError;

use super::SyscallError;

/// Empties the ambient set.
pub(crate) fn clear_ambient() -> Result<(), CapsError> {
    caps::clear(None, CapSet::Ambient)
}

/// Empties the calling thread's effective set; its permitted set stays, so
/// the thread could raise them again. For a thread that tries what the
/// process could do without them.
pub(crate) fn clear_effective() -> Result<(), CapsError> {
    caps::clear(None, CapSet::Effective)
}

/// Removes capability `cap` from the bounding set (needs CAP_SETPCAP).
pub(crate) fn drop_bounding(cap: u32) -> Result<(), CapsError> {
    caps::drop(None, CapSet::Bounding, capability(cap)?)
}

/// Sets the effective and permitted sets to `keep` and empties the
/// inheritable set. `keep` must be within the permitted set: capabilities
/// can be given up here, not gained.
pub(crate) fn limit_to(keep: u64) -> Result<(), CapsError> {
    let keep: CapsHashSet = caps::all()
        .into_iter()
        .filter(|c| keep & c.bitmask() != 0)
        .collect();
    // Effective first: it must stay within the permitted set at each step.
    caps::set(None, CapSet::Effective, &keep)?;
    caps::set(None, CapSet::Permitted, &keep)?;
    caps::clear(None, CapSet::Inheritable)
}

/// The highest capability number this module can name: CAP_CHECKPOINT_RESTORE,
/// also the highest Linux has (as of 6.18).
pub(crate) fn last_known() -> u32 {
    caps::all()
        .iter()
        .map(|c| u32::from(c.index()))
        .max()
        .unwrap_or(0)
}

fn capability(cap: u32) -> Result<Capability, CapsError> {
    caps::all()
        .into_iter()
        .find(|c| u32::from(c.index()) == cap)
        .ok_or_else(|| CapsError::from(format!("unknown capability {cap}")))
}

/// Sets no_new_privs: nothing this thread or its children execute can gain
/// privileges (set-user-ID bits, file capabilities). It cannot be unset.
pub(crate) fn set_no_new_privs() -> Result<(), SyscallError> {
    rustix::thread::set_no_new_privs(true)
        .map_err(|e| SyscallError::new("prctl(PR_SET_NO_NEW_PRIVS)", e))
}
