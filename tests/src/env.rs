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

/// Set by `cargo xtask vm-test` in its QEMU guests to the kernel series
/// under test (e.g. `6.1`).
const VM_KERNEL_VAR: &str = "KDIAG_VM_KERNEL";

/// Whether the tests run in a vm-test guest, whose emulated CPU is tens of
/// times slower: time bounds stated for real hosts do not hold there.
pub fn in_emulated_guest() -> bool {
    std::env::var_os(VM_KERNEL_VAR).is_some()
}

/// Whether the calling test can go on: `true` when `available`. When not,
/// inside a vm-test guest the test skips by name: this prints
/// `SKIP <test>: <reason> (kernel <series>)` on its own line of stderr (not
/// captured by the test runner) for `cargo xtask vm-test` to count and
/// report, and returns `false` (the test then returns). Anywhere else it
/// panics with `reason`: on a real host nothing is skipped.
///
/// ```ignore
/// if !skip_unless(has_disk_fs(), "global direct reclaim needs a disk file system") {
///     return;
/// }
/// ```
pub fn skip_unless(available: bool, reason: &str) -> bool {
    if available {
        return true;
    }
    let Some(kernel) = std::env::var_os(VM_KERNEL_VAR) else {
        panic!("{reason}");
    };
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("unnamed test");
    // Written to the stream directly: libtest captures only the print
    // macros. The leading newline keeps the line whole when another test's
    // "test … ok" status is being written at the same time.
    let line = format!(
        "\nSKIP {test}: {reason} (kernel {})\n",
        kernel.to_string_lossy()
    );
    let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
    false
}

/// The CPUs the kernel may ever bring up (/sys/devices/system/cpu/possible,
/// e.g. `0-1` or `0,2-5`): what each per-CPU map keeps a value for.
pub fn possible_cpus() -> usize {
    let path = "/sys/devices/system/cpu/possible";
    let list = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
    list.trim()
        .split(',')
        .map(|range| {
            let bound = |n: &str| -> usize {
                n.parse()
                    .unwrap_or_else(|_| panic!("{path}: {list:?} is not a CPU list"))
            };
            let (first, last) = range.split_once('-').unwrap_or((range, range));
            bound(last) - bound(first) + 1
        })
        .sum()
}
