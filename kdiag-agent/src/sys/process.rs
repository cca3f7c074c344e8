//! The process itself: allocator settings, CPU time, clocks, page size.

use rustix::time::{ClockId, clock_getres, clock_gettime};

/// Makes glibc serve blocks of `bytes` and more from mappings of their own,
/// returned to the kernel when freed (`mallopt(M_MMAP_THRESHOLD)`, which also
/// stops glibc from raising the threshold by itself). Returns whether it did:
/// only a process that still has one thread may call mallopt, which glibc
/// marks MT-Unsafe (malloc reads the parameters it writes without a lock).
/// Other C libraries have no such setting.
pub(crate) fn set_mmap_threshold(bytes: i32) -> bool {
    #[cfg(target_env = "gnu")]
    if single_threaded() {
        // SAFETY: the process has one thread (checked just above; only this
        // thread could start another), so nothing reads the allocator's
        // parameters while mallopt writes them.
        return unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, bytes) } == 1;
    }
    let _ = bytes;
    false
}

/// One entry in /proc/self/task: the calling thread alone.
#[cfg(target_env = "gnu")]
fn single_threaded() -> bool {
    std::fs::read_dir("/proc/self/task").is_ok_and(|tasks| tasks.count() == 1)
}

/// The process's user plus system CPU time, in nanoseconds
/// (`getrusage(RUSAGE_SELF)`, which rustix does not have).
pub(crate) fn cpu_time_ns() -> u64 {
    // SAFETY: rusage is integers only; all-zero is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a rusage; RUSAGE_SELF cannot fail.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &raw mut usage) };
    let tv = |t: libc::timeval| t.tv_sec as u64 * 1_000_000_000 + t.tv_usec as u64 * 1000;
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// CLOCK_MONOTONIC in nanoseconds: the clock the kernel programs stamp
/// events with (`bpf_ktime_get_ns`).
pub(crate) fn monotonic_ns() -> i128 {
    clock_ns(ClockId::Monotonic)
}

/// CLOCK_REALTIME (wall time) in nanoseconds since the Unix epoch.
pub(crate) fn realtime_ns() -> i128 {
    clock_ns(ClockId::Realtime)
}

fn clock_ns(clock: ClockId) -> i128 {
    let ts = clock_gettime(clock);
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
}

/// The kernel's tick (one jiffy) in nanoseconds: the resolution of the
/// coarse clocks, which advance once a tick (`TICK_NSEC`, 1e9 / HZ rounded).
/// `None` when the kernel does not say.
pub(crate) fn tick_ns() -> Option<u64> {
    let res = clock_getres(ClockId::MonotonicCoarse);
    let ns = u64::try_from(res.tv_sec).ok()? * 1_000_000_000 + u64::try_from(res.tv_nsec).ok()?;
    (ns > 0).then_some(ns)
}

/// The size of a memory page, from the auxiliary vector.
pub(crate) fn page_size() -> usize {
    rustix::param::page_size()
}

/// Clock ticks per second of /proc's CPU times (`USER_HZ`).
pub(crate) fn clock_ticks_per_second() -> u64 {
    rustix::param::clock_ticks_per_second().max(1)
}

/// Makes rustix read now what it otherwise reads from the process's
/// auxiliary vector on first use (the page size; the vDSO, for the clocks):
/// it asks with a prctl() the seccomp filter refuses, or reads
/// /proc/self/auxv, which a process that gave up root cannot read.
pub(crate) fn read_auxiliary_vector() {
    let _ = rustix::param::page_size();
    let _ = clock_ticks_per_second();
    let _ = clock_gettime(ClockId::Monotonic);
}

/// Makes the process not dumpable: no core dump, /proc/PID files owned by
/// root, and no ptrace by processes of the same user (`PR_SET_DUMPABLE`).
/// The kernel does this by itself when the ids change; a process started
/// as its final user does it here.
pub(crate) fn set_not_dumpable() -> Result<(), super::SyscallError> {
    rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)
        .map_err(|e| super::SyscallError::new("prctl(PR_SET_DUMPABLE)", e))
}

/// Raises the locked-memory limit (RLIMIT_MEMLOCK) as far as the process
/// may: to no limit where it may raise its hard limit (CAP_SYS_RESOURCE),
/// else its soft limit to the hard one. Returns the soft limit now in
/// force, in bytes (`None`: no limit).
pub(crate) fn raise_memlock_limit() -> Option<u64> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let unlimited = Rlimit {
        current: None,
        maximum: None,
    };
    if setrlimit(Resource::Memlock, unlimited).is_err() {
        let hard = getrlimit(Resource::Memlock).maximum;
        let _ = setrlimit(
            Resource::Memlock,
            Rlimit {
                current: hard,
                maximum: hard,
            },
        );
    }
    getrlimit(Resource::Memlock).current
}

/// Waits for one RCU grace period: every BPF program run that had begun
/// when it was called has ended (`membarrier(MEMBARRIER_CMD_GLOBAL)`, which
/// needs no privilege). Where the kernel refuses it (nohz_full CPUs, no
/// CONFIG_MEMBARRIER), it returns at once: a run still in flight may then
/// count one event more than the stream shows.
pub(crate) fn wait_for_rcu_grace_period() {
    let _ = rustix::thread::membarrier(rustix::thread::MembarrierCommand::Global);
}
