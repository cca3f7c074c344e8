//! The TCP programs' configuration (`TCP_CONFIG`), shared by the classes
//! that use them: tracepoint offsets, the socket's namespace offset, filters.

use kdiag_common::{
    cost::ProgramId,
    tcp::{
        AF_INET, AF_INET6, FIELD_ABSENT, INET_LOCAL_LEN, MAX_PORTS, SOCK_HEAD_DADDR,
        SOCK_HEAD_DPORT, SOCK_HEAD_FAMILY, SOCK_HEAD_NUM, SOCK_HEAD_RCV_SADDR, SOCK_HEAD_STATE,
        SockConnOffsets, TcpConfig, TcpTpOffsets, TupleOffsets,
    },
};

use super::health::{CLOSE_FIELDS, RETRANS_FIELDS, plan};
use crate::{
    attribution::procfs,
    class::{BtfQueries, Global, KernelTypes, MapSize, Tracepoint},
    kernel::{btf, tracefs::Format},
    output::record::Degraded,
};

/// The TCP programs' tracepoints, as both TCP classes attach them (each
/// says which it requires). Each has a BTF tracepoint entry that reads the
/// connection from the socket, where the BTF says where it is
/// ([`sock_conn_offsets`]).
pub(crate) const SET_STATE: Tracepoint = Tracepoint {
    group: "sock",
    name: "inet_sock_set_state",
    program: ProgramId::InetSockSetState.name(),
    btf_program: ProgramId::InetSockSetState.btf_name(),
    btf_check: Some(sock_conn_check),
    required: false,
};
pub(crate) const RETRANSMIT_SKB: Tracepoint = Tracepoint {
    group: "tcp",
    name: "tcp_retransmit_skb",
    program: ProgramId::RetransmitSkb.name(),
    btf_program: ProgramId::RetransmitSkb.btf_name(),
    btf_check: Some(sock_conn_check),
    required: false,
};
pub(crate) const RETRANSMIT_SYNACK: Tracepoint = Tracepoint {
    group: "tcp",
    name: "tcp_retransmit_synack",
    program: ProgramId::RetransmitSynack.name(),
    btf_program: ProgramId::RetransmitSynack.btf_name(),
    btf_check: Some(sock_conn_check),
    required: false,
};

/// The kernel-side TCP settings: `--port`, `-4`/`-6`, and whether state
/// changes are sent (only when the `tcp` class runs; `retrans` alone needs
/// the state program only to learn owners).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct TcpFilter {
    pub ports: Vec<u16>,
    /// 0 = both, else AF_INET or AF_INET6.
    pub family: u16,
    pub stream_states: bool,
    /// `--max-sockets`, or sized for the host when not given
    /// ([`MaxSockets`]): the size of the programs' socket map.
    pub max_sockets: u32,
    /// Why the socket map has the fallback size: the host's sockets could
    /// not be counted.
    pub fallback: Option<Degraded>,
}

impl TcpFilter {
    pub(crate) fn new(
        ports: &[u16],
        ipv4: bool,
        ipv6: bool,
        stream_states: bool,
        max_sockets: MaxSockets,
    ) -> Result<Self, String> {
        if ports.len() > MAX_PORTS {
            return Err(format!(
                "--port: at most {MAX_PORTS} ports, got {}",
                ports.len()
            ));
        }
        let family = match (ipv4, ipv6) {
            (true, _) => AF_INET,
            (_, true) => AF_INET6,
            _ => 0,
        };
        Ok(Self {
            ports: ports.to_vec(),
            family,
            stream_states,
            max_sockets: max_sockets.entries,
            fallback: max_sockets.fallback,
        })
    }

    /// The state program's maps, all that a class following only the
    /// owners of sockets needs: the sockets followed, the listeners whose
    /// owners their children inherit.
    pub(crate) fn owner_map_sizes(&self) -> Vec<MapSize> {
        vec![
            MapSize {
                map: "SOCKS",
                entries: self.max_sockets,
            },
            MapSize {
                map: "LISTENERS",
                entries: MAX_LISTENERS,
            },
        ]
    }

    /// The TCP programs' maps: the state program's, and the request
    /// sockets whose SYN-ACK retransmits are counted.
    pub(crate) fn map_sizes(&self) -> Vec<MapSize> {
        let mut sizes = self.owner_map_sizes();
        sizes.push(MapSize {
            map: "SYNACK_RETRANS",
            entries: MAX_PENDING_SYNACKS,
        });
        sizes
    }
}

/// Listening sockets (address, port and namespace) followed at once, for
/// the owners their children inherit: hosts have tens, a node with many
/// pods hundreds. Past it the least recently used is forgotten, and a
/// connection it accepts is owned as one accepted from a listener older
/// than the agent: as /proc showed that listener at start, if it did.
const MAX_LISTENERS: u32 = 1024;
/// Request sockets (half-open connections) whose SYN-ACK retransmits are
/// counted at once: only those with a SYN-ACK retransmitted take one. Past
/// it the least recently retransmitting is forgotten, and its next
/// retransmit counts from 1 again.
const MAX_PENDING_SYNACKS: u32 = 4096;

/// The socket map's size: `--max-sockets`, or when not given room for
/// [`SOCKETS_HEADROOM`] times the TCP sockets the host has at start, as a
/// power of two (the kernel rounds the map's buckets so), within
/// [`MIN_SOCKETS`] and [`MAX_SIZED_SOCKETS`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MaxSockets {
    pub entries: u32,
    /// Why `entries` is [`FALLBACK_SOCKETS`], when it is.
    pub fallback: Option<Degraded>,
}

/// Room over the sockets at start, for the ones the host opens next.
const SOCKETS_HEADROOM: u64 = 2;
/// The smallest sized map: 1.1 MiB of kernel memory.
const MIN_SOCKETS: u32 = 8192;
/// The largest sized map: 34 MiB; more takes `--max-sockets`.
const MAX_SIZED_SOCKETS: u32 = 262_144;
/// The size when the host's sockets cannot be counted: room for a busy
/// host's (8.5 MiB).
const FALLBACK_SOCKETS: u32 = 65536;

impl MaxSockets {
    /// `--max-sockets N`.
    pub(crate) fn given(entries: u32) -> Self {
        Self {
            entries,
            fallback: None,
        }
    }

    /// `--max-sockets` given, or else sized for the host's TCP sockets now.
    pub(crate) fn given_or_sized(given: Option<u32>) -> Self {
        given.map_or_else(
            || Self::for_allocated(procfs::tcp_sockets_allocated()),
            Self::given,
        )
    }

    /// Sized for `allocated` TCP sockets (`None`: unknown).
    pub(crate) fn for_allocated(allocated: Option<u64>) -> Self {
        let Some(allocated) = allocated else {
            return Self {
                entries: FALLBACK_SOCKETS,
                fallback: Some(Degraded {
                    what: "proc/net/sockstat".to_owned(),
                    why: format!(
                        "the host's TCP sockets could not be counted (no TCP alloc in \
                         /proc/net/sockstat): the socket map holds {FALLBACK_SOCKETS} \
                         (--max-sockets sets it)"
                    ),
                }),
            };
        };
        let wanted = allocated
            .saturating_mul(SOCKETS_HEADROOM)
            .checked_next_power_of_two()
            .unwrap_or(u64::MAX);
        Self::given(wanted.clamp(MIN_SOCKETS.into(), MAX_SIZED_SOCKETS.into()) as u32)
    }
}

/// The socket's network namespace, which tells listeners on one port in
/// different namespaces apart, its family, for the records that do not
/// carry it, and the connection fields the BTF tracepoint entries read
/// from the socket ([`sock_conn_offsets`]).
pub(crate) const TCP_QUERIES: BtfQueries = BtfQueries {
    members: &[
        ("sock_common", "skc_net"),
        ("sock_common", "skc_family"),
        ("net", "ns"),
        ("ns_common", "inum"),
        ("sock_common", "skc_daddr"),
        ("sock_common", "skc_rcv_saddr"),
        ("sock_common", "skc_dport"),
        ("sock_common", "skc_num"),
        ("sock_common", "skc_state"),
        ("sock_common", "skc_v6_daddr"),
        ("sock_common", "skc_v6_rcv_saddr"),
        ("sock", "__sk_common"),
        ("sock", "sk_protocol"),
        ("inet_sock", "sk"),
        ("inet_sock", "inet_saddr"),
        ("inet_sock", "inet_sport"),
        ("request_sock", "__req_common"),
    ],
    enumerators: &[],
    enums: &[],
};

/// Where the BTF tracepoint entries read a connection from its socket:
/// `struct sock_common`'s head as every kernel lays it out (checked member
/// by member: `SOCK_HEAD_*` from `skc_daddr`), its IPv6 addresses, and
/// `struct sock`'s `sk_protocol`. Both `struct sock` and `struct
/// request_sock` must begin with their `sock_common`: the programs read
/// either at the same offsets.
pub(crate) fn sock_conn_offsets(btf: &btf::Answers) -> Result<SockConnOffsets, String> {
    let at = |strukt, member| btf.offset(strukt, member).map_err(|e| e.to_string());
    for (strukt, member) in [
        ("sock", "__sk_common"),
        ("inet_sock", "sk"),
        ("request_sock", "__req_common"),
    ] {
        let offset = at(strukt, member)?;
        if offset != 0 {
            return Err(format!("{strukt}.{member} is at byte {offset}, not 0"));
        }
    }
    let head = at("sock_common", "skc_daddr")?;
    for (member, want) in [
        ("skc_daddr", SOCK_HEAD_DADDR),
        ("skc_rcv_saddr", SOCK_HEAD_RCV_SADDR),
        ("skc_dport", SOCK_HEAD_DPORT),
        ("skc_num", SOCK_HEAD_NUM),
        ("skc_family", SOCK_HEAD_FAMILY),
        ("skc_state", SOCK_HEAD_STATE),
    ] {
        let offset = at("sock_common", member)?;
        if offset != head + want {
            return Err(format!(
                "sock_common.{member} is at byte {offset}, not {}",
                head + want
            ));
        }
    }
    // A 16-bit field since 5.6; 5.5's 8-bit bitfield starts mid-word.
    let protocol_bits = btf
        .bit_offset("sock", "sk_protocol")
        .map_err(|e| e.to_string())?;
    if protocol_bits % 16 != 0 {
        return Err(format!(
            "sock.sk_protocol is at bit {protocol_bits}, not a 16-bit field"
        ));
    }
    let inet_saddr = at("inet_sock", "inet_saddr")?;
    let inet_sport = at("inet_sock", "inet_sport")?;
    let sport_at = inet_sport
        .checked_sub(inet_saddr)
        .filter(|at| at % 2 == 0 && *at as usize + 2 <= INET_LOCAL_LEN)
        .ok_or_else(|| {
            format!(
                "inet_sock.inet_sport (byte {inet_sport}) is not within {INET_LOCAL_LEN} bytes \
                 after inet_saddr (byte {inet_saddr})"
            )
        })?;
    let narrow =
        |offset: u32| u16::try_from(offset).map_err(|_| format!("offset {offset} out of range"));
    Ok(SockConnOffsets {
        head: narrow(head)?,
        v6_daddr: narrow(at("sock_common", "skc_v6_daddr")?)?,
        v6_rcv_saddr: narrow(at("sock_common", "skc_v6_rcv_saddr")?)?,
        protocol: narrow(protocol_bits / 8)?,
        inet_saddr: narrow(inet_saddr)?,
        inet_sport_at: narrow(sport_at)?,
        _pad: [0; 2],
    })
}

/// The TCP tracepoints' `btf_check`.
fn sock_conn_check(btf: &btf::Answers) -> Result<(), String> {
    sock_conn_offsets(btf).map(drop)
}

/// `TCP_CONFIG` for the kernel's types and these settings.
pub(crate) fn tcp_global(
    kernel: &KernelTypes,
    filter: &TcpFilter,
    degraded: &mut Vec<Degraded>,
) -> Global {
    degraded.extend(filter.fallback.clone());
    let formats = &kernel.formats;
    let mut tcp = TcpConfig::DEFAULT;
    tcp.retransmit_skb = tcp_offsets(formats.get("retransmit_skb"));
    tcp.retransmit_synack = tcp_offsets(formats.get("retransmit_synack"));
    tcp.set_state = tcp_offsets(formats.get("inet_sock_set_state"));
    if formats.contains("inet_sock_set_state") {
        // `struct sock` begins with its `struct sock_common __sk_common`, so
        // the offset within sock_common is the offset within sock.
        // The namespace as its inode number (`net->ns.inum`), the name
        // /proc gives it.
        let btf = &kernel.btf;
        let offsets = btf.offset("sock_common", "skc_net").and_then(|net| {
            let inum = btf.offset("net", "ns")? + btf.offset("ns_common", "inum")?;
            Ok((net, inum))
        });
        match offsets {
            Ok((net, inum)) => (tcp.sk_net_offset, tcp.net_inum_offset) = (net, inum),
            Err(e) => degraded.push(Degraded {
                what: "btf/net.ns.inum".to_owned(),
                why: format!(
                    "listeners on one address and port in different network namespaces share \
                     an owner: {e}"
                ),
            }),
        }
    }
    // 5.10's retransmit records have no `family`: the programs read the
    // socket's. Without its offset they cannot tell the addresses' family,
    // and drop those records.
    let no_family: Vec<&str> = [
        ("retransmit_skb", &tcp.retransmit_skb),
        ("retransmit_synack", &tcp.retransmit_synack),
    ]
    .into_iter()
    .filter(|(program, o)| formats.contains(program) && o.tuple.family == FIELD_ABSENT)
    .map(|(program, _)| program)
    .collect();
    if !no_family.is_empty() {
        let offset = kernel
            .btf
            .offset("sock_common", "skc_family")
            .map_err(|e| e.to_string())
            .and_then(|o| u16::try_from(o).map_err(|_| format!("offset {o} out of range")));
        match offset {
            Ok(offset) => tcp.sk_family_offset = offset,
            Err(e) => degraded.push(Degraded {
                what: "btf/sock_common.skc_family".to_owned(),
                why: format!(
                    "the records of {} have no family field, and the socket's is not \
                     found: their events are dropped: {e}",
                    no_family.join(" and ")
                ),
            }),
        }
    }
    tcp.family = filter.family;
    let n = filter.ports.len().min(MAX_PORTS);
    tcp.nports = n as u16;
    tcp.ports[..n].copy_from_slice(&filter.ports[..n]);
    tcp.stream_states = u32::from(filter.stream_states);
    // Both plans whatever the classes: the classes sharing these programs
    // must set one configuration (each class says what its records lack).
    tcp.retrans_sock = plan(&kernel.btf, RETRANS_FIELDS).0;
    tcp.close_sock = plan(&kernel.btf, CLOSE_FIELDS).0;
    // Left zero without them: the loader then attaches the classic entries
    // (the same check, `sock_conn_check`), and says why.
    tcp.sock_conn = sock_conn_offsets(&kernel.btf).unwrap_or_default();
    Global::new("TCP_CONFIG", &tcp)
}

/// Offsets of the TCP fields in a tracepoint's format; absent ones (and all
/// of them, when the tracepoint is missing) are `FIELD_ABSENT`.
pub(crate) fn tcp_offsets(format: Option<&Format>) -> TcpTpOffsets {
    let Some(f) = format else {
        return TcpTpOffsets::ABSENT;
    };
    let at = |name: &str| f.field(name).map_or(FIELD_ABSENT, |f| f.offset);
    TcpTpOffsets {
        tuple: TupleOffsets {
            sport: at("sport"),
            dport: at("dport"),
            family: at("family"),
            saddr: at("saddr"),
            daddr: at("daddr"),
            saddr_v6: at("saddr_v6"),
            daddr_v6: at("daddr_v6"),
            _pad: 0,
        },
        skaddr: at("skaddr"),
        req: at("req"),
        // tcp_retransmit_skb calls it `state`, inet_sock_set_state `newstate`.
        state: f
            .field("state")
            .or_else(|| f.field("newstate"))
            .map_or(FIELD_ABSENT, |f| f.offset),
        oldstate: at("oldstate"),
        protocol: at("protocol"),
        _pad: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::tracefs::parse_format;

    #[test]
    fn offsets_from_set_state_format() {
        let text = "format:
\tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:int oldstate;\toffset:16;\tsize:4;\tsigned:1;
\tfield:int newstate;\toffset:20;\tsize:4;\tsigned:1;
\tfield:__u16 sport;\toffset:24;\tsize:2;\tsigned:0;
\tfield:__u16 protocol;\toffset:30;\tsize:2;\tsigned:0;
";
        let o = tcp_offsets(Some(&parse_format(text).unwrap()));
        assert_eq!((o.skaddr, o.oldstate, o.state, o.protocol), (8, 16, 20, 30));
        assert_eq!(o.tuple.sport, 24);
        assert_eq!(o.tuple.daddr_v6, FIELD_ABSENT);
        assert_eq!(o.req, FIELD_ABSENT);
        assert_eq!(tcp_offsets(None), TcpTpOffsets::ABSENT);
    }

    /// The usual layouts the programs read directly are what the kernel's
    /// format files say (these are 6.18's; 4.16 to 6.17 differ only by
    /// tcp_retransmit_skb's trailing `err`).
    #[test]
    fn usual_layouts_match_the_format_files() {
        let field = |decl: &str, offset: u16, size: u16| {
            format!("\tfield:{decl};\toffset:{offset};\tsize:{size};\tsigned:0;\n")
        };
        let tuple = |at: u16, v4: u16| {
            [
                field("__u16 sport", at, 2),
                field("__u16 dport", at + 2, 2),
                field("__u16 family", at + 4, 2),
                field("__u8 saddr[4]", v4, 4),
                field("__u8 daddr[4]", v4 + 4, 4),
                field("__u8 saddr_v6[16]", v4 + 8, 16),
                field("__u8 daddr_v6[16]", v4 + 24, 16),
            ]
            .concat()
        };
        let set_state = [
            field("const void * skaddr", 8, 8),
            field("int oldstate", 16, 4),
            field("int newstate", 20, 4),
            tuple(24, 32),
            field("__u16 protocol", 30, 2),
        ]
        .concat();
        let retransmit_skb = [
            field("const void * skbaddr", 8, 8),
            field("const void * skaddr", 16, 8),
            field("int state", 24, 4),
            tuple(28, 34),
            field("int err", 76, 4),
        ]
        .concat();
        let retransmit_synack = [
            field("const void * skaddr", 8, 8),
            field("const void * req", 16, 8),
            tuple(24, 30),
        ]
        .concat();
        let parse =
            |fields: &str| tcp_offsets(Some(&parse_format(&format!("format:\n{fields}")).unwrap()));
        assert_eq!(parse(&set_state), TcpTpOffsets::USUAL_SET_STATE);
        assert_eq!(parse(&retransmit_skb), TcpTpOffsets::USUAL_RETRANSMIT_SKB);
        assert_eq!(
            parse(&retransmit_synack),
            TcpTpOffsets::USUAL_RETRANSMIT_SYNACK
        );
    }

    /// 5.10's tcp_retransmit_skb has no `family`: the programs need the
    /// socket's, and without its offset the agent says what is lost.
    #[test]
    fn records_without_family_need_the_sockets() {
        let retransmit_skb = |family: &str| {
            parse_format(&format!(
                "format:
\tfield:const void * skaddr;\toffset:16;\tsize:8;\tsigned:0;
\tfield:__u16 sport;\toffset:28;\tsize:2;\tsigned:0;
{family}"
            ))
            .unwrap()
        };
        let global = |format| {
            let mut kernel = KernelTypes::default();
            kernel.formats.insert("retransmit_skb", format);
            let mut degraded = Vec::new();
            let filter = TcpFilter::new(&[], false, false, false, MaxSockets::given(1024)).unwrap();
            tcp_global(&kernel, &filter, &mut degraded);
            degraded
        };
        let with = global(retransmit_skb(
            "\tfield:__u16 family;\toffset:32;\tsize:2;\tsigned:0;\n",
        ));
        assert!(with.is_empty(), "{with:?}");
        // No BTF answers here: the socket's family cannot be found either.
        let without = global(retransmit_skb(""));
        assert_eq!(without.len(), 1, "{without:?}");
        assert_eq!(without[0].what, "btf/sock_common.skc_family");
        assert!(without[0].why.contains("retransmit_skb"), "{without:?}");
    }

    /// The running kernel's BTF places every field the BTF tracepoint
    /// entries read where they read it.
    #[test]
    fn the_running_kernels_sockets_fit_the_btf_entries() {
        let btf = btf::Answers::of_kernel(TCP_QUERIES.members, &[], &[], &[]);
        let offsets = sock_conn_offsets(&btf).unwrap();
        assert_eq!(offsets.head, 0);
        assert!(
            offsets.protocol != 0 && offsets.inet_saddr != 0,
            "{offsets:?}"
        );
    }

    /// A layout the programs cannot read is refused with the member that
    /// does not fit: 5.5's 8-bit `sk_protocol` bitfield, a moved field, a
    /// local port past the read (6.1's, 20 bytes after the address, fits).
    #[test]
    fn layouts_the_btf_entries_cannot_read_are_refused() {
        let members_at = |protocol_bits: u32, family_bits: u32, sport: u32| {
            btf::Answers::with_bit_offsets(&[
                (("sock", "__sk_common"), 0),
                (("inet_sock", "sk"), 0),
                (("request_sock", "__req_common"), 0),
                (("sock_common", "skc_daddr"), 0),
                (("sock_common", "skc_rcv_saddr"), 32),
                (("sock_common", "skc_dport"), 96),
                (("sock_common", "skc_num"), 112),
                (("sock_common", "skc_family"), family_bits),
                (("sock_common", "skc_state"), 144),
                (("sock_common", "skc_v6_daddr"), 56 * 8),
                (("sock_common", "skc_v6_rcv_saddr"), 72 * 8),
                (("sock", "sk_protocol"), protocol_bits),
                (("inet_sock", "inet_saddr"), 1000 * 8),
                (("inet_sock", "inet_sport"), sport * 8),
            ])
        };
        let members = |protocol_bits, family_bits| members_at(protocol_bits, family_bits, 1008);
        let fits = sock_conn_offsets(&members(500 * 8, 128)).unwrap();
        assert_eq!(
            (fits.protocol, fits.inet_saddr, fits.inet_sport_at),
            (500, 1000, 8)
        );
        assert_eq!((fits.v6_daddr, fits.v6_rcv_saddr), (56, 72));
        let bitfield = sock_conn_offsets(&members(500 * 8 + 8, 128)).unwrap_err();
        assert!(bitfield.contains("sk_protocol"), "{bitfield}");
        let moved = sock_conn_offsets(&members(500 * 8, 160)).unwrap_err();
        assert!(moved.contains("skc_family"), "{moved}");
        let far = sock_conn_offsets(&members_at(500 * 8, 128, 1020)).unwrap();
        assert_eq!(far.inet_sport_at, 20);
        let past = sock_conn_offsets(&members_at(500 * 8, 128, 1024)).unwrap_err();
        assert!(past.contains("inet_sport"), "{past}");
        let none = sock_conn_offsets(&btf::Answers::default()).unwrap_err();
        assert!(!none.is_empty());
    }

    /// Twice the host's sockets as a power of two, within the floor and
    /// the ceiling; the fallback, said, when they are unknown.
    #[test]
    fn socket_map_follows_the_hosts_sockets() {
        let sized = |allocated| MaxSockets::for_allocated(Some(allocated));
        for (allocated, entries) in [
            (0, MIN_SOCKETS),
            (1, MIN_SOCKETS),
            (4096, 8192),
            (4097, 16384),
            (20_000, 65536),
            (131_072, 262_144),
            (131_073, MAX_SIZED_SOCKETS),
            (u64::MAX / 2 + 1, MAX_SIZED_SOCKETS),
            (u64::MAX, MAX_SIZED_SOCKETS),
        ] {
            assert_eq!(sized(allocated), MaxSockets::given(entries), "{allocated}");
        }
        let unknown = MaxSockets::for_allocated(None);
        assert_eq!(unknown.entries, FALLBACK_SOCKETS);
        assert_eq!(unknown.fallback.unwrap().what, "proc/net/sockstat");
        assert_eq!(
            MaxSockets::given_or_sized(Some(1024)),
            MaxSockets::given(1024)
        );
        // Bounds the rule can give: powers of two, as the kernel sizes the
        // map's buckets.
        assert!(MIN_SOCKETS.is_power_of_two() && MAX_SIZED_SOCKETS.is_power_of_two());
    }

    #[test]
    fn filter_limits() {
        assert!(TcpFilter::new(&[1; 9], false, false, false, MaxSockets::given(1024)).is_err());
        let f = TcpFilter::new(&[80, 443], false, true, true, MaxSockets::given(1024)).unwrap();
        assert_eq!((f.family, f.ports.len()), (AF_INET6, 2));
    }
}
