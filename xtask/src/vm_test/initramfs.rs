//! The guest's initramfs: busybox, the kernel modules the guest needs and the
//! init script, as an uncompressed cpio archive (the kernel unpacks those
//! directly; compressing the few MB would cost more time than it saves).

use std::{fs, path::Path};

use anyhow::{Context, Result};

use super::modules::Module;

/// PID 1 of the guest.
pub(super) const INIT: &str = include_str!("init.sh");

/// Modules the guest loads, before their dependencies (and the soft
/// dependencies of `modules::SOFT_DEPS`) are added: the 9p shares over
/// virtio, veth and nftables for the network tests, the scratch disk (ext2
/// is served by the ext4 driver) for the memory tests. Those a kernel has
/// built in are left out.
pub(super) const MODULES: &[&str] = &[
    "virtio_pci",
    "9pnet_virtio",
    "9p",
    "nf_tables",
    "veth",
    "virtio_blk",
    "ext4",
];

/// Builds the archive from busybox (static) and the resolved modules.
pub(super) fn build(busybox: &Path, modules: &[Module]) -> Result<Vec<u8>> {
    let busybox = fs::read(busybox).with_context(|| format!("reading {}", busybox.display()))?;
    let mut cpio = Cpio::default();
    for dir in [
        "bin",
        "dev",
        "proc",
        "sys",
        "host",
        "results",
        "lib",
        "lib/modules",
        "tmp",
    ] {
        cpio.dir(dir);
    }
    // The kernel opens /dev/console for init before anything is mounted.
    cpio.char_dev("dev/console", 5, 1);
    cpio.file("bin/busybox", 0o755, &busybox);
    cpio.file("init", 0o755, INIT.as_bytes());
    let mut load = String::new();
    for module in modules {
        cpio.file(
            &format!("lib/modules/{}.ko", module.name),
            0o644,
            &module.object,
        );
        load.push_str(&module.name);
        load.push('\n');
    }
    cpio.file("modules.load", 0o644, load.as_bytes());
    Ok(cpio.finish())
}

/// A writer of the "newc" cpio format, the one the kernel accepts
/// (Documentation/driver-api/early-userspace/buffer-format.rst).
#[derive(Default)]
struct Cpio {
    out: Vec<u8>,
    next_ino: u32,
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFCHR: u32 = 0o020000;

impl Cpio {
    fn dir(&mut self, name: &str) {
        self.entry(name, S_IFDIR | 0o755, (0, 0), &[]);
    }

    fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, S_IFREG | perm, (0, 0), data);
    }

    fn char_dev(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, S_IFCHR | 0o600, (major, minor), &[]);
    }

    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.next_ino += 1;
        let nlink = if mode & S_IFDIR != 0 { 2 } else { 1 };
        let size = u32::try_from(data.len()).expect("initramfs members are far below 4 GiB");
        let namesize = u32::try_from(name.len() + 1).expect("short names");
        // magic, then ino mode uid gid nlink mtime filesize devmajor devminor
        // rdevmajor rdevminor namesize check, 8 hex digits each.
        let fields = [
            self.next_ino,
            mode,
            0,
            0,
            nlink,
            0,
            size,
            0,
            0,
            rdev.0,
            rdev.1,
            namesize,
            0,
        ];
        self.out.extend_from_slice(b"070701");
        for field in fields {
            self.out
                .extend_from_slice(format!("{field:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    /// Header+name and data are each padded to a multiple of four bytes.
    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_entries_are_aligned_and_terminated() {
        let mut cpio = Cpio::default();
        cpio.file("init", 0o755, b"#!/bin/sh\n");
        let out = cpio.finish();
        assert!(out.starts_with(b"070701"));
        // mode field (second) of the first header
        assert_eq!(&out[14..22], b"000081ed");
        // filesize field
        assert_eq!(&out[54..62], b"0000000a");
        // header (110) + "init\0" (5) padded to 116, then the data
        assert_eq!(&out[116..126], b"#!/bin/sh\n");
        let trailer = 128;
        assert_eq!(&out[trailer..trailer + 6], b"070701");
        assert_eq!(&out[trailer + 110..trailer + 120], b"TRAILER!!!");
        assert_eq!(out.len() % 4, 0);
    }
}
