//! The event classes and what the agent needs to know of each. Adding a
//! class means a module in `classes/`, its programs in kdiag-ebpf, its wire
//! types in kdiag-common, and one arm in `agent::plan`.

use std::io;

use aya::Ebpf;
use kdiag_common::{ClassId, EventKind};

use crate::{
    kernel::tracefs::Formats, kernel::wire::DecodeError, output::Output, output::record::Degraded,
};

/// A kernel tracepoint one of kdiag's programs attaches to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tracepoint {
    pub group: &'static str,
    pub name: &'static str,
    /// The program's name in the eBPF object.
    pub program: &'static str,
    /// Without it the class has nothing to report: the agent fails if a
    /// required tracepoint cannot attach, and runs degraded otherwise.
    pub required: bool,
}

impl Tracepoint {
    pub fn path(&self) -> String {
        format!("{}/{}", self.group, self.name)
    }
}

/// A value for one of the programs' `.rodata` globals, set before load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Global {
    pub name: &'static str,
    pub bytes: Vec<u8>,
}

impl Global {
    pub fn new<T: aya::Pod>(name: &'static str, value: &T) -> Self {
        Self {
            name,
            bytes: crate::sys::pod::bytes_of(value).to_vec(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClassError {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("writing output: {0}")]
    Output(#[from] io::Error),
    #[error("{0}")]
    Setup(String),
}

/// One event class: its tracepoints, how to configure its programs, how to
/// decode its events, the records it writes.
pub trait Class {
    /// Its name in `agent_stats` and on the command line.
    fn name(&self) -> &'static str;
    fn id(&self) -> ClassId;
    fn tracepoints(&self) -> &'static [Tracepoint];

    /// Globals for its programs, from the tracepoints' formats (offsets) and
    /// its options (filters). Classes sharing programs return the same
    /// global with the same value. What the class must do without goes in
    /// `degraded`.
    fn globals(&self, formats: &Formats, degraded: &mut Vec<Degraded>) -> Vec<Global>;

    /// Called once the programs are loaded and attached, to take the maps the
    /// class reads itself (histograms, counters).
    fn on_loaded(&mut self, _ebpf: &mut Ebpf) -> Result<(), ClassError> {
        Ok(())
    }

    /// Whether events of this kind belong to this class.
    fn handles(&self, kind: EventKind) -> bool;

    /// Decodes one event and writes its records; returns how many.
    fn on_event(&mut self, data: &[u8], out: &mut Output) -> Result<u64, ClassError>;

    /// Every `--interval` and once at exit (after the last events were
    /// drained): writes the class's summaries for the interval that ends at
    /// `now_ns` (monotonic) and lasted `interval_ns`.
    fn on_interval(
        &mut self,
        _now_ns: u64,
        _interval_ns: u64,
        _out: &mut Output,
    ) -> Result<(), ClassError> {
        Ok(())
    }
}
