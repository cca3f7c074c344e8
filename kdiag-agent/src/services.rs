//! What every class shares, created once by the agent and handed to the
//! classes through their `Context` (class.rs): one socket-owner
//! resolver (one cache, one /proc time budget), one cgroup-path table per
//! hierarchy, one vmstat/PSI sampler, and the metrics registry of
//! `--metrics-addr` (output/metrics). In `run`, the TCP classes see the
//! same sockets and the memory classes the same cgroups: a copy per class
//! would resolve and walk everything twice.

use std::path::Path;

use kdiag_common::{
    Owner,
    stack::{KernelStack, NO_STACKS},
    tcp::TcpTuple,
};

use crate::{
    attribution::{
        cgroup::{CgroupPaths, OwnerHierarchy, ProcCgroups, find_cgroup2_mount},
        owner::{ListenerId, OwnerResolver},
        vmstat::VmstatSampler,
    },
    class::ClassError,
    kernel::kallsyms::KernelSymbols,
    output::{
        Output,
        metrics::Metrics,
        record::{Cgroup, Degraded, ResolvedOwner, StackField},
    },
};

pub(crate) struct Services {
    owners: OwnerResolver,
    /// Whether a class resolves socket owners, so that the agent snapshots
    /// who holds each socket before giving up its privileges.
    owners_wanted: bool,
    wait_for_lookups: bool,
    cgroups: CgroupTables,
    /// The hierarchy of the cgroups the kernel captures with owners
    /// (`bpf_get_current_cgroup_id`: the unified one).
    unified: Hierarchy,
    /// On a host without cgroup v2, where every id the kernel captures
    /// names the root: owners' cgroups from a v1 hierarchy instead.
    v1_owners: Option<ProcCgroups>,
    vmstat: VmstatSampler,
    /// The end of the last interval whose `vmstat` record was written.
    vmstat_written: Option<u64>,
    metrics: Metrics,
    /// /proc/kallsyms, opened while privileged by the first class that
    /// takes kernel stacks (one table for all); why not, if it cannot be.
    symbols: Option<Result<KernelSymbols, String>>,
}

/// One cgroup hierarchy's table in [`CgroupTables`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Hierarchy(usize);

/// One id -> path table per hierarchy mount.
#[derive(Debug, Default)]
struct CgroupTables(Vec<CgroupPaths>);

impl CgroupTables {
    fn hierarchy(&mut self, mount: Option<&Path>) -> Hierarchy {
        if let Some(i) = self.0.iter().position(|t| t.mount() == mount) {
            return Hierarchy(i);
        }
        self.0
            .push(CgroupPaths::with_mount(mount.map(Path::to_path_buf)));
        Hierarchy(self.0.len() - 1)
    }
}

impl Services {
    pub(crate) fn new() -> Self {
        let mut cgroups = CgroupTables::default();
        let unified = cgroups.hierarchy(find_cgroup2_mount().as_deref());
        let v1_owners = match OwnerHierarchy::detect() {
            OwnerHierarchy::V1 { controller, .. } => Some(ProcCgroups::new(controller)),
            _ => None,
        };
        Self {
            owners: OwnerResolver::new(),
            owners_wanted: false,
            wait_for_lookups: true,
            cgroups,
            unified,
            v1_owners,
            vmstat: VmstatSampler::new(),
            vmstat_written: None,
            metrics: Metrics::default(),
            symbols: None,
        }
    }

    /// The kernel programs' stack threshold, in ns, for a class's
    /// `--stack-min-latency-us` (`None`: off): [`NO_STACKS`] when off, or
    /// when the kernel's symbols cannot be read (see
    /// [`Services::degraded`]). Opens /proc/kallsyms on first use: call it
    /// while the agent is privileged.
    pub(crate) fn stack_threshold_ns(&mut self, micros: Option<u64>) -> u64 {
        let Some(us) = micros else {
            return NO_STACKS;
        };
        let symbols = self
            .symbols
            .get_or_insert_with(|| KernelSymbols::open().map_err(|e| e.to_string()));
        if symbols.is_ok() {
            us.saturating_mul(1000)
        } else {
            NO_STACKS
        }
    }

    /// What the services must do without, for `agent_start`.
    pub(crate) fn degraded(&self) -> Vec<Degraded> {
        match &self.symbols {
            Some(Err(why)) => vec![Degraded {
                what: "kallsyms".to_owned(),
                why: format!("{why}: records have no kernel stacks"),
            }],
            _ => Vec::new(),
        }
    }

    /// The `stack` of a record whose event carried `raw` (see
    /// [`StackField`]).
    pub(crate) fn stack(&mut self, raw: Option<KernelStack>) -> StackField {
        let raw = raw?;
        let table = self
            .symbols
            .as_mut()
            .and_then(|s| s.as_mut().ok())
            .and_then(KernelSymbols::table);
        let ips = raw.ips.get(..raw.nr as usize).filter(|ips| !ips.is_empty());
        Some(table.zip(ips).map(|(table, ips)| table.stack(ips)))
    }

    /// Classes count what they write in these metrics (without
    /// `--metrics-addr`, in a registry that keeps nothing).
    pub(crate) fn set_metrics(&mut self, metrics: Metrics) {
        self.metrics = metrics;
    }

    pub(crate) fn metrics(&mut self) -> &mut Metrics {
        &mut self.metrics
    }

    /// The table of the hierarchy mounted at `mount` (shared by every class
    /// that names the same one).
    pub(crate) fn cgroup_hierarchy(&mut self, mount: Option<&Path>) -> Hierarchy {
        self.cgroups.hierarchy(mount)
    }

    /// Cgroup `id` of `hierarchy` as records name it.
    pub(crate) fn cgroup(&mut self, hierarchy: Hierarchy, id: u64) -> Cgroup {
        self.cgroups.0[hierarchy.0].name(id)
    }

    /// [`Services::cgroup`] for an event's record: pending while the
    /// hierarchy is walked to find `id`, unless the agent does not wait for
    /// lookups now (see [`Services::wait_for_lookups`]).
    pub(crate) fn event_cgroup(
        &mut self,
        hierarchy: Hierarchy,
        id: u64,
    ) -> Result<Cgroup, ClassError> {
        self.cgroups.0[hierarchy.0]
            .name_when_walked(id, self.wait_for_lookups)
            .ok_or(ClassError::LookupPending)
    }

    /// A class will ask for socket owners.
    pub(crate) fn want_socket_owners(&mut self) {
        self.owners_wanted = true;
    }

    /// Starts, on threads of their own, what the programs' loading need not
    /// wait for: the TCP tables the snapshot of socket holders reads.
    pub(crate) fn before_loading(&mut self) {
        if self.owners_wanted {
            self.owners.start_snapshot();
        }
    }

    /// What needs privileges the agent gives up once attached: who holds
    /// each socket now, if a class will ask for socket owners (see
    /// [`OwnerResolver::snapshot_holders`]), calling `meanwhile` every few
    /// milliseconds while it runs.
    pub(crate) fn before_dropping_privileges(&mut self, meanwhile: impl FnMut()) {
        if self.owners_wanted {
            self.owners.snapshot_holders(meanwhile);
        }
    }

    /// The owner of the socket `sock_id` with addresses `tuple`, given what
    /// the kernel captured (see [`OwnerResolver::resolve`]); pending while
    /// it is looked up, unless the agent does not wait for owners now (see
    /// [`Services::wait_for_lookups`]); its cgroup from a v1 hierarchy on a
    /// host without cgroup v2 (see [`OwnerHierarchy`]).
    pub(crate) fn owner(
        &mut self,
        sock_id: u64,
        owner: &Owner,
        tuple: &TcpTuple,
        listener: Option<ListenerId>,
    ) -> Result<ResolvedOwner, ClassError> {
        let cgroups = &mut self.cgroups.0[self.unified.0];
        let resolved = self.owners.resolve(
            cgroups,
            sock_id,
            owner,
            tuple,
            listener,
            self.wait_for_lookups,
        );
        self.finish_owner(resolved)
    }

    /// The process that held the socket with inode `inode` when the agent
    /// started (see [`OwnerResolver::holder`]); pending like [`Self::owner`].
    pub(crate) fn socket_holder(&mut self, inode: u64) -> Result<ResolvedOwner, ClassError> {
        let resolved = self.owners.holder(inode, self.wait_for_lookups);
        self.finish_owner(resolved)
    }

    /// A looked-up owner, pending while `None`; its cgroup from a v1
    /// hierarchy on a host without cgroup v2 (see [`OwnerHierarchy`]).
    fn finish_owner(
        &mut self,
        resolved: Option<ResolvedOwner>,
    ) -> Result<ResolvedOwner, ClassError> {
        let mut resolved = resolved.ok_or(ClassError::LookupPending)?;
        if let Some(v1) = &mut self.v1_owners {
            resolved.cgroup = resolved.pid.map(|pid| v1.of(pid)).unwrap_or_default();
        }
        Ok(resolved)
    }

    /// Whether events wait for the owners and cgroups being looked up (see
    /// `agent::Held`); when not, they are written without.
    pub(crate) fn wait_for_lookups(&mut self, wait: bool) {
        self.wait_for_lookups = wait;
    }

    /// A listener closed: what was learnt of it no longer holds.
    pub(crate) fn forget_listener(&mut self, id: ListenerId) {
        self.owners.forget_listener(id);
    }

    /// Writes the host's `vmstat` record for the interval ending at `now_ns`,
    /// once however many classes ask: each memory class wants it beside its
    /// summaries, and `run` has two.
    pub(crate) fn write_vmstat(
        &mut self,
        now_ns: u64,
        interval_ns: u64,
        out: &mut Output,
    ) -> std::io::Result<()> {
        if self.vmstat_written == Some(now_ns) {
            return Ok(());
        }
        self.vmstat_written = Some(now_ns);
        out.write(now_ns, &self.vmstat.sample(interval_ns))
    }
}
