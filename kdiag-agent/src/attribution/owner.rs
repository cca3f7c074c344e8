//! Who owns a socket: the owner the kernel programs captured in process
//! context, or, for sockets created before the agent started, the process
//! that held the socket's inode when the agent took its snapshot of every
//! process's descriptors (while it could still read them all: see
//! [`OwnerResolver::snapshot_holders`]), found by the connection's
//! addresses in the TCP tables read while the programs loaded. /proc lookups, for
//! the sockets the snapshot cannot name, run off the event loop (see
//! `background`), one at a time: an event whose owner is being looked up is
//! pending (the agent holds it, and the events after it, in order), for at
//! most `HOLD_AT_MOST`; after that it is written without an owner, and the
//! owner found later serves the socket's next events.

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use foldhash::HashMap;
use kdiag_common::{
    COMM_LEN, Owner,
    tcp::{TCP_LISTEN, TcpTuple},
};

use crate::attribution::{
    background::Pending,
    cgroup::{self, CgroupPaths, cgroup_name},
    procfs,
};
use crate::output::record::{Cgroup, ResolvedOwner};

/// Which owners to report; the kernel filters ports and family, but owners
/// of sockets older than the agent are only known here.
#[derive(Debug, Clone, Default)]
pub(crate) struct OwnerFilter {
    pub pids: Vec<u32>,
    /// A path relative to the mount of the hierarchy owners are named in
    /// (`cgroup::OwnerHierarchy`), without trailing `/`.
    pub cgroup: Option<String>,
}

impl OwnerFilter {
    /// `cgroup`: in the hierarchy mounted at `mount`.
    pub(crate) fn new(pids: Vec<u32>, cgroup: Option<PathBuf>, mount: Option<&Path>) -> Self {
        let cgroup = cgroup.map(|p| {
            let p = p.to_string_lossy().trim_end_matches('/').to_owned();
            cgroup::relative_to(mount, &p)
        });
        Self { pids, cgroup }
    }

    pub(crate) fn accepts(&self, owner: &ResolvedOwner) -> bool {
        let pid_ok = self.pids.is_empty() || owner.pid.is_some_and(|p| self.pids.contains(&p));
        let cgroup_ok = self.cgroup.as_deref().is_none_or(|want| {
            owner.cgroup.path().is_some_and(|have| {
                have == want
                    || want == "/"
                    || have.strip_prefix(want).is_some_and(|r| r.starts_with('/'))
            })
        });
        pid_ok && cgroup_ok
    }
}

/// A /proc lookup walks the TCP table of every network namespace, and its
/// cost grows with them (a /proc/net/tcp
/// read took 0.7 s with 38k TIME_WAIT sockets under connection churn). So
/// lookups draw on a time budget: it refills at LOOKUP_SHARE of wall time
/// and holds at most LOOKUP_BURST, a lookup may start while the budget is
/// positive and is charged what it took. Over time they take at most 5% of
/// the agent's time, while the first ones after a quiet spell run at once.
const LOOKUP_SHARE: f64 = 0.05;
const LOOKUP_BURST: Duration = Duration::from_millis(250);
/// Bounds the cache; it is cleared when full (the next events repopulate it).
const CACHE_MAX: usize = 16_384;
/// Bounds the comm strings kept; cleared when full, like the cache.
const COMMS_MAX: usize = 4096;
/// A socket not found in /proc may be found later: a connection that was not
/// yet in the TCP table when it was looked up.
const RETRY_NOT_FOUND_AFTER: Duration = Duration::from_secs(2);
/// How long events wait for a /proc lookup before the one that asked for it
/// is written without an owner (the lookup goes on, and serves later
/// events). Lookups take milliseconds to a few hundred on hosts with many
/// sockets (see [`LOOKUP_SHARE`]).
const HOLD_AT_MOST: Duration = Duration::from_secs(1);
/// How often the start-up walk of descriptors lets the agent drain its
/// buffers: under the busiest churn, 5 ms of records are a small part of
/// the ring buffer.
const WALK_POLL: Duration = Duration::from_millis(5);

/// A listener: its network namespace (its inode number, 0 when unknown)
/// and its port.
pub(crate) type ListenerId = (u64, u16);

/// /proc results and when their holder was last seen alive; `Err(when)` =
/// not found at `when`.
type Found = Result<(ResolvedOwner, Instant), Instant>;

/// How often a cached owner's process is checked to still be the one that
/// held the socket (same pid, same start time).
const RECHECK_HOLDER: Duration = Duration::from_secs(1);

/// What a /proc lookup is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum LookupKey {
    /// One socket (its id and addresses).
    Socket(u64, TcpTuple),
    /// A listener the programs did not see at listen(), for the sockets it
    /// accepts: one lookup serves them all, and it works before accept()
    /// gives a socket a file descriptor of its own.
    Listener(ListenerId),
    /// A socket known by its inode number.
    Inode(u64),
}

#[derive(Debug, Default)]
pub(crate) struct OwnerResolver {
    cache: HashMap<LookupKey, Found>,
    /// The lookup running (one at a time), and when it started.
    in_flight: Option<(LookupKey, Instant, Pending<Option<ResolvedOwner>>)>,
    budget: LookupBudget,
    /// The comm strings of owners the kernel captured, by their raw bytes:
    /// decoded once per process name, not once per event.
    comms: HashMap<[u8; COMM_LEN], Arc<str>>,
    /// Who held each socket at start-up; shared with the lookups' threads.
    holders: Arc<Holders>,
    /// The namespaces' TCP tables, being read for the snapshot.
    tables: Option<Pending<Tables>>,
}

/// The TCP tables of every network namespace, read while the programs
/// load: on a host with a large established hash (sized from its memory),
/// each read walks every bucket, milliseconds per namespace, which the
/// agent's start-up need not wait for. A connection opened after its
/// namespace's table was read is not here; [`Holders::take`] knows its
/// socket if a process held it at the walk, and a lookup finds its
/// addresses then.
#[derive(Debug, Default)]
pub(crate) struct Tables {
    /// Network namespace inode -> the id of its TCP table in /proc (see
    /// `procfs::tcp_table_id`), which stays readable once the privileges
    /// that /proc/PID/ns/net takes are given up.
    tables: HashMap<u64, u64>,
    /// The inode of each TCP connection (listeners aside), by its local
    /// and remote address and port.
    conns: HashMap<Addrs, u64>,
}

impl Tables {
    /// Reads the table of each namespace once, through the first process
    /// seen in it.
    pub(crate) fn read() -> Self {
        let mut read = Self::default();
        let mut seen = HashSet::new();
        let mut rows = Vec::new();
        for pid in procfs::pids() {
            let Some(table) = procfs::tcp_table_id(pid) else {
                continue;
            };
            if seen.contains(&table) {
                continue;
            }
            // A process gone since the stat leaves its namespace to the next.
            let Some(sockets) = procfs::tcp_sockets(pid) else {
                continue;
            };
            seen.insert(table);
            if let Some(ns) = procfs::netns_inode(pid) {
                read.tables.entry(ns).or_insert(table);
            }
            // Sockets no process holds (inode 0: orphans closing, TIME_WAIT)
            // too: they name no owner, but make their addresses ambiguous.
            rows.extend(
                sockets
                    .filter(|r| i32::from(r.state) != TCP_LISTEN)
                    .map(|r| ((r.local, r.remote), r.inode)),
            );
        }
        read.conns = unambiguous(rows);
        read
    }
}

/// Each connection's inode by its addresses, from the rows of every
/// namespace's table, but for addresses found in two namespaces (loopback
/// connections, containers with overlapping addresses): an event's
/// addresses cannot tell those apart, and no owner is better than another
/// namespace's. A row of inode 0 (a socket no process holds) names no
/// connection, but counts as one of the two.
fn unambiguous(rows: impl IntoIterator<Item = (Addrs, u64)>) -> HashMap<Addrs, u64> {
    let mut found: HashMap<Addrs, Option<u64>> = HashMap::default();
    for (addrs, inode) in rows {
        found
            .entry(addrs)
            .and_modify(|held| {
                if *held != Some(inode) {
                    *held = None;
                }
            })
            .or_insert(Some(inode));
    }
    found
        .into_iter()
        .filter_map(|(addrs, inode)| Some((addrs, inode.filter(|&i| i != 0)?)))
        .collect()
}

/// Socket inode -> the process holding it, from one walk of every
/// process's file descriptors. Reading another user's descriptors takes
/// CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH, which the agent gives up once
/// attached; by then the kernel programs capture the owner of every socket
/// that changes state, so only sockets older than the agent need this.
#[derive(Debug, Default)]
struct Holders {
    /// The first process (in /proc order) holding each socket.
    by_inode: HashMap<u64, u32>,
    /// Those processes' owner fields, as they were at the walk, and when
    /// each process started (see `procfs::start_time`).
    owners: HashMap<u32, (ResolvedOwner, Option<u64>)>,
    /// Network namespace inode -> its TCP table's id (see [`Tables`]).
    tables: HashMap<u64, u64>,
    /// The inode of each held TCP connection, by its local and remote
    /// address (see [`Tables`]): a connection older than the agent is
    /// found here at once, where looking it up walks /proc again (on a
    /// host with many processes and namespaces, longer than an event may
    /// wait for its owner).
    by_addrs: HashMap<Addrs, u64>,
}

/// A connection's local and remote address and port.
type Addrs = (([u8; 16], u16), ([u8; 16], u16));

impl Holders {
    /// Walks every process's descriptors; `tables` are the namespaces'
    /// connections.
    fn take(tables: Tables) -> Self {
        let mut holders = Self::default();
        for pid in procfs::pids() {
            let mut first_holder = false;
            for inode in procfs::socket_inodes(pid) {
                if let std::collections::hash_map::Entry::Vacant(e) = holders.by_inode.entry(inode)
                {
                    e.insert(pid);
                    first_holder = true;
                }
            }
            if first_holder {
                let owner = ResolvedOwner {
                    pid: Some(pid),
                    comm: procfs::comm(pid).map(Arc::from),
                    cgroup: Cgroup(procfs::cgroup_v2(pid).map(|p| cgroup_name(&p))),
                };
                holders.owners.insert(pid, (owner, procfs::start_time(pid)));
            }
        }
        holders.tables = tables.tables;
        // Only connections some process held: the others (orphans, those
        // in TIME_WAIT) have no owner to find.
        holders.by_addrs = tables
            .conns
            .into_iter()
            .filter(|(_, inode)| holders.by_inode.contains_key(inode))
            .collect();
        holders
    }

    /// The holder of the connection at `tuple` at the walk, if that
    /// process still runs.
    fn owner_of_conn(&self, tuple: &TcpTuple) -> Option<ResolvedOwner> {
        let addrs = ((tuple.saddr, tuple.sport), (tuple.daddr, tuple.dport));
        self.owner(*self.by_addrs.get(&addrs)?)
    }

    /// The holder of socket `inode` at the walk, if that process still
    /// runs: a pid that names another process now is never reported.
    fn owner(&self, inode: u64) -> Option<ResolvedOwner> {
        let pid = *self.by_inode.get(&inode)?;
        self.owners
            .get(&pid)
            .filter(|_| self.still_runs(pid))
            .map(|(owner, _)| owner.clone())
    }

    /// Whether the process `pid` of the walk still runs.
    fn still_runs(&self, pid: u32) -> bool {
        self.owners
            .get(&pid)
            .is_some_and(|(_, start)| start.is_some() && procfs::start_time(pid) == *start)
    }
}

/// The time budget of /proc lookups (see [`LOOKUP_SHARE`]).
#[derive(Debug)]
struct LookupBudget {
    /// Seconds of lookup that may still start; negative after an expensive
    /// one, until refilled.
    seconds: f64,
    refilled: Instant,
}

impl Default for LookupBudget {
    fn default() -> Self {
        Self {
            seconds: LOOKUP_BURST.as_secs_f64(),
            refilled: Instant::now(),
        }
    }
}

impl LookupBudget {
    fn may_start(&mut self, now: Instant) -> bool {
        let earned = now.duration_since(self.refilled).as_secs_f64() * LOOKUP_SHARE;
        self.seconds = (self.seconds + earned).min(LOOKUP_BURST.as_secs_f64());
        self.refilled = now;
        self.seconds > 0.0
    }

    fn charge(&mut self, took: Duration) {
        self.seconds -= took.as_secs_f64();
    }
}

impl OwnerResolver {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Starts reading every namespace's TCP table on a thread of its own,
    /// for [`OwnerResolver::snapshot_holders`]: while the programs load.
    pub(crate) fn start_snapshot(&mut self) {
        self.tables = Pending::start("kdiag-tables", Tables::read);
    }

    /// Notes which process holds each socket now: the owners of sockets
    /// older than the agent, for the rest of the run. Taken once attached
    /// (a socket created later changes state under the programs' eyes) and
    /// before the agent gives up the capabilities that let it read every
    /// process's descriptors. Returns the number of sockets found.
    ///
    /// The walk runs on a thread of its own, and `meanwhile` is called
    /// every few milliseconds until it is over: the programs are attached
    /// by then, and their events must be drained. Its thread ends with its
    /// result; the agent waits until it is gone before giving up its
    /// privileges (see `privileges`).
    pub(crate) fn snapshot_holders(&mut self, mut meanwhile: impl FnMut()) -> usize {
        let tables = match self.tables.take() {
            // A reading thread that died read nothing: lookups find those
            // connections instead.
            Some(reading) => reading.join().unwrap_or_default(),
            None => Tables::read(),
        };
        let holders = match Pending::start("kdiag-holders", move || Holders::take(tables)) {
            Some(walk) => loop {
                match walk.poll() {
                    Some(Ok((holders, _))) => break holders,
                    // The walk died: lookups find what it would have.
                    Some(Err(())) => break Holders::default(),
                    None => {
                        meanwhile();
                        std::thread::sleep(WALK_POLL);
                    }
                }
            },
            // No thread to be had (the tables went with the closure):
            // read and walked here, undrained meanwhile.
            None => Holders::take(Tables::read()),
        };
        self.holders = Arc::new(holders);
        self.holders.by_inode.len()
    }

    /// The owner of the socket `sock_id` with addresses `tuple`, given what
    /// the kernel captured; `cgroups` names the cgroup ids it captured.
    /// `listener`: the listener that accepted it, when it is an accepted
    /// socket. `None` while it (or the path of the cgroup the kernel
    /// captured with it) is looked up, if the caller `wait`s.
    pub(crate) fn resolve(
        &mut self,
        cgroups: &mut CgroupPaths,
        sock_id: u64,
        owner: &Owner,
        tuple: &TcpTuple,
        listener: Option<ListenerId>,
        wait: bool,
    ) -> Option<ResolvedOwner> {
        if owner.known != 0 {
            // Pending, like a /proc lookup, while the cgroup is walked for:
            // a `--cgroup` filter needs its path.
            return Some(ResolvedOwner {
                pid: Some(owner.tgid),
                comm: Some(self.comm(&owner.comm)),
                // Pending while the cgroup is walked for, like a /proc
                // lookup: a `--cgroup` filter needs its path.
                cgroup: cgroups.name_when_walked(owner.cgroup_id, wait)?,
            });
        }
        let holders = self.holders.clone();
        let tuple = *tuple;
        match listener {
            Some(id) => self.cached_lookup(LookupKey::Listener(id), wait, move || {
                // In the listener's namespace, where the snapshot knows it.
                let table = holders.tables.get(&id.0).copied();
                holders.owner(find_listener_inode(&tuple, table)?)
            }),
            // A socket not held at the snapshot and whose owner the programs
            // did not see is, but for a full socket map, one accepted after
            // it from a listener older than the agent: the listener's owner
            // accepted it.
            None => {
                let key = LookupKey::Socket(sock_id, tuple);
                if !self.cache.contains_key(&key)
                    && let Some(owner) = holders.owner_of_conn(&tuple)
                {
                    // Held at the walk: cached like a lookup's result, and
                    // rechecked the same way.
                    return self.store(key, Some(owner), Duration::ZERO);
                }
                self.cached_lookup(key, wait, move || match find_inode(&tuple) {
                    InTables::Several => None,
                    // Held by a process at the walk, else (accepted since,
                    // or gone from the tables) its listener's.
                    found => found
                        .one()
                        .and_then(|inode| holders.owner(inode))
                        .or_else(|| holders.owner(find_listener_inode(&tuple, None)?)),
                })
            }
        }
    }

    /// The process that held the socket with inode `inode` at the
    /// snapshot, if it still runs: the owner of a socket whose owner the
    /// programs do not capture (UDP). Unknown for sockets created since.
    /// `None` while it is looked up, if the caller `wait`s.
    pub(crate) fn holder(&mut self, inode: u64, wait: bool) -> Option<ResolvedOwner> {
        let holders = self.holders.clone();
        self.cached_lookup(LookupKey::Inode(inode), wait, move || holders.owner(inode))
    }

    /// `lookup` through the cache and the time budget, off the loop; `None`
    /// while it runs, if the caller `wait`s.
    fn cached_lookup(
        &mut self,
        key: LookupKey,
        wait: bool,
        lookup: impl FnOnce() -> Option<ResolvedOwner> + Send + 'static,
    ) -> Option<ResolvedOwner> {
        if let Some((_, _, pending)) = &self.in_flight
            && let Some(done) = pending.poll()
            && let Some((key, _, _)) = self.in_flight.take()
        {
            // A lookup whose thread died found nothing.
            let (found, took) = done.unwrap_or((None, Duration::ZERO));
            self.store(key, found, took);
        }
        match self.cache.get_mut(&key) {
            Some(Ok((hit, seen))) => {
                if seen.elapsed() < RECHECK_HOLDER {
                    return Some(hit.clone());
                }
                match hit.pid {
                    Some(pid) if !self.holders.still_runs(pid) => {
                        // Gone (its pid may be another's now): looked up
                        // again, not reported.
                        self.cache.remove(&key);
                    }
                    _ => {
                        *seen = Instant::now();
                        return Some(hit.clone());
                    }
                }
            }
            Some(Err(when)) if when.elapsed() < RETRY_NOT_FOUND_AFTER => {
                return Some(ResolvedOwner::default());
            }
            _ => {}
        }
        if let Some((_, started, _)) = &self.in_flight {
            // Behind the running lookup (its own, or another's: one at a
            // time), unless that one has taken too long.
            let waiting = wait && started.elapsed() < HOLD_AT_MOST;
            return (!waiting).then(ResolvedOwner::default);
        }
        let now = Instant::now();
        if !self.budget.may_start(now) {
            return Some(ResolvedOwner::default());
        }
        let pending = Pending::start("kdiag-owner", lookup)?;
        self.in_flight = Some((key, now, pending));
        (!wait).then(ResolvedOwner::default)
    }

    /// Caches a lookup's result and charges its time to the budget.
    fn store(
        &mut self,
        key: LookupKey,
        found: Option<ResolvedOwner>,
        took: Duration,
    ) -> Option<ResolvedOwner> {
        self.budget.charge(took);
        if self.cache.len() >= CACHE_MAX {
            self.cache.clear();
        }
        let now = Instant::now();
        self.cache
            .insert(key, found.clone().map(|f| (f, now)).ok_or(now));
        found
    }

    fn comm(&mut self, raw: &[u8; COMM_LEN]) -> Arc<str> {
        if let Some(comm) = self.comms.get(raw) {
            return comm.clone();
        }
        if self.comms.len() >= COMMS_MAX {
            self.comms.clear();
        }
        let comm: Arc<str> = comm_str(raw).into();
        self.comms.insert(*raw, comm.clone());
        comm
    }

    /// A listener closed: what was learnt of it no longer holds.
    pub(crate) fn forget_listener(&mut self, id: ListenerId) {
        self.cache.remove(&LookupKey::Listener(id));
    }
}

/// A task's comm: bytes up to the first NUL, invalid UTF-8 replaced.
pub(crate) fn comm_str(comm: &[u8]) -> String {
    let end = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..end]).into_owned()
}

/// Finds the listener an accepted socket came from: a LISTEN socket on its
/// local port, bound to its local address or to any, in the TCP table
/// `table` (of the child's namespace) when known. Without it, listeners of
/// the same port in two network namespaces cannot be told apart: none is.
fn find_listener_inode(child: &TcpTuple, table: Option<u64>) -> Option<u64> {
    let listens = |r: &procfs::TcpRow, addr: [u8; 16]| {
        i32::from(r.state) == TCP_LISTEN && r.local == (addr, child.sport)
    };
    // A listener on the child's own address before one on any address: the
    // kernel prefers the more specific one (inet_lhash2 scoring).
    match find_row(table, |r| listens(r, child.saddr)) {
        InTables::None => find_row(table, |r| listens(r, [0; 16])).one(),
        found => found.one(),
    }
}

/// The connection with `tuple`'s addresses, in the TCP tables of every
/// network namespace.
fn find_inode(tuple: &TcpTuple) -> InTables {
    find_row(None, |r| {
        r.local == (tuple.saddr, tuple.sport) && r.remote == (tuple.daddr, tuple.dport)
    })
}

/// What a search of the TCP tables found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InTables {
    None,
    /// In one namespace: the socket's inode (0: no process holds it).
    One(u64),
    /// In several namespaces: addresses alone cannot say which (see
    /// [`unambiguous`]).
    Several,
}

impl InTables {
    /// The inode of the one socket found, if a process holds it.
    fn one(self) -> Option<u64> {
        match self {
            Self::One(inode) if inode != 0 => Some(inode),
            Self::One(_) | Self::None | Self::Several => None,
        }
    }
}

/// The socket `wanted` accepts in the TCP tables of every network
/// namespace, or only in the table `only`.
fn find_row(only: Option<u64>, wanted: impl Fn(&procfs::TcpRow) -> bool) -> InTables {
    let mut found = found_rows(only, wanted);
    let Some(inode) = found.next() else {
        return InTables::None;
    };
    // One table has each row once: no need to read the others.
    if only.is_some() || found.next().is_none() {
        InTables::One(inode)
    } else {
        InTables::Several
    }
}

/// For each TCP table of every network namespace, or only the table
/// `only`, that has a socket `wanted` accepts: the inode of one a process
/// holds, else 0 (the socket is an orphan closing, or in TIME_WAIT: it
/// names no owner, but is there). Tables are read as needed (one process
/// per namespace is enough to read its table).
fn found_rows(
    only: Option<u64>,
    wanted: impl Fn(&procfs::TcpRow) -> bool,
) -> impl Iterator<Item = u64> {
    let mut seen = HashSet::new();
    procfs::pids().filter_map(move |pid| {
        let ns = procfs::tcp_table_id(pid)?;
        if only.is_some_and(|t| t != ns) || seen.contains(&ns) {
            return None;
        }
        // A process gone since the stat leaves its namespace to the next.
        let rows = procfs::tcp_sockets(pid)?;
        seen.insert(ns);
        let mut rows = rows.filter(|r| wanted(r));
        let first = rows.next()?;
        Some(match first.inode {
            0 => rows.find(|r| r.inode != 0).map_or(0, |r| r.inode),
            held => held,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comm_stops_at_nul_and_tolerates_bad_utf8() {
        assert_eq!(comm_str(b"curl\0\0\0garbage"), "curl");
        assert_eq!(comm_str(b"0123456789abcdef"), "0123456789abcdef");
        assert_eq!(comm_str(&[0xff, b'a', 0]), "\u{fffd}a");
    }

    /// `cached_lookup` until it has an answer.
    fn lookup_now(
        r: &mut OwnerResolver,
        key: LookupKey,
        lookup: impl FnOnce() -> Option<ResolvedOwner> + Send + 'static,
    ) -> ResolvedOwner {
        if let Some(found) = r.cached_lookup(key, true, lookup) {
            return found;
        }
        until_answered(|| r.cached_lookup(key, true, || panic!("looked up twice")))
    }

    /// Polls `answer` until it has an answer.
    fn until_answered(mut answer: impl FnMut() -> Option<ResolvedOwner>) -> ResolvedOwner {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(found) = answer() {
                return found;
            }
            assert!(Instant::now() < deadline, "the lookup never came back");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn one_lookup_serves_a_listener_until_it_is_not_found() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let mut r = OwnerResolver::default();
        let server = ResolvedOwner {
            pid: Some(42),
            ..ResolvedOwner::default()
        };
        let lookups = Arc::new(AtomicUsize::new(0));
        for _ in 0..3 {
            let (n, found) = (lookups.clone(), server.clone());
            let got = lookup_now(&mut r, LookupKey::Listener((7, 80)), move || {
                n.fetch_add(1, Ordering::Relaxed);
                Some(found)
            });
            assert_eq!(got, server);
        }
        assert_eq!(
            lookups.load(Ordering::Relaxed),
            1,
            "one /proc lookup for every socket of the listener"
        );
        // Not found: not looked up again before RETRY_NOT_FOUND_AFTER.
        for _ in 0..3 {
            let n = lookups.clone();
            let got = lookup_now(&mut r, LookupKey::Listener((7, 81)), move || {
                n.fetch_add(1, Ordering::Relaxed);
                None
            });
            assert_eq!(got, ResolvedOwner::default());
        }
        assert_eq!(lookups.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn events_wait_for_a_lookup_in_turn_unless_told_not_to() {
        let mut r = OwnerResolver::default();
        let server = ResolvedOwner {
            pid: Some(42),
            ..ResolvedOwner::default()
        };
        let found = server.clone();
        let key = LookupKey::Listener((7, 80));
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let got = r.cached_lookup(key, true, move || {
            let _ = wait.recv();
            Some(found)
        });
        assert_eq!(got, None, "pending while it runs");
        // Another socket waits its turn: one lookup at a time.
        let other = LookupKey::Listener((7, 81));
        assert_eq!(r.cached_lookup(other, true, || panic!("two at once")), None);
        // An event that cannot wait goes without.
        assert_eq!(
            r.cached_lookup(other, false, || panic!("two at once")),
            Some(ResolvedOwner::default())
        );
        go.send(()).unwrap();
        assert_eq!(
            lookup_now(&mut r, key, || panic!("looked up twice")),
            server
        );
    }

    #[test]
    fn a_socket_inode_names_its_holder_while_it_runs() {
        let me = std::process::id();
        let owner = ResolvedOwner {
            pid: Some(me),
            ..ResolvedOwner::default()
        };
        let start = procfs::start_time(me);
        assert!(start.is_some(), "no start time of this process");
        let mut holders = Holders::default();
        holders.by_inode.insert(7, me);
        holders.owners.insert(me, (owner.clone(), start));
        // A process by the same pid that started at another time is not
        // the holder.
        holders.by_inode.insert(8, me + 1);
        holders
            .owners
            .insert(me + 1, (ResolvedOwner::default(), Some(0)));
        let mut r = OwnerResolver {
            holders: Arc::new(holders),
            ..OwnerResolver::default()
        };
        let mut now = |inode| until_answered(|| r.holder(inode, true));
        assert_eq!(now(7), owner);
        assert_eq!(now(8), ResolvedOwner::default());
        // Not held at the snapshot: a socket opened since.
        assert_eq!(now(9), ResolvedOwner::default());
    }

    #[test]
    fn the_snapshot_keeps_the_connections_of_the_tables_that_a_process_holds() {
        // A loopback connection of this process, whose descriptors it may
        // always read.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_server, _) = listener.accept().unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&client);
        let link = std::fs::read_link(format!("/proc/self/fd/{fd}")).unwrap();
        let inode: u64 = link.to_str().unwrap()["socket:[".len()..]
            .trim_end_matches(']')
            .parse()
            .unwrap();
        let ipv4 = |addr: std::net::SocketAddr| {
            let mut a = [0u8; 16];
            if let std::net::IpAddr::V4(v4) = addr.ip() {
                a[..4].copy_from_slice(&v4.octets());
            }
            (a, addr.port())
        };
        let held = (
            ipv4(client.local_addr().unwrap()),
            ipv4(client.peer_addr().unwrap()),
        );
        let orphan = (([1; 16], 1), ([2; 16], 2));
        let mut tables = Tables::default();
        tables.tables.insert(4026531840, 12);
        tables.conns.insert(held, inode);
        // A connection no process holds (orphaned, or in TIME_WAIT).
        tables.conns.insert(orphan, u64::MAX);
        let holders = Holders::take(tables);
        assert_eq!(holders.by_addrs.get(&held), Some(&inode));
        assert!(!holders.by_addrs.contains_key(&orphan));
        assert_eq!(holders.tables.get(&4026531840), Some(&12));
        let me = std::process::id();
        assert_eq!(holders.by_inode.get(&inode), Some(&me));
        assert_eq!(holders.owner(inode).and_then(|o| o.pid), Some(me));
    }

    #[test]
    fn addresses_in_two_namespaces_name_no_connection() {
        let a = (
            ([127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], 40000),
            ([127; 16], 80),
        );
        let b = (([10; 16], 40001), ([10; 16], 80));
        // `a` in two namespaces (two inodes), then in a third; `b` in one.
        let conns = unambiguous([(a, 7), (b, 8), (a, 9), (a, 10)]);
        assert_eq!(conns.into_iter().collect::<Vec<_>>(), [(b, 8)]);
        // The same row read twice is still one connection.
        let once = unambiguous([(b, 8), (b, 8)]);
        assert_eq!(once.into_iter().collect::<Vec<_>>(), [(b, 8)]);
        // A socket no process holds (inode 0) in another namespace makes
        // the addresses ambiguous, whichever comes first, and names no
        // connection itself.
        assert!(unambiguous([(a, 7), (a, 0)]).is_empty());
        assert!(unambiguous([(a, 0), (a, 7)]).is_empty());
        assert!(unambiguous([(a, 0)]).is_empty());
    }

    #[test]
    fn a_connection_held_at_the_snapshot_is_named_without_a_lookup() {
        let me = std::process::id();
        let owner = ResolvedOwner {
            pid: Some(me),
            ..ResolvedOwner::default()
        };
        let tuple = TcpTuple {
            sport: 50234,
            dport: 12059,
            saddr: [10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            daddr: [10, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            ..TcpTuple::default()
        };
        let mut holders = Holders::default();
        holders.by_inode.insert(7, me);
        holders
            .owners
            .insert(me, (owner.clone(), procfs::start_time(me)));
        holders
            .by_addrs
            .insert(((tuple.saddr, tuple.sport), (tuple.daddr, tuple.dport)), 7);
        let mut r = OwnerResolver {
            holders: Arc::new(holders),
            // No lookup may start: the answer must come from the snapshot.
            budget: LookupBudget {
                seconds: -1.0,
                refilled: Instant::now(),
            },
            ..OwnerResolver::default()
        };
        let unknown = Owner::default();
        assert_eq!(
            r.resolve(&mut CgroupPaths::default(), 1, &unknown, &tuple, None, true),
            Some(owner)
        );
        assert!(r.in_flight.is_none());
        // Other addresses are not the snapshot's: looked up (here, with no
        // budget left, written without an owner at once).
        let other = TcpTuple {
            sport: 50235,
            ..tuple
        };
        assert_eq!(
            r.resolve(&mut CgroupPaths::default(), 2, &unknown, &other, None, true),
            Some(ResolvedOwner::default())
        );
    }

    #[test]
    fn a_closed_listener_is_forgotten() {
        let mut r = OwnerResolver::default();
        r.cache.insert(
            LookupKey::Listener((7, 80)),
            Ok((ResolvedOwner::default(), Instant::now())),
        );
        r.forget_listener((7, 80));
        assert!(r.cache.is_empty());
    }

    #[test]
    fn known_owner_needs_no_proc() {
        let mut r = OwnerResolver::default();
        let owner = Owner {
            tgid: 42,
            known: 1,
            cgroup_id: 0,
            comm: *b"nginx\0\0\0\0\0\0\0\0\0\0\0",
        };
        let got = r
            .resolve(
                &mut CgroupPaths::default(),
                1,
                &owner,
                &TcpTuple::default(),
                None,
                true,
            )
            .unwrap();
        assert_eq!(got.pid, Some(42));
        assert_eq!(got.comm.as_deref(), Some("nginx"));
        assert_eq!(got.cgroup, Cgroup::default());
    }

    #[test]
    fn lookups_share_a_time_budget() {
        let mut b = LookupBudget::default();
        let t0 = b.refilled;
        assert!(b.may_start(t0));
        // One expensive lookup uses the burst and more.
        b.charge(Duration::from_millis(700));
        assert!(!b.may_start(t0 + Duration::from_secs(1)));
        // Paid back at 5% of wall time: 450 ms of debt takes 9 s.
        assert!(!b.may_start(t0 + Duration::from_millis(8900)));
        assert!(b.may_start(t0 + Duration::from_millis(9200)));
        // Never more than the burst saved up.
        assert!(b.may_start(t0 + Duration::from_secs(3600)));
        assert!(b.seconds <= LOOKUP_BURST.as_secs_f64());
    }
}
