//! The loads the benchmark generates itself: loopback bulk transfer
//! (iperf3), retransmits (iperf3 through an nftables random-drop rule in a
//! network namespace of its own), connection churn and many idle
//! connections (small generators here).

use std::{
    fs,
    io::ErrorKind,
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};

use super::probe;
use crate::util::{describe, run_checked};

/// Port of the benchmark's iperf3 servers (in the host's or the
/// benchmark's own network namespace).
const IPERF_PORT: u16 = 5291;

/// Share of data segments dropped in the retransmit namespace.
const DROP_PERCENT: u32 = 2;

/// A continuous load, kept running while tracers come and go.
pub enum Load {
    /// Loopback iperf3, both ends on CPU 0.
    Bulk,
    /// Connection churn at the generator's full speed.
    Churn,
    /// iperf3 in a namespace that drops a share of the segments: the sender
    /// retransmits (tcp_retransmit_skb), fast retransmits and timeouts.
    Retransmits,
}

/// A running [`Load`]; stops when dropped.
pub struct Running {
    _iperf: Option<IperfStream>,
    _churn: Option<Churn>,
}

impl Load {
    pub fn start(&self) -> Result<Running> {
        let (iperf, churn) = match self {
            Load::Bulk => (Some(IperfStream::start(None)?), None),
            Load::Churn => (None, Some(Churn::start(None))),
            Load::Retransmits => (Some(IperfStream::start(Some(Netns::lossy()?))?), None),
        };
        Ok(Running {
            _iperf: iperf,
            _churn: churn,
        })
    }

    pub fn describe(&self) -> String {
        match self {
            Load::Bulk => format!(
                "loopback TCP bulk transfer: iperf3 -s -B 127.0.0.1 -p {IPERF_PORT}; \
                 iperf3 -c 127.0.0.1 -p {IPERF_PORT} -A 0,0 -t <secs>"
            ),
            Load::Churn => format!(
                "loopback connection churn: {CHURN_THREADS} threads connect() to a local \
                 listener and close at once, as fast as they can"
            ),
            Load::Retransmits => format!(
                "iperf3 over loopback in a network namespace with \
                 `nft add rule inet kdiag_bench input tcp dport {IPERF_PORT} numgen random \
                 mod 100 < {DROP_PERCENT} drop`"
            ),
        }
    }
}

/// A child process killed (and reaped) when dropped.
struct Guarded(Child);

impl Drop for Guarded {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A network namespace of the benchmark's own, deleted when dropped (its
/// nftables table goes with it).
pub struct Netns {
    name: String,
}

impl Netns {
    /// A namespace whose loopback drops [`DROP_PERCENT`]% of the TCP segments
    /// to the iperf3 port.
    fn lossy() -> Result<Self> {
        let ns = Netns {
            name: format!("kdiag-bench-{}", std::process::id()),
        };
        run_checked(Command::new("ip").args(["netns", "add", &ns.name]))?;
        ns.exec_checked(&["ip", "link", "set", "lo", "up"])?;
        let rule = format!(
            "add table inet kdiag_bench; \
             add chain inet kdiag_bench input {{ type filter hook input priority 0; }}; \
             add rule inet kdiag_bench input tcp dport {IPERF_PORT} numgen random mod 100 \
             < {DROP_PERCENT} drop"
        );
        ns.exec_checked(&["nft", &rule])?;
        Ok(ns)
    }

    fn command(&self, argv: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).args(argv);
        cmd
    }

    fn exec_checked(&self, argv: &[&str]) -> Result<()> {
        run_checked(&mut self.command(argv))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// An iperf3 server listening on 127.0.0.1, in a namespace or not.
pub struct IperfServer {
    server: Guarded,
    netns: Option<Netns>,
}

impl IperfServer {
    pub fn start(netns: Option<Netns>) -> Result<Self> {
        let port = IPERF_PORT.to_string();
        let argv = ["iperf3", "-s", "-B", "127.0.0.1", "-p", &port];
        let mut cmd = match &netns {
            Some(ns) => ns.command(&argv),
            None => {
                let mut cmd = Command::new(argv[0]);
                cmd.args(&argv[1..]);
                cmd
            }
        };
        let desc = describe(&cmd);
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {desc}"))?;
        let server = Self {
            server: Guarded(child),
            netns,
        };
        // Listening once its socket shows in its namespace's TCP table.
        let pid = server.server.0.id();
        probe::poll(Duration::from_secs(10), Duration::from_millis(10), || {
            listening(pid, IPERF_PORT).then_some(())
        })
        .with_context(|| format!("{desc} is not listening after 10s"))?;
        Ok(server)
    }

    fn client(&self, extra: &[&str]) -> Command {
        let port = IPERF_PORT.to_string();
        let mut argv = vec!["iperf3", "-c", "127.0.0.1", "-p", &port, "-A", "0,0"];
        argv.extend_from_slice(extra);
        match &self.netns {
            Some(ns) => ns.command(&argv),
            None => {
                let mut cmd = Command::new(argv[0]);
                cmd.args(&argv[1..]);
                cmd
            }
        }
    }

    /// One client run of `secs` seconds; returns the received bits/s.
    pub fn measure(&self, secs: u64) -> Result<f64> {
        let secs = secs.to_string();
        let mut cmd = self.client(&["-t", &secs, "-J"]);
        let desc = describe(&cmd);
        let out = cmd
            .stderr(Stdio::inherit())
            .output()
            .with_context(|| format!("running {desc}"))?;
        ensure!(out.status.success(), "{desc} failed ({})", out.status);
        let report: serde_json::Value =
            serde_json::from_slice(&out.stdout).with_context(|| format!("parsing {desc}"))?;
        report
            .pointer("/end/sum_received/bits_per_second")
            .and_then(serde_json::Value::as_f64)
            .with_context(|| format!("{desc}: no end.sum_received.bits_per_second"))
    }
}

/// Whether process `pid` sees a TCP listener on 127.0.0.1:`port` (its
/// namespace's /proc/PID/net/tcp: local address in hex, state 0A = LISTEN).
fn listening(pid: u32, port: u16) -> bool {
    let want = format!("0100007F:{port:04X}");
    fs::read_to_string(format!("/proc/{pid}/net/tcp")).is_ok_and(|table| {
        table.lines().skip(1).any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.get(1) == Some(&want.as_str()) && f.get(3) == Some(&"0A")
        })
    })
}

/// A server and one long-running client: a continuous stream.
pub struct IperfStream {
    _client: Guarded,
    _server: IperfServer,
}

impl IperfStream {
    fn start(netns: Option<Netns>) -> Result<Self> {
        let server = IperfServer::start(netns)?;
        // Longer than any benchmark; killed when dropped.
        let client = server
            .client(&["-t", "86400"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the iperf3 client")?;
        Ok(Self {
            _client: Guarded(client),
            _server: server,
        })
    }
}

/// Client threads of the churn generator; the listener accepts on one more.
/// Two CPUs: more threads only contend.
const CHURN_THREADS: usize = 2;

/// Connection churn on loopback: connect, close, repeat. Client sockets
/// close first and end in TIME_WAIT, which loopback reuses at once
/// (net.ipv4.tcp_tw_reuse = 2, the default, reuses for loopback).
pub struct Churn {
    stop: Arc<AtomicBool>,
    connections: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
    threads: Vec<JoinHandle<()>>,
}

impl Churn {
    /// `rate`: connections per second in all, or as many as possible.
    pub fn start(rate: Option<u64>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let mut threads = Vec::new();
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("binding 127.0.0.1:0");
        let addr = listener.local_addr().expect("listener address");
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        {
            let stop = stop.clone();
            threads.push(thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        // Dropped at once: the server side closes too.
                        Ok(_) => {}
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {
                            thread::sleep(Duration::from_micros(200))
                        }
                        Err(_) => {}
                    }
                }
            }));
        }
        let per_thread_gap = rate.map(|r| Duration::from_secs_f64(CHURN_THREADS as f64 / r as f64));
        for _ in 0..CHURN_THREADS {
            let (stop, connections, errors) = (stop.clone(), connections.clone(), errors.clone());
            threads.push(thread::spawn(move || {
                let start = Instant::now();
                let mut n = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    match TcpStream::connect(addr) {
                        Ok(_) => connections.fetch_add(1, Ordering::Relaxed),
                        Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                    };
                    n += 1;
                    if let Some(gap) = per_thread_gap {
                        let due = start + gap * n;
                        thread::sleep(due.saturating_duration_since(Instant::now()));
                    }
                }
            }));
        }
        Self {
            stop,
            connections,
            errors,
            threads,
        }
    }

    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }

    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }
}

impl Drop for Churn {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Listener ports for [`Held`]: one destination port gives at most the
/// ephemeral port range (about 28k) of connections, so several are used.
const HELD_LISTENERS: usize = 8;

/// `n` established loopback connections, held open until dropped.
pub struct Held {
    client: Vec<TcpStream>,
    server: Arc<Mutex<Vec<TcpStream>>>,
}

impl Held {
    /// Opens `wanted` connections, or as many as the open-file limit
    /// allows; [`Held::len`] says how many.
    pub fn open(wanted: usize) -> Result<Self> {
        let n = fd_room(wanted)?;
        let server = Arc::new(Mutex::new(Vec::with_capacity(n)));
        let mut addrs: Vec<SocketAddr> = Vec::new();
        for _ in 0..HELD_LISTENERS {
            let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
            addrs.push(listener.local_addr()?);
            let server = server.clone();
            // Exits when the listener fails, i.e. never before the process
            // ends; the thread only holds the listener and accepted streams.
            thread::spawn(move || {
                while let Ok((stream, _)) = listener.accept() {
                    if let Ok(mut held) = server.lock() {
                        held.push(stream);
                    }
                }
            });
        }
        let mut client = Vec::with_capacity(n);
        for i in 0..n {
            let stream = TcpStream::connect(addrs[i % addrs.len()])
                .with_context(|| format!("opening connection {i} of {n}"))?;
            client.push(stream);
        }
        let accepted = probe::poll(Duration::from_secs(30), Duration::from_millis(50), || {
            let held = server.lock().map(|s| s.len()).unwrap_or(0);
            (held >= n).then_some(held)
        });
        if accepted.is_none() {
            bail!("the listeners did not accept all {n} connections within 30s");
        }
        Ok(Self { client, server })
    }

    pub fn len(&self) -> usize {
        self.client.len()
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.client.clear();
        if let Ok(mut s) = self.server.lock() {
            s.clear();
        }
    }
}

/// Two fds per held connection (client and server end) exceed the default
/// soft limit; raises it as far as the hard limit allows (raising the hard
/// limit needs CAP_SYS_RESOURCE) and returns how many connections fit.
fn fd_room(wanted: usize) -> Result<usize> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid rlimit to fill.
    ensure!(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0,
        "reading the open-file limit: {}",
        std::io::Error::last_os_error()
    );
    limit.rlim_cur = limit.rlim_max.min(2 * wanted as u64 + FD_SPARE);
    // SAFETY: a valid rlimit for RLIMIT_NOFILE, within the hard limit.
    ensure!(
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } == 0,
        "raising the open-file limit to {}: {}",
        limit.rlim_cur,
        std::io::Error::last_os_error()
    );
    Ok(wanted.min((limit.rlim_cur.saturating_sub(FD_SPARE) / 2) as usize))
}

/// Fds left for everything else the benchmark has open.
const FD_SPARE: u64 = 512;
