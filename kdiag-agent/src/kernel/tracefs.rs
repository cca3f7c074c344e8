//! Tracepoint format files -> field offsets.
//!
//! Tracepoint layouts change between kernel versions (tcp_retransmit_skb
//! gained `state` in 4.16 and `err` in 6.x), so the programs never hard-code
//! an offset: the agent reads `events/<group>/<name>/format` at start-up and
//! hands the offsets to the programs.

use std::{
    collections::HashMap,
    fs, io,
    path::{Path, PathBuf},
};

use crate::sys::{self, SyscallError};

#[derive(Debug, thiserror::Error)]
pub(crate) enum TracefsError {
    #[error("tracefs is not mounted, and mounting it at {path} failed")]
    Mount {
        path: &'static str,
        #[source]
        source: SyscallError,
    },
    #[error("tracepoint {0} does not exist on this kernel")]
    Missing(String),
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: {reason}")]
    Parse { path: PathBuf, reason: String },
}

/// Where tracefs is mounted. aya looks in the same two places.
const MOUNTS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

#[derive(Debug, Clone)]
pub(crate) struct Tracefs {
    root: PathBuf,
}

impl Tracefs {
    /// Finds tracefs, mounting it at /sys/kernel/tracing (as systemd does at
    /// boot) when no one has. The mount is left in place: other tools expect
    /// it there, and it holds no state of ours.
    pub(crate) fn open() -> Result<Self, TracefsError> {
        if let Some(root) = MOUNTS.iter().map(Path::new).find(|p| is_mounted(p)) {
            return Ok(Self {
                root: root.to_path_buf(),
            });
        }
        let target = MOUNTS[0];
        sys::fs::mount_tracefs(Path::new(target)).map_err(|source| TracefsError::Mount {
            path: target,
            source,
        })?;
        Ok(Self {
            root: PathBuf::from(target),
        })
    }

    /// Formats under `root` (laid out like tracefs) instead of the kernel's.
    pub(crate) fn at(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
        }
    }

    /// The format of `group/name`.
    pub(crate) fn format(&self, group: &str, name: &str) -> Result<Format, TracefsError> {
        let dir = self.root.join("events").join(group).join(name);
        let path = dir.join("format");
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(TracefsError::Missing(format!("{group}/{name}")));
            }
            Err(source) => return Err(TracefsError::Read { path, source }),
        };
        parse_format(&text).map_err(|reason| TracefsError::Parse { path, reason })
    }
}

/// A mounted tracefs has an `events` directory; the bare mount point does not.
fn is_mounted(path: &Path) -> bool {
    path.join("events").is_dir()
}

/// One field of a tracepoint record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Field {
    pub name: String,
    pub offset: u16,
    pub size: u16,
}

/// The fields of a tracepoint record, from its format file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Format {
    pub fields: Vec<Field>,
    /// The `print fmt:` line, without the prefix.
    pub print_fmt: String,
}

impl Format {
    pub(crate) fn field(&self, name: &str) -> Option<&Field> {
        self.fields.iter().find(|f| f.name == name)
    }

    /// The value names the kernel prints for `field`, from its
    /// `__print_symbolic(REC->field, {1, "name"}, ...)` in the print format.
    pub(crate) fn symbols(&self, field: &str) -> Vec<(i64, String)> {
        let marker = format!("__print_symbolic(REC->{field},");
        let Some(start) = self.print_fmt.find(&marker) else {
            return Vec::new();
        };
        let rest = &self.print_fmt[start + marker.len()..];
        let list = rest.split(')').next().unwrap_or_default();
        list.split('{')
            .filter_map(|entry| {
                let (value, name) = entry.split_once(',')?;
                let name = name.split('"').nth(1)?;
                Some((value.trim().parse().ok()?, name.to_owned()))
            })
            .collect()
    }
}

/// The formats of the attached tracepoints, by program name.
#[derive(Debug, Default)]
pub(crate) struct Formats(HashMap<&'static str, Format>);

impl Formats {
    pub(crate) fn insert(&mut self, program: &'static str, format: Format) {
        self.0.insert(program, format);
    }

    pub(crate) fn get(&self, program: &str) -> Option<&Format> {
        self.0.get(program)
    }

    pub(crate) fn contains(&self, program: &str) -> bool {
        self.0.contains_key(program)
    }
}

/// Parses a format file. Lines look like
/// `\tfield:__u8 saddr[4];\toffset:34;\tsize:4;\tsigned:0;`.
pub(crate) fn parse_format(text: &str) -> Result<Format, String> {
    let mut fields = Vec::new();
    let mut print_fmt = String::new();
    for line in text.lines() {
        let line = line.trim();
        if let Some(fmt) = line.strip_prefix("print fmt:") {
            fmt.trim().clone_into(&mut print_fmt);
            continue;
        }
        let Some(rest) = line.strip_prefix("field:") else {
            continue;
        };
        let mut decl = None;
        let mut offset = None;
        let mut size = None;
        for part in rest.split(';').map(str::trim) {
            if let Some(v) = part.strip_prefix("offset:") {
                offset = v.parse::<u16>().ok();
            } else if let Some(v) = part.strip_prefix("size:") {
                size = v.parse::<u16>().ok();
            } else if decl.is_none() && !part.is_empty() {
                decl = Some(part);
            }
        }
        let (Some(decl), Some(offset), Some(size)) = (decl, offset, size) else {
            return Err(format!("malformed field line {line:?}"));
        };
        let name = field_name(decl).ok_or_else(|| format!("no field name in {decl:?}"))?;
        fields.push(Field {
            name: name.to_owned(),
            offset,
            size,
        });
    }
    if fields.is_empty() {
        return Err("no fields".to_owned());
    }
    Ok(Format { fields, print_fmt })
}

/// `const void * skaddr` -> `skaddr`; `__u8 saddr[4]` -> `saddr`.
fn field_name(decl: &str) -> Option<&str> {
    let last = decl.rsplit([' ', '*']).find(|s| !s.is_empty())?;
    let name = last.split('[').next()?;
    (!name.is_empty()).then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    const RETRANSMIT_SKB: &str = "name: tcp_retransmit_skb
ID: 2281
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:const void * skbaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:const void * skaddr;\toffset:16;\tsize:8;\tsigned:0;
\tfield:int state;\toffset:24;\tsize:4;\tsigned:1;
\tfield:__u16 sport;\toffset:28;\tsize:2;\tsigned:0;
\tfield:__u8 saddr_v6[16];\toffset:42;\tsize:16;\tsigned:0;

print fmt: \"skbaddr=%p\", REC->skbaddr
";

    #[test]
    fn parses_offsets_and_names() {
        let f = parse_format(RETRANSMIT_SKB).unwrap();
        assert_eq!(f.fields.len(), 7);
        let field = |n| f.field(n).map(|f| (f.offset, f.size));
        assert_eq!(field("skaddr"), Some((16, 8)));
        assert_eq!(field("state"), Some((24, 4)));
        assert_eq!(field("sport"), Some((28, 2)));
        assert_eq!(field("saddr_v6"), Some((42, 16)));
        assert_eq!(field("err"), None);
    }

    #[test]
    fn symbolic_values_from_print_fmt() {
        let text = "format:
\tfield:int status;\toffset:44;\tsize:4;\tsigned:1;

print fmt: \"mode=%s status=%s\", REC->sync ? \"sync\" : \"async\", __print_symbolic(REC->status, {1, \"skipped\"}, {8, \"success\"}, {0, \"not_suitable_zone\"})
";
        let f = parse_format(text).unwrap();
        assert_eq!(
            f.symbols("status"),
            vec![
                (1, "skipped".to_owned()),
                (8, "success".to_owned()),
                (0, "not_suitable_zone".to_owned())
            ]
        );
        assert!(f.symbols("sync").is_empty());
        assert!(
            parse_format(RETRANSMIT_SKB)
                .unwrap()
                .symbols("state")
                .is_empty()
        );
    }

    #[test]
    fn rejects_garbage() {
        assert!(parse_format("").is_err());
        assert!(parse_format("field:int x;\toffset:zz;\tsize:4;").is_err());
        assert!(parse_format("\u{0}\u{1}field:;;;").is_err());
    }
}
