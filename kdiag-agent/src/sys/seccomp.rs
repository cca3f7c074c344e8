//! The seccomp filter the agent runs under once attached: the system calls
//! of the running agent (reading its buffers and /proc, writing records,
//! timers, signals, the thread that detaches the programs at the end, and
//! exiting), each with the arguments it uses where they tell a harmless
//! call from a dangerous one. Everything else fails with EPERM, so that a
//! call the agent does not expect is an error it reports, not a crash.
//!
//! The list covers every class with both transports, through every way a
//! run ends (a signal, `--duration`, a closed stdout). Changing what the
//! agent does after start-up may mean adding to it: a call missing here
//! fails with EPERM, and the integration tests run every class under the
//! filter.

use std::{
    collections::BTreeMap,
    io,
    os::fd::{FromRawFd, OwnedFd},
};

use aya_obj::generated::bpf_cmd;
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Why the filter could not be installed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SeccompError {
    #[error("this architecture has no seccomp filter here")]
    Architecture,
    #[error("cannot build the filter")]
    Build(#[source] seccompiler::BackendError),
    #[error("cannot compile or install the filter")]
    Install(#[source] seccompiler::Error),
}

/// The bpf() commands of a running agent, all on descriptors it already
/// holds: map reads (losses, per-CPU histograms, the memory classes'
/// per-thread tables, whose entries of exited threads it also deletes),
/// the softirq class's generation counter, and program information
/// (run-time statistics); and attaching its own BTF tracepoint programs
/// again, which the CPU budget detaches (such a program's tracepoint is
/// fixed when it is loaded: the command cannot point it elsewhere).
/// Loading programs, creating maps and getting descriptors of other
/// objects are not among them.
const BPF_COMMANDS: &[bpf_cmd] = &[
    bpf_cmd::BPF_MAP_LOOKUP_ELEM,
    bpf_cmd::BPF_MAP_UPDATE_ELEM,
    bpf_cmd::BPF_MAP_DELETE_ELEM,
    bpf_cmd::BPF_MAP_GET_NEXT_KEY,
    bpf_cmd::BPF_OBJ_GET_INFO_BY_FD,
    bpf_cmd::BPF_RAW_TRACEPOINT_OPEN,
];

/// `PERF_EVENT_IOC_DISABLE` (include/uapi/linux/perf_event.h: `_IO('$',
/// 1)`): detaching a program attached through a perf event without a BPF
/// link (kernels before 5.15).
const PERF_EVENT_IOC_DISABLE: u64 = 0x2401;

/// `CLONE_THREAD` (include/uapi/linux/sched.h): clone() may start threads
/// of this process, never a new process.
const CLONE_THREAD: u64 = 0x0001_0000;

/// System calls allowed with any arguments.
const ANY_ARGUMENTS: &[libc::c_long] = &[
    // Reading /proc, /sys and the buffers' descriptors; writing records.
    // lseek: also /proc/kallsyms, read again from its start through the
    // descriptor opened while privileged (kernel/kallsyms.rs).
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_openat,
    libc::SYS_close,
    libc::SYS_lseek,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_getdents64,
    libc::SYS_readlinkat,
    libc::SYS_fcntl,
    // Memory.
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    // The event loop, timers and waiting.
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_pwait,
    libc::SYS_ppoll,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    // The wait for BTF tracepoint programs still running at exit
    // (process::wait_for_rcu_grace_period).
    libc::SYS_membarrier,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_getrusage,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_getrandom,
    // Signals.
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_restart_syscall,
    // A panic's backtrace names files relative to the working directory.
    libc::SYS_getcwd,
    // The thread that detaches the programs at the end: clone() is below,
    // and clone3() fails with ENOSYS (see `install`).
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    // The C library's allocator sizes its arenas by the CPUs a new thread
    // may run on.
    libc::SYS_sched_getaffinity,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// x86_64's older forms of the calls above, which the C library may still
/// make.
#[cfg(target_arch = "x86_64")]
const ANY_ARGUMENTS_X86_64: &[libc::c_long] = &[
    libc::SYS_open,
    libc::SYS_stat,
    libc::SYS_lstat,
    libc::SYS_readlink,
    libc::SYS_poll,
    libc::SYS_epoll_wait,
];

#[cfg(not(target_arch = "x86_64"))]
const ANY_ARGUMENTS_X86_64: &[libc::c_long] = &[];

/// The filter: the calls above, and bpf(), ioctl(), clone() and tgkill()
/// with only the arguments the agent uses; with `serving`, also accept4()
/// (the `--metrics-addr` socket, bound before the filter: making or binding
/// sockets stays refused).
fn filter(serving: bool) -> Result<BpfProgram, SeccompError> {
    let arch =
        TargetArch::try_from(std::env::consts::ARCH).map_err(|_| SeccompError::Architecture)?;
    let build = SeccompError::Build;
    let arg_is = |arg: u8, value: u64| -> Result<SeccompRule, SeccompError> {
        let condition =
            SeccompCondition::new(arg, SeccompCmpArgLen::Qword, SeccompCmpOp::Eq, value)
                .map_err(build)?;
        SeccompRule::new(vec![condition]).map_err(build)
    };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = ANY_ARGUMENTS
        .iter()
        .chain(ANY_ARGUMENTS_X86_64)
        .map(|&call| (call, Vec::new()))
        .collect();
    rules.insert(
        libc::SYS_bpf,
        BPF_COMMANDS
            .iter()
            .map(|&cmd| arg_is(0, cmd as u64))
            .collect::<Result<_, _>>()?,
    );
    // FIONREAD: how full the stdout pipe is (see `fd::pipe_room`).
    rules.insert(
        libc::SYS_ioctl,
        vec![
            arg_is(1, PERF_EVENT_IOC_DISABLE)?,
            arg_is(1, libc::FIONREAD)?,
        ],
    );
    let thread_only = SeccompCondition::new(
        0,
        SeccompCmpArgLen::Qword,
        SeccompCmpOp::MaskedEq(CLONE_THREAD),
        CLONE_THREAD,
    )
    .map_err(build)?;
    rules.insert(
        libc::SYS_clone,
        vec![SeccompRule::new(vec![thread_only]).map_err(build)?],
    );
    // The event loop's signal handler wakes it through a socket pair made
    // at start-up; sends to an address and receives that ask for the
    // sender's (sockets not connected) are not among what the agent does.
    rules.insert(libc::SYS_sendto, vec![arg_is(4, 0)?]);
    rules.insert(libc::SYS_recvfrom, vec![arg_is(4, 0)?]);
    if serving {
        rules.insert(libc::SYS_accept4, Vec::new());
    }
    // Signals to itself only: the C library's abort() after a panic.
    rules.insert(
        libc::SYS_tgkill,
        vec![arg_is(0, u64::from(std::process::id()))?],
    );
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Errno(libc::EPERM as u32),
        SeccompAction::Allow,
        arch,
    )
    .map_err(build)?;
    filter.try_into().map_err(SeccompError::Build)
}

/// clone3() takes its flags in memory, where a filter cannot look: it
/// fails with ENOSYS, and the C library falls back to clone(), whose flags
/// the filter checks.
fn no_clone3() -> Result<BpfProgram, SeccompError> {
    let arch =
        TargetArch::try_from(std::env::consts::ARCH).map_err(|_| SeccompError::Architecture)?;
    let filter = SeccompFilter::new(
        BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )
    .map_err(SeccompError::Build)?;
    filter.try_into().map_err(SeccompError::Build)
}

/// Installs the filter on every thread of the process (no_new_privs must be
/// set). Two filters: when several match a call, the kernel takes the most
/// restrictive action (kernel/seccomp.c, `seccomp_run_filters`), and an
/// error is more restrictive than allowing. So the filter installed first
/// turns clone3() into ENOSYS, and the main one, installed last, allows
/// clone3() and refuses every call it does not list with EPERM. `serving`:
/// the agent accepts connections on its metrics socket.
pub(crate) fn install(serving: bool) -> Result<(), SeccompError> {
    let clone3 = no_clone3()?;
    let main = filter(serving)?;
    seccompiler::apply_filter_all_threads(&clone3).map_err(SeccompError::Install)?;
    seccompiler::apply_filter_all_threads(&main).map_err(SeccompError::Install)
}

/// Tries a call outside the filter (opening a UDP socket, which a process
/// without the filter may always do): Ok means the call went through.
pub(crate) fn try_forbidden_call() -> io::Result<()> {
    // SAFETY: socket() with integer arguments only.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor socket() just returned, which nothing else owns.
    drop(unsafe { OwnedFd::from_raw_fd(fd) });
    Ok(())
}
