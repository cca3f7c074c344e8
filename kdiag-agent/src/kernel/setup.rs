//! What the classes ask of the kernel side before load, and what it answers:
//! the tracepoints their programs attach to, the BTF they need, the globals
//! and map sizes that configure the programs, and the kernel's types (the
//! tracepoints' formats and the BTF answers) they configure them from.

use crate::kernel::{
    btf::{self, Enumerator, Member},
    loader::AttachMode,
    tracefs::Formats,
};

/// A kernel tracepoint one of kdiag's programs attaches to.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Tracepoint {
    pub group: &'static str,
    pub name: &'static str,
    /// The program's name in the eBPF object: its classic tracepoint entry.
    pub program: &'static str,
    /// Its BTF tracepoint (tp_btf) entry, where it has one: loaded instead
    /// of `program` where the kernel has BTF for the tracepoint and allows
    /// it (see `loader::AttachMode`).
    pub btf_program: Option<&'static str>,
    /// What the BTF tracepoint entry needs of the kernel's BTF beyond the
    /// tracepoint's typedef (offsets of the fields it reads where the
    /// classic entry has them in the record): `Err` says why the classic
    /// entry is attached instead. Asked with the class's BTF queries.
    pub btf_check: Option<BtfCheck>,
    /// Without it the class has nothing to report: the agent fails if a
    /// required tracepoint cannot attach, and runs degraded otherwise.
    pub required: bool,
}

/// See [`Tracepoint::btf_check`].
pub(crate) type BtfCheck = fn(&btf::Answers) -> Result<(), String>;

impl Tracepoint {
    pub(crate) fn path(&self) -> String {
        format!("{}/{}", self.group, self.name)
    }

    /// The typedef of the tracepoint's prototype in the kernel's BTF
    /// (`DEFINE_EVENT` declares `btf_trace_<name>`, include/trace/bpf_probe.h),
    /// by which a BTF tracepoint program names its tracepoint.
    pub(crate) fn btf_typedef(&self) -> String {
        format!("btf_trace_{}", self.name)
    }
}

/// A value for one of the programs' `.rodata` globals, set before load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Global {
    pub name: &'static str,
    pub bytes: Vec<u8>,
}

impl Global {
    pub(crate) fn new<T: aya::Pod>(name: &'static str, value: &T) -> Self {
        Self {
            name,
            bytes: crate::sys::pod::bytes_of(value).to_vec(),
        }
    }
}

/// The size of one of the programs' maps. The object declares each class's
/// maps with one entry, so the maps of classes that do not run cost next to
/// nothing until they are freed (`loader::release_unused_maps`); the
/// running classes size theirs here (classes sharing a map:
/// the largest size wins).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MapSize {
    pub map: &'static str,
    pub entries: u32,
}

/// What a class asks of the running kernel's BTF: struct member offsets and
/// enum values its programs need. Every class's questions are answered in
/// one pass over the file before load.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BtfQueries {
    pub members: &'static [Member<'static>],
    pub enumerators: &'static [Enumerator<'static>],
    /// Enums wanted whole: every enumerator's name and value.
    pub enums: &'static [&'static str],
}

/// The running kernel's types, as the classes need them to configure their
/// programs: the formats of the attached tracepoints (by program name) and
/// the answers to every class's BTF queries (and the loader's: the ids of
/// the tracepoints' `btf_trace_` typedefs).
#[derive(Debug, Default)]
pub(crate) struct KernelTypes {
    pub formats: Formats,
    pub btf: btf::Answers,
    /// How the programs with a BTF tracepoint entry are to attach, which
    /// decided the typedefs asked for.
    pub attach: AttachMode,
}
