//! Just enough of a BTF reader to find member offsets and enum values in
//! the running kernel's types (/sys/kernel/btf/vmlinux), without parsing the
//! whole type graph: a single pass over the type section per lookup.
//!
//! Format: include/uapi/linux/btf.h and Documentation/bpf/btf.rst.

use std::{fs, io, path::Path};

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: io::Error },
    #[error("malformed BTF: {0}")]
    Malformed(&'static str),
    #[error("struct {0} has no member {1} in the kernel's BTF")]
    NotFound(String, String),
}

const VMLINUX: &str = "/sys/kernel/btf/vmlinux";
const MAGIC: u16 = 0xeb9f;

// Kinds (BTF_KIND_*) and the bytes that follow each type's 12-byte header.
const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_ENUM64: u32 = 19;

/// The running kernel's BTF.
pub fn vmlinux() -> Result<Vec<u8>, BtfError> {
    fs::read(Path::new(VMLINUX)).map_err(|source| BtfError::Read {
        path: VMLINUX.to_owned(),
        source,
    })
}

/// Byte offset of `skc_net` in `struct sock`. `struct sock` begins with its
/// `struct sock_common __sk_common`, so the offset within sock_common is the
/// offset within sock.
pub fn sk_net_offset() -> Result<u32, BtfError> {
    member_offset(&vmlinux()?, "sock_common", "skc_net")
}

/// Byte offset of `member` in the struct named `name`.
pub fn member_offset(data: &[u8], name: &str, member: &str) -> Result<u32, BtfError> {
    let found = find_type(data, KIND_STRUCT, name, |strings, entries, kind_flag| {
        entries.chunks_exact(12).find_map(|m| {
            let word = |i: usize| u32::from_le_bytes([m[i], m[i + 1], m[i + 2], m[i + 3]]);
            (string(strings, word(0)) == member.as_bytes()).then(|| {
                // With kind_flag set the top 8 bits hold a bitfield size.
                let raw = word(8);
                let bits = if kind_flag { raw & 0xff_ffff } else { raw };
                bits / 8
            })
        })
    })?;
    found.ok_or_else(|| BtfError::NotFound(name.to_owned(), member.to_owned()))
}

/// The value of `variant` in the enum named `name`.
pub fn enum_value(data: &[u8], name: &str, variant: &str) -> Result<i64, BtfError> {
    let found = find_type(data, KIND_ENUM, name, |strings, entries, _| {
        entries.chunks_exact(8).find_map(|e| {
            let word = |i: usize| u32::from_le_bytes([e[i], e[i + 1], e[i + 2], e[i + 3]]);
            (string(strings, word(0)) == variant.as_bytes()).then(|| i64::from(word(4) as i32))
        })
    })?;
    found.ok_or_else(|| BtfError::NotFound(name.to_owned(), variant.to_owned()))
}

/// The NUL-terminated string at `off` of the string section.
fn string(strings: &[u8], off: u32) -> &[u8] {
    let s = strings.get(off as usize..).unwrap_or_default();
    &s[..s.iter().position(|&b| b == 0).unwrap_or(s.len())]
}

/// Scans the type section for types of `kind` named `name` and returns the
/// first `Some` that `look` gives for one of them. `look` gets the string
/// lookup, the bytes that follow the type's header (members, enumerators)
/// and its kind_flag.
fn find_type<R>(
    data: &[u8],
    want_kind: u32,
    name: &str,
    look: impl Fn(&[u8], &[u8], bool) -> Option<R>,
) -> Result<Option<R>, BtfError> {
    let u16_at = |off: usize| -> Result<u16, BtfError> {
        data.get(off..off + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .ok_or(BtfError::Malformed("truncated"))
    };
    let u32_at = |off: usize| -> Result<u32, BtfError> {
        data.get(off..off + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or(BtfError::Malformed("truncated"))
    };
    if u16_at(0)? != MAGIC {
        return Err(BtfError::Malformed("bad magic (or not little-endian)"));
    }
    let hdr_len = u32_at(4)? as usize;
    let type_off = hdr_len + u32_at(8)? as usize;
    let type_len = u32_at(12)? as usize;
    let str_off = hdr_len + u32_at(16)? as usize;
    let str_len = u32_at(20)? as usize;
    let strings = data
        .get(str_off..str_off + str_len)
        .ok_or(BtfError::Malformed("string section out of bounds"))?;
    let end = type_off + type_len;
    if end > data.len() {
        return Err(BtfError::Malformed("type section out of bounds"));
    }
    let mut pos = type_off;
    while pos + 12 <= end {
        let name_off = u32_at(pos)?;
        let info = u32_at(pos + 4)?;
        let vlen = (info & 0xffff) as usize;
        let kind = (info >> 24) & 0x1f;
        let kind_flag = info >> 31 == 1;
        pos += 12;
        let extra = match kind {
            KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
            KIND_ARRAY => 12,
            KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * vlen,
            KIND_ENUM | KIND_FUNC_PROTO => 8 * vlen,
            _ => 0,
        };
        if kind == want_kind && string(strings, name_off) == name.as_bytes() {
            let entries = data
                .get(pos..pos + extra)
                .ok_or(BtfError::Malformed("truncated"))?;
            if let Some(found) = look(strings, entries, kind_flag) {
                return Ok(Some(found));
            }
        }
        pos += extra;
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF blob with `int`, `struct sock_common { int a; int skc_net; }`
    /// and `enum cgroup_subsys_id { memory_cgrp_id = 4 }`.
    fn blob() -> Vec<u8> {
        let strings = b"\0int\0sock_common\0a\0skc_net\0cgroup_subsys_id\0memory_cgrp_id\0";
        let mut types = Vec::new();
        let mut push = |v: u32| types.extend_from_slice(&v.to_le_bytes());
        // [1] int: name "int", kind INT, size 4, then its 4-byte encoding.
        push(1);
        push(KIND_INT << 24);
        push(4);
        push(32);
        // [2] struct sock_common, 2 members, size 8.
        push(5);
        push((KIND_STRUCT << 24) | 2);
        push(8);
        push(17); // "a"
        push(1);
        push(0);
        push(19); // "skc_net"
        push(1);
        push(32); // bit offset
        // [3] enum cgroup_subsys_id, 1 enumerator, size 4.
        push(27);
        push((KIND_ENUM << 24) | 1);
        push(4);
        push(44); // "memory_cgrp_id"
        push(4);
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.extend_from_slice(&[1, 0]);
        for v in [
            24u32,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&types);
        out.extend_from_slice(strings);
        out
    }

    #[test]
    fn finds_member_offset() {
        assert_eq!(member_offset(&blob(), "sock_common", "skc_net").unwrap(), 4);
        assert_eq!(member_offset(&blob(), "sock_common", "a").unwrap(), 0);
    }

    #[test]
    fn finds_enum_value() {
        assert_eq!(
            enum_value(&blob(), "cgroup_subsys_id", "memory_cgrp_id").unwrap(),
            4
        );
        assert!(enum_value(&blob(), "cgroup_subsys_id", "cpu_cgrp_id").is_err());
        assert!(enum_value(&blob(), "sock_common", "a").is_err());
    }

    #[test]
    fn missing_member_and_garbage() {
        assert!(matches!(
            member_offset(&blob(), "sock_common", "nope"),
            Err(BtfError::NotFound(..))
        ));
        assert!(member_offset(&[], "x", "y").is_err());
        assert!(member_offset(&[0x9f, 0xeb, 1, 0, 0xff, 0xff, 0xff, 0xff], "x", "y").is_err());
        let mut b = blob();
        b.truncate(40);
        assert!(member_offset(&b, "sock_common", "skc_net").is_err());
    }
}
