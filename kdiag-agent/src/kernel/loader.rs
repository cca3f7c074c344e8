//! Loads the kernel programs in two steps, with the classes' configuration
//! in between: [`kernel_types`] reads the tracepoints' layouts and answers
//! the BTF queries; [`load`] loads the object with the globals and map sizes
//! the classes made of them, attaches each program, and reports how each
//! attached and what could not.
//!
//! A program with a BTF tracepoint (tp_btf) entry attaches that way where
//! the kernel allows it: the kernel hands it the tracepoint's arguments
//! straight from the call site, where a classic tracepoint program first
//! has the kernel fill a trace record (and is skipped whenever any other
//! BPF program runs on that CPU). Its classic entry is the fallback.

use std::{
    collections::{BTreeMap, HashSet},
    path::Path,
    sync::Arc,
};

use aya::{
    Btf, BtfError, Ebpf, EbpfError, EbpfLoader, Endianness,
    maps::{Map, MapError},
    programs::{BtfTracePoint, Program, ProgramError, TracePoint, tp_btf::BtfTracePointLinkId},
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
    #[error(transparent)]
    NoBtf(#[from] btf::Unanswered),
    #[error("the BTF handed to the loader is malformed")]
    TypedefBtf(#[source] Arc<BtfError>),
    #[error("the kernel's BTF does not give what the program reads: {0}")]
    BtfCheck(String),
}

/// How the programs that have a BTF tracepoint entry attach: `--attach`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum AttachMode {
    #[default]
    /// As BTF tracepoints (tp_btf) where the kernel's BTF describes the
    /// tracepoint and the kernel takes the program (5.5+ with BTF); as
    /// classic tracepoints otherwise, and for the programs without one.
    Auto,
    /// Every program as a classic tracepoint.
    Classic,
}

/// How one tracepoint's program is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AttachedAs {
    /// A BTF tracepoint program (BPF_TRACE_RAW_TP with the tracepoint's
    /// BTF): the tracepoint's arguments, no trace record.
    BtfTracepoint,
    /// A classic tracepoint program (a perf event on the tracepoint): the
    /// trace record.
    Tracepoint,
    /// A raw tracepoint program: the tracepoint's arguments, untyped.
    RawTracepoint,
}

impl AttachedAs {
    /// As `agent_start`'s `attached_as` says it.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::BtfTracepoint => "tp_btf",
            Self::Tracepoint => "tracepoint",
            Self::RawTracepoint => "raw_tracepoint",
        }
    }
}

/// A tracepoint whose program is attached, and how.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Attached {
    pub tracepoint: Tracepoint,
    pub how: AttachedAs,
}

pub(crate) struct Loaded {
    pub ebpf: Ebpf,
    /// Ring buffer or perf, never `Auto`.
    pub transport: TransportKind,
    pub attached: Vec<Attached>,
    /// The links of the programs attached as BTF tracepoints, for the CPU
    /// budget, which detaches some and attaches them again (see
    /// `budget::Switch`).
    pub btf_links: Vec<BtfLink>,
    pub degraded: Vec<Degraded>,
    /// The entries of each map sized for the classes that run (the others
    /// keep the object's one entry until `release_unused_maps`).
    pub map_entries: BTreeMap<&'static str, u32>,
    /// The size of the buffer between the programs and the agent.
    pub buffer_bytes: u32,
}

/// A program attached as a BTF tracepoint, and its link.
#[derive(Debug)]
pub(crate) struct BtfLink {
    /// The tracepoint's program (its classic entry's name, the one
    /// `agent_stats` reports).
    pub program: &'static str,
    /// The BTF tracepoint entry's name in the object.
    pub entry: &'static str,
    pub link: BtfTracePointLinkId,
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
/// every BTF query answered in one pass, with the ids of the typedefs the
/// BTF tracepoint programs attach by under `mode`. A tracepoint without a
/// format is the end when required, and in `degraded` otherwise: the
/// classic program is the fallback of every BTF tracepoint program.
pub(crate) fn kernel_types(
    tracepoints: &[Tracepoint],
    queries: &[BtfQueries],
    mode: AttachMode,
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
    let typedefs: Vec<String> = tracepoints
        .iter()
        .filter(|tp| btf_entry(tp, mode).is_some())
        .map(Tracepoint::btf_typedef)
        .collect();
    Ok(KernelTypes {
        formats,
        btf: answer(queries, &typedefs),
        attach: mode,
    })
}

/// The BTF tracepoint program of `tp` to try under `mode`, if any.
fn btf_entry(tp: &Tracepoint, mode: AttachMode) -> Option<&'static str> {
    match mode {
        AttachMode::Auto => tp.btf_program,
        AttachMode::Classic => None,
    }
}

/// Loads the object with the loader `preparing` makes, `globals` and
/// `map_sizes` (the largest where classes share a map) and attaches the
/// programs of `tracepoints`: as BTF tracepoints where `kernel.attach` and
/// the kernel allow, else those that have a format in `kernel` as classic
/// tracepoints. `buffer_bytes`: size of the ring buffer, a power of two of
/// at least a page (the CLI checks).
pub(crate) fn load(
    preparing: Preparing,
    tracepoints: &[Tracepoint],
    kernel: &KernelTypes,
    globals: Vec<Global>,
    map_sizes: Vec<MapSize>,
    transport: TransportKind,
    buffer_bytes: u32,
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
    let mut degraded = Vec::new();

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
    let mut loader = preparing.loader();
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
    for (name, entries) in &sizes {
        loader.map_max_entries(name, *entries);
    }
    let memlock = charges_memlock().then(sys::process::raise_memlock_limit);
    let mode = kernel.attach;
    // The BTF the BTF tracepoint programs are loaded with (a placeholder
    // type for every id below theirs, tens of thousands) is made and
    // parsed on a thread of its own while aya creates the maps.
    let (ebpf, typedefs) = std::thread::scope(|scope| {
        let typedefs = scope.spawn(|| typedef_btf(tracepoints, mode, kernel));
        let ebpf = loader.load(OBJECT);
        let typedefs = typedefs
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        (ebpf, typedefs)
    });
    let mut ebpf = ebpf.map_err(|e| memlock_error(e, memlock))?;
    // A tracepoint without a format is missing (in `degraded` already, or
    // the end when required): its BTF entry, which needs no format, is not
    // attached either, so that `attached` and `degraded` agree.
    let present: Vec<&Tracepoint> = tracepoints
        .iter()
        .filter(|tp| kernel.formats.contains(tp.program))
        .collect();
    let prepared = load_programs(&mut ebpf, &present, kernel, &typedefs);
    let mut attached = Vec::new();
    let mut btf_links = Vec::new();
    for (tp, prepared) in present.into_iter().zip(prepared) {
        let btf_error = match prepared {
            Prepared::Btf(program) => match attach_btf(&mut ebpf, program) {
                Ok(link) => {
                    attached.push(Attached {
                        tracepoint: *tp,
                        how: AttachedAs::BtfTracepoint,
                    });
                    btf_links.push(BtfLink {
                        program: tp.program,
                        entry: program,
                        link,
                    });
                    continue;
                }
                Err(e) => Some(e),
            },
            Prepared::Classic { btf_error } => btf_error,
        };
        // Only the cost differs: said in `degraded` all the same.
        if let Some(e) = btf_error {
            degraded.push(Degraded {
                what: format!("{} (tp_btf)", tp.path()),
                why: format!(
                    "{}; attaching the classic tracepoint program instead",
                    Chain(&e)
                ),
            });
        }
        match attach(&mut ebpf, tp) {
            Ok(how) => attached.push(Attached {
                tracepoint: *tp,
                how,
            }),
            Err(e) => give_up_or_degrade(tp, e, &mut degraded)?,
        }
    }
    Ok(Loaded {
        ebpf,
        transport,
        attached,
        btf_links,
        degraded,
        map_entries: sizes,
        buffer_bytes,
    })
}

/// Every BTF query and the ids of `typedefs`, answered in one pass over
/// the kernel's BTF.
fn answer(queries: &[BtfQueries], typedefs: &[String]) -> btf::Answers {
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
    btf::Answers::of_kernel(&members, &enumerators, &enums, typedefs)
}

/// What aya's `BtfTracePoint::load` is given to find a tracepoint's
/// `btf_trace_<name>` typedef in: it looks the name up and hands the
/// kernel the typedef's id. Parsing the kernel's whole BTF into aya's
/// types for a few ids would cost about 17 MiB of memory at start-up; this
/// BTF holds only the typedefs the streaming pass found, each at its id in
/// the kernel's BTF (`btf::typedefs_at_ids`).
fn typedef_btf(
    tracepoints: &[Tracepoint],
    mode: AttachMode,
    kernel: &KernelTypes,
) -> Result<Btf, Arc<BtfError>> {
    let ids: Vec<(String, u32)> = tracepoints
        .iter()
        .filter(|tp| btf_entry(tp, mode).is_some())
        .filter_map(|tp| {
            let name = tp.btf_typedef();
            let id = kernel.btf.typedef_id(&name).ok()?;
            Some((name, id))
        })
        .collect();
    Btf::parse(&btf::typedefs_at_ids(&ids), Endianness::default()).map_err(Arc::new)
}

/// aya's loader, made while the caller reads the kernel's types: see
/// [`prepare`].
pub(crate) struct Preparing(Option<std::thread::JoinHandle<EbpfLoader<'static>>>);

/// Starts making aya's loader on a thread of its own, to be taken by
/// [`load`]: on a machine with several CPUs, while the caller reads the
/// kernel's types ([`kernel_types`]), which it does not need.
///
/// First aya's probes of what the kernel's BPF supports (a dozen BTF, map
/// and program loads, milliseconds), which its first load would otherwise
/// run. Then the loader: aya 0.14's `EbpfLoader::new()` reads and parses
/// the kernel's whole BTF (megabytes of memory and milliseconds of
/// start-up, measured in docs/BENCHMARKS.md) before `.btf(None)` can say it
/// is not wanted (aya issue 1172; later aya versions parse lazily). So the
/// thread first makes its root directory /proc, where
/// /sys/kernel/btf/vmlinux does not exist: aya's read fails and it parses
/// nothing. The root is that thread's alone (`unshare(CLONE_FS)`), and the
/// thread ends once the loader is made. Where chroot is not allowed (no
/// CAP_SYS_CHROOT, a seccomp profile), the loader is made the usual way.
pub(crate) fn prepare() -> Preparing {
    let thread = std::thread::Builder::new().spawn(|| {
        aya::features();
        let _ = sys::fs::chroot_this_thread(Path::new("/proc"));
        EbpfLoader::new()
    });
    Preparing(thread.ok())
}

impl Preparing {
    /// The loader, once made (made here if the thread could not be).
    fn loader(self) -> EbpfLoader<'static> {
        self.0
            .and_then(|thread| thread.join().ok())
            .unwrap_or_default()
    }
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

/// How a tracepoint's program was loaded, before any is attached.
enum Prepared {
    /// Its BTF tracepoint entry, this one, is loaded.
    Btf(&'static str),
    /// Its classic entry is to be attached (and loaded, if it is not yet),
    /// after its BTF entry could not be loaded (why, if one was tried).
    Classic { btf_error: Option<AttachError> },
}

/// Loads the programs of `tracepoints`, each on a thread of its own: the
/// kernel's verifier runs in the calling thread and is most of the
/// agent's start-up (tens of milliseconds for the TCP programs), so the
/// programs are verified side by side on a machine with several CPUs. A
/// BTF tracepoint entry is loaded where `kernel.attach` and the kernel's
/// BTF allow, else the classic entry; nothing is attached yet.
fn load_programs(
    ebpf: &mut Ebpf,
    tracepoints: &[&Tracepoint],
    kernel: &KernelTypes,
    btf: &Result<Btf, Arc<BtfError>>,
) -> Vec<Prepared> {
    let mut programs: BTreeMap<&str, &mut Program> = ebpf.programs_mut().collect();
    let jobs: Vec<_> = tracepoints
        .iter()
        .map(|&tp| {
            let entry = btf_entry(tp, kernel.attach);
            let btf_program = entry.and_then(|e| Some((e, programs.remove(e)?)));
            (tp, entry, btf_program, programs.remove(tp.program))
        })
        .collect();
    std::thread::scope(|scope| {
        let running: Vec<_> = jobs
            .into_iter()
            .map(|(tp, entry, btf_program, classic)| {
                scope.spawn(move || {
                    let btf_error = match (entry, btf_program) {
                        (None, _) => None,
                        (Some(entry), None) => Some(AttachError::MissingProgram(entry)),
                        (Some(entry), Some((_, program))) => {
                            match load_btf(program, tp, entry, kernel, btf) {
                                Ok(()) => return Prepared::Btf(entry),
                                Err(e) => Some(e),
                            }
                        }
                    };
                    // Loaded here, side by side with the others; a failure
                    // is met again, and reported, when it is attached.
                    if let Some(program) = classic {
                        let _ = load_classic(program);
                    }
                    Prepared::Classic { btf_error }
                })
            })
            .collect();
        running
            .into_iter()
            .map(|t| {
                t.join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    })
}

/// Loads `program`, the BTF tracepoint entry `entry` of `tp`; left
/// unloaded when it fails, for the classic entry to take its place.
fn load_btf(
    program: &mut Program,
    tp: &Tracepoint,
    entry: &'static str,
    kernel: &KernelTypes,
    btf: &Result<Btf, Arc<BtfError>>,
) -> Result<(), AttachError> {
    // No BTF, or none for this tracepoint (older kernels): said in the
    // kernel's terms, not as a lookup failure in the typedefs' BTF.
    kernel.btf.typedef_id(&tp.btf_typedef())?;
    if let Some(check) = tp.btf_check {
        check(&kernel.btf).map_err(AttachError::BtfCheck)?;
    }
    let btf = btf
        .as_ref()
        .map_err(|e| AttachError::TypedefBtf(e.clone()))?;
    let program: &mut BtfTracePoint =
        program
            .try_into()
            .map_err(|source| AttachError::NotTracePoint {
                program: entry,
                source,
            })?;
    program.load(tp.name, btf).map_err(AttachError::Load)
}

/// Attaches `program`, a loaded BTF tracepoint entry, and returns its
/// link; unloads it when that fails, for the classic entry to take its
/// place.
fn attach_btf(ebpf: &mut Ebpf, program: &'static str) -> Result<BtfTracePointLinkId, AttachError> {
    let entry: &mut BtfTracePoint = ebpf
        .program_mut(program)
        .ok_or(AttachError::MissingProgram(program))?
        .try_into()
        .map_err(|source| AttachError::NotTracePoint { program, source })?;
    entry.attach().map_err(|e| {
        let _ = entry.unload();
        AttachError::Attach(e)
    })
}

/// Loads a classic or raw tracepoint program, unless it is loaded.
fn load_classic(program: &mut Program) -> Result<(), ProgramError> {
    if program.fd().is_ok() {
        return Ok(());
    }
    match program {
        Program::RawTracePoint(p) => p.load(),
        Program::TracePoint(p) => p.load(),
        _ => Ok(()),
    }
}

/// Attaches `tp`'s program (loading it first unless [`load_programs`]
/// did) as what it was built as: a classic tracepoint program to
/// `group/name`, a raw tracepoint program (the section `raw_tp/NAME`) to
/// `name`.
fn attach(ebpf: &mut Ebpf, tp: &Tracepoint) -> Result<AttachedAs, AttachError> {
    let program = ebpf
        .program_mut(tp.program)
        .ok_or(AttachError::MissingProgram(tp.program))?;
    load_classic(program).map_err(AttachError::Load)?;
    if let Program::RawTracePoint(program) = program {
        program.attach(tp.name).map_err(AttachError::Attach)?;
        return Ok(AttachedAs::RawTracepoint);
    }
    let program: &mut TracePoint =
        program
            .try_into()
            .map_err(|source| AttachError::NotTracePoint {
                program: tp.program,
                source,
            })?;
    program
        .attach(tp.group, tp.name)
        .map_err(AttachError::Attach)?;
    Ok(AttachedAs::Tracepoint)
}

/// Closes the agent's descriptors of the maps no loaded program uses, once
/// the classes and the agent have taken the maps they read: aya creates
/// every map of the object, so the maps of the classes not running exist
/// (at one entry, [`load`]) until then. A loaded program holds the maps it
/// uses itself, so those stay whoever else holds them; for the others the
/// agent's descriptor is the last hold, and the kernel frees them.
///
/// Releases nothing where the kernel cannot say which maps a program uses.
pub(crate) fn release_unused_maps(ebpf: &mut Ebpf) {
    let mut used = HashSet::new();
    for (_, program) in ebpf.programs() {
        // A program of a class not running was never loaded: no descriptor.
        if program.fd().is_err() {
            continue;
        }
        match program.info().map(|info| info.map_ids()) {
            Ok(Ok(Some(ids))) => used.extend(ids),
            _ => return,
        }
    }
    let unused: Vec<String> = ebpf
        .maps()
        .filter(|(_, map)| map_id(map).is_some_and(|id| !used.contains(&id)))
        .map(|(name, _)| name.to_owned())
        .collect();
    for name in unused {
        drop(ebpf.take_map(&name));
    }
}

/// The kernel's id of `map`, for the map types the object declares.
fn map_id(map: &Map) -> Option<u32> {
    let data = match map {
        Map::Array(d)
        | Map::PerCpuArray(d)
        | Map::HashMap(d)
        | Map::PerCpuHashMap(d)
        | Map::LruHashMap(d)
        | Map::PerfEventArray(d)
        | Map::RingBuf(d)
        | Map::StackTraceMap(d) => d,
        _ => return None,
    };
    data.info().ok().map(|info| info.id())
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
