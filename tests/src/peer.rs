//! Runs `kdiag-peer` (this crate's second binary) inside a namespace.

use std::net::{IpAddr, SocketAddr};
use std::process::{Child, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::WAIT;
use crate::lines::LineLog;
use crate::netns::Netns;

/// The comm the agent must report for peer sockets.
pub const PEER_COMM: &str = "kdiag-peer";

/// A running kdiag-peer; killed in Drop.
pub struct Peer {
    child: Child,
    what: String,
    stdout: LineLog,
    stderr: LineLog,
}

impl Peer {
    /// `kdiag-peer listen ADDR PORT` in `ns`: a server that reads each
    /// connection until EOF, then closes it. Returns once it listens.
    /// `bin` is `env!("CARGO_BIN_EXE_kdiag-peer")` of the calling test.
    pub fn listen<'a>(
        bin: &str,
        ns: impl Into<Netns<'a>>,
        addr: impl Into<IpAddr>,
        port: u16,
    ) -> Peer {
        Peer::listen_with(bin, ns.into(), addr.into(), port, &[])
    }

    /// `listen`, but a server that never closes (nor reads) what it
    /// accepts: its sockets stay in CLOSE_WAIT once the clients close.
    pub fn listen_holding<'a>(
        bin: &str,
        ns: impl Into<Netns<'a>>,
        addr: impl Into<IpAddr>,
        port: u16,
    ) -> Peer {
        Peer::listen_with(bin, ns.into(), addr.into(), port, &["--hold"])
    }

    fn listen_with(bin: &str, ns: Netns, addr: IpAddr, port: u16, extra: &[&str]) -> Peer {
        let (addr, port) = (addr.to_string(), port.to_string());
        let mut args = vec!["listen", &addr, &port];
        args.extend_from_slice(extra);
        let peer = Peer::spawn(bin, ns, &args);
        peer.wait_line("ready");
        peer
    }

    /// `kdiag-peer connect ADDR PORT [--send-every-ms N]` in `ns`; returns
    /// once the process runs (the connect may still be in progress: see
    /// `wait_connected`).
    pub fn connect<'a>(
        bin: &str,
        ns: impl Into<Netns<'a>>,
        addr: impl Into<IpAddr>,
        port: u16,
        send_every_ms: Option<u64>,
    ) -> Peer {
        let ms = send_every_ms.map(|ms| ms.to_string());
        let extra = match &ms {
            Some(ms) => vec!["--send-every-ms", ms.as_str()],
            None => vec![],
        };
        Peer::connect_with(bin, ns.into(), addr.into(), port, &extra)
    }

    /// `kdiag-peer connect ADDR PORT --count N` in `ns`: `count` connections
    /// one after the other, each closed by both sides before the next (the
    /// server must be a `listen` peer). See `wait_done`.
    pub fn connect_many<'a>(
        bin: &str,
        ns: impl Into<Netns<'a>>,
        addr: impl Into<IpAddr>,
        port: u16,
        count: u32,
    ) -> Peer {
        let count = count.to_string();
        Peer::connect_with(bin, ns.into(), addr.into(), port, &["--count", &count])
    }

    fn connect_with(bin: &str, ns: Netns, addr: IpAddr, port: u16, extra: &[&str]) -> Peer {
        let (addr, port) = (addr.to_string(), port.to_string());
        let mut args = vec!["connect", &addr, &port];
        args.extend_from_slice(extra);
        Peer::spawn(bin, ns, &args)
    }

    fn spawn(bin: &str, ns: Netns, args: &[&str]) -> Peer {
        let mut child = ns
            .command(bin, args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {bin} in netns {}: {e}", ns.name()));
        let stdout = LineLog::spawn(child.stdout.take().expect("piped stdout"));
        let stderr = LineLog::spawn(child.stderr.take().expect("piped stderr"));
        let what = format!(
            "kdiag-peer {} (netns {}, pid {})",
            args.join(" "),
            ns.name(),
            child.id()
        );
        let peer = Peer {
            child,
            what,
            stdout,
            stderr,
        };
        peer.wait_exec();
        peer
    }

    /// The tests use the spawned child's pid as the peer's pid: true only
    /// because `ip netns exec` execs the program in place rather than
    /// forking. Wait for the exec and so check that.
    fn wait_exec(&self) {
        let comm_path = format!("/proc/{}/comm", self.pid());
        let deadline = Instant::now() + WAIT;
        loop {
            let comm = std::fs::read_to_string(&comm_path).unwrap_or_default();
            if comm.trim_end() == PEER_COMM {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "pid {} never became {PEER_COMM} (comm {comm:?}): `ip netns exec` must exec in \
                 place; stderr: {}",
                self.pid(),
                self.stderr.text()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for "connected LOCAL_ADDR" and returns LOCAL_ADDR.
    pub fn wait_connected(&self) -> SocketAddr {
        let line = self.wait_line("connected ");
        let local = &line["connected ".len()..];
        local
            .parse()
            .unwrap_or_else(|e| panic!("{}: bad local address {local:?}: {e}", self.what))
    }

    /// Waits for `connect_many` to print "done N", i.e. for all its
    /// connections to be closed by both sides; `timeout` bounds the wait.
    pub fn wait_done(&self, timeout: Duration) {
        self.wait_line_within("done ", timeout);
    }

    /// Ends the peer now (SIGKILL): the kernel closes its sockets as at any
    /// exit, which is how the tests close a connection at a chosen moment.
    pub fn kill(mut self) {
        self.kill_and_reap();
    }

    fn kill_and_reap(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the first stdout line starting with `prefix`.
    fn wait_line(&self, prefix: &str) -> String {
        self.wait_line_within(prefix, WAIT)
    }

    fn wait_line_within(&self, prefix: &str, timeout: Duration) -> String {
        self.stdout
            .wait(timeout, |lines| {
                lines.iter().find(|l| l.starts_with(prefix)).cloned()
            })
            .unwrap_or_else(|ended| {
                panic!(
                    "{}: no {prefix:?} line ({ended:?}); stdout: {:?}; stderr: {:?}",
                    self.what,
                    self.stdout.text(),
                    self.stderr.text()
                )
            })
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.kill_and_reap();
    }
}
