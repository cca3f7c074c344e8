//! `retrans`: every TCP retransmit, attributed to the socket's owner.

use kdiag_common::{
    ClassId, EventKind,
    tcp::{RetransEvent, RetransKind},
};

use super::{
    config::{RETRANSMIT_SKB, RETRANSMIT_SYNACK, SET_STATE, TCP_QUERIES, TcpFilter, tcp_global},
    health::{RETRANS_FIELDS, SOCK_QUERIES, missing_note, plan, sender_state},
    state_names::state_name,
};
use crate::{
    attribution::owner::OwnerFilter,
    class::{BtfQueries, Class, ClassError, Context, Global, KernelTypes, MapSize, Tracepoint},
    kernel::wire::{DecodeError, decode},
    output::record::ResolvedOwner,
    output::record::{Degraded, Endpoints, Retrans},
    services::Services,
};

const TRACEPOINTS: &[Tracepoint] = &[
    Tracepoint {
        required: true,
        ..RETRANSMIT_SKB
    },
    RETRANSMIT_SYNACK,
    // Not a source of records: it tells the kernel programs who owns each
    // socket. Without it only the owners of sockets older than the agent
    // are known (from /proc, at start-up).
    SET_STATE,
];

pub(crate) struct RetransClass {
    filter: OwnerFilter,
    tcp: TcpFilter,
}

impl RetransClass {
    pub(crate) fn new(filter: OwnerFilter, tcp: TcpFilter, services: &mut Services) -> Self {
        services.want_socket_owners();
        Self { filter, tcp }
    }
}

/// Decodes one `retrans` event.
pub(crate) fn decode_retrans(data: &[u8]) -> Result<RetransEvent, DecodeError> {
    let ev: RetransEvent = decode(data, EventKind::Retrans)?;
    if RetransKind::from_u32(ev.kind).is_none() {
        return Err(DecodeError::BadField {
            field: "kind",
            value: u64::from(ev.kind),
        });
    }
    Ok(ev)
}

/// The record for a decoded event and its owner.
pub(crate) fn retrans_record(ev: &RetransEvent, owner: ResolvedOwner) -> Retrans {
    let kind = match RetransKind::from_u32(ev.kind) {
        Some(RetransKind::Syn) => "syn",
        Some(RetransKind::SynAck) => "synack",
        _ => "data",
    };
    Retrans {
        owner,
        conn: Endpoints::new(&ev.tuple),
        state: state_name(ev.state),
        kind,
        conn_retrans: ev.conn_retrans,
        sender: sender_state(&ev.sock),
    }
}

impl Class for RetransClass {
    fn name(&self) -> &'static str {
        "retrans"
    }

    fn id(&self) -> ClassId {
        ClassId::Retrans
    }

    fn tracepoints(&self) -> &'static [Tracepoint] {
        TRACEPOINTS
    }

    fn btf_queries(&self) -> &'static [BtfQueries] {
        &[TCP_QUERIES, SOCK_QUERIES]
    }

    fn map_sizes(&self) -> Vec<MapSize> {
        self.tcp.map_sizes()
    }

    fn configure(
        &mut self,
        kernel: &KernelTypes,
        degraded: &mut Vec<Degraded>,
    ) -> Result<Vec<Global>, ClassError> {
        let (_, missing) = plan(&kernel.btf, RETRANS_FIELDS);
        degraded.extend(missing_note("retrans", &missing));
        Ok(vec![tcp_global(kernel, &self.tcp, degraded)])
    }

    fn handles(&self, kind: EventKind) -> bool {
        kind == EventKind::Retrans
    }

    fn on_event(&mut self, data: &[u8], cx: &mut Context<'_>) -> Result<u64, ClassError> {
        let ev = decode_retrans(data)?;
        let owner = cx.services.owner(ev.sock_id, &ev.owner, &ev.tuple, None)?;
        if !self.filter.accepts(&owner) {
            cx.filtered = true;
            return Ok(0);
        }
        let record = retrans_record(&ev, owner);
        cx.out.write(ev.header.ts_ns, &record)?;
        let pod = record
            .owner
            .cgroup
            .0
            .as_ref()
            .and_then(|c| c.pod_uid.as_deref());
        cx.services
            .metrics()
            .retransmit(record.state, record.kind, pod);
        Ok(1)
    }
}

#[cfg(test)]
mod tests {
    use kdiag_common::{
        EventHeader, Owner,
        tcp::{AF_INET6, SOCK_FIELDS, SockField, SockFields, TcpTuple},
    };

    use super::*;
    use crate::output::record::Cgroup;

    fn event() -> RetransEvent {
        let mut tuple = TcpTuple {
            family: 2,
            sport: 50000,
            dport: 9001,
            ..TcpTuple::default()
        };
        tuple.saddr[..4].copy_from_slice(&[10, 231, 0, 2]);
        tuple.daddr[..4].copy_from_slice(&[10, 231, 0, 1]);
        RetransEvent {
            header: EventHeader {
                kind: EventKind::Retrans as u32,
                cpu: 1,
                ts_ns: 123,
            },
            sock_id: 0xffff_8880_dead_beef,
            owner: Owner::default(),
            tuple,
            state: 2,
            kind: RetransKind::Syn as u32,
            conn_retrans: 3,
            _pad: 0,
            sock: sock(&[
                (SockField::SrttUs, 20_000 << 3),
                (SockField::MdevUs, 4 * 2500),
                (SockField::Cwnd, 1),
                (SockField::Ssthresh, 7),
                (SockField::PacketsOut, 1),
                (SockField::LostOut, 0),
                (SockField::RetransOut, 1),
            ]),
        }
    }

    /// Socket fields as the programs send them: these read, the rest not.
    fn sock(read: &[(SockField, u64)]) -> SockFields {
        let mut s = SockFields {
            values: [0; SOCK_FIELDS],
            present: 0,
            _pad: 0,
            jiffies: 0,
        };
        for &(f, v) in read {
            s.values[f as usize] = v;
            s.present |= 1 << f as u32;
        }
        s
    }

    fn bytes(ev: &RetransEvent) -> Vec<u8> {
        crate::sys::pod::bytes_of(ev).to_vec()
    }

    #[test]
    fn decodes_and_formats_ipv4_syn() {
        let ev = decode_retrans(&bytes(&event())).unwrap();
        let owner = ResolvedOwner {
            pid: Some(77),
            comm: Some("curl".into()),
            cgroup: Cgroup(Some(crate::attribution::cgroup::cgroup_name("/a"))),
        };
        let r = retrans_record(&ev, owner);
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "pid": 77, "comm": "curl", "cgroup": "/a", "container_id": null, "pod_uid": null,
                "family": "ipv4",
                "saddr": "10.231.0.2", "sport": 50000, "daddr": "10.231.0.1", "dport": 9001,
                "state": "SYN_SENT", "kind": "syn", "conn_retrans": 3,
                // In tcp_info's units; total_retrans was not read.
                "srtt_us": 20_000, "rttvar_us": 2500, "cwnd": 1, "ssthresh": 7,
                "packets_out": 1, "lost_out": 0, "retrans_out": 1, "total_retrans": null
            })
        );
        // No kernel pointer leaks into the record.
        assert!(
            !json
                .to_string()
                .contains(&0xffff_8880_dead_beefu64.to_string())
        );
    }

    #[test]
    fn formats_ipv6_synack_with_unknown_owner() {
        let mut ev = event();
        ev.tuple.family = AF_INET6;
        ev.tuple.saddr = "fd00::1".parse::<std::net::Ipv6Addr>().unwrap().octets();
        ev.tuple.daddr = "fd00::2".parse::<std::net::Ipv6Addr>().unwrap().octets();
        ev.kind = RetransKind::SynAck as u32;
        ev.state = 3;
        let r = retrans_record(
            &decode_retrans(&bytes(&ev)).unwrap(),
            ResolvedOwner::default(),
        );
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["family"], "ipv6");
        assert_eq!(json["saddr"], "fd00::1");
        assert_eq!(json["kind"], "synack");
        assert_eq!(json["state"], "SYN_RECV");
        assert!(json["pid"].is_null() && json["comm"].is_null() && json["cgroup"].is_null());
    }

    #[test]
    fn rejects_short_wrong_kind_and_bad_fields() {
        let b = bytes(&event());
        assert!(matches!(
            decode_retrans(&b[..b.len() - 1]),
            Err(DecodeError::Short { .. })
        ));
        let mut ev = event();
        ev.header.kind = 99;
        assert!(matches!(
            decode_retrans(&bytes(&ev)),
            Err(DecodeError::WrongKind { .. })
        ));
        let mut ev = event();
        ev.kind = 7;
        assert!(matches!(
            decode_retrans(&bytes(&ev)),
            Err(DecodeError::BadField { .. })
        ));
    }

    #[test]
    fn owner_filter_by_pid_and_cgroup() {
        let owner = |pid, cg: &str| ResolvedOwner {
            pid: Some(pid),
            comm: None,
            cgroup: Cgroup(Some(crate::attribution::cgroup::cgroup_name(cg))),
        };
        let f = OwnerFilter {
            pids: vec![5],
            cgroup: None,
        };
        assert!(f.accepts(&owner(5, "/")));
        assert!(!f.accepts(&owner(6, "/")));
        assert!(!f.accepts(&ResolvedOwner::default()));
        let f = OwnerFilter {
            pids: vec![],
            cgroup: Some("/system.slice".into()),
        };
        assert!(f.accepts(&owner(1, "/system.slice")));
        assert!(f.accepts(&owner(1, "/system.slice/nginx.service")));
        assert!(!f.accepts(&owner(1, "/system.slicer")));
        assert!(!f.accepts(&owner(1, "/user.slice")));
    }
}
