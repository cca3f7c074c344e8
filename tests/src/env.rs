//! Preconditions of the integration tests: root and a built agent.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

/// Panics unless the tests run as root: they create network namespaces,
/// nftables rules and load eBPF programs.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert!(
        euid == 0,
        "kdiag integration tests must run as root (euid is {euid}): they create network \
         namespaces and load eBPF programs; run them with `cargo xtask test`"
    );
}

/// The agent under test, from `KDIAG_AGENT` (set by `cargo xtask test`).
/// Panics, rather than skipping, when it is unset or not an executable file.
pub fn agent_path() -> PathBuf {
    require_root();
    let path = std::env::var_os("KDIAG_AGENT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            panic!(
                "KDIAG_AGENT is not set: it must be the absolute path of a built kdiag-agent; \
             run the integration tests with `cargo xtask test`"
            )
        });
    assert!(
        path.is_absolute(),
        "KDIAG_AGENT must be an absolute path, got {}",
        path.display()
    );
    let meta =
        std::fs::metadata(&path).unwrap_or_else(|e| panic!("KDIAG_AGENT={}: {e}", path.display()));
    assert!(
        meta.is_file() && meta.permissions().mode() & 0o111 != 0,
        "KDIAG_AGENT={} is not an executable file",
        path.display()
    );
    path
}
