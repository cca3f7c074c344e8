//! Kernel addresses to `symbol+0xoffset`, from /proc/kallsyms, for the
//! stacks of slow events (`--stack-min-latency-us`).
//!
//! /proc/kallsyms shows real addresses only to a reader that was privileged
//! when it opened the file: the kernel decides from the credentials saved
//! with the open file (`kallsyms_show_value(file->f_cred)`), not from the
//! reader's at read time. The agent runs as an unprivileged user once
//! attached, so it opens the file before that, keeps the descriptor, and
//! reads it from the start (lseek, read) whenever it needs the table:
//! first when the first stack arrives (a run without slow events never pays
//! for it), again when the set of loaded modules has changed.
//!
//! The table keeps what a return address can point into: text symbols
//! (`t`, `T`, `w`, `W`), without the `__pfx_` padding before each function
//! (half of a 6.x kernel's symbols, never a return address) and without
//! BPF programs (`[bpf]`: they come and go with every program loaded, and a
//! stack taken at a tracepoint does not run through one). Two sorted
//! arrays and one string of names: about 36 bytes a function, 2 MB more
//! resident for a 6.18 kernel (121k symbols, 64k functions kept).

use std::{
    fs::File,
    io::{self, BufRead, BufReader, Read, Seek, SeekFrom},
    time::{Duration, Instant},
};

/// What a frame whose address falls in no known function is written as.
pub(crate) const UNKNOWN_FRAME: &str = "[unknown]";

/// An address further than this past the start of the symbol below it is
/// taken to be in none (a gap between modules, a trampoline or JIT area
/// the table does not cover): no kernel function comes near this size,
/// while the gaps between the kernel, its modules and other executable
/// areas are larger.
const MAX_SYMBOL_SIZE: u64 = 1 << 20;

/// Tracing frames are looked for among this many innermost ones: the
/// program's own frames and the tracepoint's dispatch are 2 to 5 deep.
const MAX_TRACING_FRAMES: usize = 8;

/// Whether a frame is the kernel's tracing code: a tracepoint's dispatch
/// to the BPF program.
fn is_tracing_frame(frame: &str) -> bool {
    const TRACING: &[&str] = &[
        "__traceiter_",
        "__bpf_trace_",
        "bpf_trace_run",
        "perf_trace_",
        "trace_call_bpf",
        "perf_tp_event",
        "trace_event_raw_event_",
        "__probestub_",
    ];
    TRACING.iter().any(|p| frame.starts_with(p))
}

/// How often, at most, /proc/modules is compared with what the table was
/// read with: between two checks, a frame in a module loaded meanwhile may
/// resolve to `[unknown]` (or, within a megabyte of another module's last
/// function, to that function).
const MODULES_CHECK: Duration = Duration::from_secs(1);

/// How far into /proc/kallsyms the first function is looked for: past the
/// per-CPU symbols, a few hundred lines.
const FIRST_FUNCTION_WITHIN: u64 = 1 << 20;

/// Why stacks cannot be symbolized.
#[derive(Debug, thiserror::Error)]
pub(crate) enum KallsymsError {
    #[error("cannot read /proc/kallsyms: {0}")]
    Read(#[from] io::Error),
    #[error(
        "/proc/kallsyms shows no addresses to the agent (kernel.kptr_restrict is 2, or the \
         agent lacks CAP_SYSLOG)"
    )]
    Hidden,
}

/// Kernel functions by address.
#[derive(Debug, Default)]
pub(crate) struct SymbolTable {
    /// Start addresses, ascending, one per address.
    addrs: Vec<u64>,
    /// End of each name in `names`; name `i` starts where name `i - 1` ends.
    name_ends: Vec<u32>,
    names: String,
}

/// One line of /proc/kallsyms: address, type, name (and `[module]`).
fn parse_line(line: &str) -> Option<(u64, char, &str, Option<&str>)> {
    let mut cols = line.split_ascii_whitespace();
    let addr = u64::from_str_radix(cols.next()?, 16).ok()?;
    let kind = cols.next()?.chars().next()?;
    let name = cols.next()?;
    Some((addr, kind, name, cols.next()))
}

/// Whether a kallsyms text shows addresses, from its first function's: the
/// per-CPU symbols before it (up to 6.14, `fixed_percpu_data` first) are
/// at 0 whatever is shown.
fn shows_addresses(text: impl BufRead) -> bool {
    text.lines()
        .map_while(Result::ok)
        .find_map(|line| {
            let (addr, kind, name, module) = parse_line(&line)?;
            is_function(kind, name, module).then_some(addr)
        })
        .is_some_and(|addr| addr != 0)
}

/// Whether a symbol belongs in the table (see the module comment).
fn is_function(kind: char, name: &str, module: Option<&str>) -> bool {
    matches!(kind, 't' | 'T' | 'w' | 'W') && !name.starts_with("__pfx_") && module != Some("[bpf]")
}

impl SymbolTable {
    /// Parses /proc/kallsyms text. A line that does not parse is skipped.
    pub(crate) fn parse(text: impl BufRead) -> io::Result<Self> {
        let mut entries: Vec<(u64, u32, u32)> = Vec::new();
        let mut names = String::new();
        for line in text.lines() {
            let line = line?;
            let Some((addr, kind, name, module)) = parse_line(&line) else {
                continue;
            };
            if !is_function(kind, name, module) {
                continue;
            }
            let (Ok(start), Ok(len)) = (u32::try_from(names.len()), u32::try_from(name.len()))
            else {
                break;
            };
            names.push_str(name);
            entries.push((addr, start, len));
        }
        // Stable: of several names for one address (aliases), the first
        // listed stays.
        entries.sort_by_key(|&(addr, _, _)| addr);
        entries.dedup_by_key(|&mut (addr, _, _)| addr);
        // Names in address order, so that each ends where the next starts.
        let mut sorted = String::with_capacity(names.len());
        let mut name_ends = Vec::with_capacity(entries.len());
        for &(_, start, len) in &entries {
            sorted.push_str(&names[start as usize..(start + len) as usize]);
            name_ends.push(sorted.len() as u32);
        }
        sorted.shrink_to_fit();
        Ok(Self {
            addrs: entries.iter().map(|&(addr, _, _)| addr).collect(),
            name_ends,
            names: sorted,
        })
    }

    /// Whether every address is 0: the file hid them from its opener.
    fn hidden(&self) -> bool {
        self.addrs.iter().all(|&a| a == 0)
    }

    /// The function `addr` is in, and how far into it.
    pub(crate) fn lookup(&self, addr: u64) -> Option<(&str, u64)> {
        let i = self.addrs.partition_point(|&a| a <= addr).checked_sub(1)?;
        let offset = addr - self.addrs[i];
        if offset >= MAX_SYMBOL_SIZE || self.addrs[i] == 0 {
            return None;
        }
        let start = if i == 0 { 0 } else { self.name_ends[i - 1] };
        Some((
            &self.names[start as usize..self.name_ends[i] as usize],
            offset,
        ))
    }

    /// `addr` as a stack frame: `symbol+0xoffset`, or [`UNKNOWN_FRAME`].
    pub(crate) fn frame(&self, addr: u64) -> String {
        self.lookup(addr).map_or_else(
            || UNKNOWN_FRAME.to_owned(),
            |(name, offset)| format!("{name}+{offset:#x}"),
        )
    }

    /// The frames of a stack taken by a tracepoint program, innermost
    /// first, from the function that hit the tracepoint: without the
    /// tracing code between it and the program, which the kernel's unwinder
    /// leaves in for some program types and not others (a BTF tracepoint's
    /// stack starts in the BPF program itself, then `bpf_trace_run1`).
    pub(crate) fn stack(&self, ips: &[u64]) -> Vec<String> {
        let mut frames: Vec<String> = ips.iter().map(|&ip| self.frame(ip)).collect();
        // The innermost frames that are BPF programs (unknown here) or
        // tracing code, if tracing code is among them.
        let lead = frames
            .iter()
            .take(MAX_TRACING_FRAMES)
            .take_while(|f| f.as_str() == UNKNOWN_FRAME || is_tracing_frame(f))
            .count();
        if frames[..lead].iter().any(|f| is_tracing_frame(f)) {
            frames.drain(..lead);
        }
        frames
    }
}

/// /proc/kallsyms opened while privileged, and the table last read from it.
#[derive(Debug)]
pub(crate) struct KernelSymbols {
    file: File,
    table: Option<SymbolTable>,
    /// /proc/modules (names and sizes) when the table was read; `None`
    /// on a kernel without modules.
    modules: Option<String>,
    checked: Option<Instant>,
    /// Whether a failed first read was reported (once, on stderr).
    reported: bool,
}

/// The loaded modules, from /proc/modules; `None` where there is none (a
/// kernel without modules).
fn loaded_modules() -> Option<String> {
    std::fs::read_to_string("/proc/modules")
        .ok()
        .map(|text| module_list(&text))
}

/// Names and sizes of the modules in /proc/modules text, one per line:
/// what changes when a module is loaded or unloaded, not its use count or
/// users, which change while it stays.
fn module_list(text: &str) -> String {
    text.lines()
        .map(|l| {
            l.split_ascii_whitespace()
                .take(2)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

impl KernelSymbols {
    /// Opens /proc/kallsyms: to be called while the agent still has its
    /// privileges. Reads just the first line, to check that the file shows
    /// this opener real addresses; the table is read on first use.
    pub(crate) fn open() -> Result<Self, KallsymsError> {
        let file = File::open("/proc/kallsyms")?;
        if !shows_addresses(BufReader::new(&file).take(FIRST_FUNCTION_WITHIN)) {
            return Err(KallsymsError::Hidden);
        }
        Ok(Self {
            file,
            table: None,
            modules: None,
            checked: None,
            reported: false,
        })
    }

    /// Reads the table from the start of the file.
    fn read(&mut self) -> Result<SymbolTable, KallsymsError> {
        (&self.file).seek(SeekFrom::Start(0))?;
        let table = SymbolTable::parse(BufReader::with_capacity(64 << 10, &self.file))?;
        if table.hidden() {
            return Err(KallsymsError::Hidden);
        }
        Ok(table)
    }

    /// The table, read on first use and again when the loaded modules
    /// changed (checked at most every [`MODULES_CHECK`]). A failed re-read
    /// keeps the previous table; `None` if none could ever be read.
    pub(crate) fn table(&mut self) -> Option<&SymbolTable> {
        let due = self.checked.is_none_or(|t| t.elapsed() >= MODULES_CHECK);
        if due {
            self.checked = Some(Instant::now());
            let modules = loaded_modules();
            if self.table.is_none() || modules != self.modules {
                match self.read() {
                    Ok(table) => {
                        self.table = Some(table);
                        self.modules = modules;
                    }
                    Err(e) if self.table.is_none() && !self.reported => {
                        self.reported = true;
                        crate::output::diagnose(format_args!("kernel stacks are null: {e}"));
                    }
                    Err(_) => {}
                }
            }
        }
        self.table.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
ffffffff81000000 T _stext
ffffffff81000000 T _text
ffffffff81001000 t __pfx_do_one
ffffffff81001010 T do_one
ffffffff81001200 t helper_two
ffffffff81002000 D some_data
ffffffff81003000 W weak_three
ffffffffc0100000 t mod_fn\t[mymod]
ffffffffc0200000 t bpf_prog_abc_x\t[bpf]
not a line
";

    fn table() -> SymbolTable {
        SymbolTable::parse(SAMPLE.as_bytes()).unwrap()
    }

    #[test]
    fn addresses_are_told_from_the_first_function() {
        let shown = "0000000000000000 A fixed_percpu_data\n\
                     0000000000000000 A __per_cpu_start\n\
                     ffffffff81000000 T startup_64\n";
        assert!(shows_addresses(shown.as_bytes()));
        let hidden = "0000000000000000 A fixed_percpu_data\n0000000000000000 T startup_64\n";
        assert!(!shows_addresses(hidden.as_bytes()));
        assert!(!shows_addresses("".as_bytes()));
    }
    #[test]
    fn keeps_functions_only() {
        let t = table();
        // _stext (its alias _text dropped), do_one, helper_two, weak_three,
        // mod_fn: no padding, data or BPF symbols.
        assert_eq!(t.addrs.len(), 5);
        assert_eq!(t.lookup(0xffff_ffff_8100_0000), Some(("_stext", 0)));
    }

    #[test]
    fn resolves_into_the_function_below() {
        let t = table();
        assert_eq!(t.frame(0xffff_ffff_8100_1010), "do_one+0x0");
        assert_eq!(t.frame(0xffff_ffff_8100_1123), "do_one+0x113");
        // In the padding before do_one: the function before it.
        assert_eq!(t.frame(0xffff_ffff_8100_1008), "_stext+0x1008");
        // Data is not a function: the one below it.
        assert_eq!(t.frame(0xffff_ffff_8100_2004), "helper_two+0xe04");
        assert_eq!(t.frame(0xffff_ffff_8100_3001), "weak_three+0x1");
        assert_eq!(t.frame(0xffff_ffff_c010_0040), "mod_fn+0x40");
    }

    #[test]
    fn unknown_below_the_first_and_far_past_the_last() {
        let t = table();
        assert_eq!(t.frame(0xffff_ffff_80ff_ffff), UNKNOWN_FRAME);
        assert_eq!(t.frame(0), UNKNOWN_FRAME);
        assert_eq!(
            t.frame(0xffff_ffff_c010_0000 + MAX_SYMBOL_SIZE),
            UNKNOWN_FRAME
        );
        // A BPF program's address: not in the table.
        assert_eq!(t.frame(0xffff_ffff_c020_0010), UNKNOWN_FRAME);
        assert_eq!(SymbolTable::default().frame(0x1000), UNKNOWN_FRAME);
    }

    #[test]
    fn stacks_start_where_the_tracepoint_was_hit() {
        let t = SymbolTable::parse(
            "ffffffff81000000 T bpf_trace_run1\nffffffff81001000 T handle_softirqs\n\
             ffffffff81002000 T run_ksoftirqd\n"
                .as_bytes(),
        )
        .unwrap();
        // A BPF program (unknown), the dispatch, then the kernel's own.
        let ips = [
            0x10,
            0xffff_ffff_8100_0010,
            0xffff_ffff_8100_1020,
            0xffff_ffff_8100_2030,
        ];
        assert_eq!(
            t.stack(&ips),
            ["handle_softirqs+0x20", "run_ksoftirqd+0x30"]
        );
        // Without tracing frames, the stack is kept whole, unknown frames
        // included.
        let ips = [0x10, 0xffff_ffff_8100_1020, 0x10];
        assert_eq!(
            t.stack(&ips),
            [UNKNOWN_FRAME, "handle_softirqs+0x20", UNKNOWN_FRAME]
        );
    }

    #[test]
    fn module_changes_are_loads_and_unloads() {
        let before = "nf_tables 376832 5 nft_ct, Live 0xffffffffc0a00000\n\
                      xfs 2150400 1 - Live 0xffffffffc0800000\n";
        let used = "nf_tables 376832 9 nft_ct,nft_nat, Live 0xffffffffc0a00000\n\
                    xfs 2150400 1 - Live 0xffffffffc0800000\n";
        let loaded = "nf_tables 376832 5 nft_ct, Live 0xffffffffc0a00000\n\
                      xfs 2150400 1 - Live 0xffffffffc0800000\n\
                      dummy 12288 0 - Live 0xffffffffc0c00000\n";
        assert_eq!(module_list(before), "nf_tables 376832\nxfs 2150400");
        assert_eq!(module_list(before), module_list(used));
        assert_ne!(module_list(before), module_list(loaded));
    }

    #[test]
    fn hidden_addresses_resolve_nothing() {
        let t =
            SymbolTable::parse("0000000000000000 T _stext\n0000000000000000 t do_one\n".as_bytes())
                .unwrap();
        assert!(t.hidden());
        assert_eq!(t.frame(0x10), UNKNOWN_FRAME);
        assert!(!table().hidden());
    }

    #[test]
    fn names_stay_paired_with_addresses_after_sorting() {
        // Out of address order, as module symbols are.
        let t = SymbolTable::parse(
            "ffffffffc0000100 t bbb\t[m]\nffffffff81000000 T a\nffffffffc0000000 t cc\t[m]\n"
                .as_bytes(),
        )
        .unwrap();
        assert_eq!(t.frame(0xffff_ffff_8100_0001), "a+0x1");
        assert_eq!(t.frame(0xffff_ffff_c000_0001), "cc+0x1");
        assert_eq!(t.frame(0xffff_ffff_c000_0101), "bbb+0x1");
    }
}
