//! Packet drops: skb/kfree_skb, for TCP and UDP over IPv4 and IPv6.

use bytemuck::{Pod, Zeroable};

use crate::{EventHeader, FIELD_ABSENT, Owner, tcp::TcpTuple};

/// Ethertypes as the tracepoint records them (`ntohs(skb->protocol)`,
/// include/trace/events/skb.h).
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
/// IP protocol numbers of the transports this class follows.
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
/// `skb->network_header` when no network header was set (`(u16)~0U`,
/// include/linux/skbuff.h).
pub const HEADER_UNSET: u16 = u16::MAX;

/// Field offsets of skb/kfree_skb's record. `reason` exists since 5.17 and
/// `rx_sk` since 6.11; absent fields are [`FIELD_ABSENT`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct DropTpOffsets {
    pub skbaddr: u16,
    pub protocol: u16,
    pub reason: u16,
    pub rx_sk: u16,
}

impl DropTpOffsets {
    pub const ABSENT: Self = Self {
        skbaddr: FIELD_ABSENT,
        protocol: FIELD_ABSENT,
        reason: FIELD_ABSENT,
        rx_sk: FIELD_ABSENT,
    };

    /// Where kfree_skb keeps its fields since 6.11 (`rx_sk`): the programs
    /// read a field found there with one load, elsewhere with a probe read.
    pub const USUAL: Self = Self {
        skbaddr: 8,
        protocol: 32,
        reason: 36,
        rx_sk: 24,
    };
}

/// Configuration of the drop program, written into `.rodata` at load.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct DropConfig {
    pub tp: DropTpOffsets,
    /// Byte offsets in `struct sk_buff` (from the kernel's BTF): `head`,
    /// `network_header`, `sk`.
    pub skb_head: u16,
    pub skb_network_header: u16,
    pub skb_sk: u16,
    /// Byte offset of `skc_num` (the local port, host order) in `struct
    /// sock`, or [`FIELD_ABSENT`]: which end of the packet is the socket's.
    pub sk_num: u16,
    /// Byte offset of `sk_socket` in `struct sock`, and of the socket's
    /// inode number from its `struct socket` (`vfs_inode.i_ino` in `struct
    /// socket_alloc`, include/net/sock.h), or [`FIELD_ABSENT`]: the inode
    /// of a UDP socket, whose owner the agent finds from it.
    pub sk_socket: u16,
    pub socket_ino: u16,
    /// The value of `SKB_DROP_REASON_NOT_SPECIFIED` in this kernel's `enum
    /// skb_drop_reason`, or [`NO_REASON`] without reasons.
    pub not_specified: u32,
    /// Non-zero: send an event for every drop, also those without a reason
    /// or with `NOT_SPECIFIED` (`--all-reasons`).
    pub all_reasons: u32,
}
const _: () = assert!(size_of::<DropConfig>() == 28);

/// The reason of a drop on a kernel without reasons (0 is
/// `SKB_NOT_DROPPED_YET`, never the reason of a drop).
pub const NO_REASON: u32 = 0;

impl DropConfig {
    pub const DEFAULT: Self = Self {
        tp: DropTpOffsets::ABSENT,
        skb_head: FIELD_ABSENT,
        skb_network_header: FIELD_ABSENT,
        skb_sk: FIELD_ABSENT,
        sk_num: FIELD_ABSENT,
        sk_socket: FIELD_ABSENT,
        socket_ino: FIELD_ABSENT,
        not_specified: NO_REASON,
        all_reasons: 0,
    };
}

/// `DropEvent::flags`: the socket was the receiving one (the packet's
/// destination is the socket's end).
pub const DROP_INBOUND: u16 = 1;
/// `DropEvent::flags`: which end is the socket's is known.
pub const DROP_DIRECTION_KNOWN: u16 = 2;

/// One dropped packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct DropEvent {
    pub header: EventHeader,
    /// The socket the packet belonged to (0 = none); a cache key for the
    /// agent, never printed.
    pub sock_id: u64,
    /// The inode number of a UDP packet's socket (0 = not known): who held
    /// it is the owner.
    pub sock_ino: u64,
    /// The socket's owner, as the TCP programs captured it (unknown for
    /// UDP sockets and sockets the programs never saw).
    pub owner: Owner,
    /// The packet's addresses and ports as in its headers: `saddr`/`sport`
    /// its source.
    pub tuple: TcpTuple,
    /// The kernel's `enum skb_drop_reason` value ([`NO_REASON`] without).
    pub reason: u32,
    /// [`IPPROTO_TCP`] or [`IPPROTO_UDP`].
    pub protocol: u16,
    /// `DROP_*` flags.
    pub flags: u16,
}
const _: () = assert!(size_of::<DropEvent>() == 16 + 8 + 8 + 32 + 40 + 8);

/// Key of the per-reason drop counters.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct DropKey {
    pub reason: u32,
    /// [`IPPROTO_TCP`] or [`IPPROTO_UDP`].
    pub protocol: u32,
}

crate::impl_pod!(DropTpOffsets, DropConfig, DropEvent, DropKey);
