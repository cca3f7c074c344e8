//! `tcp`: TCP state changes with their owner and timing, a `tcp_conn`
//! summary of each connection when it closes, and a `tcp_summary` per
//! interval putting kdiag's retransmits beside the kernel's segment counters.

use std::collections::HashMap;

use kdiag_common::{
    ClassId, EventKind,
    tcp::{
        ROLE_ACTIVE, ROLE_LISTENER, ROLE_PASSIVE, STATE_TIME_KNOWN, SockFields, TCP_CLOSE,
        TCP_LISTEN, TcpCloseEvent, TcpStateEvent, TcpTuple,
    },
};

use super::{
    config::{RETRANSMIT_SKB, RETRANSMIT_SYNACK, SET_STATE, TCP_QUERIES, TcpFilter, tcp_global},
    conns::{ConnHistory, ConnTable},
    health::{CLOSE_FIELDS, ChronoLayout, SOCK_QUERIES, conn_health, missing_note, plan},
    retrans::decode_retrans,
    state_names::{STATE_COUNT, state_name},
};
use crate::{
    attribution::{owner::OwnerFilter, procfs},
    class::{BtfQueries, Class, ClassError, Context, Global, KernelTypes, MapSize, Tracepoint},
    kernel::wire::{DecodeError, decode, event_kind},
    output::record::ResolvedOwner,
    output::record::{ConnHealth, Degraded, Endpoints, TcpConn, TcpState, TcpSummary, TopConn},
    services::Services,
    sys,
};

const TRACEPOINTS: &[Tracepoint] = &[
    Tracepoint {
        required: true,
        ..SET_STATE
    },
    // A raw tracepoint: the close of a socket whose change to CLOSE the
    // kernel skipped (see kdiag-ebpf's tcp_destroy_sock). Without it such
    // a connection has no tcp_conn.
    Tracepoint {
        group: "tcp",
        name: "tcp_destroy_sock",
        program: "tcp_destroy_sock",
        btf_program: None,
        btf_check: None,
        required: false,
    },
    // Retransmits feed tcp_summary and the per-connection counts.
    RETRANSMIT_SKB,
    RETRANSMIT_SYNACK,
];

/// Connections followed at once in userspace for `tcp_conn`: 7/8 of 65536,
/// the most a hash table of 65536 slots holds (7 MiB of connections and a
/// 1 MiB index when full).
const MAX_CONNS: usize = 57_344;
/// Connections in `tcp_summary.top`.
const TOP_CONNS: usize = 10;
/// Distinct retransmitting connections counted per interval for `top`.
const MAX_RETRANS_CONNS: usize = 4096;

pub(crate) struct TcpClass {
    filter: OwnerFilter,
    tcp: TcpFilter,
    /// Only changes into or out of this state are written as `tcp_state`.
    state: Option<i32>,
    conns: ConnTable,
    /// This interval's retransmits per connection.
    retrans: RetransCounts,
    retrans_total: u64,
    snmp_last: Option<(u64, u64)>,
    /// How to decode the chronographs; `None` where this kernel's cannot be.
    chrono: Option<ChronoLayout>,
}

impl TcpClass {
    pub(crate) fn new(
        filter: OwnerFilter,
        tcp: TcpFilter,
        state: Option<i32>,
        services: &mut Services,
    ) -> Self {
        services.want_socket_owners();
        Self {
            filter,
            tcp,
            state,
            conns: ConnTable::new(MAX_CONNS),
            retrans: RetransCounts::default(),
            retrans_total: 0,
            snmp_last: procfs::tcp_segments(),
            chrono: None,
        }
    }

    /// A state change; `sock` holds the connection's totals when it is a
    /// close (a `TcpConn` event).
    fn on_state(
        &mut self,
        ev: &TcpStateEvent,
        sock: Option<&SockFields>,
        cx: &mut Context<'_>,
    ) -> Result<u64, ClassError> {
        // An accepted socket's owner is its listener's; `net` is 0 when the
        // programs could not read the namespace, then the port alone names
        // the listener.
        let listener = (ev.role == ROLE_PASSIVE).then_some((ev.net, ev.tuple.sport));
        // First: nothing below happens for an event held for its owner.
        let owner = cx
            .services
            .owner(ev.sock_id, &ev.owner, &ev.tuple, listener)?;
        if ev.oldstate == TCP_LISTEN && ev.newstate == TCP_CLOSE {
            cx.services.forget_listener((ev.net, ev.tuple.sport));
        }
        let old_state_ns = (ev.flags & STATE_TIME_KNOWN != 0).then_some(ev.old_state_ns);
        let ts = ev.header.ts_ns;
        // Every change feeds the connection's history, even those the
        // filters keep out of the output.
        let closed = self.conns.on_change(
            ev.sock_id,
            &ev.tuple,
            (ev.oldstate, ev.newstate),
            old_state_ns,
            ts,
        );
        if !self.filter.accepts(&owner) {
            cx.filtered = true;
            return Ok(0);
        }
        let mut written = 0;
        if self
            .state
            .is_none_or(|s| s == ev.oldstate || s == ev.newstate)
        {
            cx.out
                .write(ts, &state_record(ev, owner.clone(), old_state_ns))?;
            written += 1;
        }
        if let Some(history) = closed {
            let health = sock
                .map(|s| conn_health(s, self.chrono))
                .unwrap_or_default();
            let seen = CloseSeen::Change;
            written += write_conn(ev, &ev.tuple, owner, history, seen, health, cx)?;
        }
        Ok(written)
    }

    /// A socket destroyed while the programs held it: its change to CLOSE
    /// (and maybe others before it) was skipped by the kernel. Its
    /// `tcp_conn` is written from its history here, marked inferred.
    fn on_destroy(&mut self, data: &[u8], cx: &mut Context<'_>) -> Result<u64, ClassError> {
        let ev: TcpStateEvent = decode(data, EventKind::TcpDestroy)?;
        // A socket none of whose changes was reported: the family and port
        // filters, which the programs apply to changes, kept it out.
        let Some(tuple) = self.conns.tuple(ev.sock_id) else {
            cx.filtered = true;
            return Ok(0);
        };
        let listener = (ev.role == ROLE_PASSIVE).then_some((ev.net, tuple.sport));
        // First: nothing below happens for an event held for its owner.
        let owner = cx.services.owner(ev.sock_id, &ev.owner, &tuple, listener)?;
        if ev.role == ROLE_LISTENER {
            cx.services.forget_listener((ev.net, tuple.sport));
        }
        let old_state_ns = (ev.flags & STATE_TIME_KNOWN != 0).then_some(ev.old_state_ns);
        let Some((history, tuple)) =
            self.conns
                .on_destroy(ev.sock_id, old_state_ns, ev.header.ts_ns)
        else {
            return Ok(0);
        };
        if !self.filter.accepts(&owner) {
            cx.filtered = true;
            return Ok(0);
        }
        // No socket to read totals from: they are null.
        let health = ConnHealth::default();
        write_conn(
            &ev,
            &tuple,
            owner,
            history,
            CloseSeen::Destroyed,
            health,
            cx,
        )
    }

    fn on_retrans(&mut self, data: &[u8], cx: &mut Context<'_>) -> Result<u64, ClassError> {
        let ev = decode_retrans(data)?;
        self.retrans.add((ev.sock_id, ev.tuple), || {
            cx.services.owner(ev.sock_id, &ev.owner, &ev.tuple, None)
        })?;
        // After the owner: an event held for it comes back.
        self.retrans_total += 1;
        // Counted for the summary; the `retrans` class writes the records.
        Ok(0)
    }
}

/// One interval's retransmits per connection, for `tcp_summary.top`: at
/// most `MAX_RETRANS_CONNS` connections, the retransmits of others counted
/// as untracked.
#[derive(Default)]
struct RetransCounts {
    per_conn: HashMap<(u64, TcpTuple), (ResolvedOwner, u64)>,
    untracked: u64,
}

impl RetransCounts {
    /// Counts a retransmit of connection `key`, whose owner `owner` looks
    /// up when the connection is new (and may be pending: then nothing is
    /// counted, and the event comes back).
    fn add(
        &mut self,
        key: (u64, TcpTuple),
        owner: impl FnOnce() -> Result<ResolvedOwner, ClassError>,
    ) -> Result<(), ClassError> {
        if let Some((_, n)) = self.per_conn.get_mut(&key) {
            *n += 1;
        } else if self.per_conn.len() < MAX_RETRANS_CONNS {
            self.per_conn.insert(key, (owner()?, 1));
        } else {
            self.untracked += 1;
        }
        Ok(())
    }

    /// The `TOP_CONNS` connections with the most retransmits and the
    /// retransmits untracked, and a new interval.
    fn take_top(&mut self) -> (Vec<TopConn>, u64) {
        let mut top: Vec<_> = self.per_conn.drain().collect();
        top.sort_unstable_by_key(|(_, (_, n))| std::cmp::Reverse(*n));
        top.truncate(TOP_CONNS);
        let top = top
            .into_iter()
            .map(|((_, tuple), (owner, retrans))| TopConn {
                owner,
                conn: Endpoints::new(&tuple),
                retrans,
            })
            .collect();
        (top, std::mem::take(&mut self.untracked))
    }
}

/// How a connection's close was seen.
#[derive(Clone, Copy)]
enum CloseSeen {
    /// Its change to CLOSE.
    Change,
    /// Only its destruction: the kernel skipped its change to CLOSE.
    Destroyed,
}

/// Writes the `tcp_conn` of the closed connection `ev` (at `tuple`, with
/// `history` and the totals read at its close), unless it was a listener;
/// returns the records written.
fn write_conn(
    ev: &TcpStateEvent,
    tuple: &TcpTuple,
    owner: ResolvedOwner,
    history: ConnHistory,
    seen: CloseSeen,
    health: ConnHealth,
    cx: &mut Context<'_>,
) -> Result<u64, ClassError> {
    if ev.role == ROLE_LISTENER {
        return Ok(0);
    }
    let ts = ev.header.ts_ns;
    let record = TcpConn {
        owner,
        conn: Endpoints::new(tuple),
        role: match ev.role {
            ROLE_ACTIVE => Some("active"),
            ROLE_PASSIVE => Some("passive"),
            _ => None,
        },
        duration_ns: (ev.created_ns != 0).then(|| ts.saturating_sub(ev.created_ns)),
        handshake_ns: history.handshake_ns,
        retrans: ev.retrans,
        state_ns: history.state_ns,
        close: match seen {
            CloseSeen::Change => "seen",
            CloseSeen::Destroyed => "inferred",
        },
        health,
    };
    cx.out.write(ts, &record)?;
    cx.services
        .metrics()
        .connection_closed(record.role, record.handshake_ns, record.duration_ns);
    Ok(1)
}

/// Decodes one `tcp_state` event.
pub(crate) fn decode_state(data: &[u8]) -> Result<TcpStateEvent, DecodeError> {
    let ev: TcpStateEvent = decode(data, EventKind::TcpState)?;
    check_states(&ev)?;
    Ok(ev)
}

/// Decodes one `tcp_conn` event: a change into CLOSE with the connection's
/// totals.
pub(crate) fn decode_close(data: &[u8]) -> Result<TcpCloseEvent, DecodeError> {
    let ev: TcpCloseEvent = decode(data, EventKind::TcpConn)?;
    check_states(&ev.state)?;
    if ev.state.newstate != TCP_CLOSE {
        return Err(DecodeError::BadField {
            field: "newstate",
            value: ev.state.newstate as u64,
        });
    }
    Ok(ev)
}

fn check_states(ev: &TcpStateEvent) -> Result<(), DecodeError> {
    for (field, state) in [("oldstate", ev.oldstate), ("newstate", ev.newstate)] {
        if !(1..STATE_COUNT as i32).contains(&state) {
            return Err(DecodeError::BadField {
                field,
                value: state as u64,
            });
        }
    }
    Ok(())
}

pub(crate) fn state_record(
    ev: &TcpStateEvent,
    owner: ResolvedOwner,
    old_state_ns: Option<u64>,
) -> TcpState {
    TcpState {
        owner,
        conn: Endpoints::new(&ev.tuple),
        old_state: state_name(ev.oldstate),
        new_state: state_name(ev.newstate),
        old_state_ns,
    }
}

impl Class for TcpClass {
    fn name(&self) -> &'static str {
        "tcp"
    }

    fn id(&self) -> ClassId {
        ClassId::Tcp
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
        let (_, missing) = plan(&kernel.btf, CLOSE_FIELDS);
        degraded.extend(missing_note("tcp_conn", &missing));
        self.chrono = ChronoLayout::new(kernel, sys::process::tick_ns())
            .map_err(|why| {
                degraded.push(Degraded {
                    what: "tcp_conn chronographs".to_owned(),
                    why: format!(
                        "tcp_conn records carry null busy_ns, rwnd_limited_ns, \
                         sndbuf_limited_ns and limited_by: {why}"
                    ),
                });
            })
            .ok();
        Ok(vec![tcp_global(kernel, &self.tcp, degraded)])
    }

    fn handles(&self, kind: EventKind) -> bool {
        matches!(
            kind,
            EventKind::TcpState | EventKind::TcpConn | EventKind::TcpDestroy | EventKind::Retrans
        )
    }

    fn on_event(&mut self, data: &[u8], cx: &mut Context<'_>) -> Result<u64, ClassError> {
        match event_kind(data)? {
            EventKind::Retrans => self.on_retrans(data, cx),
            EventKind::TcpConn => {
                let ev = decode_close(data)?;
                self.on_state(&ev.state, Some(&ev.sock), cx)
            }
            EventKind::TcpDestroy => self.on_destroy(data, cx),
            _ => self.on_state(&decode_state(data)?, None, cx),
        }
    }

    fn on_interval(
        &mut self,
        now_ns: u64,
        interval_ns: u64,
        cx: &mut Context<'_>,
    ) -> Result<(), ClassError> {
        let snmp = procfs::tcp_segments();
        let delta = match (self.snmp_last, snmp) {
            (Some((r0, o0)), Some((r1, o1))) => Some((r1.wrapping_sub(r0), o1.wrapping_sub(o0))),
            _ => None,
        };
        self.snmp_last = snmp;
        let (top, retrans_untracked) = self.retrans.take_top();
        let summary = TcpSummary {
            retrans: std::mem::take(&mut self.retrans_total),
            retrans_segs: delta.map(|d| d.0),
            out_segs: delta.map(|d| d.1),
            retrans_ratio: delta.and_then(|(r, o)| (o > 0).then(|| r as f64 / o as f64)),
            top,
            retrans_untracked,
            conns_tracked: self.conns.len() as u64,
            conns_evicted: self.conns.take_evicted(),
            sequence_gaps: self.conns.take_gaps(),
            socks_evicted: self.conns.take_socks_evicted(),
            interval_ns,
        };
        cx.out.write(now_ns, &summary)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use kdiag_common::{
        EventHeader, Owner,
        tcp::{SOCK_FIELDS, SockField, TCP_ESTABLISHED},
    };

    use super::*;
    use crate::{output::record::ConnHealth, sys::pod::bytes_of};

    fn close_event(newstate: i32) -> TcpCloseEvent {
        let mut sock = SockFields {
            values: [0; SOCK_FIELDS],
            present: 0,
            _pad: 0,
            jiffies: 0,
        };
        for (f, v) in [
            (SockField::BytesAcked, 1_000_002),
            (SockField::BytesReceived, 1),
        ] {
            sock.values[f as usize] = v;
            sock.present |= 1 << f as u32;
        }
        TcpCloseEvent {
            state: TcpStateEvent {
                header: EventHeader {
                    kind: EventKind::TcpConn as u32,
                    cpu: 0,
                    ts_ns: 10,
                },
                sock_id: 1,
                owner: Owner::default(),
                tuple: TcpTuple::default(),
                // FIN_WAIT2 (include/net/tcp_states.h).
                oldstate: 5,
                newstate,
                old_state_ns: 0,
                created_ns: 0,
                retrans: 0,
                role: ROLE_ACTIVE,
                flags: 0,
                _pad: 0,
                net: 0,
            },
            sock,
        }
    }

    #[test]
    fn retransmits_past_the_connections_counted_are_untracked() {
        let mut counts = RetransCounts::default();
        let conn = |i: u64| (i, TcpTuple::default());
        for i in 0..=MAX_RETRANS_CONNS as u64 {
            for _ in 0..=i % 3 {
                counts
                    .add(conn(i), || Ok(ResolvedOwner::default()))
                    .unwrap();
            }
        }
        // The connection past the table's room retransmitted once (4096 % 3
        // is 1: twice); an owner still pending counts nothing.
        let pending = counts.add(conn(0), || Err(ClassError::LookupPending));
        assert!(pending.is_ok(), "a known connection needs no owner");
        let (top, untracked) = counts.take_top();
        assert_eq!(untracked, 2);
        assert_eq!(top.len(), TOP_CONNS);
        assert!(top.iter().all(|c| c.retrans == 3));
        assert_eq!(counts.take_top(), (Vec::new(), 0), "a new interval");
    }

    #[test]
    fn close_events_carry_the_sockets_totals() {
        let ev = decode_close(bytes_of(&close_event(TCP_CLOSE))).unwrap();
        let health = conn_health(&ev.sock, None);
        assert_eq!(
            health,
            ConnHealth {
                bytes_acked: Some(1_000_002),
                bytes_received: Some(1),
                ..ConnHealth::default()
            }
        );
        // Only a change into CLOSE carries them, under its own kind.
        assert!(matches!(
            decode_close(bytes_of(&close_event(TCP_ESTABLISHED))),
            Err(DecodeError::BadField {
                field: "newstate",
                ..
            })
        ));
        let b = bytes_of(&close_event(TCP_CLOSE)).to_vec();
        assert!(matches!(
            decode_state(&b),
            Err(DecodeError::WrongKind { .. })
        ));
        assert!(matches!(
            decode_close(&b[..b.len() - 1]),
            Err(DecodeError::Short { .. })
        ));
    }
}
