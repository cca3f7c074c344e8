//! Empty on purpose: kdiag-agent's build.rs names this crate as a build
//! dependency so cargo rebuilds the agent when it changes, and a dependency
//! needs a library target. The programs are the `kdiag` binary (main.rs).
#![no_std]
