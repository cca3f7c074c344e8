//! Per-connection aggregation for `tcp_conn`: time per state and handshake
//! time, accumulated from state changes, handed over when the connection
//! closes. Bounded: when full, the connections idle longest are evicted
//! (their close is then not summarised) and counted.

use std::{collections::BTreeMap, num::NonZeroU64};

use foldhash::{HashMap, HashMapExt as _};

use kdiag_common::tcp::{
    TCP_CLOSE, TCP_ESTABLISHED, TCP_LISTEN, TCP_SYN_RECV, TCP_SYN_SENT, TcpTuple,
};

use crate::classes::tcp::state_names::{STATE_COUNT, state_name};

/// What a closed connection's record needs from its past.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ConnHistory {
    pub state_ns: BTreeMap<&'static str, u64>,
    pub handshake_ns: Option<u64>,
}

/// Kept small: a busy host fills the table (168 bytes a connection, plus 16
/// in the index).
#[derive(Debug, Default)]
struct Conn {
    state_ns: [u64; STATE_COUNT],
    /// Bit `i` set: `state_ns[i]` was measured (a state seen for 0 ns still
    /// counts as seen).
    states_seen: u16,
    /// The state of the last change seen: where a close seen only as the
    /// socket's destruction left from.
    state: u8,
    handshake_ns: Option<NonZeroU64>,
    last_seen_ns: u64,
    /// The connection's ends as of the last change seen, for the record of
    /// a close seen only as the socket's destruction (whose event has none).
    tuple: TcpTuple,
}

impl Conn {
    /// Adds the change `old` -> `new`, after `old_state_ns` in `old` when
    /// known.
    fn add(&mut self, old: i32, new: i32, old_state_ns: Option<u64>, now_ns: u64) {
        self.last_seen_ns = now_ns;
        self.state = u8::try_from(new).unwrap_or(0);
        if let (Some(ns), Ok(i)) = (old_state_ns, usize::try_from(old))
            && i < STATE_COUNT
            // The time "in CLOSE" before connect() or listen() is not a state
            // of the connection; 0 is no state (nothing seen).
            && old != TCP_CLOSE
            && old != 0
        {
            self.state_ns[i] += ns;
            self.states_seen |= 1 << i;
            if new == TCP_ESTABLISHED && (old == TCP_SYN_SENT || old == TCP_SYN_RECV) {
                // A handshake of 0 ns is not one the clock can show.
                self.handshake_ns = NonZeroU64::new(ns);
            }
        }
    }
}

/// The connections live in `slots`, allocated once at the cap, and the hash
/// map only indexes them. A hash map that held them itself would double
/// under churn although never fuller than its cap: each removal leaves a
/// tombstone, and when tombstones use up the free room of a table more than
/// half full, the table grows instead of reusing them (measured: 9 MiB for
/// the connections became 18, with both held while it copied). Now that can
/// only happen to the small index.
#[derive(Debug)]
pub(crate) struct ConnTable {
    /// Socket -> its slot. Hashed with foldhash, as the agent's other maps
    /// looked up per event: SipHash, std's default, took 6% of the agent's
    /// time per record under churn, and its resistance to chosen keys buys
    /// nothing for kernel addresses.
    index: HashMap<u64, u32>,
    slots: Vec<Conn>,
    /// Slots of closed or evicted connections, reused before new ones.
    free: Vec<u32>,
    max: usize,
    evicted: u64,
    /// Changes whose old state was not the new state of the socket's change
    /// before (see [`ConnTable::take_gaps`]).
    gaps: u64,
    /// Sockets the kernel's socket map forgot (see
    /// [`ConnTable::take_socks_evicted`]).
    socks_evicted: u64,
}

impl ConnTable {
    /// Room for `max` connections is taken up front, so that the table never
    /// reallocates. Pages not yet used cost no memory.
    pub(crate) fn new(max: usize) -> Self {
        let max = max.max(1);
        Self {
            index: HashMap::with_capacity(max),
            slots: Vec::with_capacity(max),
            free: Vec::with_capacity(max),
            max,
            evicted: 0,
            gaps: 0,
            socks_evicted: 0,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.index.len()
    }

    /// Connections evicted since the last call.
    pub(crate) fn take_evicted(&mut self) -> u64 {
        std::mem::take(&mut self.evicted)
    }

    /// Gaps in the sockets' sequences of changes seen since the last call:
    /// changes that leave a state other than the one the socket's previous
    /// change seen entered. At least one change between the two never
    /// reached the agent, whatever the reason (skipped by the kernel,
    /// dropped for a full buffer, lost): each gap counts one.
    pub(crate) fn take_gaps(&mut self) -> u64 {
        std::mem::take(&mut self.gaps)
    }

    /// Connections followed that the kernel programs' socket map
    /// (`--max-sockets`, LRU) forgot since the last call: a change of one
    /// whose earlier change was seen came without the time spent in the
    /// state it left, which the programs know for every socket in their
    /// map, and was no birth (whose state left was not timed). Each counts
    /// once, at the first change after it was forgotten.
    pub(crate) fn take_socks_evicted(&mut self) -> u64 {
        std::mem::take(&mut self.socks_evicted)
    }

    /// Records one state change of socket `sock_id` (at `tuple`);
    /// `old_state_ns` is the time spent in `old` when known. Returns the
    /// history when the socket closes.
    pub(crate) fn on_change(
        &mut self,
        sock_id: u64,
        tuple: &TcpTuple,
        (old, new): (i32, i32),
        old_state_ns: Option<u64>,
        now_ns: u64,
    ) -> Option<ConnHistory> {
        let slot = self.slot_of(sock_id);
        let conn = &mut self.slots[slot];
        // 0: no change of the socket seen before this one.
        if conn.state != 0 && i32::from(conn.state) != old {
            self.gaps += 1;
        }
        let birth = matches!(
            (old, new),
            (TCP_CLOSE, TCP_SYN_SENT | TCP_LISTEN) | (TCP_LISTEN, TCP_SYN_RECV)
        );
        if conn.state != 0 && old_state_ns.is_none() && !birth {
            self.socks_evicted += 1;
        }
        if birth {
            // A new socket at the address of one whose close never reached
            // the agent (counted as the gap above): its history is its own,
            // as the programs' entry for it is, or its states would add up
            // to more than its life.
            *conn = Conn::default();
        }
        conn.tuple = *tuple;
        conn.add(old, new, old_state_ns, now_ns);
        (new == TCP_CLOSE).then(|| self.close(sock_id, slot))
    }

    /// The ends of a connection followed, as of its last change.
    pub(crate) fn tuple(&self, sock_id: u64) -> Option<TcpTuple> {
        let slot = *self.index.get(&sock_id)?;
        Some(self.slots[slot as usize].tuple)
    }

    /// Socket `sock_id` was destroyed without its change to CLOSE being
    /// seen: it left the state of its last change seen, after
    /// `old_state_ns` there when known. Returns its history and ends, or
    /// `None` for a socket not followed (no change of it was reported).
    pub(crate) fn on_destroy(
        &mut self,
        sock_id: u64,
        old_state_ns: Option<u64>,
        now_ns: u64,
    ) -> Option<(ConnHistory, TcpTuple)> {
        let slot = *self.index.get(&sock_id)? as usize;
        let conn = &mut self.slots[slot];
        let tuple = conn.tuple;
        conn.add(i32::from(conn.state), TCP_CLOSE, old_state_ns, now_ns);
        Some((self.close(sock_id, slot), tuple))
    }

    /// Forgets the closed `sock_id` in `slot` and hands over its history.
    fn close(&mut self, sock_id: u64, slot: usize) -> ConnHistory {
        self.index.remove(&sock_id);
        self.free.push(slot as u32);
        let conn = &self.slots[slot];
        let state_ns = (0..STATE_COUNT)
            .filter(|i| conn.states_seen & (1 << i) != 0)
            .map(|i| (state_name(i as i32), conn.state_ns[i]))
            .collect();
        ConnHistory {
            state_ns,
            handshake_ns: conn.handshake_ns.map(NonZeroU64::get),
        }
    }

    /// The slot of `sock_id`, a fresh one if it has none (evicting when
    /// full).
    fn slot_of(&mut self, sock_id: u64) -> usize {
        if let Some(&slot) = self.index.get(&sock_id) {
            return slot as usize;
        }
        if self.index.len() >= self.max {
            self.evict_idlest();
        }
        // Every slot is indexed or free, and the index is under the cap
        // now: a new slot is only pushed while there are fewer than `max`,
        // within the capacity taken up front.
        let slot = match self.free.pop() {
            Some(slot) => {
                self.slots[slot as usize] = Conn::default();
                slot
            }
            None => {
                self.slots.push(Conn::default());
                (self.slots.len() - 1) as u32
            }
        };
        self.index.insert(sock_id, slot);
        slot as usize
    }

    /// Drops the eighth of the table idle longest: one O(n) pass per n/8
    /// insertions rather than one per insertion.
    fn evict_idlest(&mut self) {
        let slots = &self.slots;
        let last_seen = |slot: u32| slots[slot as usize].last_seen_ns;
        let mut ages: Vec<u64> = self.index.values().map(|&s| last_seen(s)).collect();
        let k = (ages.len() / 8).max(1) - 1;
        let (_, &mut cutoff, _) = ages.select_nth_unstable(k);
        let before = self.index.len();
        let free = &mut self.free;
        self.index.retain(|_, &mut slot| {
            let keep = last_seen(slot) > cutoff;
            if !keep {
                free.push(slot);
            }
            keep
        });
        self.evicted += (before - self.index.len()) as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ESTABLISHED: i32 = TCP_ESTABLISHED;
    const FIN_WAIT1: i32 = 4;
    const FIN_WAIT2: i32 = 5;
    const T: TcpTuple = TcpTuple {
        family: 2,
        sport: 40000,
        dport: 80,
        _pad: 0,
        saddr: [0; 16],
        daddr: [0; 16],
    };

    #[test]
    fn a_close_seen_as_destruction_ends_the_last_state_seen() {
        let mut t = ConnTable::new(16);
        t.on_change(1, &T, (TCP_CLOSE, TCP_SYN_SENT), None, 10);
        t.on_change(1, &T, (TCP_SYN_SENT, ESTABLISHED), Some(300), 20);
        t.on_change(1, &T, (ESTABLISHED, FIN_WAIT1), Some(5000), 30);
        // FIN_WAIT1 -> FIN_WAIT2 and FIN_WAIT2 -> CLOSE skipped: the time
        // since the last change seen is FIN_WAIT1's.
        assert_eq!(t.tuple(1), Some(T));
        let (h, tuple) = t.on_destroy(1, Some(70), 100).unwrap();
        assert_eq!(tuple, T);
        assert_eq!(h.handshake_ns, Some(300));
        let expect: BTreeMap<_, _> =
            [("SYN_SENT", 300), ("ESTABLISHED", 5000), ("FIN_WAIT1", 70)].into();
        assert_eq!(h.state_ns, expect);
        assert_eq!(t.len(), 0);
        // Not followed (its close was seen, or it was never reported).
        assert_eq!(t.on_destroy(1, Some(1), 101), None);
        assert_eq!(t.tuple(1), None);
    }

    #[test]
    fn a_change_that_leaves_another_state_than_the_last_entered_is_a_gap() {
        let mut t = ConnTable::new(16);
        t.on_change(1, &T, (TCP_CLOSE, TCP_SYN_SENT), None, 10);
        t.on_change(1, &T, (TCP_SYN_SENT, ESTABLISHED), Some(300), 20);
        t.on_change(1, &T, (ESTABLISHED, FIN_WAIT1), Some(5000), 30);
        assert_eq!(t.take_gaps(), 0);
        // FIN_WAIT1 -> FIN_WAIT2 never came.
        t.on_change(1, &T, (FIN_WAIT2, TCP_CLOSE), Some(60), 50);
        // A socket first seen mid-life has nothing to compare with.
        t.on_change(2, &T, (FIN_WAIT1, FIN_WAIT2), Some(7), 60);
        assert_eq!(t.take_gaps(), 1);
        assert_eq!(t.take_gaps(), 0, "taken");
    }

    #[test]
    fn a_socket_born_at_the_address_of_one_not_closed_starts_afresh() {
        let mut t = ConnTable::new(16);
        t.on_change(1, &T, (TCP_LISTEN, TCP_SYN_RECV), None, 10);
        t.on_change(1, &T, (TCP_SYN_RECV, ESTABLISHED), Some(300), 20);
        // Its change to CLOSE and its destruction never came; a child is
        // cloned at the same address.
        t.on_change(1, &T, (TCP_LISTEN, TCP_SYN_RECV), None, 40);
        assert_eq!(t.take_gaps(), 1);
        let h = t
            .on_change(1, &T, (TCP_SYN_RECV, TCP_CLOSE), Some(7), 50)
            .unwrap();
        assert_eq!(h.state_ns, [("SYN_RECV", 7)].into());
        assert_eq!(h.handshake_ns, None);
    }

    /// A change without its state time, of a socket whose earlier change
    /// was seen, is one the kernel's socket map forgot; the first change of
    /// a socket, and a new socket at a reused address, are not.
    #[test]
    fn a_followed_socket_without_its_state_time_was_evicted() {
        let mut t = ConnTable::new(16);
        t.on_change(1, &T, (TCP_CLOSE, TCP_SYN_SENT), None, 10);
        t.on_change(1, &T, (TCP_SYN_SENT, ESTABLISHED), Some(300), 20);
        // Older than the agent: first seen now, untimed.
        t.on_change(2, &T, (ESTABLISHED, FIN_WAIT1), None, 25);
        assert_eq!(t.take_socks_evicted(), 0);
        t.on_change(1, &T, (ESTABLISHED, FIN_WAIT1), None, 30);
        t.on_change(1, &T, (FIN_WAIT1, FIN_WAIT2), Some(10), 40);
        assert_eq!(t.take_socks_evicted(), 1);
        assert_eq!(t.take_socks_evicted(), 0, "taken");
        // Its close went unseen; a listener born at the same address.
        t.on_change(1, &T, (TCP_CLOSE, TCP_LISTEN), None, 50);
        t.on_change(3, &T, (TCP_LISTEN, TCP_SYN_RECV), None, 60);
        assert_eq!(t.take_socks_evicted(), 0);
    }

    #[test]
    fn active_connection_history() {
        let mut t = ConnTable::new(16);
        assert_eq!(
            t.on_change(1, &T, (TCP_CLOSE, TCP_SYN_SENT), None, 10),
            None
        );
        assert_eq!(
            t.on_change(1, &T, (TCP_SYN_SENT, ESTABLISHED), Some(300), 20),
            None
        );
        assert_eq!(
            t.on_change(1, &T, (ESTABLISHED, FIN_WAIT1), Some(5000), 30),
            None
        );
        assert_eq!(
            t.on_change(1, &T, (FIN_WAIT1, FIN_WAIT2), Some(40), 40),
            None
        );
        let h = t
            .on_change(1, &T, (FIN_WAIT2, TCP_CLOSE), Some(60), 50)
            .unwrap();
        assert_eq!(h.handshake_ns, Some(300));
        let expect: BTreeMap<_, _> = [
            ("SYN_SENT", 300),
            ("ESTABLISHED", 5000),
            ("FIN_WAIT1", 40),
            ("FIN_WAIT2", 60),
        ]
        .into();
        assert_eq!(h.state_ns, expect);
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn unknown_times_are_left_out() {
        let mut t = ConnTable::new(16);
        // Seen first mid-life (the agent started late): no time for the
        // state it leaves, no handshake.
        t.on_change(7, &T, (ESTABLISHED, FIN_WAIT1), None, 1);
        let h = t
            .on_change(7, &T, (FIN_WAIT1, TCP_CLOSE), Some(9), 2)
            .unwrap();
        assert_eq!(h.handshake_ns, None);
        assert_eq!(h.state_ns, [("FIN_WAIT1", 9)].into());
    }

    #[test]
    fn eviction_is_bounded_and_counted() {
        let mut t = ConnTable::new(8);
        for id in 0..8 {
            t.on_change(id, &T, (TCP_CLOSE, TCP_SYN_SENT), None, id);
        }
        // Full: the next new socket evicts the idlest (id 0).
        t.on_change(100, &T, (TCP_CLOSE, TCP_SYN_SENT), None, 100);
        assert!(t.len() <= 8);
        assert_eq!(t.take_evicted(), 1);
        assert_eq!(t.take_evicted(), 0);
        assert_eq!(
            t.on_change(0, &T, (TCP_SYN_SENT, TCP_CLOSE), Some(1), 101),
            Some(ConnHistory {
                state_ns: [("SYN_SENT", 1)].into(),
                handshake_ns: None,
            })
        );
        for id in 1000..2000 {
            t.on_change(id, &T, (TCP_CLOSE, TCP_SYN_SENT), None, id);
            assert!(t.len() <= 8);
        }
    }

    #[test]
    fn churn_reuses_the_room_taken_up_front() {
        let max = 1024;
        let mut t = ConnTable::new(max);
        let storage = t.slots.capacity();
        // Live connections stay over half the hash table's room (1792 for
        // 1024) while many more open and close: the pattern that made a
        // hash map holding the connections double.
        let live = 1000;
        for id in 0..live {
            t.on_change(id, &T, (TCP_CLOSE, TCP_SYN_SENT), None, id);
        }
        for id in live..200_000 {
            t.on_change(id, &T, (TCP_CLOSE, TCP_SYN_SENT), None, id);
            let h = t.on_change(id - live, &T, (TCP_SYN_SENT, TCP_CLOSE), Some(1), id);
            assert_eq!(h.map(|h| h.state_ns), Some([("SYN_SENT", 1)].into()));
        }
        assert_eq!(t.len(), live as usize);
        assert_eq!(t.take_evicted(), 0);
        assert_eq!(t.slots.capacity(), storage);
        assert!(t.slots.len() <= max);
    }
}
