//! Which kernel modules the guest needs, in load order, read straight from
//! the `.ko` files of a Debian kernel package.
//!
//! Debian's packages do not ship `modules.dep` (their postinst runs depmod),
//! and running depmod over a whole 6.12 tree of `.ko.xz` files takes close to
//! a minute. Each module names its own dependencies in the `depends=` entry of
//! its `.modinfo` section (written by modpost), so following those from the
//! few modules the guest needs reads only a dozen files.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail, ensure};

/// A module to put into the initramfs: its name (underscores, as the kernel
/// spells it) and its uncompressed object.
pub(super) struct Module {
    pub name: String,
    pub object: Vec<u8>,
}

/// Soft dependencies (`softdep=pre:` in `.modinfo`) the guest needs, as
/// (module, the module to load before it). `.modinfo` names them by alias
/// (`crc32c`), which only the `modules.alias` that depmod writes resolves,
/// and Debian's packages do not ship it. libcrc32c (up to 6.13, where
/// nf_tables used it) computes nothing without a crc32c provider:
/// nft then fails with "Protocol not supported".
pub(super) const SOFT_DEPS: &[(&str, &str)] = &[("libcrc32c", "crc32c_generic")];

/// `wanted` and everything they depend on, dependencies first, so that
/// loading them in this order with plain `insmod` always succeeds. Modules
/// this kernel has built in (listed in `modules.builtin`) are left out.
pub(super) fn resolve(modules_dir: &Path, wanted: &[&str]) -> Result<Vec<Module>> {
    let files = index(modules_dir)?;
    let mut order = Vec::new();
    let mut seen = builtin(modules_dir)?;
    for name in wanted {
        visit(
            &files,
            &canonical(name),
            &mut seen,
            &mut order,
            &mut Vec::new(),
        )?;
    }
    Ok(order)
}

/// Depth-first: a module is pushed after all of its dependencies.
fn visit(
    files: &BTreeMap<String, PathBuf>,
    name: &str,
    seen: &mut BTreeSet<String>,
    order: &mut Vec<Module>,
    stack: &mut Vec<String>,
) -> Result<()> {
    if seen.contains(name) {
        return Ok(());
    }
    ensure!(
        !stack.iter().any(|n| n == name),
        "module dependency cycle: {} -> {name}",
        stack.join(" -> ")
    );
    let path = files.get(name).with_context(|| {
        format!("module {name} is not in the kernel package (built in, or not configured?)")
    })?;
    let object = read_object(path)?;
    let depends = modinfo(&object, "depends")
        .with_context(|| format!("reading .modinfo of {}", path.display()))?
        .unwrap_or_default();
    let soft = SOFT_DEPS
        .iter()
        .filter(|(module, _)| *module == name)
        .map(|(_, dep)| *dep);
    stack.push(name.to_owned());
    for dep in depends.split(',').filter(|d| !d.is_empty()).chain(soft) {
        visit(files, &canonical(dep), seen, order, stack)?;
    }
    stack.pop();
    seen.insert(name.to_owned());
    order.push(Module {
        name: name.to_owned(),
        object,
    });
    Ok(())
}

/// Module names treat `-` and `_` alike (`9pnet_virtio`, `intel-uncore`).
fn canonical(name: &str) -> String {
    name.replace('-', "_")
}

/// Canonical names of the modules built into the kernel, from the
/// `modules.builtin` list (one `kernel/.../name.ko` path a line) that
/// Debian ships beside the modules.
fn builtin(dir: &Path) -> Result<BTreeSet<String>> {
    let path = dir.join("modules.builtin");
    let list = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(list
        .lines()
        .filter_map(|line| line.rsplit('/').next()?.strip_suffix(".ko"))
        .map(canonical)
        .collect())
}

/// Every module file under `dir`, by canonical name.
fn index(dir: &Path) -> Result<BTreeMap<String, PathBuf>> {
    let mut files = BTreeMap::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                pending.push(path);
                continue;
            }
            let file = path.file_name().unwrap_or_default().to_string_lossy();
            if let Some(stem) = ["ko", "ko.xz", "ko.zst", "ko.gz"]
                .iter()
                .find_map(|ext| file.strip_suffix(&format!(".{ext}")))
            {
                files.insert(canonical(stem), path.clone());
            }
        }
    }
    ensure!(
        !files.is_empty(),
        "no kernel modules under {}",
        dir.display()
    );
    Ok(files)
}

/// The module's ELF object. Debian compresses modules from 6.12 on (xz so
/// far; the kernel can also be built for zstd or gzip). Decompressed here,
/// so the guest needs neither the tools nor the kernel's own module
/// decompression (6.1 has none, and busybox insmod reads plain objects only).
fn read_object(path: &Path) -> Result<Vec<u8>> {
    let tool = match path.extension().and_then(|e| e.to_str()) {
        Some("xz") => ("xz", "xz-utils"),
        Some("zst") => ("zstd", "zstd"),
        Some("gz") => ("gzip", "gzip"),
        _ => return fs::read(path).with_context(|| format!("reading {}", path.display())),
    };
    let out = Command::new(tool.0)
        .args(["--decompress", "--stdout"])
        .arg(path)
        .output()
        .with_context(|| format!("running {} (Debian package {})", tool.0, tool.1))?;
    ensure!(
        out.status.success(),
        "{} --decompress {} failed: {}",
        tool.0,
        path.display(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(out.stdout)
}

/// The value of `key` in the `.modinfo` section of an ELF64 little-endian
/// object: NUL-separated `key=value` strings (include/linux/moduleparam.h,
/// `__MODULE_INFO`). `None` when the key is absent.
pub(super) fn modinfo(elf: &[u8], key: &str) -> Result<Option<String>> {
    let section = section(elf, ".modinfo")?.context("no .modinfo section")?;
    let prefix = format!("{key}=");
    Ok(section
        .split(|&b| b == 0)
        .find_map(|entry| entry.strip_prefix(prefix.as_bytes()))
        .map(|value| String::from_utf8_lossy(value).into_owned()))
}

/// The contents of the section named `name` (ELF64 header and section
/// header layout from the System V gABI, elf.h `Elf64_Ehdr`/`Elf64_Shdr`).
fn section<'a>(elf: &'a [u8], name: &str) -> Result<Option<&'a [u8]>> {
    ensure!(elf.starts_with(b"\x7fELF"), "not an ELF object");
    ensure!(
        elf.get(4) == Some(&2) && elf.get(5) == Some(&1),
        "not a 64-bit little-endian ELF object"
    );
    let shoff = usize_at(elf, 0x28, 8)?;
    let shentsize = usize_at(elf, 0x3a, 2)?;
    let shnum = usize_at(elf, 0x3c, 2)?;
    let shstrndx = usize_at(elf, 0x3e, 2)?;
    ensure!(shentsize >= 0x40, "section header entries too small");
    let header = |i: usize| -> Result<(usize, &'a [u8])> {
        let at = shoff + i * shentsize;
        let name = usize_at(elf, at, 4)?;
        let offset = usize_at(elf, at + 0x18, 8)?;
        let size = usize_at(elf, at + 0x20, 8)?;
        let data = elf
            .get(offset..offset.saturating_add(size))
            .context("section data out of bounds")?;
        Ok((name, data))
    };
    let (_, names) = header(shstrndx)?;
    for i in 0..shnum {
        let (name_off, data) = header(i)?;
        let this = names
            .get(name_off..)
            .and_then(|rest| rest.split(|&b| b == 0).next())
            .context("section name out of bounds")?;
        if this == name.as_bytes() {
            return Ok(Some(data));
        }
    }
    Ok(None)
}

fn usize_at(data: &[u8], at: usize, len: usize) -> Result<usize> {
    let Some(bytes) = data.get(at..at + len) else {
        bail!("ELF object truncated at {at:#x}");
    };
    let mut buf = [0u8; 8];
    buf[..len].copy_from_slice(bytes);
    usize::try_from(u64::from_le_bytes(buf)).context("ELF offset does not fit usize")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 LE object with a `.shstrtab` and a `.modinfo` section.
    fn object(modinfo: &[u8]) -> Vec<u8> {
        let shstrtab = b"\0.shstrtab\0.modinfo\0";
        let mut elf = vec![0u8; 0x40];
        elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
        let strtab_off = elf.len();
        elf.extend_from_slice(shstrtab);
        let modinfo_off = elf.len();
        elf.extend_from_slice(modinfo);
        let shoff = elf.len();
        let mut shdr = |name: u32, off: usize, size: usize| {
            let mut h = vec![0u8; 0x40];
            h[..4].copy_from_slice(&name.to_le_bytes());
            h[0x18..0x20].copy_from_slice(&(off as u64).to_le_bytes());
            h[0x20..0x28].copy_from_slice(&(size as u64).to_le_bytes());
            elf.extend_from_slice(&h);
        };
        shdr(0, 0, 0);
        shdr(1, strtab_off, shstrtab.len());
        shdr(11, modinfo_off, modinfo.len());
        elf[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        elf[0x3a..0x3c].copy_from_slice(&0x40u16.to_le_bytes());
        elf[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        elf[0x3e..0x40].copy_from_slice(&1u16.to_le_bytes());
        elf
    }

    #[test]
    fn reads_depends_from_modinfo() {
        let elf = object(b"license=GPL\0depends=nfnetlink,libcrc32c\0name=nf_tables\0");
        assert_eq!(
            modinfo(&elf, "depends").unwrap().as_deref(),
            Some("nfnetlink,libcrc32c")
        );
        assert_eq!(modinfo(&elf, "name").unwrap().as_deref(), Some("nf_tables"));
        assert_eq!(modinfo(&elf, "alias").unwrap(), None);
    }

    #[test]
    fn rejects_truncated_and_foreign_objects() {
        let elf = object(b"depends=\0");
        assert!(modinfo(&elf[..0x30], "depends").is_err());
        assert!(modinfo(b"#!/bin/sh\n", "depends").is_err());
        let mut be = elf.clone();
        be[5] = 2;
        assert!(modinfo(&be, "depends").is_err());
    }
}
