//! Loads the kernel programs in two steps, with the classes' configuration
//! in between: [`kernel_types`] reads the tracepoints' layouts and answers
//! the BTF queries; [`load`] loads the object with the globals and map sizes
//! the classes made of them, attaches each program, and reports what could
//! not attach.

use std::{collections::BTreeMap, path::Path};

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::MapError,
    programs::{ProgramError, TracePoint},
    util::KernelVersion,
};
use kdiag_common::{Transport, wakeup_shift};

use crate::{
    errors::Chain,
    kernel::{
        btf,
        setup::{BtfQueries, Global, KernelTypes, MapSize, Tracepoint},
        tracefs::{Formats, Tracefs, TracefsError},
        transport::TransportKind,
    },
    output::record::Degraded,
    sys,
};

/// The kernel programs, built by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/kdiag"));

#[derive(Debug, thiserror::Error)]
pub(crate) enum LoadError {
    #[error(transparent)]
    Tracefs(#[from] TracefsError),
    #[error("cannot attach {what}, which this class needs")]
    Required {
        what: String,
        #[source]
        source: AttachError,
    },
    #[error("loading the kernel programs failed")]
    Load(#[from] EbpfError),
    /// A map refused for the locked-memory limit, on a kernel that charges
    /// maps to it.
    #[error(
        "creating BPF map {map} failed: this kernel (before 5.11) charges BPF maps to the \
         locked-memory limit of the user that creates them, summed over all its processes, and \
         that limit is {limit_kib} KiB; raise it (`LimitMEMLOCK=infinity` in a systemd unit, `ulimit -l \
         unlimited` in a shell) or run the agent with CAP_SYS_RESOURCE, which lets it raise the \
         limit itself"
    )]
    MemlockLimit { map: String, limit_kib: u64 },
    /// `--transport ringbuf` where the kernel has none: a usage error.
    #[error("--transport ringbuf: this kernel has no BPF ring buffer (Linux 5.8+); use perf")]
    NoRingBuf,
    /// Two classes sharing programs asked for different settings.
    #[error("the classes asked for different values of {0}")]
    ConflictingGlobal(&'static str),
}

/// Why the program of one tracepoint is not attached.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AttachError {
    #[error(transparent)]
    Format(#[from] TracefsError),
    #[error("program {0} missing from the object")]
    MissingProgram(&'static str),
    #[error("program {program} is not a tracepoint program")]
    NotTracePoint {
        program: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("loading the program failed")]
    Load(#[source] ProgramError),
    #[error("attaching the program failed")]
    Attach(#[source] ProgramError),
}

pub(crate) struct Loaded {
    pub ebpf: Ebpf,
    /// Ring buffer or perf, never `Auto`.
    pub transport: TransportKind,
    pub attached: Vec<Tracepoint>,
    pub degraded: Vec<Degraded>,
}

/// The tracepoints of every class that runs, each once (classes can share
/// one: retrans and tcp both use inet_sock_set_state), required when any of
/// them requires it.
pub(crate) fn merge_tracepoints<'a>(all: impl Iterator<Item = &'a Tracepoint>) -> Vec<Tracepoint> {
    let mut tracepoints: Vec<Tracepoint> = Vec::new();
    for tp in all {
        match tracepoints.iter_mut().find(|t| t.program == tp.program) {
            Some(t) => t.required |= tp.required,
            None => tracepoints.push(*tp),
        }
    }
    tracepoints
}

/// The kernel's types for `tracepoints` and `queries`: formats from tracefs,
/// or from `formats_from` (a directory laid out like tracefs) in tests, and
/// every BTF query answered in one pass. A tracepoint without a format is
/// the end when required, and in `degraded` otherwise.
pub(crate) fn kernel_types(
    tracepoints: &[Tracepoint],
    queries: &[BtfQueries],
    formats_from: Option<&Path>,
    degraded: &mut Vec<Degraded>,
) -> Result<KernelTypes, LoadError> {
    let tracefs = match formats_from {
        Some(root) => Tracefs::at(root),
        None => Tracefs::open()?,
    };
    let mut formats = Formats::default();
    for tp in tracepoints {
        match tracefs.format(tp.group, tp.name) {
            Ok(f) => formats.insert(tp.program, f),
            Err(e) => give_up_or_degrade(tp, e.into(), degraded)?,
        }
    }
    Ok(KernelTypes {
        formats,
        btf: answer(queries),
    })
}

/// Loads the object with `globals` and `map_sizes` (the largest where
/// classes share a map) and attaches the programs of `tracepoints` that
/// have a format in `kernel`. `buffer_bytes`: size of the ring buffer, a
/// power of two of at least a page (the CLI checks).
pub(crate) fn load(
    tracepoints: &[Tracepoint],
    kernel: &KernelTypes,
    globals: Vec<Global>,
    map_sizes: Vec<MapSize>,
    transport: TransportKind,
    buffer_bytes: u32,
    mut degraded: Vec<Degraded>,
) -> Result<Loaded, LoadError> {
    let mut merged = BTreeMap::new();
    for g in globals {
        match merged.get(g.name) {
            Some(bytes) if *bytes != g.bytes => {
                return Err(LoadError::ConflictingGlobal(g.name));
            }
            _ => {
                merged.insert(g.name, g.bytes);
            }
        }
    }
    let mut sizes = BTreeMap::new();
    for size in map_sizes {
        let entries = sizes.entry(size.map).or_insert(size.entries);
        *entries = (*entries).max(size.entries);
    }
    degraded.dedup();

    let transport = resolve_transport(transport)?;
    let wire_transport = match transport {
        TransportKind::Perf => Transport::Perf,
        _ => Transport::RingBuf,
    } as u32;
    // The unused transport's buffer shrinks to one page.
    let ring_bytes = if transport == TransportKind::Perf {
        sys::process::page_size() as u32
    } else {
        buffer_bytes
    };
    let wakeup_shift = wakeup_shift(ring_bytes);
    let mut loader = loader_without_kernel_btf();
    // No CO-RE relocations in these programs: no kernel BTF (also when the
    // loader above had to parse it).
    loader
        .btf(None)
        .override_global("TRANSPORT", &wire_transport, true)
        .override_global("WAKEUP_SHIFT", &wakeup_shift, true)
        .map_max_entries("EVENTS", ring_bytes);
    for (name, bytes) in &merged {
        loader.override_global(name, bytes.as_slice(), true);
    }
    for (name, entries) in sizes {
        loader.map_max_entries(name, entries);
    }
    let memlock = charges_memlock().then(sys::process::raise_memlock_limit);
    let mut ebpf = loader.load(OBJECT).map_err(|e| memlock_error(e, memlock))?;

    let mut attached = Vec::new();
    for tp in tracepoints {
        if !kernel.formats.contains(tp.program) {
            continue;
        }
        match attach(&mut ebpf, tp) {
            Ok(()) => attached.push(*tp),
            Err(e) => give_up_or_degrade(tp, e, &mut degraded)?,
        }
    }
    Ok(Loaded {
        ebpf,
        transport,
        attached,
        degraded,
    })
}

/// Every BTF query, answered in one pass over the kernel's BTF.
fn answer(queries: &[BtfQueries]) -> btf::Answers {
    let mut members = Vec::new();
    let mut enumerators = Vec::new();
    let mut enums = Vec::new();
    for q in queries {
        members.extend_from_slice(q.members);
        enumerators.extend_from_slice(q.enumerators);
        enums.extend_from_slice(q.enums);
    }
    enums.sort_unstable();
    enums.dedup();
    members.sort_unstable();
    members.dedup();
    enumerators.sort_unstable();
    enumerators.dedup();
    btf::Answers::of_kernel(&members, &enumerators, &enums)
}

/// aya 0.14's `EbpfLoader::new()` reads and parses the kernel's whole BTF
/// (megabytes of memory and milliseconds of start-up, measured in
/// docs/BENCHMARKS.md) before `.btf(None)` can say it is not wanted (aya
/// issue 1172; later aya versions parse lazily). So the loader is made on a
/// thread of its own whose root directory is /proc, where
/// /sys/kernel/btf/vmlinux does not exist: aya's read fails and it parses
/// nothing. The root is that thread's alone (`unshare(CLONE_FS)`)
/// and the thread ends at once. Where chroot is not allowed (no
/// CAP_SYS_CHROOT, a seccomp profile), the loader is made the usual way.
fn loader_without_kernel_btf() -> EbpfLoader<'static> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let _ = sys::fs::chroot_this_thread(Path::new("/proc"));
                EbpfLoader::new()
            })
            .join()
    })
    .unwrap_or_else(|_| EbpfLoader::new())
}

/// A tracepoint that cannot attach: the end of loading when its class
/// needs it, an entry in `degraded` (the error and its causes) otherwise.
fn give_up_or_degrade(
    tp: &Tracepoint,
    error: AttachError,
    degraded: &mut Vec<Degraded>,
) -> Result<(), LoadError> {
    if tp.required {
        return Err(LoadError::Required {
            what: tp.path(),
            source: error,
        });
    }
    degraded.push(Degraded {
        what: tp.path(),
        why: Chain(&error).to_string(),
    });
    Ok(())
}

fn attach(ebpf: &mut Ebpf, tp: &Tracepoint) -> Result<(), AttachError> {
    let program: &mut TracePoint = ebpf
        .program_mut(tp.program)
        .ok_or(AttachError::MissingProgram(tp.program))?
        .try_into()
        .map_err(|source| AttachError::NotTracePoint {
            program: tp.program,
            source,
        })?;
    program.load().map_err(AttachError::Load)?;
    program
        .attach(tp.group, tp.name)
        .map_err(AttachError::Attach)?;
    Ok(())
}

/// Kernels before 5.11 charge BPF maps and programs to the locked-memory
/// limit (RLIMIT_MEMLOCK) of the user creating them, summed over all that
/// user's processes; later ones charge the memory cgroup instead.
fn charges_memlock() -> bool {
    KernelVersion::current().is_ok_and(|v| v < KernelVersion::new(5, 11, 0))
}

/// `error` as a [`LoadError::MemlockLimit`] when it is a map the kernel
/// refused (EPERM) while `memlock` (the soft limit in force, `Some(None)`
/// for none) was charged; as it is otherwise.
fn memlock_error(error: EbpfError, memlock: Option<Option<u64>>) -> LoadError {
    let refused_map = match &error {
        EbpfError::MapError(MapError::CreateError { name, io_error })
            if io_error.kind() == std::io::ErrorKind::PermissionDenied =>
        {
            Some(name.clone())
        }
        _ => None,
    };
    match (refused_map, memlock) {
        (Some(map), Some(Some(bytes))) => LoadError::MemlockLimit {
            map,
            limit_kib: bytes / 1024,
        },
        _ => LoadError::Load(error),
    }
}

/// The BPF ring buffer exists since 5.8.
fn resolve_transport(asked: TransportKind) -> Result<TransportKind, LoadError> {
    let has_ringbuf = KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(5, 8, 0));
    transport_for(asked, has_ringbuf)
}

fn transport_for(asked: TransportKind, has_ringbuf: bool) -> Result<TransportKind, LoadError> {
    match asked {
        TransportKind::Auto if has_ringbuf => Ok(TransportKind::Ringbuf),
        TransportKind::Auto => Ok(TransportKind::Perf),
        TransportKind::Ringbuf if !has_ringbuf => Err(LoadError::NoRingBuf),
        other => Ok(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transports_by_kernel() {
        use TransportKind::{Auto, Perf, Ringbuf};
        assert!(matches!(transport_for(Auto, true), Ok(Ringbuf)));
        assert!(matches!(transport_for(Auto, false), Ok(Perf)));
        assert!(matches!(transport_for(Perf, true), Ok(Perf)));
        assert!(matches!(transport_for(Ringbuf, true), Ok(Ringbuf)));
        assert!(matches!(
            transport_for(Ringbuf, false),
            Err(LoadError::NoRingBuf)
        ));
    }
}
