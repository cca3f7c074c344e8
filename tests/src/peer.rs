//! Runs `kdiag-peer` (this crate's second binary) inside a namespace.

use std::ffi::{CStr, CString};
use std::net::{IpAddr, SocketAddr};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::lines::LineLog;
use crate::max_wait;
use crate::netns::Netns;

/// The comm the agent must report for peer sockets.
pub const PEER_COMM: &str = "kdiag-peer";

/// Options of `kdiag-peer listen`.
#[derive(Debug, Default)]
pub struct ListenOptions {
    /// Write 100 bytes this often on every accepted connection.
    pub send_every_ms: Option<u64>,
    /// Set the peer's comm to this right after listen().
    pub rename_after_listen: Option<String>,
    /// Never read nor close what it accepts: its sockets stay in CLOSE_WAIT
    /// once the clients close, like a server that leaks sockets.
    pub hold: bool,
    /// Share the port with other listeners (SO_REUSEPORT; IPv4 only).
    pub reuseport: bool,
    /// SO_RCVBUF of the listener, inherited by what it accepts.
    pub rcvbuf: Option<u64>,
}

impl ListenOptions {
    fn args(&self) -> Vec<String> {
        let mut args = send_every_args(self.send_every_ms);
        if let Some(name) = &self.rename_after_listen {
            args.extend(["--rename-after-listen".to_owned(), name.clone()]);
        }
        if self.hold {
            args.push("--hold".to_owned());
        }
        if self.reuseport {
            args.push("--reuseport".to_owned());
        }
        if let Some(bytes) = self.rcvbuf {
            args.extend(["--rcvbuf".to_owned(), bytes.to_string()]);
        }
        args
    }
}

/// Options of `kdiag-peer connect`.
#[derive(Debug, Default)]
pub struct ConnectOptions {
    /// Write 100 bytes this often once connected.
    pub send_every_ms: Option<u64>,
    /// Start it in this cgroup directory (of any hierarchy), so that it
    /// connects from there.
    pub join_cgroup: Option<PathBuf>,
    /// Make this many connections one after the other instead of one, each
    /// closed by both sides before the next (the server must be a `listen`
    /// peer without `hold`); see `Peer::wait_done`. Not with
    /// `send_every_ms`.
    pub count: Option<u32>,
    /// The connection binds local port `from_port` (IPv4); with `count`,
    /// the i-th one binds `from_port + i`, so that each has its own port.
    /// Left to itself, the kernel
    /// gives a port again before the connection that had it is out of
    /// TIME_WAIT (seen on 6.1 and 6.18 for connections to a local address).
    pub from_port: Option<u16>,
}

impl ConnectOptions {
    fn args(&self) -> Vec<String> {
        let mut args = send_every_args(self.send_every_ms);
        if let Some(count) = self.count {
            args.extend(["--count".to_owned(), count.to_string()]);
        }
        if let Some(port) = self.from_port {
            args.extend(["--from-port".to_owned(), port.to_string()]);
        }
        args
    }
}

fn send_every_args(ms: Option<u64>) -> Vec<String> {
    ms.map_or_else(Vec::new, |ms| {
        vec!["--send-every-ms".to_owned(), ms.to_string()]
    })
}

/// Moves the calling process into the cgroup whose `cgroup.procs` is
/// `procs`: writing pid 0 there means the writer itself
/// (kernel/cgroup/cgroup.c, cgroup_procs_write_start).
fn join_cgroup(procs: &CStr) -> std::io::Result<()> {
    // SAFETY: a valid NUL-terminated path; the fd is closed below.
    let fd = unsafe { libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: writes one byte from a static buffer to the fd opened above.
    let written = unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) };
    let err = std::io::Error::last_os_error();
    // SAFETY: closes the fd opened above, once.
    unsafe { libc::close(fd) };
    if written == 1 { Ok(()) } else { Err(err) }
}

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
        Peer::listen_with(bin, ns, addr, port, &ListenOptions::default())
    }

    /// `listen` with options; returns once it listens (and has renamed
    /// itself, if asked to).
    pub fn listen_with<'a>(
        bin: &str,
        ns: impl Into<Netns<'a>>,
        addr: impl Into<IpAddr>,
        port: u16,
        opts: &ListenOptions,
    ) -> Peer {
        let mut args = vec![
            "listen".to_owned(),
            addr.into().to_string(),
            port.to_string(),
        ];
        args.extend(opts.args());
        let peer = Peer::spawn(bin, ns.into(), &args, None);
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
        let opts = ConnectOptions {
            send_every_ms,
            ..ConnectOptions::default()
        };
        Peer::connect_with(bin, ns, addr, port, &opts)
    }

    /// `connect` with options.
    pub fn connect_with<'a>(
        bin: &str,
        ns: impl Into<Netns<'a>>,
        addr: impl Into<IpAddr>,
        port: u16,
        opts: &ConnectOptions,
    ) -> Peer {
        let mut args = vec![
            "connect".to_owned(),
            addr.into().to_string(),
            port.to_string(),
        ];
        args.extend(opts.args());
        Peer::spawn(bin, ns.into(), &args, opts.join_cgroup.as_deref())
    }

    /// `kdiag-peer udp ADDR PORT --count N` in `ns`: sends `count` UDP
    /// datagrams to `addr`:`port` from one socket and returns its local
    /// port once they are sent.
    pub fn send_udp<'a>(
        bin: &str,
        ns: impl Into<Netns<'a>>,
        addr: impl Into<IpAddr>,
        port: u16,
        count: u32,
    ) -> u16 {
        let args = [
            addr.into().to_string(),
            port.to_string(),
            "--count".to_owned(),
            count.to_string(),
        ];
        let peer = Peer::run(bin, ns, "udp", &args);
        let port = peer.wait_for_line("sent ");
        port.trim()
            .parse()
            .unwrap_or_else(|e| panic!("kdiag-peer udp printed {port:?}: {e}"))
    }

    /// `kdiag-peer udp-sink ADDR PORT RCVBUF` in `ns`: a UDP socket bound
    /// to `addr`:`port` with SO_RCVBUF `rcvbuf` that is never read. Returns
    /// once it is bound.
    pub fn udp_sink<'a>(
        bin: &str,
        ns: impl Into<Netns<'a>>,
        addr: impl Into<IpAddr>,
        port: u16,
        rcvbuf: u32,
    ) -> Peer {
        let args = [
            addr.into().to_string(),
            port.to_string(),
            rcvbuf.to_string(),
        ];
        let peer = Peer::run(bin, ns, "udp-sink", &args);
        peer.wait_line("ready");
        peer
    }

    /// `kdiag-peer MODE ARGS…` in `ns`, for the modes whose arguments are
    /// fixed (`udp`, `udp-sink`, `send`, `stall`, `probe`; see the peer's usage);
    /// returns once it runs.
    pub fn run<'a>(bin: &str, ns: impl Into<Netns<'a>>, mode: &str, args: &[String]) -> Peer {
        let mut all = vec![mode.to_owned()];
        all.extend(args.iter().cloned());
        Peer::spawn(bin, ns.into(), &all, None)
    }

    /// Waits for the first stdout line starting with `prefix` and returns
    /// the rest of it.
    pub fn wait_for_line(&self, prefix: &str) -> String {
        self.wait_line(prefix)[prefix.len()..].to_owned()
    }

    /// `kdiag-peer bulk` in `ns`: a bulk TCP transfer over that namespace's
    /// loopback, as fast as the machine goes; returns once it sends.
    pub fn bulk<'a>(bin: &str, ns: impl Into<Netns<'a>>) -> Peer {
        let peer = Peer::spawn(bin, ns.into(), &["bulk".to_owned()], None);
        peer.wait_line("bulk");
        peer
    }

    /// Connects to `addr`:`port` in `ns`, where nothing listens, again and
    /// again until dropped: a churn of connections opened and refused.
    pub fn refused<'a>(
        bin: &str,
        ns: impl Into<Netns<'a>>,
        addr: impl Into<IpAddr>,
        port: u16,
    ) -> Peer {
        let args = [
            "refused".to_owned(),
            addr.into().to_string(),
            port.to_string(),
        ];
        let peer = Peer::spawn(bin, ns.into(), &args, None);
        peer.wait_line("refused");
        peer
    }

    /// Runs the peer in `ns`, first moved into `cgroup` if given.
    fn spawn(bin: &str, ns: Netns, args: &[String], cgroup: Option<&Path>) -> Peer {
        let mut command = ns.command(bin, args);
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(dir) = cgroup {
            // Joined before the exec: `ip netns exec` mounts a sysfs of the
            // new network namespace over /sys, which hides the cgroup mounts
            // from the peer itself.
            let procs = CString::new(dir.join("cgroup.procs").into_os_string().into_vec())
                .expect("cgroup path without NUL");
            // SAFETY: the closure runs between fork and exec and only makes
            // async-signal-safe calls (open, write, close) on data prepared
            // before the fork.
            unsafe { command.pre_exec(move || join_cgroup(&procs)) };
        }
        let mut child = command.spawn().unwrap_or_else(|e| {
            panic!(
                "cannot run {bin} in netns {} (cgroup {cgroup:?}): {e}",
                ns.name()
            )
        });
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
        peer.wait_exec(bin);
        peer
    }

    /// The tests use the spawned child's pid as the peer's pid: true only
    /// because `ip netns exec` execs the program in place rather than
    /// forking. Wait for the exec and so check that. The executable, not the
    /// comm, tells: a peer may rename itself as soon as it runs. Compared as
    /// files (device and inode), not paths: in a chroot, as in the vm-test
    /// guests, the kernel shows the path from outside it.
    fn wait_exec(&self, bin: &str) {
        use std::os::unix::fs::MetadataExt as _;
        let exe_path = format!("/proc/{}/exe", self.pid());
        let want = std::fs::metadata(bin).unwrap_or_else(|e| panic!("{bin}: {e}"));
        let deadline = Instant::now() + max_wait();
        loop {
            let same_file = std::fs::metadata(&exe_path)
                .is_ok_and(|m| m.dev() == want.dev() && m.ino() == want.ino());
            if same_file || self.exited_as_peer() {
                return;
            }
            let exe = std::fs::read_link(&exe_path).ok();
            assert!(
                Instant::now() < deadline,
                "pid {} never ran {} (it runs {exe:?}): `ip netns exec` must exec in place; \
                 stderr: {}",
                self.pid(),
                bin,
                self.stderr.text()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Whether it already exited (a zombie until Drop reaps it) as
    /// kdiag-peer: a `count` client can be done within milliseconds, and an
    /// exited process has no exe link any more. Its comm still tells, and
    /// only listeners rename themselves.
    fn exited_as_peer(&self) -> bool {
        let proc_file =
            |name: &str| std::fs::read_to_string(format!("/proc/{}/{name}", self.pid()));
        // /proc/PID/stat: "PID (COMM) STATE …"; the comm may hold ')'.
        let zombie = proc_file("stat").is_ok_and(|stat| {
            stat.rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        });
        zombie && proc_file("comm").is_ok_and(|comm| comm.trim_end() == PEER_COMM)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its comm now, as /proc shows it.
    pub fn comm(&self) -> String {
        let path = format!("/proc/{}/comm", self.pid());
        std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {path}: {e}", self.what))
            .trim_end()
            .to_owned()
    }

    /// Waits for "connected LOCAL_ADDR" and returns LOCAL_ADDR.
    pub fn wait_connected(&self) -> SocketAddr {
        let line = self.wait_line("connected ");
        let local = &line["connected ".len()..];
        local
            .parse()
            .unwrap_or_else(|e| panic!("{}: bad local address {local:?}: {e}", self.what))
    }

    /// Waits for a `ConnectOptions::count` peer to print "done N", i.e. for all its
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
        self.wait_line_within(prefix, max_wait())
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
