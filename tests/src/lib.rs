//! Harness for kdiag's integration tests: they run `kdiag-agent` as root
//! against the real kernel and drive real TCP traffic between two network
//! namespaces, so every fixture here owns a kernel resource (namespace,
//! process, nftables rule, cgroup) and releases it in `Drop`, also when a test panics.
//!
//! Nothing skips on a host: without root or `KDIAG_AGENT` the fixtures panic,
//! so a misconfigured run fails loudly instead of passing vacuously. The one
//! exception is `env::skip_unless` inside a `cargo xtask vm-test` guest,
//! where a test that needs what the guest cannot give prints a named `SKIP`
//! line that vm-test counts and reports; on a host it panics too.
//!
//! Nothing depends on where the checkout is: the tests run as root, and what
//! runs as another user or with fewer capabilities (`identity`) runs from a
//! copy every user can reach, so the suite passes also from a directory
//! only root may enter.

pub mod agent;
pub mod bpf;
pub mod cgroup;
pub mod cmd;
pub mod env;
pub mod identity;
pub mod lines;
pub mod loopback;
pub mod memory;
pub mod netns;
pub mod nft;
pub mod peer;
pub mod prometheus;
pub mod record;
pub mod softirqs;
pub mod tcpstat;
pub mod tempdir;
pub mod text;

use std::time::Duration;

/// Upper bound for any single wait on the agent or a peer on a real host.
/// Generous compared with the events waited for (SYN retransmits come at
/// ~1 s and ~3 s) so a loaded 2-core machine doesn't make tests flaky, yet
/// finite so none hangs.
const WAIT: Duration = Duration::from_secs(8);

/// How much longer a bound on the time the agent or a peer takes holds in
/// a vm-test guest: its CPUs are emulated, tens of times slower than the
/// host's and slower still while the host is busy, and all of them by one
/// host thread (see xtask's vm_test). The agent's start-up (a pass over the
/// kernel's BTF, the verifier's pass over each program, a snapshot of every
/// process's sockets) has taken over 8 s there alone, and two agents
/// starting at once took over 32 s.
const GUEST_SLOWDOWN: u32 = 8;

/// `bound` where the tests run: as it is on a real host, longer in an
/// emulated guest.
pub fn on_this_machine(bound: Duration) -> Duration {
    if env::in_emulated_guest() {
        bound * GUEST_SLOWDOWN
    } else {
        bound
    }
}

/// Upper bound for any single wait on the agent or a peer ([`WAIT`] on a
/// real host).
pub fn max_wait() -> Duration {
    on_this_machine(WAIT)
}
