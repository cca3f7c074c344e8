//! Who owns a socket: the owner the kernel programs captured in process
//! context, or, for sockets created before the agent started, the process
//! that held the socket's inode when the agent took its snapshot of every
//! process's descriptors (while it could still read them all: see
//! [`OwnerResolver::snapshot_holders`]).

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

/// A listener: its network namespace (the kernel's address of it, 0 when
/// unknown) and its port.
pub(crate) type ListenerId = (u64, u16);

/// /proc results; `Err(when)` = not found at `when`.
type Found = Result<ResolvedOwner, Instant>;

#[derive(Debug, Default)]
pub(crate) struct OwnerResolver {
    /// Per socket.
    cache: HashMap<(u64, TcpTuple), Found>,
    /// Per listener the programs did not see at listen(), for the sockets
    /// it accepts: one lookup serves them all, and it works before accept()
    /// gives a socket a file descriptor of its own.
    listeners: HashMap<ListenerId, Found>,
    budget: LookupBudget,
    /// The comm strings of owners the kernel captured, by their raw bytes:
    /// decoded once per process name, not once per event.
    comms: HashMap<[u8; COMM_LEN], Arc<str>>,
    /// Who held each socket at start-up.
    holders: Holders,
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
    /// Those processes' owner fields, as they were at the walk.
    owners: HashMap<u32, ResolvedOwner>,
}

impl Holders {
    /// Walks every process's descriptors.
    fn take() -> Self {
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
                holders.owners.insert(pid, owner);
            }
        }
        holders
    }

    fn owner(&self, inode: u64) -> Option<ResolvedOwner> {
        self.owners.get(self.by_inode.get(&inode)?).cloned()
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

    /// Notes which process holds each socket now: the owners of sockets
    /// older than the agent, for the rest of the run. Taken once attached
    /// (a socket created later changes state under the programs' eyes) and
    /// before the agent gives up the capabilities that let it read every
    /// process's descriptors. Returns the number of sockets found.
    pub(crate) fn snapshot_holders(&mut self) -> usize {
        self.holders = Holders::take();
        self.holders.by_inode.len()
    }

    /// The owner of the socket `sock_id` with addresses `tuple`, given what
    /// the kernel captured; `cgroups` names the cgroup ids it captured.
    /// `listener`: the listener that accepted it, when it is an accepted
    /// socket.
    pub(crate) fn resolve(
        &mut self,
        cgroups: &mut CgroupPaths,
        sock_id: u64,
        owner: &Owner,
        tuple: &TcpTuple,
        listener: Option<ListenerId>,
    ) -> ResolvedOwner {
        if owner.known != 0 {
            return ResolvedOwner {
                pid: Some(owner.tgid),
                comm: Some(self.comm(&owner.comm)),
                cgroup: cgroups.name(owner.cgroup_id),
            };
        }
        let holders = &self.holders;
        match listener {
            Some(id) => cached_lookup(&mut self.listeners, id, &mut self.budget, || {
                holders.owner(find_listener_inode(tuple)?)
            }),
            // A socket not held at the snapshot and whose owner the programs
            // did not see is, but for a full socket map, one accepted after
            // it from a listener older than the agent: the listener's owner
            // accepted it.
            None => cached_lookup(&mut self.cache, (sock_id, *tuple), &mut self.budget, || {
                find_inode(tuple)
                    .and_then(|inode| holders.owner(inode))
                    .or_else(|| holders.owner(find_listener_inode(tuple)?))
            }),
        }
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
        self.listeners.remove(&id);
    }
}

/// `lookup` through `cache` and the time budget.
fn cached_lookup<K: std::hash::Hash + Eq>(
    cache: &mut HashMap<K, Found>,
    key: K,
    budget: &mut LookupBudget,
    lookup: impl FnOnce() -> Option<ResolvedOwner>,
) -> ResolvedOwner {
    match cache.get(&key) {
        Some(Ok(hit)) => return hit.clone(),
        Some(Err(when)) if when.elapsed() < RETRY_NOT_FOUND_AFTER => {
            return ResolvedOwner::default();
        }
        _ => {}
    }
    let started = Instant::now();
    if !budget.may_start(started) {
        return ResolvedOwner::default();
    }
    let found = lookup();
    budget.charge(started.elapsed());
    if cache.len() >= CACHE_MAX {
        cache.clear();
    }
    cache.insert(key, found.clone().ok_or_else(Instant::now));
    found.unwrap_or_default()
}

/// A task's comm: bytes up to the first NUL, invalid UTF-8 replaced.
pub(crate) fn comm_str(comm: &[u8]) -> String {
    let end = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..end]).into_owned()
}

/// Finds the listener an accepted socket came from: a LISTEN socket on its
/// local port, bound to its local address or to any. Listeners of the same
/// port in two network namespaces, both bound to any address, cannot be told
/// apart here; the first namespace found wins.
fn find_listener_inode(child: &TcpTuple) -> Option<u64> {
    find_row(|r| {
        i32::from(r.state) == TCP_LISTEN
            && r.local.1 == child.sport
            && (r.local.0 == child.saddr || r.local.0 == [0; 16])
    })
}

fn find_inode(tuple: &TcpTuple) -> Option<u64> {
    find_row(|r| r.local == (tuple.saddr, tuple.sport) && r.remote == (tuple.daddr, tuple.dport))
}

/// The inode of the first socket `wanted` accepts in the TCP tables of each
/// network namespace (one process per namespace is enough to read them).
fn find_row(wanted: impl Fn(&procfs::TcpRow) -> bool) -> Option<u64> {
    let mut seen = HashSet::new();
    for pid in procfs::pids() {
        let Some(ns) = procfs::tcp_table_id(pid) else {
            continue;
        };
        if !seen.insert(ns) {
            continue;
        }
        let row = procfs::tcp_sockets(pid).find(|r| r.inode != 0 && wanted(r));
        if let Some(row) = row {
            return Some(row.inode);
        }
    }
    None
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

    #[test]
    fn one_lookup_serves_a_listener_until_it_is_not_found() {
        let mut cache = HashMap::default();
        let mut budget = LookupBudget::default();
        let server = ResolvedOwner {
            pid: Some(42),
            ..ResolvedOwner::default()
        };
        let mut lookups = 0;
        for _ in 0..3 {
            let got = cached_lookup(&mut cache, (7u64, 80u16), &mut budget, || {
                lookups += 1;
                Some(server.clone())
            });
            assert_eq!(got, server);
        }
        assert_eq!(
            lookups, 1,
            "one /proc lookup for every socket of the listener"
        );
        // Not found: not looked up again before RETRY_NOT_FOUND_AFTER.
        for _ in 0..3 {
            let got = cached_lookup(&mut cache, (7u64, 81u16), &mut budget, || {
                lookups += 1;
                None
            });
            assert_eq!(got, ResolvedOwner::default());
        }
        assert_eq!(lookups, 2);
    }

    #[test]
    fn a_closed_listener_is_forgotten() {
        let mut r = OwnerResolver::default();
        r.listeners.insert((7, 80), Ok(ResolvedOwner::default()));
        r.forget_listener((7, 80));
        assert!(r.listeners.is_empty());
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
        let got = r.resolve(
            &mut CgroupPaths::default(),
            1,
            &owner,
            &TcpTuple::default(),
            None,
        );
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
