//! Just enough of a BTF reader to find struct member offsets, enum values,
//! whole enums and the ids of named typedefs in the running kernel's types
//! (/sys/kernel/btf/vmlinux).
//!
//! The file is megabytes long and the agent wants a handful of numbers from
//! it, so it is never held in memory: a caller asks for everything it needs
//! in one batch, answered by streaming the file through a small buffer. BTF
//! names types and members by offsets into its string section, so a first
//! pass over the strings finds the offsets of the wanted names and a second
//! pass over the types compares offsets instead of strings. Memory is
//! bounded by the buffer and the batch, whatever the file says.
//!
//! Format: include/uapi/linux/btf.h and Documentation/bpf/btf.rst.

use std::{
    collections::HashMap,
    fs::File,
    io::{self, BufRead, BufReader, Read, Seek, SeekFrom},
    sync::Arc,
};

use crate::sys::mapping::Mapping;

#[derive(Debug, thiserror::Error)]
pub(crate) enum BtfError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: io::Error },
    #[error("malformed BTF: {0}")]
    Malformed(&'static str),
    /// The container ("struct sock_common", "enum cgroup_subsys_id") and the
    /// member or enumerator that no type of that name has.
    #[cfg(test)]
    #[error("{0} has no member {1} in the kernel's BTF")]
    NotFound(String, String),
}

/// A struct member whose byte offset is wanted: `(struct, member)`.
pub(crate) type Member<'a> = (&'a str, &'a str);
/// An enumerator whose value is wanted: `(enum, enumerator)`.
pub(crate) type Enumerator<'a> = (&'a str, &'a str);
/// Every enumerator of an enum, by name and value, in the order declared.
pub(crate) type EnumValues = Vec<(String, i64)>;

const VMLINUX: &str = "/sys/kernel/btf/vmlinux";
const MAGIC: u16 = 0xeb9f;
const VERSION: u8 = 1;
/// The header this reader knows; newer kernels may append fields to it.
const HEADER_LEN: u32 = 24;
/// Longest enumerator name kept when listing a whole enum; longer ones are
/// cut (the kernel's are under 64 bytes).
const MAX_ENUMERATOR_NAME: usize = 128;
/// Passes over the type section: a struct's anonymous member may be a type
/// the walk has already passed, and is then read in the next pass (a
/// struct_group in an anonymous union is two levels deep).
const MAX_TYPE_PASSES: usize = 4;
/// No header comes near this: a larger one is garbage, not a newer format.
const MAX_HEADER_LEN: u32 = 4096;
/// Large enough that a regular file takes few reads and most skips need no
/// seek; sysfs hands over a page per read whatever the buffer.
const BUF_LEN: usize = 64 * 1024;
/// Deduplicated BTF, as the kernel's is, holds each name once; more copies
/// than this of the wanted names mean a file not worth growing memory for.
const MAX_NAME_COPIES: usize = 1024;

// Kinds (BTF_KIND_*).
const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FWD: u32 = 7;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_FLOAT: u32 = 16;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

/// The byte offsets of `members` and the values of `enumerators` in the
/// running kernel's BTF, in the order asked, from one pass over the file.
/// Fails unless every one is found.
#[cfg(test)]
pub(crate) fn resolve<const M: usize, const E: usize>(
    members: [Member; M],
    enumerators: [Enumerator; E],
) -> Result<([u32; M], [i64; E]), BtfError> {
    let file = File::open(VMLINUX).map_err(|source| BtfError::Read {
        path: VMLINUX.to_owned(),
        source,
    })?;
    resolve_in(file, VMLINUX, members, enumerators)
}

/// [`resolve`] in the BTF that `reader` holds; `path` names it in errors.
/// The agent asks through [`Answers`]; the tests ask this way, by array.
///
/// A struct member's offset is that of the first struct of that name that
/// has the member; a bitfield's is the byte its first bit is in. Enumerator
/// values are signed or unsigned as their enum says. Members of anonymous
/// structs and unions count as the struct's own, at their place in it;
/// enumerators of 64-bit enums are not looked for.
#[cfg(test)]
pub(crate) fn resolve_in<R: Read + Seek, const M: usize, const E: usize>(
    reader: R,
    path: &str,
    members: [Member; M],
    enumerators: [Enumerator; E],
) -> Result<([u32; M], [i64; E]), BtfError> {
    let found = find_in(reader, path, &members, &enumerators, &[], &[])?;
    let bytes = found.offsets.into_iter().map(|o| o.map(|bits| bits / 8));
    Ok((
        answers(bytes.collect(), &members, "struct")?,
        answers(found.values, &enumerators, "enum")?,
    ))
}

/// What [`enums_in`] answers: an offset per member (in bytes), a list per
/// enum.
#[cfg(test)]
type OffsetsAndEnums = (Vec<Option<u32>>, Vec<Option<EnumValues>>);

/// Every enumerator of each of `enums` in the BTF that `reader` holds, by
/// enum, `None` for an enum it does not have. The agent asks through
/// [`Answers`].
#[cfg(test)]
pub(crate) fn enums_in<R: Read + Seek>(
    reader: R,
    path: &str,
    members: &[Member],
    enums: &[&str],
) -> Result<OffsetsAndEnums, BtfError> {
    let found = find_in(reader, path, members, &[], enums, &[])?;
    let bytes = found.offsets.into_iter().map(|o| o.map(|bits| bits / 8));
    Ok((bytes.collect(), found.enums))
}

/// What every class asked of the kernel's BTF, from one pass over the file
/// at start-up (the file is megabytes; reading it once per question made
/// start-up stream it up to five times).
#[derive(Debug, Default)]
pub(crate) struct Answers {
    offsets: HashMap<Member<'static>, u32>,
    values: HashMap<Enumerator<'static>, i64>,
    enums: HashMap<&'static str, EnumValues>,
    typedef_ids: HashMap<String, u32>,
    /// Why nothing could be answered: no BTF, or a file that is not BTF.
    unreadable: Option<Arc<BtfError>>,
}

/// Why one query has no answer.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum Unanswered {
    #[error(transparent)]
    Unreadable(Arc<BtfError>),
    #[error("{0} {1} has no member {2} in the kernel's BTF")]
    NotFound(&'static str, &'static str, &'static str),
    #[error("enum {0} is not in the kernel's BTF")]
    NoEnum(&'static str),
    #[error("no typedef {0} in the kernel's BTF")]
    NoTypedef(String),
}

impl Answers {
    /// Answers `members`, `enumerators`, `enums` (every enumerator of each)
    /// and the ids of `typedefs` from the running kernel's BTF.
    pub(crate) fn of_kernel(
        members: &[Member<'static>],
        enumerators: &[Enumerator<'static>],
        enums: &[&'static str],
        typedefs: &[String],
    ) -> Self {
        if members.is_empty() && enumerators.is_empty() && enums.is_empty() && typedefs.is_empty() {
            return Self::default();
        }
        let found = File::open(VMLINUX)
            .map_err(|source| BtfError::Read {
                path: VMLINUX.to_owned(),
                source,
            })
            .and_then(|file| match Mapping::read_only(&file) {
                // sysfs hands over a page per read(): streaming the file
                // costs over a thousand system calls, tens of milliseconds
                // of start-up on a busy host. Since 6.16 the kernel lets it
                // be mapped instead (its own memory, which the process's
                // resident size does not count); before, the mapping fails.
                Ok(mapped) => find_in(
                    io::Cursor::new(mapped.bytes()),
                    VMLINUX,
                    members,
                    enumerators,
                    enums,
                    typedefs,
                ),
                Err(_) => find_in(file, VMLINUX, members, enumerators, enums, typedefs),
            });
        Self::from_found(found, members, enumerators, enums, typedefs)
    }

    fn from_found(
        found: Result<Found, BtfError>,
        members: &[Member<'static>],
        enumerators: &[Enumerator<'static>],
        enums: &[&'static str],
        typedefs: &[String],
    ) -> Self {
        match found {
            Ok(found) => Self {
                offsets: members
                    .iter()
                    .copied()
                    .zip(found.offsets)
                    .filter_map(|(q, a)| Some((q, a?)))
                    .collect(),
                values: enumerators
                    .iter()
                    .copied()
                    .zip(found.values)
                    .filter_map(|(q, a)| Some((q, a?)))
                    .collect(),
                enums: enums
                    .iter()
                    .copied()
                    .zip(found.enums)
                    .filter_map(|(q, a)| Some((q, a?)))
                    .collect(),
                typedef_ids: typedefs
                    .iter()
                    .cloned()
                    .zip(found.typedef_ids)
                    .filter_map(|(q, a)| Some((q, a?)))
                    .collect(),
                unreadable: None,
            },
            Err(e) => Self {
                unreadable: Some(Arc::new(e)),
                ..Self::default()
            },
        }
    }

    /// Answers holding these member offsets, in bits: what a kernel's BTF
    /// would give.
    #[cfg(test)]
    pub(crate) fn with_bit_offsets(offsets: &[(Member<'static>, u32)]) -> Self {
        Self {
            offsets: offsets.iter().copied().collect(),
            ..Self::default()
        }
    }

    /// The byte offset of `member` in `strukt` (for a bitfield, of the
    /// byte its first bit is in); the class must have asked.
    pub(crate) fn offset(
        &self,
        strukt: &'static str,
        member: &'static str,
    ) -> Result<u32, Unanswered> {
        self.bit_offset(strukt, member).map(|bits| bits / 8)
    }

    /// The bit offset of `member` in `strukt`, which places a bitfield
    /// within its byte; the class must have asked.
    pub(crate) fn bit_offset(
        &self,
        strukt: &'static str,
        member: &'static str,
    ) -> Result<u32, Unanswered> {
        self.answer(&self.offsets, (strukt, member), "struct")
    }

    /// The value of `enumerator` of `enum_name`; the class must have asked.
    pub(crate) fn value(
        &self,
        enum_name: &'static str,
        enumerator: &'static str,
    ) -> Result<i64, Unanswered> {
        self.answer(&self.values, (enum_name, enumerator), "enum")
    }

    /// Every enumerator of `enum_name`, in the order declared; the class
    /// must have asked.
    pub(crate) fn enumerators_of(
        &self,
        enum_name: &'static str,
    ) -> Result<&EnumValues, Unanswered> {
        if let Some(e) = &self.unreadable {
            return Err(Unanswered::Unreadable(e.clone()));
        }
        self.enums
            .get(enum_name)
            .ok_or(Unanswered::NoEnum(enum_name))
    }

    /// The type id of the typedef `name`; the loader must have asked.
    pub(crate) fn typedef_id(&self, name: &str) -> Result<u32, Unanswered> {
        if let Some(e) = &self.unreadable {
            return Err(Unanswered::Unreadable(e.clone()));
        }
        self.typedef_ids
            .get(name)
            .copied()
            .ok_or_else(|| Unanswered::NoTypedef(name.to_owned()))
    }

    fn answer<T: Copy>(
        &self,
        found: &HashMap<(&'static str, &'static str), T>,
        query: (&'static str, &'static str),
        container: &'static str,
    ) -> Result<T, Unanswered> {
        if let Some(e) = &self.unreadable {
            return Err(Unanswered::Unreadable(e.clone()));
        }
        found
            .get(&query)
            .copied()
            .ok_or(Unanswered::NotFound(container, query.0, query.1))
    }
}

/// BTF (little-endian, as the kernel's on the hosts the agent runs on) in
/// which each of `typedefs`, `(name, id)`, is a typedef named `name` with
/// type id `id`, and every other id up to the largest a placeholder (an
/// unnamed pointer to void): for a loader that finds a typedef's id by its
/// name, without the kernel's whole BTF. 12 bytes per id.
pub(crate) fn typedefs_at_ids(typedefs: &[(String, u32)]) -> Vec<u8> {
    let last = typedefs.iter().map(|&(_, id)| id).max().unwrap_or(0);
    let mut strings = vec![0];
    let mut types = Vec::with_capacity(12 * last as usize);
    for id in 1..=last {
        let (name_off, kind) = match typedefs.iter().find(|&&(_, i)| i == id) {
            Some((name, _)) => {
                let off = strings.len() as u32;
                strings.extend_from_slice(name.as_bytes());
                strings.push(0);
                (off, KIND_TYPEDEF)
            }
            None => (0, KIND_PTR),
        };
        for word in [name_off, kind << 24, 0] {
            types.extend_from_slice(&word.to_le_bytes());
        }
    }
    let mut out = Vec::with_capacity(HEADER_LEN as usize + types.len() + strings.len());
    let header = [
        u32::from(MAGIC) | u32::from(VERSION) << 16,
        HEADER_LEN,
        0,
        types.len() as u32,
        types.len() as u32,
        strings.len() as u32,
    ];
    for word in header {
        out.extend_from_slice(&word.to_le_bytes());
    }
    out.extend_from_slice(&types);
    out.extend_from_slice(&strings);
    out
}

/// The BTF in `reader`, read in as few passes as the queries allow: an
/// answer or `None` per query (member offsets in bits).
fn find_in<R: Read + Seek>(
    reader: R,
    path: &str,
    members: &[Member],
    enumerators: &[Enumerator],
    enums: &[&str],
    typedefs: &[String],
) -> Result<Found, BtfError> {
    let batch = Batch::new(members, enumerators, enums, typedefs);
    let mut reader = Reader {
        inner: BufReader::with_capacity(BUF_LEN, reader),
        path,
    };
    let header = Header::read(&mut reader)?;
    let names = NameOffsets::find(&mut reader, header.strings, &batch.names)?;
    let mut found = batch.find(&mut reader, header.types, &names)?;
    found.name_enums(&mut reader, header.strings)?;
    Ok(found)
}

/// The answers as an array, or which query has none.
#[cfg(test)]
fn answers<T: Copy + Default, const N: usize>(
    found: Vec<Option<T>>,
    queries: &[(&str, &str); N],
    container: &str,
) -> Result<[T; N], BtfError> {
    let mut out = [T::default(); N];
    for ((slot, answer), (owner, name)) in out.iter_mut().zip(found).zip(queries) {
        *slot = answer.ok_or_else(|| {
            BtfError::NotFound(format!("{container} {owner}"), (*name).to_owned())
        })?;
    }
    Ok(out)
}

/// The file, buffered, with errors that say what went wrong in BTF terms.
struct Reader<'p, R> {
    inner: BufReader<R>,
    path: &'p str,
}

impl<R: Read + Seek> Reader<'_, R> {
    fn seek(&mut self, to: u64) -> Result<(), BtfError> {
        self.inner
            .seek(SeekFrom::Start(to))
            .map(drop)
            .map_err(|e| self.error(e))
    }

    /// Skips `n` bytes, without a system call when they are buffered.
    fn skip(&mut self, n: u32) -> Result<(), BtfError> {
        self.inner
            .seek_relative(i64::from(n))
            .map_err(|e| self.error(e))
    }

    /// The next `N` little-endian 32-bit words.
    fn words<const N: usize>(&mut self) -> Result<[u32; N], BtfError> {
        let mut bytes = [[0; 4]; N];
        self.inner
            .read_exact(bytes.as_flattened_mut())
            .map_err(|e| self.error(e))?;
        Ok(bytes.map(u32::from_le_bytes))
    }

    /// The buffered bytes, at most `limit` of them; never empty.
    fn chunk(&mut self, limit: u32) -> Result<&[u8], BtfError> {
        let path = self.path;
        let buf = self.inner.fill_buf().map_err(|e| error(path, e))?;
        if buf.is_empty() {
            return Err(BtfError::Malformed("truncated"));
        }
        Ok(&buf[..buf.len().min(limit as usize)])
    }

    fn consume(&mut self, n: usize) {
        self.inner.consume(n);
    }

    /// The NUL-terminated string that starts here, cut at `limit` bytes,
    /// and the bytes it took (with its NUL); at most `left` are read.
    fn string(&mut self, limit: usize, mut left: u32) -> Result<(String, u32), BtfError> {
        let mut bytes = Vec::new();
        let mut took = 0;
        loop {
            if left == 0 {
                return Err(BtfError::Malformed("a name runs past the string section"));
            }
            let chunk = self.chunk(left)?;
            let (end, done) = match memchr::memchr(0, chunk) {
                Some(nul) => (nul, true),
                None => (chunk.len(), false),
            };
            let room = limit.saturating_sub(bytes.len());
            bytes.extend_from_slice(chunk.get(..end.min(room)).unwrap_or_default());
            let n = if done { end + 1 } else { end };
            self.consume(n);
            // `chunk` returns at most `left` bytes.
            took += n as u32;
            left -= n as u32;
            if done {
                return Ok((String::from_utf8_lossy(&bytes).into_owned(), took));
            }
        }
    }

    fn error(&self, e: io::Error) -> BtfError {
        error(self.path, e)
    }
}

/// A file that ends early is malformed; any other failure is a read error.
fn error(path: &str, source: io::Error) -> BtfError {
    if source.kind() == io::ErrorKind::UnexpectedEof {
        BtfError::Malformed("truncated")
    } else {
        BtfError::Read {
            path: path.to_owned(),
            source,
        }
    }
}

/// Where a section is in the file.
#[derive(Clone, Copy)]
struct Section {
    start: u64,
    len: u32,
}

/// Where the type and string sections are.
struct Header {
    types: Section,
    strings: Section,
}

impl Header {
    fn read<R: Read + Seek>(reader: &mut Reader<R>) -> Result<Self, BtfError> {
        let [magic_version, hdr_len, type_off, type_len, str_off, str_len] = reader.words()?;
        if magic_version as u16 != MAGIC {
            return Err(BtfError::Malformed("bad magic (or not little-endian)"));
        }
        if (magic_version >> 16) as u8 != VERSION {
            return Err(BtfError::Malformed("unknown version"));
        }
        if !(HEADER_LEN..=MAX_HEADER_LEN).contains(&hdr_len) {
            return Err(BtfError::Malformed("implausible header length"));
        }
        // Section offsets count from the end of the header.
        let section = |off: u32, len| Section {
            start: u64::from(hdr_len) + u64::from(off),
            len,
        };
        Ok(Self {
            types: section(type_off, type_len),
            strings: section(str_off, str_len),
        })
    }
}

/// The names a batch asks for, each once, and its queries as indexes into
/// them: (struct, member), (enum, enumerator), a whole enum or a typedef.
struct Batch<'a> {
    names: Vec<&'a str>,
    members: Vec<(usize, usize)>,
    enumerators: Vec<(usize, usize)>,
    enums: Vec<usize>,
    typedefs: Vec<usize>,
}

impl<'a> Batch<'a> {
    fn new(
        members: &[Member<'a>],
        enumerators: &[Enumerator<'a>],
        enums: &[&'a str],
        typedefs: &'a [String],
    ) -> Self {
        let mut names = Vec::new();
        let mut pairs = |queries: &[(&'a str, &'a str)]| -> Vec<(usize, usize)> {
            queries
                .iter()
                .map(|&(owner, name)| (intern(&mut names, owner), intern(&mut names, name)))
                .collect()
        };
        let members = pairs(members);
        let enumerators = pairs(enumerators);
        let enums = enums.iter().map(|&e| intern(&mut names, e)).collect();
        let typedefs = typedefs.iter().map(|t| intern(&mut names, t)).collect();
        Self {
            names,
            members,
            enumerators,
            enums,
            typedefs,
        }
    }

    /// Walks the type section until every query has an answer or the
    /// section ends, and again while anonymous members of the structs asked
    /// about were found in types the walk had passed.
    fn find<R: Read + Seek>(
        &self,
        reader: &mut Reader<R>,
        types: Section,
        names: &NameOffsets,
    ) -> Result<Found, BtfError> {
        let mut walk = Walk {
            batch: self,
            names,
            found: Found {
                offsets: vec![None; self.members.len()],
                values: vec![None; self.enumerators.len()],
                listed: vec![None; self.enums.len()],
                enums: Vec::new(),
                typedef_ids: vec![None; self.typedefs.len()],
                missing: self.members.len()
                    + self.enumerators.len()
                    + self.enums.len()
                    + self.typedefs.len(),
            },
            id: 0,
            anonymous: Vec::new(),
        };
        for pass in 0..MAX_TYPE_PASSES {
            reader.seek(types.start)?;
            // After the first pass only anonymous members' types the walk
            // had passed can answer anything: it ends at the last of them.
            let end = if pass == 0 {
                u32::MAX
            } else {
                walk.anonymous
                    .iter()
                    .filter(|a| !a.read)
                    .map(|a| a.id)
                    .max()
                    .unwrap_or(0)
            };
            walk.id = 0;
            let mut left = types.len;
            while left > 0 && walk.found.missing > 0 && walk.id < end {
                walk.next_type(reader, &mut left)?;
            }
            if walk.found.missing == 0 || walk.anonymous.iter().all(|a| a.read) {
                break;
            }
        }
        Ok(walk.found)
    }
}

/// The index of `name` in `names`, added if new.
fn intern<'a>(names: &mut Vec<&'a str>, name: &'a str) -> usize {
    names.iter().position(|&n| n == name).unwrap_or_else(|| {
        names.push(name);
        names.len() - 1
    })
}

/// The answers so far, by query (member offsets in bits); `missing` counts
/// those still unanswered.
/// A whole enum's enumerators are first known by their names' offsets in
/// the string section (`listed`), then named (`enums`, by
/// [`Found::name_enums`]).
struct Found {
    offsets: Vec<Option<u32>>,
    values: Vec<Option<i64>>,
    listed: Vec<Option<Vec<(u32, i64)>>>,
    enums: Vec<Option<EnumValues>>,
    typedef_ids: Vec<Option<u32>>,
    missing: usize,
}

impl Found {
    /// Names the enumerators of the enums listed, in one forward pass over
    /// the string section.
    fn name_enums<R: Read + Seek>(
        &mut self,
        reader: &mut Reader<R>,
        strings: Section,
    ) -> Result<(), BtfError> {
        let mut wanted: Vec<u32> = self
            .listed
            .iter()
            .flatten()
            .flatten()
            .map(|&(o, _)| o)
            .collect();
        wanted.sort_unstable();
        wanted.dedup();
        if !wanted.is_empty() {
            reader.seek(strings.start)?;
        }
        let mut pos = 0u32;
        let mut named = HashMap::new();
        for off in wanted {
            if off >= strings.len {
                return Err(BtfError::Malformed("a name past the string section"));
            }
            if off < pos {
                // Inside the previous name: a suffix of it.
                reader.seek(strings.start + u64::from(off))?;
            } else {
                reader.skip(off - pos)?;
            }
            let (name, took) = reader.string(MAX_ENUMERATOR_NAME, strings.len - off)?;
            pos = off + took;
            named.insert(off, name);
        }
        self.enums = self
            .listed
            .iter()
            .map(|listed| {
                let listed = listed.as_ref()?;
                Some(
                    listed
                        .iter()
                        .map(|(off, value)| (named.get(off).cloned().unwrap_or_default(), *value))
                        .collect(),
                )
            })
            .collect();
        Ok(())
    }
}

/// A struct's member of an anonymous struct or union type (a type id):
/// its members are the struct's, at `base` bits further.
struct Anonymous {
    id: u32,
    owner: usize,
    base: u32,
    /// Whether the walk has read the type's members.
    read: bool,
}

/// A walk over the type section for one batch.
struct Walk<'w, 'a> {
    batch: &'w Batch<'a>,
    names: &'w NameOffsets,
    found: Found,
    /// The id of the type being read (ids count from 1).
    id: u32,
    anonymous: Vec<Anonymous>,
}

impl Walk<'_, '_> {
    /// Reads the next type, counting it off the `left` bytes of the section,
    /// and answers the queries it can.
    fn next_type<R: Read + Seek>(
        &mut self,
        reader: &mut Reader<R>,
        left: &mut u32,
    ) -> Result<(), BtfError> {
        let rest = left
            .checked_sub(12)
            .ok_or(BtfError::Malformed("type section ends inside a type"))?;
        let [name_off, info, _size_or_type] = reader.words()?;
        self.id += 1;
        let kind = (info >> 24) & 0x1f;
        let vlen = info & 0xffff;
        let kind_flag = info >> 31 == 1;
        let extra = extra_len(kind, vlen)?;
        *left = rest
            .checked_sub(extra)
            .ok_or(BtfError::Malformed("a type runs past the type section"))?;
        let owner = self.names.at(name_off);
        let record = matches!(kind, KIND_STRUCT | KIND_UNION);
        // Whose members this type's are: a struct asked about, or an
        // anonymous type one of them (or of these) holds.
        let mut within: Vec<(usize, u32)> = self
            .anonymous
            .iter_mut()
            .filter(|a| record && a.id == self.id)
            .map(|a| {
                a.read = true;
                (a.owner, a.base)
            })
            .collect();
        match (kind, owner) {
            (KIND_TYPEDEF, Some(name)) => {
                let id = self.id;
                for (query, slot) in self.batch.typedefs.iter().zip(&mut self.found.typedef_ids) {
                    if *query == name && slot.is_none() {
                        *slot = Some(id);
                        self.found.missing -= 1;
                    }
                }
            }
            (KIND_STRUCT, Some(owner)) if owns(&self.batch.members, owner) => {
                within.push((owner, 0));
            }
            (KIND_ENUM, Some(owner))
                if owns(&self.batch.enumerators, owner) || self.batch.enums.contains(&owner) =>
            {
                return self.enumerators(reader, owner, vlen, kind_flag);
            }
            _ => {}
        }
        if within.is_empty() {
            return reader.skip(extra);
        }
        self.members(reader, &within, vlen, kind_flag)
    }

    /// Reads the `vlen` members of a struct or union whose members belong
    /// to the structs `within` (each at its base offset).
    fn members<R: Read + Seek>(
        &mut self,
        reader: &mut Reader<R>,
        within: &[(usize, u32)],
        vlen: u32,
        kind_flag: bool,
    ) -> Result<(), BtfError> {
        for _ in 0..vlen {
            let [name_off, ty, offset] = reader.words()?;
            // With kind_flag set the top 8 bits hold a bitfield's size.
            let bits = if kind_flag {
                offset & 0xff_ffff
            } else {
                offset
            };
            for &(owner, base) in within {
                let at = base.saturating_add(bits);
                if name_off == 0 {
                    self.note_anonymous(ty, owner, at);
                } else if let Some(name) = self.names.at(name_off) {
                    answer(
                        &self.batch.members,
                        (owner, name),
                        at,
                        &mut self.found.offsets,
                        &mut self.found.missing,
                    );
                }
            }
        }
        Ok(())
    }

    /// Notes the anonymous member of type `id`, at `base` in `owner`, whose
    /// members are `owner`'s. Bounded like the names: deduplicated BTF has
    /// few of them per struct.
    fn note_anonymous(&mut self, id: u32, owner: usize, base: u32) {
        let known = self
            .anonymous
            .iter()
            .any(|a| (a.id, a.owner, a.base) == (id, owner, base));
        if !known && self.anonymous.len() < MAX_NAME_COPIES {
            self.anonymous.push(Anonymous {
                id,
                owner,
                base,
                read: false,
            });
        }
    }

    /// Reads the `vlen` enumerators of an enum named `owner`.
    fn enumerators<R: Read + Seek>(
        &mut self,
        reader: &mut Reader<R>,
        owner: usize,
        vlen: u32,
        signed: bool,
    ) -> Result<(), BtfError> {
        let whole = self.batch.enums.iter().position(|&e| e == owner);
        let mut listed = Vec::new();
        for _ in 0..vlen {
            let [name_off, raw] = reader.words()?;
            // kind_flag says whether the enum is signed.
            let value = if signed {
                i64::from(raw as i32)
            } else {
                i64::from(raw)
            };
            if whole.is_some() {
                // Named once the walk is over (Found::name_enums).
                listed.push((name_off, value));
            }
            if let Some(name) = self.names.at(name_off) {
                answer(
                    &self.batch.enumerators,
                    (owner, name),
                    value,
                    &mut self.found.values,
                    &mut self.found.missing,
                );
            }
        }
        if let Some(slot) = whole.and_then(|i| self.found.listed.get_mut(i))
            && slot.is_none()
        {
            *slot = Some(listed);
            self.found.missing -= 1;
        }
        Ok(())
    }
}

/// Whether one of `queries` is about a type named `owner`.
fn owns(queries: &[(usize, usize)], owner: usize) -> bool {
    queries.iter().any(|&(o, _)| o == owner)
}

/// Answers the still unanswered `queries` that ask for `key`: the first
/// type of a name that has the member wins.
fn answer<T: Copy>(
    queries: &[(usize, usize)],
    key: (usize, usize),
    value: T,
    slots: &mut [Option<T>],
    missing: &mut usize,
) {
    for (query, slot) in queries.iter().zip(slots) {
        if *query == key && slot.is_none() {
            *slot = Some(value);
            *missing -= 1;
        }
    }
}

/// The bytes that follow a type's 12-byte header, by kind.
fn extra_len(kind: u32, vlen: u32) -> Result<u32, BtfError> {
    Ok(match kind {
        KIND_PTR | KIND_FWD | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT
        | KIND_FUNC | KIND_FLOAT | KIND_TYPE_TAG => 0,
        KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
        KIND_ARRAY => 12,
        KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * vlen,
        KIND_ENUM | KIND_FUNC_PROTO => 8 * vlen,
        // Without its size, where the next type starts is unknown.
        _ => return Err(BtfError::Malformed("type of an unknown kind (newer BTF?)")),
    })
}

/// Where the wanted names are in the string section: (offset, index of the
/// name in the batch), by offset.
struct NameOffsets {
    found: Vec<(u32, usize)>,
    /// One bit per offset modulo `FILTER_BITS`, set for the found ones:
    /// every type's name is checked, over a hundred thousand of them, and
    /// nearly none is wanted; a bit in a table that stays in the CPU's
    /// cache turns most away without searching `found`.
    filter: Vec<u64>,
}

/// The size of [`NameOffsets`]' filter: 8 KiB, where a few hundred names
/// leave under 1% of the other offsets to search.
const FILTER_BITS: usize = 1 << 16;

impl NameOffsets {
    /// Streams the string section, noting each string equal to one of
    /// `names`. A name can be there more than once, in BTF that is not
    /// deduplicated, and a type or member may use any of its copies.
    fn find<R: Read + Seek>(
        reader: &mut Reader<R>,
        strings: Section,
        names: &[&str],
    ) -> Result<Self, BtfError> {
        reader.seek(strings.start)?;
        let mut scan = StringScan::new(names);
        let mut left = strings.len;
        while left > 0 {
            let chunk = reader.chunk(left)?;
            let n = chunk.len();
            scan.feed(chunk)?;
            reader.consume(n);
            // `chunk` returns at most `left` bytes.
            left -= n as u32;
        }
        Ok(Self::new(scan.found))
    }

    /// `found` in the order of the string section.
    fn new(found: Vec<(u32, usize)>) -> Self {
        let mut filter = vec![0u64; FILTER_BITS / 64];
        for &(off, _) in &found {
            let bit = off as usize % FILTER_BITS;
            filter[bit / 64] |= 1 << (bit % 64);
        }
        Self { found, filter }
    }

    /// Which wanted name is at `off`, if any.
    fn at(&self, off: u32) -> Option<usize> {
        let bit = off as usize % FILTER_BITS;
        if self
            .filter
            .get(bit / 64)
            .is_none_or(|w| w >> (bit % 64) & 1 == 0)
        {
            return None;
        }
        let i = self.found.binary_search_by_key(&off, |&(o, _)| o).ok()?;
        self.found.get(i).map(|&(_, name)| name)
    }
}

/// The string section seen a chunk at a time: strings are NUL-terminated
/// and may straddle chunks.
struct StringScan<'n> {
    names: &'n [&'n str],
    longest: usize,
    /// The wanted names of each length, with their first bytes (see
    /// [`prefix`]): a string is compared only to the few of its own length
    /// and start (with a hundred names, nearly every length is some
    /// name's, and comparing each of the section's strings to all of them
    /// was most of this pass).
    by_length: Vec<Vec<(u64, usize)>>,
    /// The current string so far, unless it is longer than every name.
    current: Vec<u8>,
    too_long: bool,
    /// The offsets of the current string and of the next byte.
    start: u32,
    pos: u32,
    found: Vec<(u32, usize)>,
}

impl<'n> StringScan<'n> {
    fn new(names: &'n [&'n str]) -> Self {
        let longest = names.iter().map(|n| n.len()).max().unwrap_or(0);
        let mut by_length = vec![Vec::new(); longest + 1];
        for (i, n) in names.iter().enumerate() {
            by_length[n.len()].push((prefix(n.as_bytes()), i));
        }
        Self {
            names,
            longest,
            by_length,
            current: Vec::with_capacity(longest),
            too_long: false,
            start: 0,
            pos: 0,
            found: Vec::new(),
        }
    }

    fn feed(&mut self, chunk: &[u8]) -> Result<(), BtfError> {
        // The section is a hundred thousand short strings: a vectorised
        // search for their ends is most of this pass's speed.
        let mut from = 0;
        for nul in memchr::memchr_iter(0, chunk) {
            self.end_string(chunk.get(from..nul).unwrap_or_default())?;
            from = nul + 1;
        }
        self.extend(chunk.get(from..).unwrap_or_default());
        Ok(())
    }

    /// Adds `text` to the current string, unless that makes it longer than
    /// every wanted name.
    fn extend(&mut self, text: &[u8]) {
        // Chunks add up to at most the section's u32 length.
        self.pos += text.len() as u32;
        if self.too_long || self.current.len() + text.len() > self.longest {
            self.too_long = true;
        } else {
            self.current.extend_from_slice(text);
        }
    }

    /// Ends the current string with `tail`, noting it if it is a wanted
    /// name.
    fn end_string(&mut self, tail: &[u8]) -> Result<(), BtfError> {
        let name = if self.current.is_empty() && !self.too_long {
            // Most strings lie within one chunk: compare them where they are.
            self.pos += tail.len() as u32;
            self.wanted(tail)
        } else {
            self.extend(tail);
            if self.too_long {
                None
            } else {
                self.wanted(&self.current)
            }
        };
        if let Some(name) = name {
            if self.found.len() == MAX_NAME_COPIES {
                return Err(BtfError::Malformed("too many copies of a name"));
            }
            self.found.push((self.start, name));
        }
        self.pos += 1;
        self.current.clear();
        self.too_long = false;
        self.start = self.pos;
        Ok(())
    }

    /// Which wanted name `string` is, if any.
    fn wanted(&self, string: &[u8]) -> Option<usize> {
        let start = prefix(string);
        self.by_length
            .get(string.len())?
            .iter()
            .filter(|&&(p, _)| p == start)
            .map(|&(_, i)| i)
            .find(|&i| self.names.get(i).is_some_and(|n| n.as_bytes() == string))
    }
}

/// The first 8 bytes of `bytes` (fewer, zero-padded, when it is shorter)
/// as one number, which tells most strings of one length apart in one
/// comparison.
fn prefix(bytes: &[u8]) -> u64 {
    let mut first = [0; 8];
    let n = bytes.len().min(8);
    first[..n].copy_from_slice(&bytes[..n]);
    u64::from_le_bytes(first)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::io::Cursor;

    use super::*;

    /// Builds BTF a type at a time. Names are interned, as in the kernel's
    /// deduplicated string section, unless `copy` asks for a new copy.
    pub(crate) struct Blob {
        types: Vec<u8>,
        strings: Vec<u8>,
    }

    impl Blob {
        pub(crate) fn new() -> Self {
            Self {
                types: Vec::new(),
                strings: vec![0],
            }
        }

        fn name(&mut self, name: &str) -> u32 {
            let mut off = 0;
            for s in self.strings.split(|&b| b == 0) {
                if s == name.as_bytes() {
                    return off;
                }
                off += s.len() as u32 + 1;
            }
            self.copy(name)
        }

        fn copy(&mut self, name: &str) -> u32 {
            let off = self.strings.len() as u32;
            self.strings.extend_from_slice(name.as_bytes());
            self.strings.push(0);
            off
        }

        fn words(&mut self, words: &[u32]) -> &mut Self {
            for w in words {
                self.types.extend_from_slice(&w.to_le_bytes());
            }
            self
        }

        fn ty(&mut self, name_off: u32, kind: u32, kind_flag: bool, vlen: u32) -> &mut Self {
            let info = (u32::from(kind_flag) << 31) | (kind << 24) | vlen;
            self.words(&[name_off, info, 4])
        }

        fn int(&mut self, name: &str) -> &mut Self {
            let name = self.name(name);
            self.ty(name, KIND_INT, false, 0).words(&[32])
        }

        /// A struct of `(member, offset word)`s, all of them ints.
        fn structure(&mut self, name: &str, kind_flag: bool, members: &[(&str, u32)]) -> &mut Self {
            let name = self.name(name);
            self.ty(name, KIND_STRUCT, kind_flag, members.len() as u32);
            for &(member, offset) in members {
                let member = self.name(member);
                self.words(&[member, 1, offset]);
            }
            self
        }

        /// A struct or union (`kind`) named `name` ("" for an anonymous
        /// one) of `(member, type id, offset in bits)`s.
        fn record(&mut self, kind: u32, name: &str, members: &[(&str, u32, u32)]) -> &mut Self {
            let name = if name.is_empty() { 0 } else { self.name(name) };
            self.ty(name, kind, false, members.len() as u32);
            for &(member, ty, offset) in members {
                let member = if member.is_empty() {
                    0
                } else {
                    self.name(member)
                };
                self.words(&[member, ty, offset]);
            }
            self
        }

        fn enumeration(&mut self, name: &str, signed: bool, values: &[(&str, u32)]) -> &mut Self {
            let name = self.name(name);
            self.ty(name, KIND_ENUM, signed, values.len() as u32);
            for &(value, raw) in values {
                let value = self.name(value);
                self.words(&[value, raw]);
            }
            self
        }

        /// The BTF, with the string section first if `strings_first`.
        pub(crate) fn bytes(&self, strings_first: bool) -> Vec<u8> {
            let (types_len, strings_len) = (self.types.len() as u32, self.strings.len() as u32);
            let (type_off, str_off) = if strings_first {
                (strings_len, 0)
            } else {
                (0, types_len)
            };
            let mut out = Vec::new();
            out.extend_from_slice(&MAGIC.to_le_bytes());
            out.extend_from_slice(&[VERSION, 0]);
            for v in [HEADER_LEN, type_off, types_len, str_off, strings_len] {
                out.extend_from_slice(&v.to_le_bytes());
            }
            if strings_first {
                out.extend_from_slice(&self.strings);
                out.extend_from_slice(&self.types);
            } else {
                out.extend_from_slice(&self.types);
                out.extend_from_slice(&self.strings);
            }
            out
        }
    }

    /// `int`, `struct sock_common { int a; int skc_net; }` and
    /// `enum cgroup_subsys_id { memory_cgrp_id = 4 }`.
    pub(crate) fn sample() -> Blob {
        let mut b = Blob::new();
        b.int("int")
            .structure("sock_common", false, &[("a", 0), ("skc_net", 32)])
            .enumeration("cgroup_subsys_id", false, &[("memory_cgrp_id", 4)]);
        b
    }

    fn offset(bytes: &[u8], member: Member) -> Result<u32, BtfError> {
        resolve_in(Cursor::new(bytes), "test", [member], []).map(|([o], [])| o)
    }

    fn value(bytes: &[u8], enumerator: Enumerator) -> Result<i64, BtfError> {
        resolve_in(Cursor::new(bytes), "test", [], [enumerator]).map(|([], [v])| v)
    }

    #[test]
    fn finds_member_offset() {
        let b = sample().bytes(false);
        assert_eq!(offset(&b, ("sock_common", "skc_net")).unwrap(), 4);
        assert_eq!(offset(&b, ("sock_common", "a")).unwrap(), 0);
    }

    #[test]
    fn finds_enum_value() {
        let b = sample().bytes(false);
        assert_eq!(
            value(&b, ("cgroup_subsys_id", "memory_cgrp_id")).unwrap(),
            4
        );
        assert!(value(&b, ("cgroup_subsys_id", "cpu_cgrp_id")).is_err());
        assert!(value(&b, ("sock_common", "a")).is_err());
    }

    #[test]
    fn missing_member_and_garbage() {
        let b = sample().bytes(false);
        let err = offset(&b, ("sock_common", "nope")).unwrap_err();
        assert!(matches!(&err, BtfError::NotFound(..)), "{err}");
        assert_eq!(
            err.to_string(),
            "struct sock_common has no member nope in the kernel's BTF"
        );
        assert!(offset(&[], ("x", "y")).is_err());
        let garbage = [0x9f, 0xeb, 1, 0, 0xff, 0xff, 0xff, 0xff];
        assert!(offset(&garbage, ("x", "y")).is_err());
        assert!(offset(&b[..40], ("sock_common", "skc_net")).is_err());
    }

    /// `struct sk_buff` as since 5.15, in miniature: `sk` in an anonymous
    /// union, `network_header` in an anonymous struct in an anonymous union
    /// (a struct_group). Type ids: int 1, the inner struct 2, sk_buff 3,
    /// the unions 4 and 5: the walk meets the inner struct before it knows
    /// it belongs to sk_buff, and finds it in a second pass.
    fn nested() -> Blob {
        let mut b = Blob::new();
        b.int("int")
            .record(
                KIND_STRUCT,
                "",
                &[("transport_header", 1, 0), ("network_header", 1, 16)],
            )
            .record(
                KIND_STRUCT,
                "sk_buff",
                &[("next", 1, 0), ("", 4, 64), ("", 5, 192), ("head", 1, 256)],
            )
            .record(KIND_UNION, "", &[("sk", 1, 0), ("ip_defrag_offset", 1, 0)])
            .record(KIND_UNION, "", &[("", 2, 0), ("headers", 1, 0)]);
        b
    }

    #[test]
    fn members_of_anonymous_members_are_found() {
        let b = nested().bytes(false);
        assert_eq!(offset(&b, ("sk_buff", "sk")).unwrap(), 8);
        assert_eq!(offset(&b, ("sk_buff", "network_header")).unwrap(), 26);
        assert_eq!(offset(&b, ("sk_buff", "transport_header")).unwrap(), 24);
        assert_eq!(offset(&b, ("sk_buff", "head")).unwrap(), 32);
        assert!(offset(&b, ("sk_buff", "nope")).is_err());
    }

    #[test]
    fn whole_enums_are_listed_with_their_names() {
        let mut b = nested();
        b.enumeration(
            "skb_drop_reason",
            false,
            &[("SKB_NOT_DROPPED_YET", 0), ("SKB_DROP_REASON_NO_SOCKET", 3)],
        )
        // A name that is a suffix of another's, as string sections share.
        .enumeration("other", false, &[("REASON_NO_SOCKET", 9)]);
        for strings_first in [false, true] {
            let (offsets, enums) = enums_in(
                Cursor::new(b.bytes(strings_first)),
                "test",
                &[("sk_buff", "network_header")],
                &["other", "skb_drop_reason", "missing"],
            )
            .unwrap();
            assert_eq!(offsets, [Some(26)]);
            let list = |v: &[(&str, i64)]| {
                Some(
                    v.iter()
                        .map(|&(n, v)| (n.to_owned(), v))
                        .collect::<Vec<_>>(),
                )
            };
            assert_eq!(
                enums,
                [
                    list(&[("REASON_NO_SOCKET", 9)]),
                    list(&[("SKB_NOT_DROPPED_YET", 0), ("SKB_DROP_REASON_NO_SOCKET", 3)]),
                    None
                ]
            );
        }
    }

    /// The drop reasons as BTF lists them are the kernel's own table, the
    /// one its tracepoint prints (`__print_symbolic` in the format file).
    #[test]
    fn drop_reasons_agree_with_the_tracepoint() {
        let format = std::fs::read_to_string("/sys/kernel/tracing/events/skb/kfree_skb/format")
            .expect("the kfree_skb tracepoint's format (tracefs mounted, kernel 5.17+)");
        let file = File::open(VMLINUX).expect("a kernel built with BTF");
        let (_, enums) = enums_in(file, VMLINUX, &[], &["skb_drop_reason"]).unwrap();
        let values = enums[0].as_ref().expect("enum skb_drop_reason");
        let mut printed = 0;
        for (name, value) in values {
            let Some(short) = name.strip_prefix("SKB_DROP_REASON_") else {
                continue;
            };
            if format.contains(&format!("{{ {value}, \"{short}\" }}")) {
                printed += 1;
            }
        }
        // Every reason the tracepoint prints (MAX included) is in the enum
        // under the same value.
        assert_eq!(printed, format.matches("{ ").count(), "{values:?}");
    }

    #[test]
    fn one_batch_answers_members_and_enumerators() {
        let mut b = sample();
        b.structure("task_struct", false, &[("usage", 0), ("flags", 352)])
            .enumeration("zone_type", false, &[("ZONE_DMA", 0), ("ZONE_NORMAL", 2)])
            .structure("cgroup", false, &[("level", 1728), ("kn", 2048)]);
        let (offsets, values) = resolve_in(
            Cursor::new(b.bytes(false)),
            "test",
            [
                ("task_struct", "flags"),
                ("sock_common", "skc_net"),
                ("cgroup", "kn"),
                ("cgroup", "level"),
                ("task_struct", "flags"),
            ],
            [
                ("zone_type", "ZONE_NORMAL"),
                ("cgroup_subsys_id", "memory_cgrp_id"),
            ],
        )
        .unwrap();
        assert_eq!(offsets, [44, 4, 256, 216, 44]);
        assert_eq!(values, [2, 4]);
    }

    #[test]
    fn strings_may_come_before_types() {
        let b = sample().bytes(true);
        let (offsets, values) = resolve_in(
            Cursor::new(b),
            "test",
            [("sock_common", "skc_net")],
            [("cgroup_subsys_id", "memory_cgrp_id")],
        )
        .unwrap();
        assert_eq!((offsets, values), ([4], [4]));
    }

    /// Hands over at most `step` bytes per read, as sysfs hands over a page.
    struct Trickle {
        inner: Cursor<Vec<u8>>,
        step: usize,
    }

    impl Read for Trickle {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = buf.len().min(self.step);
            self.inner.read(&mut buf[..n])
        }
    }

    impl Seek for Trickle {
        fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
            self.inner.seek(to)
        }
    }

    #[test]
    fn names_may_straddle_reads() {
        let mut b = sample();
        b.structure(
            "a_longer_struct_name",
            false,
            &[("a_longer_member_name", 96)],
        );
        for strings_first in [false, true] {
            for step in 1..8 {
                let inner = Cursor::new(b.bytes(strings_first));
                let (offsets, values) = resolve_in(
                    Trickle { inner, step },
                    "test",
                    [
                        ("sock_common", "skc_net"),
                        ("a_longer_struct_name", "a_longer_member_name"),
                    ],
                    [("cgroup_subsys_id", "memory_cgrp_id")],
                )
                .unwrap();
                assert_eq!((offsets, values), ([4, 12], [4]), "{step}");
            }
        }
    }

    #[test]
    fn bitfield_offsets_are_the_low_24_bits_with_kind_flag() {
        let mut b = Blob::new();
        // Offset words: bitfield size in the top 8 bits, bit offset below.
        b.int("int")
            .structure(
                "bits",
                true,
                &[("a", 3 << 24), ("b", (5 << 24) | 37), ("c", 64)],
            )
            .structure("plain", false, &[("c", (1 << 24) | 64)]);
        let (offsets, []) = resolve_in(
            Cursor::new(b.bytes(false)),
            "test",
            [("bits", "a"), ("bits", "b"), ("bits", "c"), ("plain", "c")],
            [],
        )
        .unwrap();
        // Without kind_flag the whole word is the bit offset.
        assert_eq!(offsets, [0, 4, 8, ((1 << 24) + 64) / 8]);
    }

    #[test]
    fn enumerators_are_signed_as_their_enum_says() {
        let mut b = Blob::new();
        b.enumeration("s", true, &[("minus_one", u32::MAX)])
            .enumeration("u", false, &[("max", u32::MAX)]);
        let (_, values) = resolve_in(
            Cursor::new(b.bytes(false)),
            "test",
            [],
            [("s", "minus_one"), ("u", "max")],
        )
        .unwrap();
        assert_eq!(values, [-1, i64::from(u32::MAX)]);
    }

    #[test]
    fn every_truncation_is_an_error() {
        // With the types first, the string section is the file's tail and
        // is always read whole.
        let b = sample().bytes(false);
        for len in 0..b.len() {
            let err = offset(&b[..len], ("sock_common", "skc_net")).unwrap_err();
            assert!(matches!(err, BtfError::Malformed(_)), "{len}: {err}");
        }
        // With the strings first, the walk stops at the last answer: here in
        // the last type.
        let b = sample().bytes(true);
        for len in 0..b.len() {
            let err = value(&b[..len], ("cgroup_subsys_id", "memory_cgrp_id")).unwrap_err();
            assert!(matches!(err, BtfError::Malformed(_)), "{len}: {err}");
        }
    }

    #[test]
    fn names_used_elsewhere_are_not_confused() {
        let mut b = Blob::new();
        b.int("int")
            // A member of another struct, a struct, a member and an
            // enumerator named after what is asked for.
            .structure("sock", false, &[("skc_net", 0), ("sock_common", 64)])
            .structure("skc_net", false, &[("sock_common", 8)])
            .enumeration("sock_common", false, &[("skc_net", 7)])
            .structure("sock_common", false, &[("a", 0), ("skc_net", 384)]);
        let bytes = b.bytes(false);
        assert_eq!(offset(&bytes, ("sock_common", "skc_net")).unwrap(), 48);
        assert_eq!(offset(&bytes, ("sock", "sock_common")).unwrap(), 8);
        assert_eq!(offset(&bytes, ("skc_net", "sock_common")).unwrap(), 1);
        assert_eq!(value(&bytes, ("sock_common", "skc_net")).unwrap(), 7);
        assert!(value(&bytes, ("sock", "skc_net")).is_err());
        assert!(offset(&bytes, ("sock_common", "sock")).is_err());
    }

    #[test]
    fn names_of_one_length_and_start_are_told_apart() {
        let mut b = Blob::new();
        b.int("int").structure(
            "sock",
            false,
            &[
                ("sk_state_one", 0),
                ("sk_state_two", 32),
                ("sk", 64),
                ("sl", 96),
            ],
        );
        let bytes = b.bytes(false);
        assert_eq!(offset(&bytes, ("sock", "sk_state_two")).unwrap(), 4);
        assert_eq!(offset(&bytes, ("sock", "sk_state_one")).unwrap(), 0);
        assert_eq!(offset(&bytes, ("sock", "sl")).unwrap(), 12);
        assert!(offset(&bytes, ("sock", "sk_state_thr")).is_err());
    }

    #[test]
    fn offsets_that_share_a_filter_bit_are_told_apart() {
        let names = NameOffsets::new(vec![(5, 0), (5 + FILTER_BITS as u32, 1)]);
        assert_eq!(names.at(5), Some(0));
        assert_eq!(names.at(5 + FILTER_BITS as u32), Some(1));
        assert_eq!(names.at(5 + 2 * FILTER_BITS as u32), None);
        assert_eq!(names.at(6), None);
        assert_eq!(names.at(0), None);
    }

    #[test]
    fn the_first_struct_with_the_member_answers() {
        // Two structs of one name, the second named and with members named
        // by copies of the strings, as BTF that is not deduplicated has.
        let mut b = Blob::new();
        b.int("int").structure("dup", false, &[("a", 0)]);
        let (dup, a, b_name) = (b.copy("dup"), b.copy("a"), b.copy("b"));
        b.ty(dup, KIND_STRUCT, false, 2)
            .words(&[a, 1, 32, b_name, 1, 64]);
        let (offsets, []) = resolve_in(
            Cursor::new(b.bytes(false)),
            "test",
            [("dup", "a"), ("dup", "b")],
            [],
        )
        .unwrap();
        assert_eq!(offsets, [0, 8]);
    }

    #[test]
    fn every_kind_is_skipped_by_its_size() {
        // (kind, bytes after the header with vlen 2), from btf.h.
        let kinds = [
            (KIND_INT, 4),
            (KIND_PTR, 0),
            (KIND_ARRAY, 12),
            (KIND_STRUCT, 24),
            (KIND_UNION, 24),
            (KIND_ENUM, 16),
            (KIND_FWD, 0),
            (KIND_TYPEDEF, 0),
            (KIND_VOLATILE, 0),
            (KIND_CONST, 0),
            (KIND_RESTRICT, 0),
            (KIND_FUNC, 0),
            (KIND_FUNC_PROTO, 16),
            (KIND_VAR, 4),
            (KIND_DATASEC, 24),
            (KIND_FLOAT, 0),
            (KIND_DECL_TAG, 4),
            (KIND_TYPE_TAG, 0),
            (KIND_ENUM64, 24),
        ];
        let mut b = sample();
        for (kind, extra) in kinds {
            // Bytes that read as garbage types if not skipped.
            b.ty(0, kind, false, 2).types.extend(vec![0xff; extra]);
        }
        b.structure("last", false, &[("x", 8)]);
        assert_eq!(offset(&b.bytes(false), ("last", "x")).unwrap(), 1);
    }

    #[test]
    fn unknown_kinds_are_malformed() {
        for kind in [0, 20, 31] {
            let mut b = sample();
            b.ty(0, kind, false, 0)
                .structure("last", false, &[("x", 8)]);
            let err = offset(&b.bytes(false), ("last", "x")).unwrap_err();
            assert!(matches!(err, BtfError::Malformed(_)), "{kind}: {err}");
        }
    }

    #[test]
    fn header_and_section_bounds_are_checked() {
        let good = sample().bytes(false);
        let with_word = |at: usize, word: u32| {
            let mut b = good.clone();
            b[at..at + 4].copy_from_slice(&word.to_le_bytes());
            b
        };
        let version_2 = with_word(0, u32::from(MAGIC) | (2 << 16));
        let short_header = with_word(4, 8);
        let long_header = with_word(4, 1 << 20);
        // A type section that ends inside the struct's members, or inside
        // the first type's header.
        let short_types = with_word(12, 30);
        let ragged_types = with_word(12, 20);
        for bytes in [
            version_2,
            short_header,
            long_header,
            short_types,
            ragged_types,
        ] {
            let err = offset(&bytes, ("sock_common", "skc_net")).unwrap_err();
            assert!(matches!(err, BtfError::Malformed(_)), "{err}");
        }
    }

    #[test]
    fn copies_of_a_name_are_capped() {
        let mut b = sample();
        for _ in 0..MAX_NAME_COPIES {
            b.copy("skc_net");
        }
        let err = offset(&b.bytes(false), ("sock_common", "skc_net")).unwrap_err();
        assert!(matches!(err, BtfError::Malformed(_)), "{err}");
    }

    #[test]
    fn read_errors_name_the_file() {
        struct Failing;
        impl Read for Failing {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::other("device on fire"))
            }
        }
        impl Seek for Failing {
            fn seek(&mut self, _: SeekFrom) -> io::Result<u64> {
                Ok(0)
            }
        }
        let err = resolve_in(Failing, "some/btf", [("a", "b")], []).unwrap_err();
        assert_eq!(err.to_string(), "cannot read some/btf: device on fire");
    }

    /// Typedef ids come from the walk's count of types, and the BTF built
    /// from them puts each where aya's lookup by name finds that id.
    #[test]
    fn typedef_ids_round_trip_through_aya() {
        let wanted = vec![("btf_trace_b".to_owned(), 7), ("btf_trace_a".to_owned(), 3)];
        let bytes = typedefs_at_ids(&wanted);
        let names: Vec<String> = ["btf_trace_a", "btf_trace_b", "btf_trace_c"]
            .map(str::to_owned)
            .to_vec();
        let found = find_in(Cursor::new(&bytes), "typedefs", &[], &[], &[], &names).unwrap();
        assert_eq!(found.typedef_ids, [Some(3), Some(7), None]);
        let btf = aya::Btf::parse(&bytes, aya::Endianness::default()).unwrap();
        for (name, id) in wanted {
            let kind = aya_obj::btf::BtfKind::Typedef;
            assert_eq!(btf.id_by_type_name_kind(&name, kind).unwrap(), id);
        }
    }

    /// The softirq tracepoints' typedefs are in the running kernel's BTF,
    /// at the ids aya's parse of the whole file gives them.
    #[test]
    fn finds_the_running_kernels_tracepoint_typedefs() {
        let names = vec!["btf_trace_softirq_entry".to_owned()];
        let answers = Answers::of_kernel(&[], &[], &[], &names);
        let id = answers.typedef_id(&names[0]).unwrap();
        let data = std::fs::read(VMLINUX).unwrap();
        let btf = aya::Btf::parse(&data, aya::Endianness::default()).unwrap();
        let kind = aya_obj::btf::BtfKind::Typedef;
        assert_eq!(btf.id_by_type_name_kind(&names[0], kind).unwrap(), id);
    }

    /// The running kernel's BTF gives what a whole-file reader that compares
    /// names as strings finds. The kernels kdiag supports have BTF, so a
    /// kernel without it fails this test rather than skipping it.
    #[test]
    fn agrees_with_the_running_kernel() {
        let data = std::fs::read(VMLINUX)
            .unwrap_or_else(|e| panic!("{VMLINUX}: {e}; this test needs a kernel built with BTF"));
        let members = [
            ("sock_common", "skc_net"),
            ("task_struct", "flags"),
            ("task_struct", "cgroups"),
            ("css_set", "subsys"),
            ("cgroup_subsys_state", "cgroup"),
            ("cgroup", "kn"),
            ("cgroup", "level"),
            ("cgroup", "ancestors"),
            ("kernfs_node", "id"),
        ];
        let enumerators = [("cgroup_subsys_id", "memory_cgrp_id")];
        let (offsets, values) = resolve(members, enumerators).unwrap();
        for (member, offset) in members.into_iter().zip(offsets) {
            let expected = whole_file_lookup(&data, KIND_STRUCT, member);
            assert_eq!(Some(i64::from(offset)), expected, "{member:?}");
        }
        for (enumerator, value) in enumerators.into_iter().zip(values) {
            let expected = whole_file_lookup(&data, KIND_ENUM, enumerator);
            assert_eq!(Some(value), expected, "{enumerator:?}");
        }
    }

    /// A member's byte offset or an enumerator's value, found the slow way:
    /// the whole file in memory, names read as strings, its own kind table.
    fn whole_file_lookup(data: &[u8], want: u32, (owner, name): (&str, &str)) -> Option<i64> {
        let word = |at: usize| u32::from_le_bytes(data[at..at + 4].try_into().unwrap());
        let hdr_len = word(4) as usize;
        let (types, types_len) = (hdr_len + word(8) as usize, word(12) as usize);
        let strings = hdr_len + word(16) as usize;
        let string = |off: u32| {
            let s = &data[strings + off as usize..];
            &s[..s.iter().position(|&b| b == 0).unwrap()]
        };
        let mut at = types;
        while at < types + types_len {
            let (type_name, info) = (word(at), word(at + 4));
            let (kind, vlen, kind_flag) = (info >> 24 & 0x1f, (info & 0xffff) as usize, info >> 31);
            at += 12;
            let (entry, extra) = match kind {
                1 | 14 | 17 => (4, 4),
                3 => (12, 12),
                4 | 5 | 15 | 19 => (12, 12 * vlen),
                6 | 13 => (8, 8 * vlen),
                _ => (0, 0),
            };
            if kind == want && string(type_name) == owner.as_bytes() {
                for e in (at..at + extra).step_by(entry) {
                    if string(word(e)) != name.as_bytes() {
                        continue;
                    }
                    return Some(match (kind, kind_flag) {
                        (KIND_STRUCT, 1) => i64::from(word(e + 8) & 0xff_ffff) / 8,
                        (KIND_STRUCT, _) => i64::from(word(e + 8)) / 8,
                        (_, 1) => i64::from(word(e + 4) as i32),
                        _ => i64::from(word(e + 4)),
                    });
                }
            }
            at += extra;
        }
        None
    }
}
