//! Runs `kdiag-peer` (this crate's second binary) inside a namespace.

use std::net::{IpAddr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::WAIT;
use crate::lines::LineLog;
use crate::netns::Ns;

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
    /// `kdiag-peer listen ADDR PORT` in `ns`; returns once it listens.
    /// `bin` is `env!("CARGO_BIN_EXE_kdiag-peer")` of the calling test.
    pub fn listen(bin: &str, ns: &Ns, addr: impl Into<IpAddr>, port: u16) -> Peer {
        let peer = Peer::spawn(
            bin,
            ns,
            &["listen", &addr.into().to_string(), &port.to_string()],
        );
        peer.wait_line("ready");
        peer
    }

    /// `kdiag-peer connect ADDR PORT [--send-every-ms N]` in `ns`; returns
    /// once the process runs (the connect may still be in progress: see
    /// `wait_connected`).
    pub fn connect(
        bin: &str,
        ns: &Ns,
        addr: impl Into<IpAddr>,
        port: u16,
        send_every_ms: Option<u64>,
    ) -> Peer {
        let (addr, port) = (addr.into().to_string(), port.to_string());
        let mut args = vec!["connect", &addr, &port];
        let ms = send_every_ms.map(|ms| ms.to_string());
        if let Some(ms) = &ms {
            args.extend(["--send-every-ms", ms]);
        }
        Peer::spawn(bin, ns, &args)
    }

    fn spawn(bin: &str, ns: &Ns, args: &[&str]) -> Peer {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &ns.name, bin])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run ip netns exec: {e}"));
        let stdout = LineLog::spawn(child.stdout.take().expect("piped stdout"));
        let stderr = LineLog::spawn(child.stderr.take().expect("piped stderr"));
        let what = format!(
            "kdiag-peer {} (netns {}, pid {})",
            args.join(" "),
            ns.name,
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

    /// Waits for the first stdout line starting with `prefix`.
    fn wait_line(&self, prefix: &str) -> String {
        self.stdout
            .wait(WAIT, |lines| {
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
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
