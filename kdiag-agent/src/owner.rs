//! Who owns a socket: the owner the kernel programs captured in process
//! context, or, for sockets created before the agent started, the process
//! found in /proc holding the socket's inode.

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use kdiag_common::{Owner, tcp::TcpTuple};

use crate::{cgroup::CgroupPaths, procfs};

/// Owner fields as the records print them.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ResolvedOwner {
    pub pid: Option<u32>,
    pub comm: Option<String>,
    pub cgroup: Option<String>,
}

/// A /proc lookup walks every process's file descriptors: bound how many run
/// per second so a retransmit storm on old sockets cannot stall the agent.
const LOOKUPS_PER_SECOND: u32 = 20;
/// And bound the share of the agent's time they take: each lookup's cost
/// grows with the TCP table (a /proc/net/tcp read took 0.7 s with 38k
/// TIME_WAIT sockets under connection churn), so a count alone could still
/// keep the agent busy reading /proc while the ring buffer overflows.
/// After a lookup that took `d`, the next waits `d * LOOKUP_BACKOFF`: at
/// most 1 / (1 + LOOKUP_BACKOFF) = 5% of the time.
const LOOKUP_BACKOFF: u32 = 19;
/// Bounds the cache; it is cleared when full (the next events repopulate it).
const CACHE_MAX: usize = 16_384;
/// A socket not found in /proc may be found later: a connection still in its
/// listener's accept queue has no file descriptor until accept().
const RETRY_NOT_FOUND_AFTER: Duration = Duration::from_secs(2);

#[derive(Debug, Default)]
pub struct OwnerResolver {
    cgroups: CgroupPaths,
    /// /proc results per socket; `Err(when)` = not found at `when`.
    cache: HashMap<(u64, TcpTuple), Result<ResolvedOwner, Instant>>,
    window: Option<Instant>,
    lookups_in_window: u32,
    /// No lookup before this, after a slow one.
    backoff_until: Option<Instant>,
}

impl OwnerResolver {
    pub fn new() -> Self {
        Self {
            cgroups: CgroupPaths::new(),
            ..Self::default()
        }
    }

    /// The owner of the socket `sock_id` with addresses `tuple`, given what
    /// the kernel captured.
    pub fn resolve(&mut self, sock_id: u64, owner: &Owner, tuple: &TcpTuple) -> ResolvedOwner {
        if owner.known != 0 {
            return ResolvedOwner {
                pid: Some(owner.tgid),
                comm: Some(comm_str(&owner.comm)),
                cgroup: self.cgroups.path(owner.cgroup_id),
            };
        }
        let key = (sock_id, *tuple);
        match self.cache.get(&key) {
            Some(Ok(hit)) => return hit.clone(),
            Some(Err(when)) if when.elapsed() < RETRY_NOT_FOUND_AFTER => {
                return ResolvedOwner::default();
            }
            _ => {}
        }
        if !self.take_lookup_budget() {
            return ResolvedOwner::default();
        }
        let started = Instant::now();
        let found = lookup_in_proc(tuple);
        self.backoff_until = Some(Instant::now() + started.elapsed() * LOOKUP_BACKOFF);
        if self.cache.len() >= CACHE_MAX {
            self.cache.clear();
        }
        self.cache
            .insert(key, found.clone().ok_or_else(Instant::now));
        found.unwrap_or_default()
    }

    fn take_lookup_budget(&mut self) -> bool {
        let now = Instant::now();
        if self.backoff_until.is_some_and(|until| now < until) {
            return false;
        }
        if self
            .window
            .is_none_or(|w| now.duration_since(w) >= Duration::from_secs(1))
        {
            self.window = Some(now);
            self.lookups_in_window = 0;
        }
        self.lookups_in_window += 1;
        self.lookups_in_window <= LOOKUPS_PER_SECOND
    }
}

/// A task's comm: bytes up to the first NUL, invalid UTF-8 replaced.
pub fn comm_str(comm: &[u8]) -> String {
    let end = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..end]).into_owned()
}

/// Finds the socket in the TCP table of each network namespace (one process
/// per namespace is enough to read it), then the process holding it.
fn lookup_in_proc(tuple: &TcpTuple) -> Option<ResolvedOwner> {
    let inode = find_inode(tuple)?;
    let pid = procfs::pids().find(|&pid| procfs::has_socket(pid, inode))?;
    Some(ResolvedOwner {
        pid: Some(pid),
        comm: procfs::comm(pid),
        cgroup: procfs::cgroup_v2(pid),
    })
}

fn find_inode(tuple: &TcpTuple) -> Option<u64> {
    let mut seen = HashSet::new();
    for pid in procfs::pids() {
        let Some(ns) = procfs::netns_inode(pid) else {
            continue;
        };
        if !seen.insert(ns) {
            continue;
        }
        let row = procfs::tcp_sockets(pid).into_iter().find(|r| {
            r.inode != 0
                && r.local == (tuple.saddr, tuple.sport)
                && r.remote == (tuple.daddr, tuple.dport)
        });
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
    fn known_owner_needs_no_proc() {
        let mut r = OwnerResolver::default();
        let owner = Owner {
            tgid: 42,
            known: 1,
            cgroup_id: 0,
            comm: *b"nginx\0\0\0\0\0\0\0\0\0\0\0",
        };
        let got = r.resolve(1, &owner, &TcpTuple::default());
        assert_eq!(got.pid, Some(42));
        assert_eq!(got.comm.as_deref(), Some("nginx"));
        assert_eq!(got.cgroup, None);
    }

    #[test]
    fn slow_lookups_back_off() {
        let mut r = OwnerResolver {
            backoff_until: Some(Instant::now() + Duration::from_secs(60)),
            ..OwnerResolver::default()
        };
        assert!(!r.take_lookup_budget());
        r.backoff_until = Some(Instant::now());
        assert!(r.take_lookup_budget());
    }

    #[test]
    fn lookups_are_rate_limited() {
        let mut r = OwnerResolver::default();
        let granted = (0..100).filter(|_| r.take_lookup_budget()).count();
        assert_eq!(granted, LOOKUPS_PER_SECOND as usize);
    }
}
