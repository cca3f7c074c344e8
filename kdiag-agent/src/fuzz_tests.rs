//! Property tests: whatever bytes the kernel, /proc or sysfs hand over, the
//! decoders and parsers return an error or a value, never panic.

use std::io::Cursor;

use proptest::prelude::*;

use kdiag_common::EventKind;

use crate::{
    attribution::{cgroup, procfs, vmstat},
    classes,
    kernel::{btf, tracefs, wire},
    privileges,
};

/// Every event decoder of every class.
fn decode_all(bytes: &[u8]) {
    let _ = wire::event_kind(bytes);
    let _ = classes::tcp::retrans::decode_retrans(bytes);
    let _ = classes::tcp::lifecycle::decode_state(bytes);
    let _ = classes::tcp::lifecycle::decode_close(bytes);
    let _ = classes::memory::decode_stall(bytes, EventKind::Reclaim);
    let _ = classes::memory::decode_stall(bytes, EventKind::Compact);
    let _ = classes::softirq::decode_softirq(bytes);
    let _ = classes::drop::decode_drop(bytes);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn event_decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = wire::event_kind(&bytes);
        decode_all(&bytes);
    }

    #[test]
    fn decoders_accept_valid_kinds_with_any_payload(
        mut bytes in proptest::collection::vec(any::<u8>(), 16..300),
        kind in 0u32..9,
    ) {
        bytes[..4].copy_from_slice(&kind.to_ne_bytes());
        decode_all(&bytes);
    }

    #[test]
    fn proc_parsers_never_panic(text in "\\PC{0,400}") {
        let _ = procfs::tcp_rows(text.as_bytes()).count();
        let _ = procfs::tcp_counters(&text, ["RetransSegs", "OutSegs"]);
        let _ = procfs::parse_cgroup_v2(text.lines().map(str::to_owned));
        let _ = tracefs::parse_format(&text);
        let _ = cgroup::parse_cgroup2_mount(&text);
        let _ = privileges::ProcStatus::parse(&text);
        let _ = vmstat::parse_vmstat(&text);
        let _ = vmstat::parse_psi(&text);
    }

    #[test]
    fn proc_tcp_rows_with_plausible_shape(
        local in "[0-9A-F]{8}:[0-9A-F]{4}",
        remote in "[0-9A-Fa-z]{0,33}:[0-9A-F]{0,5}",
        rest in "[ 0-9A-F:a-z-]{0,80}",
    ) {
        let text = format!("header\n   0: {local} {remote} {rest}\n");
        let _ = procfs::tcp_rows(text.as_bytes()).count();
    }

    #[test]
    fn btf_reader_never_panics(mut bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = resolve_btf(&bytes);
        // With a valid magic and version, the header's lengths and offsets
        // are garbage.
        if bytes.len() >= 4 {
            bytes[..4].copy_from_slice(&0x0001_eb9fu32.to_le_bytes());
        }
        let _ = resolve_btf(&bytes);
    }

    #[test]
    fn btf_reader_never_panics_on_sections_in_the_file(
        body in proptest::collection::vec(any::<u8>(), 0..512),
        sections in [0u32..600, 0u32..600, 0u32..600, 0u32..600],
    ) {
        let mut bytes = 0x0001_eb9fu32.to_le_bytes().to_vec();
        for word in [24].into_iter().chain(sections) {
            bytes.extend_from_slice(&word.to_le_bytes());
        }
        bytes.extend_from_slice(&body);
        let _ = resolve_btf(&bytes);
    }

    #[test]
    fn btf_reader_never_panics_on_damaged_btf(
        damage in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        strings_first in any::<bool>(),
    ) {
        let mut bytes = btf::tests::sample().bytes(strings_first);
        let len = bytes.len();
        for (at, xor) in damage {
            bytes[at % len] ^= xor;
        }
        let _ = resolve_btf(&bytes);
    }
}

/// What the agent asks of the kernel's BTF, asked of `bytes`.
fn resolve_btf(bytes: &[u8]) -> Result<([u32; 2], [i64; 1]), btf::BtfError> {
    // Anonymous members and whole enums take passes of their own.
    let _ = btf::enums_in(
        Cursor::new(bytes),
        "fuzz",
        &[("sock_common", "skc_net")],
        &["cgroup_subsys_id"],
    );
    btf::resolve_in(
        Cursor::new(bytes),
        "fuzz",
        [("sock_common", "skc_net"), ("sock_common", "a")],
        [("cgroup_subsys_id", "memory_cgrp_id")],
    )
}
