//! `drop`: TCP and UDP packets the kernel dropped (skb/kfree_skb), with the
//! reason the kernel gives, named from its own `enum skb_drop_reason`.

use std::{collections::HashMap, sync::Arc};

use aya::{
    Ebpf,
    maps::{MapData, PerCpuHashMap},
};
use clap::Args;
use kdiag_common::{
    ClassId, EventKind, FIELD_ABSENT,
    drop::{
        DROP_DIRECTION_KNOWN, DROP_INBOUND, DropConfig, DropEvent, DropKey, DropTpOffsets,
        IPPROTO_TCP, IPPROTO_UDP, NO_REASON,
    },
    tcp::{AF_INET, AF_INET6, TcpTuple},
};

use super::tcp::config::{TCP_QUERIES, TcpFilter, tcp_global};
use crate::{
    attribution::owner::OwnerFilter,
    class::{BtfQueries, Class, ClassError, Context, Global, KernelTypes, MapSize, Tracepoint},
    kernel::{
        btf::{Answers, EnumValues},
        tracefs::Format,
        wire::{DecodeError, decode},
    },
    output::record::{Degraded, DropSummary, Endpoints, PacketDrop, ResolvedOwner},
    services::Services,
};

/// Options of `drop`.
#[derive(Debug, Args)]
pub(crate) struct DropArgs {
    /// Also write a `drop` record for each drop the kernel gives no
    /// particular reason for: NOT_SPECIFIED, which many drop sites still
    /// use, and every drop on kernels before 5.17, which have no reasons.
    /// Without it those are only counted, in `drop_summary`.
    #[arg(long)]
    pub all_reasons: bool,
}

const TRACEPOINTS: &[Tracepoint] = &[
    Tracepoint {
        group: "skb",
        name: "kfree_skb",
        program: "kfree_skb",
        btf_program: None,
        btf_check: None,
        required: true,
    },
    // Not a source of records: it tells the kernel programs who owns each
    // TCP socket, as for `retrans`.
    Tracepoint {
        group: "sock",
        name: "inet_sock_set_state",
        program: "inet_sock_set_state",
        btf_program: None,
        btf_check: None,
        required: false,
    },
];

/// The kernel's drop reasons.
const REASONS_ENUM: &str = "skb_drop_reason";

/// Where the packet's headers are, which end of it is the socket's, and
/// the socket's inode. Since 5.15 `network_header` is in a struct_group
/// and `sk` in a union: anonymous members, which the BTF reader looks into.
const DROP_QUERIES: BtfQueries = BtfQueries {
    members: &[
        ("sk_buff", "head"),
        ("sk_buff", "network_header"),
        ("sk_buff", "sk"),
        ("sock_common", "skc_num"),
        ("sock", "sk_socket"),
        ("socket_alloc", "socket"),
        ("socket_alloc", "vfs_inode"),
        ("inode", "i_ino"),
    ],
    enumerators: &[],
    enums: &[REASONS_ENUM],
};

/// (reason, protocol) pairs counted at once in the kernel: the kernel has
/// about 130 reasons and two protocols are followed. A full map is counted
/// as the class's `failed`.
const MAX_COUNTERS: u32 = 1024;

pub(crate) struct DropClass {
    filter: OwnerFilter,
    tcp: TcpFilter,
    all_reasons: bool,
    /// Whether this kernel's tracepoint has `reason` (5.17).
    has_reasons: bool,
    /// Reason values -> names, from the kernel's BTF.
    reasons: HashMap<u32, Arc<str>>,
    counts: Option<PerCpuHashMap<MapData, DropKey, u64>>,
    /// The counters at the last interval: they only grow.
    last: HashMap<DropKey, u64>,
}

impl DropClass {
    pub(crate) fn new(
        filter: OwnerFilter,
        tcp: TcpFilter,
        all_reasons: bool,
        services: &mut Services,
    ) -> Self {
        services.want_socket_owners();
        Self {
            filter,
            tcp,
            all_reasons,
            has_reasons: false,
            reasons: HashMap::new(),
            counts: None,
            last: HashMap::new(),
        }
    }

    /// A reason's fields in the records: its name and value, both null on
    /// kernels without reasons.
    fn reason(&self, value: u32) -> (Option<Arc<str>>, Option<u32>) {
        if !self.has_reasons {
            return (None, None);
        }
        (self.reasons.get(&value).cloned(), Some(value))
    }
}

/// kfree_skb's field offsets in `format`.
fn tp_offsets(format: Option<&Format>) -> DropTpOffsets {
    let Some(f) = format else {
        return DropTpOffsets::ABSENT;
    };
    let at = |name: &str| f.field(name).map_or(FIELD_ABSENT, |f| f.offset);
    DropTpOffsets {
        skbaddr: at("skbaddr"),
        protocol: at("protocol"),
        reason: at("reason"),
        rx_sk: at("rx_sk"),
    }
}

/// Reason values -> names as the kernel prints them (its tracepoint's
/// `__print_symbolic`): without the `SKB_DROP_REASON_` prefix.
pub(crate) fn reason_names(values: &EnumValues) -> HashMap<u32, Arc<str>> {
    values
        .iter()
        .filter_map(|(name, value)| {
            let short = name
                .strip_prefix("SKB_DROP_REASON_")
                .or_else(|| name.strip_prefix("SKB_"))
                .unwrap_or(name);
            Some((u32::try_from(*value).ok()?, Arc::from(short)))
        })
        .collect()
}

/// Where a socket's inode number is: `sk_socket` in `struct sock`, and the
/// inode number from the `struct socket` it points to, which lives in a
/// `struct socket_alloc` beside its inode (`SOCK_INODE`,
/// include/net/sock.h).
fn socket_inode_offsets(btf: &Answers) -> Result<(u16, u16), String> {
    let offset = |ty, member| btf.offset(ty, member).map_err(|e| e.to_string());
    let sk_socket = offset("sock", "sk_socket")?;
    let ino = (offset("socket_alloc", "vfs_inode")? + offset("inode", "i_ino")?)
        .checked_sub(offset("socket_alloc", "socket")?)
        .ok_or("struct socket_alloc has its inode before its socket")?;
    let fit = |o: u32| u16::try_from(o).map_err(|_| format!("offset {o} out of range"));
    Ok((fit(sk_socket)?, fit(ino)?))
}

/// Decodes one `drop` event.
pub(crate) fn decode_drop(data: &[u8]) -> Result<DropEvent, DecodeError> {
    let ev: DropEvent = decode(data, EventKind::Drop)?;
    if ev.protocol != u16::from(IPPROTO_TCP) && ev.protocol != u16::from(IPPROTO_UDP) {
        return Err(DecodeError::BadField {
            field: "protocol",
            value: u64::from(ev.protocol),
        });
    }
    if ev.tuple.family != AF_INET && ev.tuple.family != AF_INET6 {
        return Err(DecodeError::BadField {
            field: "family",
            value: u64::from(ev.tuple.family),
        });
    }
    Ok(ev)
}

fn protocol_name(protocol: u32) -> &'static str {
    if protocol == u32::from(IPPROTO_TCP) {
        "tcp"
    } else {
        "udp"
    }
}

/// The packet's addresses seen from its socket (local end first), for the
/// owner lookup; `None` when which end is the socket's is not known.
fn socket_tuple(ev: &DropEvent) -> Option<TcpTuple> {
    if ev.flags & DROP_DIRECTION_KNOWN == 0 {
        return None;
    }
    let mut t = ev.tuple;
    if ev.flags & DROP_INBOUND != 0 {
        std::mem::swap(&mut t.saddr, &mut t.daddr);
        std::mem::swap(&mut t.sport, &mut t.dport);
    }
    Some(t)
}

impl Class for DropClass {
    fn name(&self) -> &'static str {
        "drop"
    }

    fn id(&self) -> ClassId {
        ClassId::Drop
    }

    fn tracepoints(&self) -> &'static [Tracepoint] {
        TRACEPOINTS
    }

    fn btf_queries(&self) -> &'static [BtfQueries] {
        &[DROP_QUERIES, TCP_QUERIES]
    }

    fn map_sizes(&self) -> Vec<MapSize> {
        let mut sizes = self.tcp.owner_map_sizes();
        sizes.push(MapSize {
            map: "DROP_COUNTS",
            entries: MAX_COUNTERS,
        });
        sizes
    }

    fn configure(
        &mut self,
        kernel: &KernelTypes,
        degraded: &mut Vec<Degraded>,
    ) -> Result<Vec<Global>, ClassError> {
        let btf = &kernel.btf;
        let mut cfg = DropConfig::DEFAULT;
        cfg.tp = tp_offsets(kernel.formats.get("kfree_skb"));
        let skb = |member| {
            btf.offset("sk_buff", member)
                .map_err(|e| e.to_string())
                .and_then(|o| u16::try_from(o).map_err(|_| format!("offset {o} out of range")))
                .map_err(|e| {
                    ClassError::Unsupported(format!(
                        "drop: where a packet's headers are is not known: {e}"
                    ))
                })
        };
        cfg.skb_head = skb("head")?;
        cfg.skb_network_header = skb("network_header")?;
        cfg.skb_sk = skb("sk")?;
        match btf.offset("sock_common", "skc_num") {
            Ok(o) => cfg.sk_num = u16::try_from(o).unwrap_or(FIELD_ABSENT),
            Err(e) => degraded.push(Degraded {
                what: "btf/sock_common.skc_num".to_owned(),
                why: format!(
                    "which end of a dropped packet is its socket's is unknown: drops of TCP \
                     sockets older than the agent have no owner: {e}"
                ),
            }),
        }
        match socket_inode_offsets(btf) {
            Ok((sk_socket, socket_ino)) => {
                cfg.sk_socket = sk_socket;
                cfg.socket_ino = socket_ino;
            }
            Err(e) => degraded.push(Degraded {
                what: "btf/socket_alloc.vfs_inode".to_owned(),
                why: format!("drops of UDP sockets have no owner: {e}"),
            }),
        }
        self.has_reasons = cfg.tp.reason != FIELD_ABSENT;
        if !self.has_reasons {
            degraded.push(Degraded {
                what: "tracepoint/skb/kfree_skb.reason".to_owned(),
                why: "this kernel gives no drop reasons (they came in 5.17): drops have reason \
                      null, are counted in drop_summary, and are written one by one only with \
                      --all-reasons"
                    .to_owned(),
            });
        } else {
            match btf.enumerators_of(REASONS_ENUM) {
                Ok(values) => self.reasons = reason_names(values),
                Err(e) => degraded.push(Degraded {
                    what: format!("btf/enum {REASONS_ENUM}"),
                    why: format!(
                        "drop reasons have their value (reason_code) but no name, and drops \
                         without a particular reason are written one by one: {e}"
                    ),
                }),
            }
            cfg.not_specified = self
                .reasons
                .iter()
                .find(|(_, name)| &***name == "NOT_SPECIFIED")
                .map_or(NO_REASON, |(&v, _)| v);
        }
        cfg.all_reasons = u32::from(self.all_reasons);
        Ok(vec![
            Global::new("DROP_CONFIG", &cfg),
            tcp_global(kernel, &self.tcp, degraded),
        ])
    }

    fn on_loaded(&mut self, ebpf: &mut Ebpf) -> Result<(), ClassError> {
        const NAME: &str = "DROP_COUNTS";
        let map = ebpf.take_map(NAME).ok_or(ClassError::MissingMap(NAME))?;
        self.counts = Some(
            PerCpuHashMap::try_from(map)
                .map_err(|source| ClassError::Map { name: NAME, source })?,
        );
        Ok(())
    }

    fn handles(&self, kind: EventKind) -> bool {
        kind == EventKind::Drop
    }

    fn on_event(&mut self, data: &[u8], cx: &mut Context<'_>) -> Result<u64, ClassError> {
        let ev = decode_drop(data)?;
        // The owner of a TCP socket, as for retransmits; of a UDP socket,
        // the process that held its inode when the agent started.
        let owner = match socket_tuple(&ev) {
            Some(local) if ev.sock_id != 0 && ev.protocol == u16::from(IPPROTO_TCP) => {
                cx.services.owner(ev.sock_id, &ev.owner, &local, None)?
            }
            _ if ev.sock_ino != 0 => cx.services.socket_holder(ev.sock_ino)?,
            _ => ResolvedOwner::default(),
        };
        if !self.filter.accepts(&owner) {
            return Ok(0);
        }
        let (reason, reason_code) = self.reason(ev.reason);
        let record = PacketDrop {
            owner,
            protocol: protocol_name(u32::from(ev.protocol)),
            packet: Endpoints::new(&ev.tuple),
            reason,
            reason_code,
        };
        cx.out.write(ev.header.ts_ns, &record)?;
        Ok(1)
    }

    fn on_interval(
        &mut self,
        now_ns: u64,
        interval_ns: u64,
        cx: &mut Context<'_>,
    ) -> Result<(), ClassError> {
        let Some(counts) = &self.counts else {
            return Ok(());
        };
        let mut now = Vec::new();
        for entry in counts.iter() {
            let (key, per_cpu) = entry.map_err(|source| ClassError::Map {
                name: "DROP_COUNTS",
                source,
            })?;
            now.push((key, per_cpu.iter().sum::<u64>()));
        }
        now.sort_unstable_by_key(|&(k, _)| (k.reason, k.protocol));
        for (key, total) in now {
            let before = self.last.insert(key, total).unwrap_or(0);
            let count = total.saturating_sub(before);
            if count == 0 {
                continue;
            }
            let (reason, reason_code) = self.reason(key.reason);
            let protocol = protocol_name(key.protocol);
            cx.services
                .metrics()
                .packet_drops(reason.as_deref(), protocol, count);
            cx.out.write(
                now_ns,
                &DropSummary {
                    reason,
                    reason_code,
                    protocol,
                    count,
                    interval_ns,
                },
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use kdiag_common::{EventHeader, Owner};

    use super::*;

    fn event() -> DropEvent {
        let mut tuple = TcpTuple {
            family: AF_INET,
            sport: 40000,
            dport: 53,
            ..TcpTuple::default()
        };
        tuple.saddr[..4].copy_from_slice(&[10, 231, 0, 1]);
        tuple.daddr[..4].copy_from_slice(&[10, 231, 0, 2]);
        DropEvent {
            header: EventHeader {
                kind: EventKind::Drop as u32,
                cpu: 0,
                ts_ns: 5,
            },
            sock_id: 0xffff_8880_0bad_cafe,
            sock_ino: 0,
            owner: Owner::default(),
            tuple,
            reason: 3,
            protocol: u16::from(IPPROTO_UDP),
            flags: 0,
        }
    }

    fn bytes(ev: &DropEvent) -> Vec<u8> {
        crate::sys::pod::bytes_of(ev).to_vec()
    }

    #[test]
    fn reasons_are_named_as_the_tracepoint_prints_them() {
        let values = vec![
            ("SKB_NOT_DROPPED_YET".to_owned(), 0),
            ("SKB_CONSUMED".to_owned(), 1),
            ("SKB_DROP_REASON_NOT_SPECIFIED".to_owned(), 2),
            ("SKB_DROP_REASON_NO_SOCKET".to_owned(), 3),
            ("SKB_DROP_REASON_NETFILTER_DROP".to_owned(), 12),
        ];
        let names = reason_names(&values);
        assert_eq!(names.get(&3).map(|n| &**n), Some("NO_SOCKET"));
        assert_eq!(names.get(&12).map(|n| &**n), Some("NETFILTER_DROP"));
        assert_eq!(names.get(&2).map(|n| &**n), Some("NOT_SPECIFIED"));
        assert_eq!(names.get(&1).map(|n| &**n), Some("CONSUMED"));
    }

    #[test]
    fn decodes_and_orients_the_socket_end() {
        let ev = decode_drop(&bytes(&event())).unwrap();
        assert_eq!(socket_tuple(&ev), None);
        let mut inbound = ev;
        inbound.flags = DROP_DIRECTION_KNOWN | DROP_INBOUND;
        let local = socket_tuple(&inbound).unwrap();
        assert_eq!((local.sport, local.dport), (53, 40000));
        assert_eq!(local.saddr[..4], [10, 231, 0, 2]);
        let mut outbound = ev;
        outbound.flags = DROP_DIRECTION_KNOWN;
        assert_eq!(socket_tuple(&outbound), Some(ev.tuple));
    }

    #[test]
    fn records_carry_the_packets_ends_and_no_pointer() {
        let ev = decode_drop(&bytes(&event())).unwrap();
        let record = PacketDrop {
            owner: ResolvedOwner::default(),
            protocol: protocol_name(u32::from(ev.protocol)),
            packet: Endpoints::new(&ev.tuple),
            reason: Some(Arc::from("NO_SOCKET")),
            reason_code: Some(ev.reason),
        };
        let json = serde_json::to_value(&record).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "pid": null, "comm": null, "cgroup": null, "container_id": null,
                "pod_uid": null, "protocol": "udp", "family": "ipv4",
                "saddr": "10.231.0.1", "sport": 40000, "daddr": "10.231.0.2", "dport": 53,
                "reason": "NO_SOCKET", "reason_code": 3
            })
        );
        assert!(!json.to_string().contains(&ev.sock_id.to_string()));
    }

    #[test]
    fn rejects_short_wrong_kind_and_bad_fields() {
        let b = bytes(&event());
        assert!(matches!(
            decode_drop(&b[..b.len() - 1]),
            Err(DecodeError::Short { .. })
        ));
        let mut ev = event();
        ev.header.kind = EventKind::Retrans as u32;
        assert!(matches!(
            decode_drop(&bytes(&ev)),
            Err(DecodeError::WrongKind { .. })
        ));
        let mut ev = event();
        ev.protocol = 1;
        assert!(matches!(
            decode_drop(&bytes(&ev)),
            Err(DecodeError::BadField {
                field: "protocol",
                ..
            })
        ));
        let mut ev = event();
        ev.tuple.family = 1;
        assert!(matches!(
            decode_drop(&bytes(&ev)),
            Err(DecodeError::BadField {
                field: "family",
                ..
            })
        ));
    }
}
