//! The drop program: skb/kfree_skb, the kernel freeing a packet it dropped,
//! with the reason it gives (`enum skb_drop_reason`, since 5.17).
//!
//! kfree_skb fires for every dropped packet of every protocol, so the
//! program turns away what it does not follow as early and cheaply as it
//! can: the ethertype first (one load from the record), then the IP
//! header's protocol. Every TCP or UDP drop is counted per reason in a
//! per-CPU map; an event per drop goes out only for drops with a reason
//! other than NOT_SPECIFIED, unless the agent asks for all.

use core::ffi::c_void;

use aya_ebpf::{
    helpers::{bpf_probe_read_kernel, generated as helper},
    macros::{map, tracepoint},
    maps::{PerCpuArray, PerCpuHashMap},
    programs::TracePointContext,
};
use kdiag_common::{
    ClassId, EventKind, FIELD_ABSENT, LOSS_FAILED,
    cost::ProgramId,
    drop::{
        DROP_DIRECTION_KNOWN, DROP_INBOUND, DropConfig, DropEvent, DropKey, DropTpOffsets,
        ETH_P_IP, ETH_P_IPV6, HEADER_UNSET, IPPROTO_TCP, IPPROTO_UDP, NO_REASON,
    },
    tcp::{AF_INET, AF_INET6},
};

use crate::{
    cost::{gates, measured},
    ctx, mem,
    output::{count_loss, counted, emit, header},
    rodata::rodata,
    tcp::SOCKS,
};

/// Offsets and options, written by the agent at load.
#[unsafe(no_mangle)]
static DROP_CONFIG: DropConfig = DropConfig::DEFAULT;

/// (reason, protocol) -> drops, per CPU. The counters only grow: the agent
/// reads differences, so no entry is ever deleted under a program that
/// increments it. One entry in the object: the agent sizes it at load.
#[map]
static DROP_COUNTS: PerCpuHashMap<DropKey, u64> = PerCpuHashMap::with_max_entries(1, 0);

/// Scratch space for building an event.
#[map]
static DROP_EVENT: PerCpuArray<DropEvent> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
fn config() -> &'static DropConfig {
    rodata(&DROP_CONFIG)
}

/// A value of type `T` at `addr` in kernel memory.
#[inline(always)]
fn kernel<T>(addr: u64) -> Result<T, i64> {
    // SAFETY: a probe read: a bad address returns an error, never faults.
    unsafe { bpf_probe_read_kernel(addr as *const T) }.map_err(i64::from)
}

#[tracepoint]
pub(crate) fn kfree_skb(ctx: TracePointContext) -> u32 {
    measured(ProgramId::KfreeSkb, || {
        counted(ClassId::Drop, try_kfree_skb(&ctx))
    })
}

/// Offsets in the IPv4 header (RFC 791): version and header length, the
/// protocol, the addresses.
const IPV4_PROTOCOL: u64 = 9;
const IPV4_ADDRS: u64 = 12;
/// In the IPv6 header (RFC 8200): the next header, the addresses; its length.
const IPV6_NEXTHDR: u64 = 6;
const IPV6_ADDRS: u64 = 8;
const IPV6_LEN: u64 = 40;

fn try_kfree_skb(ctx: &TracePointContext) -> Result<u32, i64> {
    let cfg = config();
    let (o, u) = (&cfg.tp, &DropTpOffsets::USUAL);
    // Before anything else: most freed packets are not IP (or are freed
    // for another protocol's reasons), and this is one load.
    let ethertype: u16 = ctx::field(ctx, o.protocol, u.protocol)?;
    let v4 = ethertype == ETH_P_IP;
    if !v4 && ethertype != ETH_P_IPV6 {
        return Ok(0);
    }
    let skb: u64 = ctx::field(ctx, o.skbaddr, u.skbaddr)?;
    let network: u16 = kernel(skb + u64::from(cfg.skb_network_header))?;
    if network == HEADER_UNSET {
        // No IP header in place: not a packet this class can name.
        return Ok(0);
    }
    let head: u64 = kernel(skb + u64::from(cfg.skb_head))?;
    let ip = head + u64::from(network);
    // The transport header is found from the IP header rather than from
    // `skb->transport_header`, which some drop sites reach before it is
    // set; IPv6 packets with extension headers are not followed.
    let (protocol, transport) = if v4 {
        let version_ihl: u8 = kernel(ip)?;
        if version_ihl >> 4 != 4 {
            return Ok(0);
        }
        let protocol: u8 = kernel(ip + IPV4_PROTOCOL)?;
        (protocol, ip + u64::from(version_ihl & 0xf) * 4)
    } else {
        let nexthdr: u8 = kernel(ip + IPV6_NEXTHDR)?;
        (nexthdr, ip + IPV6_LEN)
    };
    if protocol != IPPROTO_TCP && protocol != IPPROTO_UDP {
        return Ok(0);
    }
    // `reason` exists since 5.17.
    let reason: u32 = ctx::field(ctx, o.reason, u.reason).unwrap_or(NO_REASON);
    count(reason, protocol);
    let wanted = cfg.all_reasons != 0 || (reason != NO_REASON && reason != cfg.not_specified);
    if !wanted || gates().drop_events_shed != 0 {
        return Ok(0);
    }
    // Built in a per-CPU slot: the 512-byte stack has no room for it beside
    // the helpers' copies.
    let event = DROP_EVENT.get_ptr_mut(0).ok_or(-1i64)?;
    // SAFETY: this CPU's slot; classic tracepoint programs do not nest on a
    // CPU, so nothing else uses it until this program returns. All zero is
    // a valid DropEvent.
    let event = unsafe {
        mem::zero(event);
        &mut *event
    };
    let t = &mut event.tuple;
    if v4 {
        t.family = AF_INET;
        let addrs: [u8; 8] = kernel(ip + IPV4_ADDRS)?;
        t.saddr[..4].copy_from_slice(&addrs[..4]);
        t.daddr[..4].copy_from_slice(&addrs[4..]);
    } else {
        t.family = AF_INET6;
        read_into(&mut t.saddr, ip + IPV6_ADDRS)?;
        read_into(&mut t.daddr, ip + IPV6_ADDRS + 16)?;
    }
    // Source and destination port, network order, first in both headers.
    let ports: [u8; 4] = kernel(transport)?;
    t.sport = u16::from_be_bytes([ports[0], ports[1]]);
    t.dport = u16::from_be_bytes([ports[2], ports[3]]);

    // The socket: the receiving one the drop site names (`rx_sk`, 6.11),
    // else the one the packet is charged to.
    let rx_sk: u64 = ctx::field(ctx, o.rx_sk, u.rx_sk).unwrap_or(0);
    let sk: u64 = if rx_sk != 0 {
        rx_sk
    } else {
        kernel(skb + u64::from(cfg.skb_sk)).unwrap_or(0)
    };
    if sk != 0 && cfg.sk_num != FIELD_ABSENT {
        let local: u16 = kernel(sk + u64::from(cfg.sk_num))?;
        event.flags = DROP_DIRECTION_KNOWN;
        // The socket's port is the destination's: the packet came in. Both
        // ports alike (a connection to itself): the drop site's receiving
        // socket says so.
        if local == t.dport && (local != t.sport || rx_sk != 0) {
            event.flags |= DROP_INBOUND;
        }
    }
    // Owners are known for the TCP sockets the TCP programs saw born. A
    // UDP socket changes no state the programs see: the agent finds who
    // holds it from its inode.
    if sk != 0 && protocol == IPPROTO_TCP {
        if let Some(info) = SOCKS.get_ptr(sk) {
            // SAFETY: a live map value, copied at once.
            unsafe { mem::copy(&raw mut event.owner, &raw const (*info).owner) };
        }
    } else if sk != 0 && cfg.sk_socket != FIELD_ABSENT && cfg.socket_ino != FIELD_ABSENT {
        // No `struct socket` (0) once the socket is closing: no inode.
        let socket: u64 = kernel(sk + u64::from(cfg.sk_socket)).unwrap_or(0);
        if socket != 0 {
            event.sock_ino = kernel(socket + u64::from(cfg.socket_ino)).unwrap_or(0);
        }
    }
    event.header = header(EventKind::Drop);
    event.sock_id = sk;
    event.reason = reason;
    event.protocol = u16::from(protocol);
    emit(ctx, ClassId::Drop, event);
    Ok(0)
}

/// Reads `dst.len()` bytes of kernel memory at `src` into `dst`.
#[inline(always)]
fn read_into(dst: &mut [u8; 16], src: u64) -> Result<(), i64> {
    // SAFETY: a probe read of 16 bytes into a 16-byte buffer; a bad
    // address returns an error, never faults.
    let ret =
        unsafe { helper::bpf_probe_read_kernel(dst.as_mut_ptr().cast(), 16, src as *const c_void) };
    if ret == 0 { Ok(()) } else { Err(ret) }
}

/// Counts one drop of `reason` and `protocol`; a full map is the class's
/// `failed` loss.
#[inline(always)]
fn count(reason: u32, protocol: u8) {
    let key = DropKey {
        reason,
        protocol: u32::from(protocol),
    };
    match DROP_COUNTS.get_ptr_mut(&key) {
        // SAFETY: this CPU's value; classic tracepoint programs do not nest
        // on a CPU, so the plain increment cannot race.
        Some(n) => unsafe { *n += 1 },
        None => {
            if DROP_COUNTS.insert(&key, &1, 0).is_err() {
                count_loss(ClassId::Drop, LOSS_FAILED);
            }
        }
    }
}
