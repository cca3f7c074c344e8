//! The event classes and what the agent needs to know of each.

use std::io;

use kdiag_common::{ClassId, EventKind};

use crate::{output::Output, wire::DecodeError};

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

#[derive(Debug, thiserror::Error)]
pub enum ClassError {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("writing output: {0}")]
    Output(#[from] io::Error),
}

/// One event class: its tracepoints, how to decode its events, the records
/// it writes.
pub trait Class {
    /// Its name in `agent_stats` and on the command line.
    fn name(&self) -> &'static str;
    fn id(&self) -> ClassId;
    fn tracepoints(&self) -> &'static [Tracepoint];
    /// Whether events of this kind belong to this class.
    fn handles(&self, kind: EventKind) -> bool;
    /// Decodes one event and writes its records; returns how many.
    fn on_event(&mut self, data: &[u8], out: &mut Output) -> Result<u64, ClassError>;
}
