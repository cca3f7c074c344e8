//! TCP programs.
//!
//! Retransmits fire from the retransmit timer (softirq) or from the receive
//! path, where the current task has nothing to do with the socket. So the
//! owner is captured where the kernel runs in the owner's context: connect()
//! (CLOSE -> SYN_SENT) and listen() (CLOSE -> LISTEN), both seen through
//! sock/inet_sock_set_state. Accepted children are created in softirq, from
//! their listener (LISTEN -> SYN_RECV, inet_csk_clone_lock), and inherit the
//! listener's owner through the listener map. Sockets created before the
//! agent started are resolved by the agent from /proc.
//!
//! inet_sock_set_state and the two retransmit tracepoints each have two
//! entries around one body, as the softirq programs do: a BTF tracepoint
//! (tp_btf), which gets the tracepoint's arguments and reads the
//! connection from the socket they point to, and a classic tracepoint,
//! which reads it from the trace record the kernel filled, the fallback.
//! The bodies are generic over where the connection comes from ([`Conn`]).
//! Besides costing no record, a BTF tracepoint program is skipped only
//! while it runs itself on the CPU (a per-program guard), not whenever any
//! tracing program runs there (the classic tracepoints' one per-CPU guard,
//! `bpf_prog_active`): a state change in a softirq taken while another of
//! kdiag's programs (or another tool's) runs is seen. One taken while
//! inet_sock_set_state itself runs on that CPU is still skipped, and
//! under loopback churn that is most of them (docs/BENCHMARKS.md): those
//! closes come from tcp_destroy_sock.
//!
//! Scratch slots. Several programs build their events in per-CPU arrays
//! (too big for the stack). Different programs can run one in the middle
//! of another on a CPU: a BTF or raw tracepoint program in a softirq run
//! on the way out of an interrupt taken in the middle of another one
//! (inet_sock_set_state in a process's connect() interrupted by a
//! retransmit timer, or tcp_retransmit_skb sending from a process
//! interrupted by a SYN-ACK timer). So every slot has one program as its
//! only user ([`Scratch`]): a slot shared by two programs could be
//! overwritten by one in the middle of the other's event. One program can
//! run in the middle of itself too where the kernel does not guard BTF
//! and raw tracepoint programs against it (kernels without "bpf: Prevent
//! bpf program recursion for raw tracepoint probes", from 2022 and
//! backported to 6.1 stable; Debian's 5.10 does not have it): a process's
//! close() changing its socket's state, interrupted, and the softirq on
//! the interrupt's way out changing another socket's. There the inner run
//! would overwrite the outer run's event (one change written twice,
//! another lost), so each user has a slot per nesting level ([`Slot`]).
//! Classic tracepoint programs never nest at all (`bpf_prog_active`).
//! The socket map's values are updated under the socket's lock, which a
//! nested program never holds for the same socket (a softirq that finds
//! the socket owned by a process defers its work to the process).

use core::{ffi::c_void, marker::PhantomData, mem::MaybeUninit};

use aya_ebpf::{
    EbpfContext,
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_ktime_get_ns,
        bpf_probe_read_kernel, generated as helper,
    },
    macros::{btf_tracepoint, map, raw_tracepoint, tracepoint},
    maps::{LruHashMap, PerCpuArray},
    programs::{BtfTracePointContext, RawTracePointContext, TracePointContext},
};
use kdiag_common::{
    COMM_LEN, ClassId, EventKind, LOSS_MAP_FULL, LOSS_PARTIAL, Owner,
    cost::ProgramId,
    tcp::{
        AF_INET, AF_INET6, FIELD_ABSENT, INET_LOCAL_LEN, IPPROTO_TCP, LISTENER_SLOTS, ListenerKey,
        Listeners, ROLE_ACTIVE, ROLE_LISTENER, ROLE_PASSIVE, ROLE_UNKNOWN, RetransEvent,
        RetransKind, SOCK_FIELDS, SOCK_HEAD_DADDR, SOCK_HEAD_DPORT, SOCK_HEAD_FAMILY,
        SOCK_HEAD_LEN, SOCK_HEAD_NUM, SOCK_HEAD_RCV_SADDR, SOCK_HEAD_STATE, SOCK_READ_LEN,
        SOCK_READS, SOCK_SCRATCH, STATE_TIME_KNOWN, SockFields, SockInfo, SockPlan, TCP_CLOSE,
        TCP_LISTEN, TCP_SYN_RECV, TCP_SYN_SENT, TcpCloseEvent, TcpConfig, TcpStateEvent,
        TcpTpOffsets, TcpTuple,
    },
};

use crate::{
    cost::measured,
    ctx, mem,
    output::{count_loss, counted, emit, header, header_at},
    rodata::rodata,
};

// A zeroed SockInfo is a socket the programs know nothing of.
const _: () = assert!(ROLE_UNKNOWN == 0);

/// Offsets and filters, written by the agent at load.
#[unsafe(no_mangle)]
static TCP_CONFIG: TcpConfig = TcpConfig::DEFAULT;

/// Socket address -> owner and per-connection counters. LRU, so sockets
/// whose close we never see (agent started late, map full) age out instead
/// of filling it.
/// One entry in the object: the agent sizes it at load for the classes that
/// run (see `Class::map_sizes`), and leaves it this small for the others.
#[map]
pub(crate) static SOCKS: LruHashMap<u64, SockInfo> = LruHashMap::with_max_entries(1, 0);

/// (network namespace, address, port) of each listener -> the listeners
/// bound there and their owners, handed to the children they accept.
/// One entry in the object: the agent sizes it at load for the classes that
/// run (see `Class::map_sizes`), and leaves it this small for the others.
#[map]
static LISTENERS: LruHashMap<ListenerKey, Listeners> = LruHashMap::with_max_entries(1, 0);

/// Scratch space for a new `LISTENERS` value (too big for the stack beside
/// the rest). Only listen(), in process context, fills it: never nested.
#[map]
static LISTENERS_NEW: PerCpuArray<Listeners> = PerCpuArray::with_max_entries(1, 0);

/// Scratch space for building a state-change event, and at a close the
/// connection's totals after it: one per nesting level.
#[map]
static STATE_EVENT: PerCpuArray<TcpCloseEvent> = PerCpuArray::with_max_entries(NESTING_LEVELS, 0);

/// Users of the per-CPU scratch slots shared by several programs: one slot
/// each, indexed by this (see the module comment on nesting).
#[derive(Clone, Copy)]
#[repr(u32)]
enum Scratch {
    SetState,
    RetransmitSkb,
    RetransmitSynack,
}
const SCRATCH_USERS: u32 = 3;

/// How deep a program can run in the middle of itself on a CPU (see the
/// module comment): in process context, then in a softirq, which never
/// nests further (the TCP tracepoints do not fire in hard interrupts).
const NESTING_LEVELS: u32 = 2;

/// Per user, how many of its runs are under way on this CPU.
#[map]
static NESTING: PerCpuArray<u32> = PerCpuArray::with_max_entries(SCRATCH_USERS, 0);

/// A scratch user's slots at one nesting level.
#[derive(Clone, Copy)]
struct Slot {
    user: Scratch,
    level: u32,
}

impl Slot {
    /// Index in the arrays with a slot per user and level.
    #[inline(always)]
    fn index(self) -> u32 {
        self.user as u32 * NESTING_LEVELS + self.level
    }
}

/// Runs `body` with this CPU's slots of `user` at the nesting level of
/// this run. A run deeper than [`NESTING_LEVELS`] (never seen) fails, and
/// is counted as its class's `failed`.
#[inline(always)]
fn nested(user: Scratch, body: impl FnOnce(Slot) -> Result<u32, i64>) -> Result<u32, i64> {
    let depth = NESTING.get_ptr_mut(user as u32).ok_or(-1i64)?;
    // SAFETY: this CPU's counter. Plain updates: a run in the middle of
    // this one ends before this one goes on, and leaves it as it found it.
    let level = unsafe { *depth };
    if level >= NESTING_LEVELS {
        return Err(-1);
    }
    // Volatile: the body's runs in the middle of this one must see it,
    // though this run stores over it again before reading it.
    // SAFETY: as above.
    unsafe { core::ptr::write_volatile(depth, level + 1) };
    let result = body(Slot { user, level });
    // SAFETY: as above.
    unsafe { *depth = level };
    result
}

/// Scratch space for building a retransmit event (with the socket's fields
/// it is too big for the stack), per retransmit program and nesting level
/// ([`Slot::index`]).
#[map]
static RETRANS_EVENT: PerCpuArray<RetransEvent> =
    PerCpuArray::with_max_entries(SCRATCH_USERS * NESTING_LEVELS, 0);

/// Where the reads of a socket's memory land: read `i` at byte
/// `i * SOCK_READ_LEN`. Words, so that every field the agent placed at a
/// multiple of its width is aligned. Per program reading sockets and
/// nesting level ([`Slot::index`]).
#[map]
static SOCK_BUF: PerCpuArray<[u64; SOCK_SCRATCH / 8]> =
    PerCpuArray::with_max_entries(SCRATCH_USERS * NESTING_LEVELS, 0);

/// Request socket address -> SYN-ACK retransmits so far. Request sockets
/// have no close event; LRU bounds them.
/// One entry in the object: the agent sizes it at load for the classes that
/// run (see `Class::map_sizes`), and leaves it this small for the others.
#[map]
static SYNACK_RETRANS: LruHashMap<u64, u32> = LruHashMap::with_max_entries(1, 0);

#[inline(always)]
fn config() -> &'static TcpConfig {
    rodata(&TCP_CONFIG)
}

/// A TCP tracepoint's record layout: where the agent found its fields
/// (in the configuration) and where they usually are. The usual offsets
/// are constants, not values behind a reference, so that a field read
/// there is a context load at an offset fixed in the instruction, the only
/// kind the verifier allows (see `ctx::field`).
trait Layout {
    const USUAL: TcpTpOffsets;
    fn offsets() -> &'static TcpTpOffsets;
}

struct SetState;
impl Layout for SetState {
    const USUAL: TcpTpOffsets = TcpTpOffsets::USUAL_SET_STATE;
    #[inline(always)]
    fn offsets() -> &'static TcpTpOffsets {
        &config().set_state
    }
}

struct RetransmitSkb;
impl Layout for RetransmitSkb {
    const USUAL: TcpTpOffsets = TcpTpOffsets::USUAL_RETRANSMIT_SKB;
    #[inline(always)]
    fn offsets() -> &'static TcpTpOffsets {
        &config().retransmit_skb
    }
}

struct RetransmitSynack;
impl Layout for RetransmitSynack {
    const USUAL: TcpTpOffsets = TcpTpOffsets::USUAL_RETRANSMIT_SYNACK;
    #[inline(always)]
    fn offsets() -> &'static TcpTpOffsets {
        &config().retransmit_synack
    }
}

/// One field of a record: `field!(ctx, L, path)` reads `path` of layout
/// `L`.
macro_rules! field {
    ($ctx:expr, $layout:ty, $($path:ident).+) => {
        ctx::field($ctx, <$layout>::offsets().$($path).+, <$layout>::USUAL.$($path).+)
    };
}

/// A connection's fields where a program finds them: in its classic
/// tracepoint's record ([`Record`]) or in the socket itself ([`SockConn`],
/// for the BTF tracepoint entries). Read in the order the bodies need
/// them, so that a connection filtered out by family or port costs no
/// address read.
trait Conn {
    fn family(&self) -> Result<u16, i64>;
    /// Local and remote port, host order.
    fn ports(&self) -> Result<(u16, u16), i64>;
    /// Fills in `tuple`'s addresses, of its family; false for a family
    /// other than IPv4 and IPv6.
    fn addrs(&self, tuple: &mut TcpTuple) -> Result<bool, i64>;
    /// The socket's TCP state (tcp_retransmit_skb's `state`), 0 when
    /// unknown.
    fn state(&self) -> i32;
}

/// The connection fields of a classic tracepoint's record, of layout `L`.
struct Record<'a, L> {
    ctx: &'a TracePointContext,
    /// The socket whose family stands in for a record without `family`
    /// (the retransmit tracepoints of 5.10).
    sk: u64,
    layout: PhantomData<L>,
}

impl<'a, L: Layout> Record<'a, L> {
    #[inline(always)]
    fn new(ctx: &'a TracePointContext, sk: u64) -> Self {
        Self {
            ctx,
            sk,
            layout: PhantomData,
        }
    }
}

impl<L: Layout> Conn for Record<'_, L> {
    #[inline(always)]
    fn family(&self) -> Result<u16, i64> {
        if L::offsets().tuple.family == FIELD_ABSENT {
            sock_family(config(), self.sk)
        } else {
            field!(self.ctx, L, tuple.family)
        }
    }

    #[inline(always)]
    fn ports(&self) -> Result<(u16, u16), i64> {
        Ok((
            field!(self.ctx, L, tuple.sport)?,
            field!(self.ctx, L, tuple.dport)?,
        ))
    }

    #[inline(always)]
    fn addrs(&self, tuple: &mut TcpTuple) -> Result<bool, i64> {
        let o = &L::offsets().tuple;
        match tuple.family {
            AF_INET => {
                let s = read_addr4(self.ctx, o.saddr, L::USUAL.tuple.saddr)?;
                let d = read_addr4(self.ctx, o.daddr, L::USUAL.tuple.daddr)?;
                tuple.saddr[..4].copy_from_slice(&s);
                tuple.daddr[..4].copy_from_slice(&d);
            }
            AF_INET6 => {
                // Probe reads: 16 bytes in one helper call.
                tuple.saddr = ctx::field(self.ctx, o.saddr_v6, FIELD_ABSENT)?;
                tuple.daddr = ctx::field(self.ctx, o.daddr_v6, FIELD_ABSENT)?;
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    #[inline(always)]
    fn state(&self) -> i32 {
        // `state` exists since 4.16; without it every retransmit is "data".
        field!(self.ctx, L, state).unwrap_or(0)
    }
}

/// An IPv4 address field (`__u8[4]`, only 2-byte aligned in some records):
/// two 2-byte loads where it usually is (see `ctx::field` on arrays), one
/// probe read elsewhere.
#[inline(always)]
fn read_addr4(ctx: &TracePointContext, offset: u16, usual: u16) -> Result<[u8; 4], i64> {
    if offset != usual {
        return ctx::field(ctx, offset, FIELD_ABSENT);
    }
    let lo: u16 = ctx::field(ctx, usual, usual)?;
    let hi: u16 = ctx::field(ctx, usual + 2, usual + 2)?;
    let (lo, hi) = (lo.to_ne_bytes(), hi.to_ne_bytes());
    Ok([lo[0], lo[1], hi[0], hi[1]])
}

/// The connection fields of a socket or a request socket, at the offsets
/// the agent took from the kernel's BTF: what the tracepoints copy into
/// their records. The head of its `struct sock_common` (addresses, ports,
/// family, state) is read in one helper call.
///
/// A full socket's local address and port are read from its `inet_sock`
/// (`inet_saddr`, `inet_sport`), as the records have them: `skc_num` and
/// `skc_rcv_saddr` do not always agree with them (a change to CLOSE is
/// traced after the port is released, which zeroes `skc_num`). A request
/// socket has only its `sock_common`, whose `skc_num` and `skc_rcv_saddr`
/// are what tcp_retransmit_synack records. `skc_num` is host order,
/// `skc_dport` and `inet_sport` network order.
struct SockConn {
    /// The three words at `SockConnOffsets::head`.
    head: [u64; SOCK_HEAD_LEN / 8],
    /// Local IPv4 address (network order, as it lies) and port.
    saddr: u32,
    sport: u16,
    /// The `struct sock_common`, for the IPv6 addresses.
    sk: u64,
}

impl SockConn {
    /// A full socket's (`struct sock`, an `inet_sock`).
    #[inline(always)]
    fn read(sk: u64) -> Result<Self, i64> {
        let mut conn = Self::read_head(sk)?;
        let offsets = &config().sock_conn;
        let at = u64::from(offsets.inet_saddr);
        // SAFETY: probe read of kernel memory; a fault returns an error.
        let local = unsafe { bpf_probe_read_kernel((sk + at) as *const [u64; INET_LOCAL_LEN / 8]) }
            .map_err(i64::from)?;
        let sport_at = u32::from(offsets.inet_sport_at);
        // The agent checked that the port lies within the read.
        let word = match sport_at / 8 {
            0 => local[0],
            1 => local[1],
            _ => local[2],
        };
        conn.saddr = local[0] as u32;
        conn.sport = u16::from_be((word >> ((sport_at % 8) * 8)) as u16);
        Ok(conn)
    }

    /// A request socket's (`struct request_sock`).
    #[inline(always)]
    fn read_request(req: u64) -> Result<Self, i64> {
        Self::read_head(req)
    }

    /// The head, with the local address and port of `sock_common`.
    #[inline(always)]
    fn read_head(sk: u64) -> Result<Self, i64> {
        let at = u64::from(config().sock_conn.head);
        // SAFETY: probe read of kernel memory; a fault returns an error.
        let head = unsafe { bpf_probe_read_kernel((sk + at) as *const [u64; SOCK_HEAD_LEN / 8]) }
            .map_err(i64::from)?;
        let mut conn = Self {
            head,
            saddr: 0,
            sport: 0,
            sk,
        };
        conn.saddr = conn.at(SOCK_HEAD_RCV_SADDR, 32) as u32;
        conn.sport = conn.at(SOCK_HEAD_NUM, 16) as u16;
        Ok(conn)
    }

    /// The `bits`-bit field at byte `at` of the head (the target is
    /// little-endian; the fields do not cross a word).
    #[inline(always)]
    fn at(&self, at: u32, bits: u32) -> u64 {
        (self.head[(at / 8) as usize] >> ((at % 8) * 8)) & ((1 << bits) - 1)
    }

    /// The IPv6 address at `offset` of the socket.
    #[inline(always)]
    fn addr6(&self, offset: u16) -> Result<[u8; 16], i64> {
        // SAFETY: probe read of kernel memory; a fault returns an error.
        unsafe { bpf_probe_read_kernel((self.sk + u64::from(offset)) as *const [u8; 16]) }
            .map_err(i64::from)
    }
}

impl Conn for SockConn {
    #[inline(always)]
    fn family(&self) -> Result<u16, i64> {
        Ok(self.at(SOCK_HEAD_FAMILY, 16) as u16)
    }

    #[inline(always)]
    fn ports(&self) -> Result<(u16, u16), i64> {
        let dport = u16::from_be(self.at(SOCK_HEAD_DPORT, 16) as u16);
        Ok((self.sport, dport))
    }

    #[inline(always)]
    fn addrs(&self, tuple: &mut TcpTuple) -> Result<bool, i64> {
        match tuple.family {
            AF_INET => {
                // Network order in memory: the bytes as they lie.
                let d = (self.at(SOCK_HEAD_DADDR, 32) as u32).to_ne_bytes();
                tuple.saddr[..4].copy_from_slice(&self.saddr.to_ne_bytes());
                tuple.daddr[..4].copy_from_slice(&d);
            }
            AF_INET6 => {
                let offsets = &config().sock_conn;
                tuple.saddr = self.addr6(offsets.v6_rcv_saddr)?;
                tuple.daddr = self.addr6(offsets.v6_daddr)?;
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    #[inline(always)]
    fn state(&self) -> i32 {
        self.at(SOCK_HEAD_STATE, 8) as i32
    }
}

/// The connection of `conn`, after the family and port filters. `None`:
/// filtered out.
#[inline(always)]
fn read_tuple(cfg: &TcpConfig, conn: &impl Conn) -> Result<Option<TcpTuple>, i64> {
    let family = conn.family()?;
    let (sport, dport) = conn.ports()?;
    if !cfg.family_allowed(family) || !cfg.port_allowed(sport, dport) {
        return Ok(None);
    }
    let mut tuple = TcpTuple {
        family,
        sport,
        dport,
        ..TcpTuple::default()
    };
    Ok(conn.addrs(&mut tuple)?.then_some(tuple))
}

/// Writes the current task into `dst` as a socket owner. Only meaningful
/// in process context.
///
/// # Safety
/// `dst` must be valid for an `Owner`.
#[inline(always)]
unsafe fn current_owner(dst: *mut Owner) {
    // SAFETY: per the caller; the helpers take no pointer but the comm
    // buffer, which is `dst`'s and COMM_LEN bytes long (on failure the
    // kernel zeroes it).
    unsafe {
        (*dst).tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
        (*dst).known = 1;
        (*dst).cgroup_id = bpf_get_current_cgroup_id();
        helper::bpf_get_current_comm((&raw mut (*dst).comm).cast(), COMM_LEN as u32);
    }
}

/// The inode number of the network namespace a socket belongs to
/// (`sk->__sk_common.skc_net.net->ns.inum`), or 0 when the offsets are
/// unknown: then listeners are keyed by address and port only.
#[inline(always)]
fn sock_net(cfg: &TcpConfig, sk: u64) -> u64 {
    if cfg.sk_net_offset == 0 || cfg.net_inum_offset == 0 {
        return 0;
    }
    // SAFETY: probe reads of kernel memory; a fault returns an error.
    let net = unsafe { bpf_probe_read_kernel((sk + u64::from(cfg.sk_net_offset)) as *const u64) }
        .unwrap_or(0);
    if net == 0 {
        return 0;
    }
    // SAFETY: as above.
    unsafe { bpf_probe_read_kernel((net + u64::from(cfg.net_inum_offset)) as *const u32) }
        .map_or(0, u64::from)
}

/// The family of socket `sk` (`sk->__sk_common.skc_family`), for records
/// without a `family` field; an error when the agent found no offset.
#[inline(always)]
fn sock_family(cfg: &TcpConfig, sk: u64) -> Result<u16, i64> {
    if cfg.sk_family_offset == 0 {
        return Err(-1);
    }
    // SAFETY: probe read of kernel memory; a fault returns an error.
    unsafe { bpf_probe_read_kernel((sk + u64::from(cfg.sk_family_offset)) as *const u16) }
        .map_err(i64::from)
}

/// A state change as an entry reads it. The rest matters only when
/// `protocol` is TCP: the tracepoint fires for every inet protocol with
/// states (DCCP, SCTP, MPTCP too).
struct StateChange {
    protocol: u16,
    sk: u64,
    oldstate: i32,
    newstate: i32,
}

#[btf_tracepoint(function = "inet_sock_set_state")]
pub(crate) fn inet_sock_set_state_btf(ctx: BtfTracePointContext) -> u32 {
    measured(ProgramId::InetSockSetState, || {
        counted(
            ClassId::Tcp,
            nested(Scratch::SetState, |slot| {
                try_inet_sock_set_state(&ctx, arg_change(&ctx), SockConn::read, slot)
            }),
        )
    })
}

#[tracepoint]
pub(crate) fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    measured(ProgramId::InetSockSetState, || {
        counted(
            ClassId::Tcp,
            nested(Scratch::SetState, |slot| {
                try_inet_sock_set_state(
                    &ctx,
                    record_change(&ctx),
                    |sk| Ok(Record::<SetState>::new(&ctx, sk)),
                    slot,
                )
            }),
        )
    })
}

/// The BTF tracepoint's arguments (`TP_PROTO(const struct sock *sk, const
/// int oldstate, const int newstate)`, include/trace/events/sock.h) and the
/// socket's protocol.
#[inline(always)]
fn arg_change(ctx: &BtfTracePointContext) -> Result<StateChange, i64> {
    let sk: u64 = ctx.arg(0);
    if sk == 0 {
        // Never from the kernel; checked so that the verifier knows the
        // pointer is not null where it is offset.
        return Err(-1);
    }
    let at = u64::from(config().sock_conn.protocol);
    // SAFETY: probe read of kernel memory; a fault returns an error.
    let protocol = unsafe { bpf_probe_read_kernel((sk + at) as *const u16) }.map_err(i64::from)?;
    Ok(StateChange {
        protocol,
        sk,
        oldstate: ctx.arg(1),
        newstate: ctx.arg(2),
    })
}

/// The classic tracepoint's record of the change.
#[inline(always)]
fn record_change(ctx: &TracePointContext) -> Result<StateChange, i64> {
    Ok(StateChange {
        protocol: field!(ctx, SetState, protocol)?,
        sk: field!(ctx, SetState, skaddr)?,
        oldstate: field!(ctx, SetState, oldstate)?,
        newstate: field!(ctx, SetState, state)?,
    })
}

/// The body of both entries: `conn(sk)` reads the socket's connection
/// fields, only where they are needed (listeners, and the event sent);
/// the event is built in `slot`.
#[inline(always)]
fn try_inet_sock_set_state<C: EbpfContext, F: Conn>(
    ctx: &C,
    change: Result<StateChange, i64>,
    conn: impl Fn(u64) -> Result<F, i64>,
    slot: Slot,
) -> Result<u32, i64> {
    let cfg = config();
    let StateChange {
        protocol,
        sk,
        oldstate,
        newstate,
    } = change?;
    if protocol != IPPROTO_TCP {
        return Ok(0);
    }
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    // The event is built in a per-CPU slot: with the socket's state beside
    // it, it would not fit the 512-byte stack.
    let close = STATE_EVENT.get_ptr_mut(slot.level).ok_or(-1i64)?;
    // SAFETY: this CPU's slot of this program at this run's nesting level
    // (see the module comment), so nothing else uses it until this run
    // returns.
    let close = unsafe { &mut *close };
    let event = &mut close.state;

    // Ownership is tracked for every TCP socket, whatever the filters: they
    // apply to what is reported, and cost more here than they save.
    let since = if record_birth(&conn, cfg, sk, oldstate, newstate, now, event)? {
        // Born with this change: the state it leaves was not timed.
        0
    } else {
        // Take what we knew of the socket before this change, and the time
        // it spent in the state it leaves. State changes of one socket
        // happen under its lock, so these plain updates do not race.
        match SOCKS.get_ptr_mut(sk) {
            Some(p) => {
                // SAFETY: a live map value.
                unsafe {
                    take_sock_info(event, p);
                    let since = (*p).state_since_ns;
                    (*p).state_since_ns = now;
                    since
                }
            }
            None => {
                // A socket from before the agent started: unknown owner,
                // role and start (all zero), its states timed from here on.
                let mut info = MaybeUninit::<SockInfo>::uninit();
                let info = info.as_mut_ptr();
                // SAFETY: a stack slot for a SockInfo, all zero but its
                // state time.
                unsafe {
                    mem::zero(info);
                    (*info).state_since_ns = now;
                    take_sock_info(event, info);
                    if newstate != TCP_CLOSE && SOCKS.insert(sk, &*info, 0).is_err() {
                        count_loss(ClassId::Tcp, LOSS_MAP_FULL);
                    }
                }
                0
            }
        }
    };
    if newstate == TCP_CLOSE {
        if oldstate == TCP_LISTEN {
            let key = listener_key(&conn(sk)?, cfg, sk)?;
            // The agent forgets what it learnt of this listener.
            event.net = key.net;
            forget_listener(&key, sk);
        }
        let _ = SOCKS.remove(sk);
    }
    if cfg.stream_states == 0 {
        return Ok(0);
    }
    let Some(tuple) = read_tuple(cfg, &conn(sk)?)? else {
        return Ok(0);
    };
    // Stamped with the clock read that timed the states, so that a closed
    // connection's state times add up exactly to its duration (both are
    // differences of these reads).
    event.header = header_at(EventKind::TcpState, now);
    event.sock_id = sk;
    event.tuple = tuple;
    event.oldstate = oldstate;
    event.newstate = newstate;
    event.old_state_ns = now.saturating_sub(since);
    event.flags = if since != 0 { STATE_TIME_KNOWN } else { 0 };
    event._pad = 0;
    if newstate == TCP_CLOSE && oldstate != TCP_LISTEN {
        // The connection's end: its totals, read here and only here so
        // that the other state changes cost nothing more. The tracepoint
        // fires on entry to tcp_set_state, before tcp_done or
        // tcp_disconnect clear anything.
        event.header.kind = EventKind::TcpConn as u32;
        read_sock(sk, &cfg.close_sock, &mut close.sock, ClassId::Tcp, slot);
        // SAFETY: helper without arguments.
        close.sock.jiffies = unsafe { helper::bpf_jiffies64() };
        emit(ctx, ClassId::Tcp, close);
    } else {
        emit(ctx, ClassId::Tcp, event);
    }
    Ok(0)
}

/// Reads the fields `plan` names from socket `sk` into `out`: one probe read
/// per group of nearby fields (the agent grouped them), then each field
/// picked from the buffer. A failed read leaves its fields out of `out`
/// and counts the event as partial for `class`. `slot`: the run's slot of
/// the buffer.
#[inline(always)]
fn read_sock(sk: u64, plan: &SockPlan, out: &mut SockFields, class: ClassId, slot: Slot) {
    out.present = 0;
    out._pad = 0;
    out.jiffies = 0;
    let Some(buf) = SOCK_BUF.get_ptr_mut(slot.index()) else {
        out.values = [0; SOCK_FIELDS];
        count_loss(class, LOSS_PARTIAL);
        return;
    };
    let buf = buf.cast::<u8>();
    // Bit `i`: read `i` failed.
    let mut failed = 0u32;
    let mut i = 0;
    while i < SOCK_READS {
        let read = &plan.reads[i];
        let len = read.len;
        if len as usize > SOCK_READ_LEN {
            failed |= 1 << i;
        } else if len != 0 {
            // SAFETY: `len` bytes fit the buffer's i-th slice; the probe
            // read returns an error rather than fault on a bad address.
            let ret = unsafe {
                helper::bpf_probe_read_kernel(
                    buf.add(i * SOCK_READ_LEN).cast::<c_void>(),
                    len,
                    (sk + u64::from(read.start)) as *const c_void,
                )
            };
            // The helper returns 0 or a negative error: the sign bit is
            // the failure, taken without a branch. With a branch per read
            // the verifier would know `failed` exactly on each of its
            // 2^SOCK_READS paths and check the field loop below once per
            // value (a third of this program's verification).
            failed |= ((ret as u64 >> 63) as u32) << i;
        }
        i += 1;
    }
    let mut f = 0;
    while f < SOCK_FIELDS {
        let at = usize::from(plan.at[f]);
        out.values[f] = 0;
        if at <= SOCK_SCRATCH - 8 && failed & (1 << (at / SOCK_READ_LEN)) == 0 {
            // SAFETY: inside the buffer (checked just above), at a multiple
            // of the field's width (the agent placed it so).
            out.values[f] = unsafe {
                let p = buf.add(at);
                match plan.width[f] {
                    1 => u64::from(*p),
                    4 => u64::from(*p.cast::<u32>()),
                    _ => *p.cast::<u64>(),
                }
            };
            out.present |= 1 << f;
        }
        f += 1;
    }
    if failed != 0 {
        count_loss(class, LOSS_PARTIAL);
    }
}

/// Enters sockets born with this state change in the socket map, with their
/// owner: connect(), listen(), and children cloned from a listener. For
/// those, fills `event`'s socket fields as the map lookup would (saving
/// it) and returns true.
#[inline(always)]
fn record_birth<F: Conn>(
    conn: &impl Fn(u64) -> Result<F, i64>,
    cfg: &TcpConfig,
    sk: u64,
    oldstate: i32,
    newstate: i32,
    now: u64,
    event: &mut TcpStateEvent,
) -> Result<bool, i64> {
    let role = match newstate {
        TCP_SYN_SENT => ROLE_ACTIVE,
        TCP_LISTEN => ROLE_LISTENER,
        TCP_SYN_RECV if oldstate == TCP_LISTEN => ROLE_PASSIVE,
        _ => return Ok(false),
    };
    let mut info = MaybeUninit::<SockInfo>::uninit();
    let info = info.as_mut_ptr();
    // SAFETY: a stack slot for a SockInfo; all zero is a valid one.
    unsafe {
        mem::zero(info);
        (*info).role = role;
        (*info).created_ns = now;
        (*info).state_since_ns = now;
    }
    // SAFETY: a field of that slot.
    let owner = unsafe { &raw mut (*info).owner };
    if role == ROLE_PASSIVE {
        // A child cloned from its listener, in softirq
        // (inet_csk_clone_lock): the listener's owner will accept() it.
        // The listener is bound to the child's local address or to any.
        let mut key = listener_key(&conn(sk)?, cfg, sk)?;
        // SAFETY: a field of the slot above.
        unsafe { (*info).net = key.net };
        let mut found = LISTENERS.get_ptr(key);
        if found.is_none() {
            key.addr = [0; 16];
            found = LISTENERS.get_ptr(key);
        }
        if let Some(listeners) = found {
            // SAFETY: a live map value; the slot is copied at once.
            unsafe {
                let mut i = 0;
                while i < LISTENER_SLOTS {
                    let slot = &raw const (*listeners).slots[i];
                    if (*slot).sk != 0 {
                        mem::copy(owner, &raw const (*slot).owner);
                        break;
                    }
                    i += 1;
                }
            }
        }
    } else {
        // connect() or listen(): process context, the caller owns it.
        // SAFETY: `owner` is valid, see above.
        unsafe { current_owner(owner) };
        if role == ROLE_LISTENER {
            let key = listener_key(&conn(sk)?, cfg, sk)?;
            // SAFETY: just written.
            add_listener(&key, sk, unsafe { &*owner })?;
        }
    }
    // SAFETY: filled in above.
    unsafe {
        SOCKS.insert(sk, &*info, 0).map_err(i64::from)?;
        take_sock_info(event, info);
    }
    Ok(true)
}

/// Copies what the socket map knows of a socket into its event.
///
/// # Safety
/// `info` must be valid for a `SockInfo`.
#[inline(always)]
unsafe fn take_sock_info(event: &mut TcpStateEvent, info: *const SockInfo) {
    // SAFETY: per the caller.
    unsafe {
        mem::copy(&raw mut event.owner, &raw const (*info).owner);
        event.created_ns = (*info).created_ns;
        event.retrans = (*info).retrans;
        event.role = (*info).role;
        event.net = (*info).net;
    }
}

/// The listener map's key for socket `sk`, whose connection is `conn`:
/// its namespace, family, local address and port.
#[inline(always)]
fn listener_key(conn: &impl Conn, cfg: &TcpConfig, sk: u64) -> Result<ListenerKey, i64> {
    let family = conn.family()?;
    let (port, _) = conn.ports()?;
    let mut tuple = TcpTuple {
        family,
        ..TcpTuple::default()
    };
    if !conn.addrs(&mut tuple)? {
        tuple.saddr = [0; 16];
    }
    let mut key = MaybeUninit::<ListenerKey>::uninit();
    let p = key.as_mut_ptr();
    // SAFETY: a stack slot for a ListenerKey: zeroed (its padding is part of
    // the map key), then filled.
    unsafe {
        mem::zero(p);
        (*p).net = sock_net(cfg, sk);
        (*p).port = port;
        (*p).family = family;
        (*p).addr = tuple.saddr;
        Ok(key.assume_init())
    }
}

/// Notes the listener `sk` under `key`, beside those already bound there
/// (an SO_REUSEPORT group). When all slots are taken the newest replaces
/// the first.
#[inline(always)]
fn add_listener(key: &ListenerKey, sk: u64, owner: &Owner) -> Result<(), i64> {
    if let Some(listeners) = LISTENERS.get_ptr_mut(key) {
        // SAFETY: a live map value. Two listen() calls on one address and
        // port at the same moment could take one slot: the later wins.
        unsafe {
            let mut free = 0;
            let mut i = LISTENER_SLOTS;
            while i > 0 {
                i -= 1;
                if (*listeners).slots[i].sk == 0 {
                    free = i;
                }
            }
            (*listeners).slots[free].sk = sk;
            (*listeners).slots[free].owner = *owner;
        }
        return Ok(());
    }
    let new = LISTENERS_NEW.get_ptr_mut(0).ok_or(-1i64)?;
    // SAFETY: this CPU's scratch slot, zeroed then filled, and copied into
    // the map before the program returns.
    unsafe {
        mem::zero(new);
        (*new).slots[0].sk = sk;
        (*new).slots[0].owner = *owner;
        LISTENERS.insert(key, &*new, 0).map_err(i64::from)
    }
}

/// The listener `sk` closed: its slot is freed, its siblings keep theirs;
/// the key goes with the last of them.
#[inline(always)]
fn forget_listener(key: &ListenerKey, sk: u64) {
    let Some(listeners) = LISTENERS.get_ptr_mut(key) else {
        return;
    };
    let mut left = 0;
    // SAFETY: a live map value.
    unsafe {
        let mut i = 0;
        while i < LISTENER_SLOTS {
            let slot = &mut (*listeners).slots[i];
            if slot.sk == sk {
                slot.sk = 0;
            } else if slot.sk != 0 {
                left += 1;
            }
            i += 1;
        }
    }
    if left == 0 {
        let _ = LISTENERS.remove(key);
    }
}

/// tcp/tcp_destroy_sock, as a raw tracepoint: the second source of a
/// socket's close. A classic tracepoint program is skipped while another
/// one runs on its CPU (the kernel's per-CPU `bpf_prog_active` guard in
/// trace_call_bpf), and a softirq that runs on the way out of an interrupt
/// taken during one of kdiag's programs loses every state change it makes
/// (counted only as that program's recursion misses). A raw tracepoint
/// program is only skipped while it runs itself (its own guard, in
/// bpf_trace_run), so it runs there. The socket is destroyed after its last
/// change to CLOSE (inet_csk_destroy_sock requires that state), and that
/// change takes the socket out of `SOCKS`: one still there was closed
/// unseen. Its event says so, with what the programs knew of it; the agent
/// has the rest from its earlier changes.
#[raw_tracepoint(tracepoint = "tcp_destroy_sock")]
pub(crate) fn tcp_destroy_sock(ctx: RawTracePointContext) -> u32 {
    measured(ProgramId::TcpDestroySock, || {
        counted(ClassId::Tcp, try_tcp_destroy_sock(&ctx))
    })
}

fn try_tcp_destroy_sock(ctx: &RawTracePointContext) -> Result<u32, i64> {
    // TP_PROTO(struct sock *sk) (include/trace/events/tcp.h).
    let sk: u64 = ctx.arg(0);
    let Some(info) = SOCKS.get_ptr(sk) else {
        return Ok(0);
    };
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    // On the stack, not in STATE_EVENT: this program can run in the middle
    // of inet_sock_set_state's, on the same CPU, which owns that slot.
    let mut event = MaybeUninit::<TcpStateEvent>::uninit();
    let p = event.as_mut_ptr();
    // SAFETY: a stack slot for the event, zeroed (no tuple, no old state),
    // then filled from the live map value, which is copied at once.
    let since = unsafe {
        mem::zero(p);
        take_sock_info(&mut *p, info);
        (*info).state_since_ns
    };
    let _ = SOCKS.remove(sk);
    // SAFETY: the slot zeroed and filled above.
    let event = unsafe { &mut *p };
    event.header = header_at(EventKind::TcpDestroy, now);
    event.sock_id = sk;
    event.newstate = TCP_CLOSE;
    event.old_state_ns = now.saturating_sub(since);
    event.flags = if since != 0 { STATE_TIME_KNOWN } else { 0 };
    emit(ctx, ClassId::Tcp, event);
    Ok(0)
}

#[btf_tracepoint(function = "tcp_retransmit_skb")]
pub(crate) fn retransmit_skb_btf(ctx: BtfTracePointContext) -> u32 {
    // TP_PROTO(const struct sock *sk, const struct sk_buff *skb), and a
    // reason after them in newer kernels (include/trace/events/tcp.h).
    measured(ProgramId::RetransmitSkb, || {
        counted(
            ClassId::Retrans,
            nested(Scratch::RetransmitSkb, |slot| {
                try_retransmit_skb(&ctx, arg_sock(&ctx, 0), SockConn::read, slot)
            }),
        )
    })
}

#[tracepoint]
pub(crate) fn retransmit_skb(ctx: TracePointContext) -> u32 {
    measured(ProgramId::RetransmitSkb, || {
        counted(
            ClassId::Retrans,
            nested(Scratch::RetransmitSkb, |slot| {
                try_retransmit_skb(
                    &ctx,
                    field!(&ctx, RetransmitSkb, skaddr),
                    |sk| Ok(Record::<RetransmitSkb>::new(&ctx, sk)),
                    slot,
                )
            }),
        )
    })
}

/// A BTF tracepoint's socket argument `n`, not null.
#[inline(always)]
fn arg_sock(ctx: &BtfTracePointContext, n: usize) -> Result<u64, i64> {
    let sk: u64 = ctx.arg(n);
    // Never null from the kernel; checked so that the verifier knows it is
    // not where it is offset.
    if sk == 0 { Err(-1) } else { Ok(sk) }
}

/// The body of both entries: `conn(sk)` reads the socket's connection; the
/// event is built in `slot`.
#[inline(always)]
fn try_retransmit_skb<C: EbpfContext, F: Conn>(
    ctx: &C,
    sk: Result<u64, i64>,
    conn: impl FnOnce(u64) -> Result<F, i64>,
    slot: Slot,
) -> Result<u32, i64> {
    let cfg = config();
    let sk = sk?;
    let conn = conn(sk)?;
    let Some(tuple) = read_tuple(cfg, &conn)? else {
        return Ok(0);
    };
    let state = conn.state();
    let (owner, conn_retrans) = match SOCKS.get_ptr_mut(sk) {
        Some(info) => {
            // SAFETY: a live map value. A plain increment is enough: the
            // kernel retransmits with the socket locked (tcp_retransmit_timer
            // and the receive path both hold it), so two retransmits of one
            // socket never run at once.
            unsafe {
                (*info).retrans += 1;
                ((*info).owner, (*info).retrans)
            }
        }
        None => {
            // A socket from before the agent started: count from here; the
            // agent fills in the owner from /proc.
            let info = SockInfo {
                retrans: 1,
                ..SockInfo::default()
            };
            if SOCKS.insert(sk, info, 0).is_err() {
                count_loss(ClassId::Retrans, LOSS_MAP_FULL);
            }
            (Owner::default(), 1)
        }
    };
    let kind = if state == TCP_SYN_SENT {
        RetransKind::Syn
    } else {
        RetransKind::Data
    };
    let event = retrans_event(slot)?;
    event.header = header(EventKind::Retrans);
    event.sock_id = sk;
    // SAFETY: a copy between valid values of one type.
    unsafe { mem::copy(&raw mut event.owner, &raw const owner) };
    event.tuple = tuple;
    event.state = state;
    event.kind = kind as u32;
    event.conn_retrans = conn_retrans;
    event._pad = 0;
    read_sock(
        sk,
        &cfg.retrans_sock,
        &mut event.sock,
        ClassId::Retrans,
        slot,
    );
    emit(ctx, ClassId::Retrans, event);
    Ok(0)
}

/// This CPU's retransmit event under construction in `slot`.
#[inline(always)]
fn retrans_event(slot: Slot) -> Result<&'static mut RetransEvent, i64> {
    let event = RETRANS_EVENT.get_ptr_mut(slot.index()).ok_or(-1i64)?;
    // SAFETY: this CPU's slot of this program at this run's nesting level
    // (see the module comment), so nothing else uses it until this run
    // returns.
    Ok(unsafe { &mut *event })
}

#[btf_tracepoint(function = "tcp_retransmit_synack")]
pub(crate) fn retransmit_synack_btf(ctx: BtfTracePointContext) -> u32 {
    // TP_PROTO(const struct sock *sk, const struct request_sock *req): the
    // record's connection fields are the request socket's (its
    // `ireq_family` is the listener's family).
    measured(ProgramId::RetransmitSynack, || {
        counted(
            ClassId::Retrans,
            nested(Scratch::RetransmitSynack, |slot| {
                try_retransmit_synack(
                    &ctx,
                    arg_sock(&ctx, 0),
                    arg_sock(&ctx, 1),
                    |_, req| SockConn::read_request(req),
                    slot,
                )
            }),
        )
    })
}

#[tracepoint]
pub(crate) fn retransmit_synack(ctx: TracePointContext) -> u32 {
    measured(ProgramId::RetransmitSynack, || {
        counted(
            ClassId::Retrans,
            nested(Scratch::RetransmitSynack, |slot| {
                try_retransmit_synack(
                    &ctx,
                    field!(&ctx, RetransmitSynack, skaddr),
                    field!(&ctx, RetransmitSynack, req),
                    |listener, _| Ok(Record::<RetransmitSynack>::new(&ctx, listener)),
                    slot,
                )
            }),
        )
    })
}

/// The body of both entries: `listener` is the listening socket, `req`
/// the request socket that identifies the connection being set up;
/// `conn(listener, req)` reads the connection; the event is built in
/// `slot`.
#[inline(always)]
fn try_retransmit_synack<C: EbpfContext, F: Conn>(
    ctx: &C,
    listener: Result<u64, i64>,
    req: Result<u64, i64>,
    conn: impl FnOnce(u64, u64) -> Result<F, i64>,
    slot: Slot,
) -> Result<u32, i64> {
    let cfg = config();
    let (listener, req) = (listener?, req?);
    let Some(tuple) = read_tuple(cfg, &conn(listener, req)?)? else {
        return Ok(0);
    };
    // SAFETY: the value is copied out immediately.
    let owner = unsafe { SOCKS.get(listener) }
        .map(|info| info.owner)
        .unwrap_or_default();
    let conn_retrans = match SYNACK_RETRANS.get_ptr_mut(req) {
        Some(count) => {
            // SAFETY: a live map value; one request socket's SYN-ACKs are
            // retransmitted by its own timer, one at a time.
            unsafe {
                *count += 1;
                *count
            }
        }
        None => {
            if SYNACK_RETRANS.insert(req, 1, 0).is_err() {
                count_loss(ClassId::Retrans, LOSS_MAP_FULL);
            }
            1
        }
    };
    let event = retrans_event(slot)?;
    event.header = header(EventKind::Retrans);
    event.sock_id = req;
    // SAFETY: a copy between valid values of one type.
    unsafe { mem::copy(&raw mut event.owner, &raw const owner) };
    event.tuple = tuple;
    event.state = TCP_SYN_RECV;
    event.kind = RetransKind::SynAck as u32;
    event.conn_retrans = conn_retrans;
    event._pad = 0;
    // A request socket is no tcp_sock: nothing to read.
    read_sock(
        req,
        &SockPlan::NONE,
        &mut event.sock,
        ClassId::Retrans,
        slot,
    );
    emit(ctx, ClassId::Retrans, event);
    Ok(0)
}
