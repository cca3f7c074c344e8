//! A connection's health read from its `struct tcp_sock`: the sender's
//! state at each retransmit, and its totals and sender-limit chronographs
//! when it closes.
//!
//! The field offsets come from the running kernel's BTF. The programs read
//! a socket in a few bounded reads, each covering a group of nearby
//! fields; the agent groups them here ([`plan`]) and decodes what comes
//! back ([`SenderState::new`], [`ConnHealth::new`]).

use kdiag_common::tcp::{
    FIELD_ABSENT, SOCK_READ_LEN, SOCK_READS, SockField, SockFields, SockPlan, SockRead,
};

use crate::{
    class::{BtfQueries, KernelTypes},
    kernel::btf::{Answers, Unanswered},
    output::record::{ConnHealth, Degraded, SenderState},
};

/// The members the socket reads need (tcp_sock's in include/linux/tcp.h;
/// `struct minmax` in include/linux/win_minmax.h).
pub(crate) const SOCK_QUERIES: BtfQueries = BtfQueries {
    members: &[
        ("tcp_sock", "srtt_us"),
        ("tcp_sock", "mdev_us"),
        ("tcp_sock", "snd_cwnd"),
        ("tcp_sock", "snd_ssthresh"),
        ("tcp_sock", "packets_out"),
        ("tcp_sock", "lost_out"),
        ("tcp_sock", "retrans_out"),
        ("tcp_sock", "total_retrans"),
        ("tcp_sock", "rtt_min"),
        ("minmax", "s"),
        ("minmax_sample", "v"),
        ("tcp_sock", "bytes_acked"),
        ("tcp_sock", "bytes_received"),
        ("tcp_sock", "segs_out"),
        ("tcp_sock", "segs_in"),
        ("tcp_sock", "chrono_type"),
        ("tcp_sock", "chrono_start"),
        ("tcp_sock", "chrono_stat"),
    ],
    enumerators: &[],
    enums: &[],
};

/// What a retransmit reads.
pub(crate) const RETRANS_FIELDS: &[SockField] = &[
    SockField::SrttUs,
    SockField::MdevUs,
    SockField::Cwnd,
    SockField::Ssthresh,
    SockField::PacketsOut,
    SockField::LostOut,
    SockField::RetransOut,
    SockField::TotalRetrans,
];

/// What a close reads.
pub(crate) const CLOSE_FIELDS: &[SockField] = &[
    SockField::SrttUs,
    SockField::MinRttUs,
    SockField::BytesAcked,
    SockField::BytesReceived,
    SockField::SegsOut,
    SockField::SegsIn,
    SockField::TotalRetrans,
    SockField::ChronoType,
    SockField::ChronoStart,
    SockField::ChronoBusy,
    SockField::ChronoRwnd,
    SockField::ChronoSndbuf,
];

/// Where a field is in `struct tcp_sock`: its byte offset and width (for
/// `chrono_type`, the byte it starts in; see [`ChronoLayout`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Located {
    offset: u32,
    width: u8,
}

/// The field's place in the kernel's `struct tcp_sock`.
fn locate(btf: &Answers, field: SockField) -> Result<Located, Unanswered> {
    let member = |name| btf.offset("tcp_sock", name);
    let u32_at = |offset| Located { offset, width: 4 };
    let chrono_stat = |i: u32| Ok(u32_at(member("chrono_stat")? + 4 * i));
    match field {
        SockField::SrttUs => member("srtt_us").map(u32_at),
        SockField::MdevUs => member("mdev_us").map(u32_at),
        SockField::Cwnd => member("snd_cwnd").map(u32_at),
        SockField::Ssthresh => member("snd_ssthresh").map(u32_at),
        SockField::PacketsOut => member("packets_out").map(u32_at),
        SockField::LostOut => member("lost_out").map(u32_at),
        SockField::RetransOut => member("retrans_out").map(u32_at),
        SockField::TotalRetrans => member("total_retrans").map(u32_at),
        // The windowed minimum is the first of the filter's samples
        // (tcp_min_rtt(): rtt_min.s[0].v).
        SockField::MinRttUs => Ok(u32_at(
            member("rtt_min")? + btf.offset("minmax", "s")? + btf.offset("minmax_sample", "v")?,
        )),
        SockField::BytesAcked => member("bytes_acked").map(|offset| Located { offset, width: 8 }),
        SockField::BytesReceived => {
            member("bytes_received").map(|offset| Located { offset, width: 8 })
        }
        SockField::SegsOut => member("segs_out").map(u32_at),
        SockField::SegsIn => member("segs_in").map(u32_at),
        SockField::ChronoType => member("chrono_type").map(|offset| Located { offset, width: 1 }),
        SockField::ChronoStart => member("chrono_start").map(u32_at),
        SockField::ChronoBusy => chrono_stat(0),
        SockField::ChronoRwnd => chrono_stat(1),
        SockField::ChronoSndbuf => chrono_stat(2),
    }
}

/// The reads that fetch `fields` of a socket, and the fields this kernel
/// lacks (or that are too far apart for [`SOCK_READS`] reads) with why.
/// Fields are grouped greedily by offset: a read starts at the first
/// field not yet covered, rounded down to 8 bytes so that every field
/// stays as aligned in the buffer as in the socket, and takes every field
/// that ends within [`SOCK_READ_LEN`] bytes of its start.
pub(crate) fn plan(btf: &Answers, fields: &[SockField]) -> (SockPlan, Vec<(SockField, String)>) {
    let mut plan = SockPlan::NONE;
    let mut missing = Vec::new();
    let mut located: Vec<(SockField, Located)> = Vec::new();
    for &field in fields {
        match locate(btf, field) {
            Ok(at) => located.push((field, at)),
            Err(e) => missing.push((field, e.to_string())),
        }
    }
    located.sort_by_key(|(_, at)| at.offset);
    let mut reads = 0;
    for (field, at) in located {
        let end = at.offset + u32::from(at.width);
        let fits = reads > 0 && {
            let read = &plan.reads[reads - 1];
            end - read.start <= SOCK_READ_LEN as u32
        };
        if !fits {
            if reads == SOCK_READS {
                missing.push((
                    field,
                    format!("more than {SOCK_READS} reads of the socket would be needed"),
                ));
                continue;
            }
            plan.reads[reads] = SockRead {
                start: at.offset & !7,
                len: 0,
            };
            reads += 1;
        }
        let i = reads - 1;
        let read = &mut plan.reads[i];
        read.len = read.len.max(end - read.start);
        let at_in_buf = i * SOCK_READ_LEN + (at.offset - read.start) as usize;
        plan.at[field as usize] = u16::try_from(at_in_buf).unwrap_or(FIELD_ABSENT);
        plan.width[field as usize] = at.width;
    }
    (plan, missing)
}

/// A `degraded` entry naming the fields `records` will carry as null.
pub(crate) fn missing_note(records: &str, missing: &[(SockField, String)]) -> Option<Degraded> {
    let (_, first_why) = missing.first()?;
    let names: Vec<String> = missing.iter().map(|(f, _)| format!("{f:?}")).collect();
    Some(Degraded {
        what: format!("btf/tcp_sock ({records})"),
        why: format!(
            "{records} records carry null for the socket fields {}: {first_why}",
            names.join(", ")
        ),
    })
}

/// How to decode the chronographs: which bits of the byte read hold
/// `chrono_type` (a 2-bit bitfield in older kernels, a u8 in 6.18; 0 to 3
/// either way), and the unit of the times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ChronoLayout {
    /// Bit of the byte read where the field starts.
    shift: u32,
    /// Nanoseconds per jiffy, the chronographs' unit.
    jiffy_ns: u64,
}

impl ChronoLayout {
    /// From the BTF (the field's bit offset) and the kernel's tick, or the
    /// reason the chronographs cannot be decoded.
    pub(crate) fn new(kernel: &KernelTypes, jiffy_ns: Option<u64>) -> Result<Self, String> {
        let bits = kernel
            .btf
            .bit_offset("tcp_sock", "chrono_type")
            .map_err(|e| e.to_string())?;
        let shift = bits % 8;
        // Two bits from `shift` must fit the byte the programs read.
        if shift > 6 {
            return Err(format!("chrono_type straddles a byte (bit {bits})"));
        }
        let jiffy_ns = jiffy_ns
            .filter(|&ns| ns > 0)
            .ok_or("the kernel's tick length (CLOCK_MONOTONIC_COARSE resolution) is unknown")?;
        Ok(Self { shift, jiffy_ns })
    }
}

/// The sender's state at a retransmit, in the units `tcp_info` reports.
pub(crate) fn sender_state(sock: &SockFields) -> SenderState {
    let get = |f| sock.get(f);
    SenderState {
        // tcp_get_info(): srtt_us >> 3 and mdev_us >> 2, the kernel's
        // fixed-point scaling (tcp_rtt_estimator()).
        srtt_us: get(SockField::SrttUs).map(|v| v >> 3),
        rttvar_us: get(SockField::MdevUs).map(|v| v >> 2),
        cwnd: get(SockField::Cwnd),
        ssthresh: get(SockField::Ssthresh),
        packets_out: get(SockField::PacketsOut),
        lost_out: get(SockField::LostOut),
        retrans_out: get(SockField::RetransOut),
        total_retrans: get(SockField::TotalRetrans),
    }
}

/// The chronographs' `enum tcp_chrono` (include/net/tcp.h): 0 is
/// TCP_CHRONO_UNSPEC, then busy, receive-window limited, send-buffer limited.
const CHRONO_TYPES: u64 = 3;

/// The least share of its busy time a limit must take to name it.
const LIMIT_MIN_SHARE_PERCENT: u64 = 20;

/// A closed connection's totals, in the units `tcp_info` reports; `chrono`
/// is `None` where the chronographs cannot be decoded.
pub(crate) fn conn_health(sock: &SockFields, chrono: Option<ChronoLayout>) -> ConnHealth {
    let get = |f| sock.get(f);
    let chronos = chrono.and_then(|layout| chronographs(sock, layout));
    let (busy_ns, rwnd_limited_ns, sndbuf_limited_ns) = match chronos {
        Some((busy, rwnd, sndbuf)) => (Some(busy), Some(rwnd), Some(sndbuf)),
        None => (None, None, None),
    };
    ConnHealth {
        srtt_us: get(SockField::SrttUs).map(|v| v >> 3),
        // ~0U until the first RTT sample (minmax_reset() in tcp_init_sock).
        min_rtt_us: get(SockField::MinRttUs).filter(|&v| v != u64::from(u32::MAX)),
        bytes_acked: get(SockField::BytesAcked),
        bytes_received: get(SockField::BytesReceived),
        segs_out: get(SockField::SegsOut),
        segs_in: get(SockField::SegsIn),
        busy_ns,
        rwnd_limited_ns,
        sndbuf_limited_ns,
        limited_by: chronos.and_then(|(busy, rwnd, sndbuf)| {
            limited_by(busy, rwnd, sndbuf, get(SockField::TotalRetrans)?)
        }),
    }
}

/// Busy (all three chronographs, as `tcpi_busy_time`), receive-window
/// limited and send-buffer limited time in ns, computed as
/// tcp_get_info_chrono_stats() does: the stored jiffies of each, plus the
/// running one's time since `chrono_start`.
fn chronographs(sock: &SockFields, layout: ChronoLayout) -> Option<(u64, u64, u64)> {
    let running = (sock.get(SockField::ChronoType)? >> layout.shift) & 3;
    let start = sock.get(SockField::ChronoStart)? as u32;
    let stored = [
        sock.get(SockField::ChronoBusy)?,
        sock.get(SockField::ChronoRwnd)?,
        sock.get(SockField::ChronoSndbuf)?,
    ];
    // tcp_jiffies32, the clock the chronographs are kept in.
    let now = sock.jiffies as u32;
    let mut ns = [0u64; CHRONO_TYPES as usize];
    for (i, (ns, stored)) in ns.iter_mut().zip(stored).enumerate() {
        let mut jiffies = stored;
        if running == i as u64 + 1 {
            jiffies += u64::from(now.wrapping_sub(start));
        }
        *ns = jiffies.saturating_mul(layout.jiffy_ns);
    }
    let [busy, rwnd, sndbuf] = ns;
    Some((busy + rwnd + sndbuf, rwnd, sndbuf))
}

/// What held the sender back most, when one limit took at least
/// [`LIMIT_MIN_SHARE_PERCENT`] of its busy time: `"receiver"` (the peer's
/// receive window was full: rwnd_limited), `"sender"` (its own send buffer
/// was full: sndbuf_limited), `"network"` (the rest of the busy time, data
/// in flight under the congestion window, counted only for a connection
/// that lost packets: `total_retrans` > 0). `None` when it never had data
/// to send (busy 0) or no limit reaches the share. Ties go in that order.
pub(crate) fn limited_by(
    busy_ns: u64,
    rwnd_ns: u64,
    sndbuf_ns: u64,
    total_retrans: u64,
) -> Option<&'static str> {
    if busy_ns == 0 {
        return None;
    }
    let network_ns = if total_retrans > 0 {
        busy_ns.saturating_sub(rwnd_ns).saturating_sub(sndbuf_ns)
    } else {
        0
    };
    let (name, ns) = [
        ("receiver", rwnd_ns),
        ("sender", sndbuf_ns),
        ("network", network_ns),
    ]
    .into_iter()
    .fold(("", 0), |best, c| if c.1 > best.1 { c } else { best });
    (ns > 0 && u128::from(ns) * 100 >= u128::from(busy_ns) * u128::from(LIMIT_MIN_SHARE_PERCENT))
        .then_some(name)
}

#[cfg(test)]
mod tests {
    use kdiag_common::tcp::{SOCK_FIELDS, SOCK_SCRATCH};

    use super::*;

    /// 6.18's offsets (bits) of the members the plans use.
    fn answers_6_18() -> Answers {
        Answers::with_bit_offsets(&[
            (("tcp_sock", "snd_cwnd"), 11552),
            (("tcp_sock", "lost_out"), 11616),
            (("tcp_sock", "retrans_out"), 11840),
            (("tcp_sock", "snd_ssthresh"), 11936),
            (("tcp_sock", "rtt_min"), 11968),
            (("minmax", "s"), 0),
            (("minmax_sample", "v"), 32),
            (("tcp_sock", "segs_out"), 12288),
            (("tcp_sock", "chrono_type"), 12448),
            (("tcp_sock", "chrono_start"), 12480),
            (("tcp_sock", "chrono_stat"), 12512),
            (("tcp_sock", "mdev_us"), 12704),
            (("tcp_sock", "srtt_us"), 13440),
            (("tcp_sock", "packets_out"), 13472),
            (("tcp_sock", "bytes_received"), 14016),
            (("tcp_sock", "segs_in"), 14080),
            (("tcp_sock", "bytes_acked"), 14592),
            (("tcp_sock", "total_retrans"), 17600),
        ])
    }

    /// What the programs do with a plan: the reads into a buffer, then each
    /// field from it.
    fn run(plan: &SockPlan, sock: &[u8], jiffies: u64) -> SockFields {
        let mut buf = [0u8; SOCK_SCRATCH];
        for (i, r) in plan.reads.iter().enumerate() {
            let (start, len) = (r.start as usize, r.len as usize);
            buf[i * SOCK_READ_LEN..][..len].copy_from_slice(&sock[start..start + len]);
        }
        let mut out = SockFields {
            values: [0; SOCK_FIELDS],
            present: 0,
            _pad: 0,
            jiffies,
        };
        for f in 0..SOCK_FIELDS {
            let at = usize::from(plan.at[f]);
            if plan.at[f] == FIELD_ABSENT {
                continue;
            }
            let width = usize::from(plan.width[f]);
            assert_eq!(at % width, 0, "field {f} misaligned");
            let mut v = [0u8; 8];
            v[..width].copy_from_slice(&buf[at..at + width]);
            out.values[f] = u64::from_le_bytes(v);
            out.present |= 1 << f;
        }
        out
    }

    fn put(sock: &mut [u8], bits: u32, bytes: &[u8]) {
        let at = (bits / 8) as usize;
        sock[at..at + bytes.len()].copy_from_slice(bytes);
    }

    #[test]
    fn retransmit_reads_two_groups_and_decodes_tcp_info_units() {
        let btf = answers_6_18();
        let (plan, missing) = plan(&btf, RETRANS_FIELDS);
        assert!(missing.is_empty(), "{missing:?}");
        // snd_cwnd .. packets_out in one read, total_retrans far behind.
        let used: Vec<_> = plan.reads.iter().filter(|r| r.len > 0).collect();
        assert_eq!(used.len(), 2, "{:?}", plan.reads);
        assert!(used.iter().all(|r| r.len as usize <= SOCK_READ_LEN));
        let mut sock = vec![0u8; 2304];
        put(&mut sock, 13440, &(20_000u32 << 3).to_le_bytes());
        put(&mut sock, 12704, &(4 * 1500u32).to_le_bytes());
        put(&mut sock, 11552, &7u32.to_le_bytes());
        put(&mut sock, 11936, &5u32.to_le_bytes());
        put(&mut sock, 13472, &3u32.to_le_bytes());
        put(&mut sock, 11616, &1u32.to_le_bytes());
        put(&mut sock, 11840, &2u32.to_le_bytes());
        put(&mut sock, 17600, &9u32.to_le_bytes());
        let s = sender_state(&run(&plan, &sock, 0));
        assert_eq!(
            s,
            SenderState {
                srtt_us: Some(20_000),
                rttvar_us: Some(1500),
                cwnd: Some(7),
                ssthresh: Some(5),
                packets_out: Some(3),
                lost_out: Some(1),
                retrans_out: Some(2),
                total_retrans: Some(9),
            }
        );
    }

    #[test]
    fn missing_members_are_null_and_named() {
        let btf = Answers::with_bit_offsets(&[(("tcp_sock", "snd_cwnd"), 8000)]);
        let (plan, missing) = plan(&btf, RETRANS_FIELDS);
        assert_eq!(missing.len(), RETRANS_FIELDS.len() - 1);
        let mut sock = vec![0u8; 1100];
        put(&mut sock, 8000, &10u32.to_le_bytes());
        let s = sender_state(&run(&plan, &sock, 0));
        assert_eq!((s.cwnd, s.srtt_us, s.total_retrans), (Some(10), None, None));
        let note = missing_note("retrans", &missing).unwrap();
        assert!(note.why.contains("SrttUs"), "{note:?}");
        assert!(missing_note("retrans", &[]).is_none());
    }

    #[test]
    fn fields_spread_over_more_reads_than_allowed_are_left_out() {
        let members: Vec<_> = [
            "srtt_us",
            "mdev_us",
            "snd_cwnd",
            "snd_ssthresh",
            "packets_out",
        ]
        .into_iter()
        .enumerate()
        .map(|(i, m)| (("tcp_sock", m), (i as u32 + 1) * 8 * 1024))
        .collect();
        let (plan, missing) = plan(&Answers::with_bit_offsets(&members), RETRANS_FIELDS);
        assert!(plan.reads.iter().all(|r| r.len == 4));
        // The fifth group and the three members not in the BTF.
        assert_eq!(missing.len(), 4, "{missing:?}");
        assert_eq!(plan.at[SockField::PacketsOut as usize], FIELD_ABSENT);
    }

    fn close_sock(chrono_type_byte: u8) -> Vec<u8> {
        let mut sock = vec![0u8; 2304];
        put(&mut sock, 13440, &(800u32 << 3).to_le_bytes());
        put(&mut sock, 11968 + 32, &650u32.to_le_bytes());
        put(&mut sock, 14592, &1_000_001u64.to_le_bytes());
        put(&mut sock, 14016, &5u64.to_le_bytes());
        put(&mut sock, 12288, &700u32.to_le_bytes());
        put(&mut sock, 14080, &400u32.to_le_bytes());
        put(&mut sock, 17600, &0u32.to_le_bytes());
        put(&mut sock, 12448, &[chrono_type_byte]);
        // Started at jiffy u32::MAX - 1: the running one wraps.
        put(&mut sock, 12480, &(u32::MAX - 1).to_le_bytes());
        put(
            &mut sock,
            12512,
            &[10u32, 200, 3].map(u32::to_le_bytes).concat(),
        );
        sock
    }

    #[test]
    fn close_totals_and_running_chronograph() {
        let btf = answers_6_18();
        let (plan, missing) = plan(&btf, CLOSE_FIELDS);
        assert!(missing.is_empty(), "{missing:?}");
        let layout = ChronoLayout {
            shift: 0,
            jiffy_ns: 4_000_000,
        };
        // Receive-window limited chronograph running for 2 + 8 jiffies.
        let sock = run(&plan, &close_sock(2), (1 << 32) + 8);
        let h = conn_health(&sock, Some(layout));
        assert_eq!(
            h,
            ConnHealth {
                srtt_us: Some(800),
                min_rtt_us: Some(650),
                bytes_acked: Some(1_000_001),
                bytes_received: Some(5),
                segs_out: Some(700),
                segs_in: Some(400),
                busy_ns: Some((10 + 210 + 3) * 4_000_000),
                rwnd_limited_ns: Some(210 * 4_000_000),
                sndbuf_limited_ns: Some(3 * 4_000_000),
                limited_by: Some("receiver"),
            }
        );
        // A 2-bit field at bit 3 of its byte, as older kernels have it, holding 1
        // (busy) beside other bits; unknown chronographs are null.
        let sock = run(&plan, &close_sock((1 << 3) | 0b1110_0000), (1 << 32) + 8);
        let layout = ChronoLayout { shift: 3, ..layout };
        let h = conn_health(&sock, Some(layout));
        assert_eq!(h.busy_ns, Some((20 + 200 + 3) * 4_000_000));
        assert_eq!(h.rwnd_limited_ns, Some(200 * 4_000_000));
        let h = conn_health(&sock, None);
        assert_eq!((h.busy_ns, h.limited_by), (None, None));
        assert_eq!(h.srtt_us, Some(800));
    }

    #[test]
    fn no_rtt_sample_is_null() {
        let btf = answers_6_18();
        let (plan, _) = plan(&btf, CLOSE_FIELDS);
        let mut sock = close_sock(0);
        put(&mut sock, 11968 + 32, &u32::MAX.to_le_bytes());
        let h = conn_health(&run(&plan, &sock, 0), None);
        assert_eq!(h.min_rtt_us, None);
    }

    #[test]
    fn limited_by_rule() {
        // Nothing to send.
        assert_eq!(limited_by(0, 0, 0, 5), None);
        assert_eq!(limited_by(100, 60, 10, 0), Some("receiver"));
        assert_eq!(limited_by(100, 10, 60, 0), Some("sender"));
        // Busy without losses is not the network's doing.
        assert_eq!(limited_by(100, 5, 5, 0), None);
        assert_eq!(limited_by(100, 5, 5, 3), Some("network"));
        // Under the share: no limit stands out.
        assert_eq!(limited_by(100, 19, 0, 0), None);
        assert_eq!(limited_by(100, 20, 0, 0), Some("receiver"));
        // Ties: receiver before sender.
        assert_eq!(limited_by(100, 40, 40, 0), Some("receiver"));
    }

    #[test]
    fn chrono_layout_needs_a_tick_and_a_byte() {
        let at_bit = |bits| KernelTypes {
            btf: Answers::with_bit_offsets(&[(("tcp_sock", "chrono_type"), bits)]),
            ..KernelTypes::default()
        };
        // Bit 7: two bits would straddle the byte read.
        assert!(ChronoLayout::new(&at_bit(8 * 100 + 7), Some(1_000_000)).is_err());
        let kernel = at_bit(8 * 100 + 2);
        assert!(ChronoLayout::new(&kernel, None).is_err());
        assert_eq!(
            ChronoLayout::new(&kernel, Some(1_000_000)),
            Ok(ChronoLayout {
                shift: 2,
                jiffy_ns: 1_000_000
            })
        );
    }
}
