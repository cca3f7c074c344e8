//! TCP: retransmits (tcp/tcp_retransmit_skb, tcp/tcp_retransmit_synack) and
//! socket ownership from sock/inet_sock_set_state.

use bytemuck::{Pod, Zeroable};

use crate::{EventHeader, Owner, numbered_from_zero};

/// Kernel TCP states (include/net/tcp_states.h).
pub const TCP_ESTABLISHED: i32 = 1;
pub const TCP_SYN_SENT: i32 = 2;
pub const TCP_SYN_RECV: i32 = 3;
pub const TCP_CLOSE: i32 = 7;
pub const TCP_LISTEN: i32 = 10;

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
pub const IPPROTO_TCP: u16 = 6;

pub use crate::FIELD_ABSENT;

/// Offsets of the connection fields every TCP tracepoint carries
/// (`sport`, `dport`, `family`, `saddr`, `daddr`, `saddr_v6`, `daddr_v6`),
/// read from the tracepoint's format file at start-up because they move
/// between kernel versions.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct TupleOffsets {
    pub sport: u16,
    pub dport: u16,
    pub family: u16,
    pub saddr: u16,
    pub daddr: u16,
    pub saddr_v6: u16,
    pub daddr_v6: u16,
    pub _pad: u16,
}

/// Field offsets for one TCP tracepoint. `state` holds the socket's state
/// (tcp_retransmit_skb's `state`, which only exists since 4.16;
/// inet_sock_set_state's `newstate`); `req` is tcp_retransmit_synack's;
/// `oldstate` and `protocol` are inet_sock_set_state's. Fields a tracepoint
/// does not have are [`FIELD_ABSENT`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct TcpTpOffsets {
    pub tuple: TupleOffsets,
    pub skaddr: u16,
    pub req: u16,
    pub state: u16,
    pub oldstate: u16,
    pub protocol: u16,
    pub _pad: u16,
}
const _: () = assert!(size_of::<TcpTpOffsets>() == 28);

impl TcpTpOffsets {
    pub const ABSENT: Self = Self {
        tuple: TupleOffsets {
            sport: FIELD_ABSENT,
            dport: FIELD_ABSENT,
            family: FIELD_ABSENT,
            saddr: FIELD_ABSENT,
            daddr: FIELD_ABSENT,
            saddr_v6: FIELD_ABSENT,
            daddr_v6: FIELD_ABSENT,
            _pad: 0,
        },
        skaddr: FIELD_ABSENT,
        req: FIELD_ABSENT,
        state: FIELD_ABSENT,
        oldstate: FIELD_ABSENT,
        protocol: FIELD_ABSENT,
        _pad: 0,
    };

    /// Where inet_sock_set_state has kept its fields since 4.16 (the
    /// `protocol` field's arrival). The programs read a field whose offset
    /// matches its usual one straight from the record and fall back to a
    /// probe read otherwise (see the programs' `read`).
    pub const USUAL_SET_STATE: Self = Self {
        tuple: TupleOffsets {
            sport: 24,
            dport: 26,
            family: 28,
            saddr: 32,
            daddr: 36,
            saddr_v6: 40,
            daddr_v6: 56,
            _pad: 0,
        },
        skaddr: 8,
        req: FIELD_ABSENT,
        state: 20,
        oldstate: 16,
        protocol: 30,
        _pad: 0,
    };

    /// tcp_retransmit_skb since 4.16 (`state`); 6.x appended `err`, which
    /// moves nothing.
    pub const USUAL_RETRANSMIT_SKB: Self = Self {
        tuple: TupleOffsets {
            sport: 28,
            dport: 30,
            family: 32,
            saddr: 34,
            daddr: 38,
            saddr_v6: 42,
            daddr_v6: 58,
            _pad: 0,
        },
        skaddr: 16,
        req: FIELD_ABSENT,
        state: 24,
        oldstate: FIELD_ABSENT,
        protocol: FIELD_ABSENT,
        _pad: 0,
    };

    /// tcp_retransmit_synack since 4.16 (`family`).
    pub const USUAL_RETRANSMIT_SYNACK: Self = Self {
        tuple: TupleOffsets {
            sport: 24,
            dport: 26,
            family: 28,
            saddr: 30,
            daddr: 34,
            saddr_v6: 38,
            daddr_v6: 54,
            _pad: 0,
        },
        skaddr: 8,
        req: 16,
        state: FIELD_ABSENT,
        oldstate: FIELD_ABSENT,
        protocol: FIELD_ABSENT,
        _pad: 0,
    };
}

/// Most ports `--port` can name; the filter lives in the kernel.
pub const MAX_PORTS: usize = 8;

/// Configuration of the TCP programs, written into `.rodata` at load.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct TcpConfig {
    pub retransmit_skb: TcpTpOffsets,
    pub retransmit_synack: TcpTpOffsets,
    pub set_state: TcpTpOffsets,
    /// Byte offset of `skc_net` in `struct sock` (from the kernel's BTF), or
    /// 0 when unknown. It tells listeners of the same port in different
    /// network namespaces apart.
    pub sk_net_offset: u32,
    /// 0 = both families, else AF_INET or AF_INET6.
    pub family: u16,
    /// Number of valid entries in `ports` (0 = every port).
    pub nports: u16,
    /// Host byte order; matches the local or the remote port.
    pub ports: [u16; MAX_PORTS],
    /// Non-zero: send a [`TcpStateEvent`] for every state change (the `tcp`
    /// class); zero: only keep the socket map (owners for `retrans`).
    pub stream_states: u32,
    /// Byte offset of `skc_family` in `struct sock` (from the kernel's BTF),
    /// or 0 when not needed or unknown: where a tracepoint's record has no
    /// `family` (the retransmit tracepoints of 5.10), the socket's own
    /// family, which is what later kernels record there.
    pub sk_family_offset: u16,
    pub _pad: u16,
    /// Byte offset of the namespace's inode number in `struct net`
    /// (`net->ns.inum`, from the kernel's BTF), or 0 when unknown: then
    /// sockets carry no network namespace.
    pub net_inum_offset: u32,
    /// The sender's state read from the socket at each retransmit.
    pub retrans_sock: SockPlan,
    /// The connection's totals read from the socket when it closes (only
    /// while state changes are sent).
    pub close_sock: SockPlan,
    /// Where the BTF tracepoint entries read the connection from the
    /// socket; all zero when the BTF does not say (then the agent attaches
    /// the classic entries, which read it from the record).
    pub sock_conn: SockConnOffsets,
}
const _: () = assert!(
    size_of::<TcpConfig>()
        == 3 * 28 + 8 + 16 + 4 + 4 + 4 + 2 * size_of::<SockPlan>() + size_of::<SockConnOffsets>()
);

/// Where a BTF tracepoint entry, which gets the tracepoint's arguments and
/// no record, finds what the record would hold, from the kernel's BTF.
/// Offsets are from the start of a `struct sock_common`, which begins
/// `struct sock`, `struct inet_sock` and `struct request_sock`.
///
/// One read of [`SOCK_HEAD_LEN`] bytes at `head` (`skc_daddr`) holds the
/// IPv4 addresses, the ports, the family and the state, laid out as every
/// kernel has them (`SOCK_HEAD_*`; the agent checks the BTF agrees before
/// it attaches these entries); the IPv6 addresses are read only for IPv6
/// sockets. A full socket's local address and port are the `inet_sock`'s
/// (what the records hold), one more read of [`INET_LOCAL_LEN`] bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SockConnOffsets {
    pub head: u16,
    /// `skc_v6_daddr`, `skc_v6_rcv_saddr`.
    pub v6_daddr: u16,
    pub v6_rcv_saddr: u16,
    /// `sk_protocol` in `struct sock` (a 16-bit field since 5.6).
    pub protocol: u16,
    /// `inet_saddr` in `struct inet_sock`, where its local read starts.
    pub inet_saddr: u16,
    /// `inet_sport` (network order), from `inet_saddr`: an even byte
    /// within [`INET_LOCAL_LEN`].
    pub inet_sport_at: u16,
    pub _pad: [u16; 2],
}

/// Bytes read at [`SockConnOffsets::inet_saddr`]: three words (6.1 has
/// `inet_sport` 20 bytes after `inet_saddr`, 6.12 and later 8).
pub const INET_LOCAL_LEN: usize = 24;

/// Bytes read at [`SockConnOffsets::head`]: three words.
pub const SOCK_HEAD_LEN: usize = 24;
/// Where the head read holds `skc_daddr` (the remote IPv4 address),
/// `skc_rcv_saddr` (the local one), `skc_dport` (the remote port, network
/// order), `skc_num` (the local port, host order), `skc_family` and
/// `skc_state` (one byte).
pub const SOCK_HEAD_DADDR: u32 = 0;
pub const SOCK_HEAD_RCV_SADDR: u32 = 4;
pub const SOCK_HEAD_DPORT: u32 = 12;
pub const SOCK_HEAD_NUM: u32 = 14;
pub const SOCK_HEAD_FAMILY: u32 = 16;
pub const SOCK_HEAD_STATE: u32 = 18;
const _: () = assert!((SOCK_HEAD_STATE as usize) < SOCK_HEAD_LEN);

impl TcpConfig {
    pub const DEFAULT: Self = Self {
        retransmit_skb: TcpTpOffsets::ABSENT,
        retransmit_synack: TcpTpOffsets::ABSENT,
        set_state: TcpTpOffsets::ABSENT,
        sk_net_offset: 0,
        family: 0,
        nports: 0,
        ports: [0; MAX_PORTS],
        stream_states: 0,
        sk_family_offset: 0,
        _pad: 0,
        net_inum_offset: 0,
        retrans_sock: SockPlan::NONE,
        close_sock: SockPlan::NONE,
        sock_conn: SockConnOffsets {
            head: 0,
            v6_daddr: 0,
            v6_rcv_saddr: 0,
            protocol: 0,
            inet_saddr: 0,
            inet_sport_at: 0,
            _pad: [0; 2],
        },
    };

    /// Whether a connection with these ports passes the `--port` filter.
    #[inline(always)]
    pub fn port_allowed(&self, sport: u16, dport: u16) -> bool {
        if self.nports == 0 {
            return true;
        }
        let mut i = 0;
        while i < MAX_PORTS {
            if (i as u16) < self.nports && (self.ports[i] == sport || self.ports[i] == dport) {
                return true;
            }
            i += 1;
        }
        false
    }

    #[inline(always)]
    pub fn family_allowed(&self, family: u16) -> bool {
        self.family == 0 || self.family == family
    }
}

/// Most reads of one socket's memory per event: each covers one group of
/// nearby fields, so an event costs a few helper calls whatever the number
/// of fields.
pub const SOCK_READS: usize = 4;
/// Longest read, in bytes; a read lands at `i * SOCK_READ_LEN` of the
/// programs' scratch buffer.
pub const SOCK_READ_LEN: usize = 256;
/// The scratch buffer the reads land in.
pub const SOCK_SCRATCH: usize = SOCK_READS * SOCK_READ_LEN;

wire_enum! {
    /// The `struct tcp_sock` fields the programs can read, as indexes into
    /// [`SockFields::values`] and [`SockPlan::at`]. A plan reads a subset.
    pub enum SockField {
        /// `srtt_us`: smoothed RTT in microseconds, shifted left by 3.
        SrttUs,
        /// `mdev_us`: mean RTT deviation in microseconds, shifted left by 2.
        MdevUs,
        /// `snd_cwnd`, in segments.
        Cwnd,
        /// `snd_ssthresh`, in segments.
        Ssthresh,
        PacketsOut,
        LostOut,
        RetransOut,
        TotalRetrans,
        /// `rtt_min.s[0].v`: the windowed minimum RTT in microseconds.
        MinRttUs,
        BytesAcked,
        BytesReceived,
        SegsOut,
        SegsIn,
        /// The byte holding `chrono_type` (a 2-bit bitfield in older
        /// kernels, a u8 in 6.18): the agent shifts and masks it.
        ChronoType,
        /// `chrono_start`, jiffies.
        ChronoStart,
        /// `chrono_stat[0..3]`: jiffies busy, receive-window limited and
        /// send-buffer limited, not counting the running chronograph.
        ChronoBusy,
        ChronoRwnd,
        ChronoSndbuf,
    }
}

/// Number of [`SockField`]s.
pub const SOCK_FIELDS: usize = SockField::ALL.len();
// A field indexes arrays of SOCK_FIELDS entries and a u32 bit mask.
const _: () = assert!(numbered_from_zero(&SockField::VALUES) && SOCK_FIELDS <= 32);

/// One read of a socket's memory: `len` bytes (at most [`SOCK_READ_LEN`]; 0
/// = unused) from byte `start` of its `struct tcp_sock`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SockRead {
    pub start: u32,
    pub len: u32,
}

/// Which socket fields a program reads and how, from the kernel's BTF: the
/// reads, then where each field landed in the scratch buffer and its width.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct SockPlan {
    pub reads: [SockRead; SOCK_READS],
    /// Byte of the scratch buffer each field starts at, aligned to its
    /// width; [`FIELD_ABSENT`] when not read (the kernel lacks it, or the
    /// program does not need it).
    pub at: [u16; SOCK_FIELDS],
    /// Width of each field in bytes: 1, 4 or 8.
    pub width: [u8; SOCK_FIELDS],
    pub _pad: [u8; SOCK_PLAN_PAD],
}
const SOCK_PLAN_PAD: usize = (8 - (3 * SOCK_FIELDS) % 8) % 8;
const _: () = assert!(size_of::<SockPlan>().is_multiple_of(8));

impl SockPlan {
    /// Reads nothing.
    pub const NONE: Self = Self {
        reads: [SockRead { start: 0, len: 0 }; SOCK_READS],
        at: [FIELD_ABSENT; SOCK_FIELDS],
        width: [0; SOCK_FIELDS],
        _pad: [0; SOCK_PLAN_PAD],
    };
}

/// Socket fields read by a program, raw as the kernel keeps them.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct SockFields {
    /// By [`SockField`]; 0 unless its bit of `present` is set.
    pub values: [u64; SOCK_FIELDS],
    /// Bit `i` set: `values[i]` was read.
    pub present: u32,
    pub _pad: u32,
    /// The kernel's jiffies when they were read (`bpf_jiffies64`), which
    /// times the running chronograph; 0 when not needed.
    pub jiffies: u64,
}

impl SockFields {
    /// The field, when it was read.
    pub fn get(&self, field: SockField) -> Option<u64> {
        (self.present & (1 << field as u32) != 0).then_some(self.values[field as usize])
    }
}

/// A connection's addresses. `saddr`/`sport` are the local end. IPv4
/// addresses fill the first 4 bytes of the 16.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct TcpTuple {
    pub family: u16,
    pub sport: u16,
    pub dport: u16,
    pub _pad: u16,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
}
const _: () = assert!(size_of::<TcpTuple>() == 40);

/// What was retransmitted.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetransKind {
    /// A SYN of a connect() (socket in SYN_SENT).
    Syn = 0,
    /// A SYN-ACK of a listener (tcp_retransmit_synack).
    SynAck = 1,
    /// Anything else: data, FIN, window probes.
    Data = 2,
}

impl RetransKind {
    pub const fn from_u32(v: u32) -> Option<Self> {
        match v {
            0 => Some(Self::Syn),
            1 => Some(Self::SynAck),
            2 => Some(Self::Data),
            _ => None,
        }
    }
}

/// One retransmit.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct RetransEvent {
    pub header: EventHeader,
    /// Identifies the socket (or the request socket, for SYN-ACKs) while it
    /// lives; used by the agent as a cache key, never printed.
    pub sock_id: u64,
    pub owner: Owner,
    pub tuple: TcpTuple,
    /// Kernel TCP state (SYN_RECV for SYN-ACKs).
    pub state: i32,
    /// A [`RetransKind`] as u32.
    pub kind: u32,
    /// Retransmits of this connection the kernel programs counted so far,
    /// this one included.
    pub conn_retrans: u32,
    pub _pad: u32,
    /// The sender's state at the retransmit (data retransmits; a SYN-ACK's
    /// request socket has none, so nothing is read for it).
    pub sock: SockFields,
}
const _: () = assert!(size_of::<RetransEvent>() == 16 + 8 + 32 + 40 + 16 + size_of::<SockFields>());

/// Per-socket state kept in the kernel, keyed by the socket's address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SockInfo {
    pub owner: Owner,
    /// Retransmits counted so far.
    pub retrans: u32,
    /// A `ROLE_*` value.
    pub role: u32,
    /// When the programs first saw the socket (monotonic ns; 0 = unknown).
    pub created_ns: u64,
    /// When it entered its current state (monotonic ns; 0 = unknown).
    pub state_since_ns: u64,
    /// An accepted socket's network namespace (its inode number, as
    /// /proc/PID/ns/net shows it; 0 when unknown or not accepted): with its
    /// local port it names the listener it came from.
    pub net: u64,
}
const _: () = assert!(size_of::<SockInfo>() == 64);

/// How a socket came to be, as far as the programs saw.
pub const ROLE_UNKNOWN: u32 = 0;
/// connect(): CLOSE -> SYN_SENT.
pub const ROLE_ACTIVE: u32 = 1;
/// Accepted: cloned from a listener, LISTEN -> SYN_RECV.
pub const ROLE_PASSIVE: u32 = 2;
/// listen(): CLOSE -> LISTEN.
pub const ROLE_LISTENER: u32 = 3;

/// `TcpStateEvent::flags`: `old_state_ns` is known.
pub const STATE_TIME_KNOWN: u32 = 1;

/// One TCP state change (sock/inet_sock_set_state), with what the programs
/// know of the socket at that moment.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct TcpStateEvent {
    pub header: EventHeader,
    /// Identifies the socket while it lives; never printed.
    pub sock_id: u64,
    pub owner: Owner,
    pub tuple: TcpTuple,
    pub oldstate: i32,
    pub newstate: i32,
    /// Time spent in `oldstate`, valid when `flags & STATE_TIME_KNOWN`.
    pub old_state_ns: u64,
    /// When the socket was first seen (0 = unknown).
    pub created_ns: u64,
    /// Retransmits of this socket so far.
    pub retrans: u32,
    pub role: u32,
    pub flags: u32,
    pub _pad: u32,
    /// The network namespace (inode number) of an accepted socket, and of
    /// a listener at its close; else 0. With the local port it identifies
    /// the listener, for owners the programs did not see at listen().
    pub net: u64,
}
const _: () = assert!(size_of::<TcpStateEvent>() == 16 + 8 + 32 + 40 + 8 + 8 + 8 + 16 + 8);

/// A state change into CLOSE, of a socket that was not a listener, while
/// state changes are sent: the change (its header says `TcpConn`) and the
/// connection's totals read from the socket at that moment.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct TcpCloseEvent {
    pub state: TcpStateEvent,
    pub sock: SockFields,
}

/// Key of the listener map: a listening address and port within one
/// network namespace.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct ListenerKey {
    /// The namespace's inode number (0 when its offsets are unknown).
    pub net: u64,
    pub port: u16,
    pub family: u16,
    pub _pad: [u8; 4],
    /// The bound address; all zero for any address.
    pub addr: [u8; 16],
}
const _: () = assert!(size_of::<ListenerKey>() == 32);

/// Listeners of one key followed at once: an SO_REUSEPORT group, or one
/// address and port bound by several processes in turn.
pub const LISTENER_SLOTS: usize = 4;

/// One listener of a [`ListenerKey`]: its socket (0 = a free slot) and owner.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct ListenerSlot {
    pub sk: u64,
    pub owner: Owner,
}

/// Value of the listener map: the listeners of one key. Their children
/// inherit the first one's owner: the kernel does not say which member of
/// an SO_REUSEPORT group accepted a connection where the programs run.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Listeners {
    pub slots: [ListenerSlot; LISTENER_SLOTS],
}

crate::impl_pod!(
    TupleOffsets,
    TcpTpOffsets,
    TcpConfig,
    SockConnOffsets,
    TcpTuple,
    RetransEvent,
    TcpStateEvent,
    TcpCloseEvent,
    SockRead,
    SockPlan,
    SockFields,
    SockInfo,
    ListenerKey,
    ListenerSlot,
    Listeners
);
