//! What the agent needs to know of each event class, and what it hands
//! them: the kernel's types before load, the shared services and the output
//! while running. The classes themselves, and the registry that makes them
//! from the command line, are in `classes/`.

use std::io;

use aya::Ebpf;
use kdiag_common::{
    ClassId, EventKind,
    cost::{ProgramCost, ProgramId},
};

// What a class declares and configures before load is the kernel side's
// vocabulary; the classes name it through here.
pub(crate) use crate::kernel::setup::{BtfQueries, Global, KernelTypes, MapSize, Tracepoint};
use crate::{
    attribution::cgroup::{CgroupError, ContainerError},
    kernel::wire::DecodeError,
    output::{Output, record::Degraded},
    services::Services,
};

/// How often [`Class::housekeeping`] runs.
pub(crate) const HOUSEKEEPING: std::time::Duration = std::time::Duration::from_secs(10);

/// What a class works with while the agent runs.
pub(crate) struct Context<'a> {
    pub out: &'a mut Output,
    pub services: &'a mut Services,
    /// Set by a class when the event it was handed was kept out of the
    /// output by the user's filters (`--pid`, `--cgroup`, `--container`),
    /// so that filtered events are counted apart from lost ones; the
    /// agent takes it after each event.
    pub filtered: bool,
}

impl<'a> Context<'a> {
    pub(crate) fn new(out: &'a mut Output, services: &'a mut Services) -> Self {
        Self {
            out,
            services,
            filtered: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum ClassError {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// The event's owner or cgroup is being looked up: the agent holds the event,
    /// and every one after it, and hands it to the class again later.
    #[error("the owner or cgroup is being looked up")]
    LookupPending,
    #[error("writing output: {0}")]
    Output(#[from] io::Error),
    #[error("the kernel programs have no {0} map")]
    MissingMap(&'static str),
    #[error("the {name} map: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    /// This kernel lacks what the class cannot do without.
    #[error("{0}")]
    Unsupported(String),
    /// An option that this kernel or host cannot honour: a usage error.
    #[error("{0}")]
    Usage(String),
    /// A `--container` with no cgroup, or several, in the hierarchy a class
    /// reads.
    #[error("--container {id}: in the hierarchy mounted at {}: {source}", hierarchy.display())]
    Container {
        id: String,
        hierarchy: std::path::PathBuf,
        source: ContainerError,
    },
    /// A `--cgroup` that names no cgroup of the hierarchy it applies to.
    #[error("--cgroup: no such cgroup in the hierarchy mounted at {}: {source}", hierarchy.display())]
    Cgroup {
        hierarchy: std::path::PathBuf,
        source: CgroupError,
    },
}

/// One event class: its tracepoints, how to configure its programs, how to
/// decode its events, the records it writes.
pub(crate) trait Class {
    /// Its name in `agent_stats` and on the command line.
    fn name(&self) -> &'static str;
    fn id(&self) -> ClassId;
    fn tracepoints(&self) -> &'static [Tracepoint];

    /// What its programs need from the kernel's BTF.
    fn btf_queries(&self) -> &'static [BtfQueries] {
        &[]
    }

    /// Globals for its programs, from the kernel's types (tracepoint offsets,
    /// BTF answers) and its options (filters). Classes sharing programs
    /// return the same global with the same value. What the class must do
    /// without goes in `degraded`.
    fn configure(
        &mut self,
        kernel: &KernelTypes,
        degraded: &mut Vec<Degraded>,
    ) -> Result<Vec<Global>, ClassError>;

    /// The sizes of the maps its programs use.
    fn map_sizes(&self) -> Vec<MapSize> {
        Vec::new()
    }

    /// Called once the programs are loaded and attached, to take the maps the
    /// class reads itself (histograms, counters).
    fn on_loaded(&mut self, _ebpf: &mut Ebpf) -> Result<(), ClassError> {
        Ok(())
    }

    /// Run counts its programs keep in the class's own maps rather than in
    /// the shared cost map, summed over CPUs: the agent adds them to the
    /// programs' figures.
    fn program_costs(&self) -> Vec<(ProgramId, ProgramCost)> {
        Vec::new()
    }

    /// Every [`HOUSEKEEPING`] whatever the interval (also with `--interval
    /// 0`): keeps the kernel maps the class reads itself from filling up.
    fn housekeeping(&mut self) {}

    /// Whether events of this kind belong to this class.
    fn handles(&self, kind: EventKind) -> bool;

    /// Decodes one event and writes its records; returns how many.
    fn on_event(&mut self, data: &[u8], cx: &mut Context<'_>) -> Result<u64, ClassError>;

    /// Every `--interval` and once at exit (after the last events were
    /// drained): writes the class's summaries for the interval that ends at
    /// `now_ns` (monotonic) and lasted `interval_ns`.
    fn on_interval(
        &mut self,
        _now_ns: u64,
        _interval_ns: u64,
        _cx: &mut Context<'_>,
    ) -> Result<(), ClassError> {
        Ok(())
    }
}
