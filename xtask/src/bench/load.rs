//! The loads the benchmark generates itself: loopback bulk transfer
//! (iperf3), retransmits (iperf3 through an nftables random-drop rule in a
//! network namespace of its own), connection churn and many idle
//! connections (small generators here; the idle connections live in child
//! processes, `xtask bench-hold`, to stay within the open-file limit).

use std::{
    collections::BTreeSet,
    fs,
    io::{BufRead, BufReader, Read},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
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
pub(super) enum Load {
    /// Loopback iperf3, both ends on CPU 0.
    Bulk,
    /// Connection churn at the generator's full speed.
    Churn,
    /// iperf3 in a namespace that drops a share of the segments: the sender
    /// retransmits (tcp_retransmit_skb), fast retransmits and timeouts.
    Retransmits,
}

/// A running [`Load`]; stops when dropped.
pub(super) struct Running {
    _iperf: Option<IperfStream>,
    _churn: Option<Churn>,
}

impl Load {
    pub(super) fn start(&self) -> Result<Running> {
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

    pub(super) fn describe(&self) -> String {
        match self {
            Load::Bulk => format!(
                "loopback TCP bulk transfer: iperf3 -s -B 127.0.0.1 -p {IPERF_PORT}; \
                 iperf3 -c 127.0.0.1 -p {IPERF_PORT} -A 0,0 -t <secs>"
            ),
            Load::Churn => format!(
                "loopback connection churn: {CHURN_THREADS} threads connect() to a local \
                 listener and close at once with a reset (SO_LINGER 0), as fast as they can"
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
pub(super) struct Netns {
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
pub(super) struct IperfServer {
    server: Guarded,
    netns: Option<Netns>,
}

impl IperfServer {
    pub(super) fn start(netns: Option<Netns>) -> Result<Self> {
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
    pub(super) fn measure(&self, secs: u64) -> Result<f64> {
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
pub(super) struct IperfStream {
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

/// Listen backlog of the churn listener. std listens with 128: when the
/// accepting thread misses a few milliseconds of CPU, the queue overflows,
/// the SYN is dropped, and its client waits a second for the SYN
/// retransmit. The rate then depends on how often that happens, not on the
/// tracer measured (a copy with the old backlog and a sleeping acceptor:
/// 7-8 ListenOverflows in 4 s and 0.7k-8k connections/s, with or without a
/// tracer).
const CHURN_BACKLOG: i32 = 4096;

/// Connection churn on loopback: connect, close with a reset, repeat.
pub(super) struct Churn {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    connections: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
    threads: Vec<JoinHandle<()>>,
}

impl Churn {
    /// `rate`: connections per second in all, or as many as possible.
    pub(super) fn start(rate: Option<u64>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let mut threads = Vec::new();
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("binding 127.0.0.1:0");
        // Listening again on a listening socket only changes its backlog.
        // SAFETY: a valid listening socket.
        let rc = unsafe { libc::listen(listener.as_raw_fd(), CHURN_BACKLOG) };
        assert_eq!(rc, 0, "listen: {}", std::io::Error::last_os_error());
        let addr = listener.local_addr().expect("listener address");
        {
            let stop = stop.clone();
            // Blocking accepts: a thread that sleeps while the queue is
            // empty lets it overflow. Drop wakes it with one last connect.
            threads.push(thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    // Dropped at once: the server side closes too.
                    let _ = listener.accept();
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
                    // Closed with a reset: a normal close leaves a TIME_WAIT
                    // socket per connection, and at full speed those use up
                    // the ephemeral ports within seconds, after which the
                    // generator crawls (about 150 connections/s measured).
                    match TcpStream::connect(addr).map(|s| reset_on_close(&s)) {
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
            addr,
            stop,
            connections,
            errors,
            threads,
        }
    }

    pub(super) fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }

    pub(super) fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }
}

impl Drop for Churn {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wakes the accepting thread, blocked in accept().
        let _ = TcpStream::connect(self.addr);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The line a holder prints once all its connections are established.
const HOLD_READY: &str = "ready";

/// How long the holders may take, all together, to open their connections.
const HOLD_LIMIT: Duration = Duration::from_secs(60);

/// Connections made before the listener accepts them, half the listen
/// backlog std's listeners get (128): a full accept queue drops SYNs, and a
/// client retries only a second later.
const ACCEPT_BATCH: usize = 64;

/// Fds a holder needs besides its connections: stdio and its listeners.
const FD_SPARE: u64 = 64;

/// `n` established loopback connections, held open until dropped.
///
/// Each takes two fds (client and server end), and a process may raise its
/// soft open-file limit only up to the hard one (beyond needs
/// CAP_SYS_RESOURCE), so the connections are spread over as many child
/// processes as the hard limit requires: `xtask bench-hold`, see [`hold`].
pub(super) struct Held {
    holders: Vec<Guarded>,
    connections: usize,
}

impl Held {
    /// Opens `n` connections, or fails naming the holder that could not.
    pub(super) fn open(n: usize) -> Result<Self> {
        let per_holder = usize::try_from(fd_limit()?.rlim_max.saturating_sub(FD_SPARE) / 2)
            .unwrap_or(usize::MAX);
        ensure!(
            per_holder > 0,
            "the hard open-file limit leaves no room for connections"
        );
        let exe = std::env::current_exe().context("locating the xtask binary")?;
        let mut held = Self {
            holders: Vec::new(),
            connections: n,
        };
        let (ready_tx, ready_rx) = mpsc::channel();
        let shares: Vec<usize> = split(n, n.div_ceil(per_holder)).collect();
        let mut names = Vec::new();
        for (i, share) in shares.iter().enumerate() {
            let mut cmd = Command::new(&exe);
            cmd.args(["bench-hold", "--connections", &share.to_string()])
                // A failure is reported by its message alone.
                .env("RUST_LIB_BACKTRACE", "0");
            let desc = format!(
                "connection holder {} of {} (`{}`)",
                i + 1,
                shares.len(),
                describe(&cmd)
            );
            let mut child = cmd
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .with_context(|| format!("starting {desc}"))?;
            let stdout = child.stdout.take().context("holder stdout")?;
            held.holders.push(Guarded(child));
            names.push(desc);
            let ready_tx = ready_tx.clone();
            thread::spawn(move || {
                let mut line = String::new();
                let read = BufReader::new(stdout).read_line(&mut line);
                let _ = ready_tx.send((i, read.is_ok() && line.trim_end() == HOLD_READY));
            });
        }
        let deadline = Instant::now() + HOLD_LIMIT;
        let mut waiting: BTreeSet<usize> = (0..held.holders.len()).collect();
        while !waiting.is_empty() {
            let Ok((i, ready)) =
                ready_rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))
            else {
                let late: Vec<&str> = waiting.iter().map(|&i| names[i].as_str()).collect();
                bail!(
                    "not ready after {}s: {}",
                    HOLD_LIMIT.as_secs(),
                    late.join("; ")
                );
            };
            if !ready {
                let child = &mut held.holders[i].0;
                let _ = child.kill();
                let status = child.wait()?;
                let mut stderr = String::new();
                if let Some(mut pipe) = child.stderr.take() {
                    let _ = pipe.read_to_string(&mut stderr);
                }
                bail!("{} failed ({status}): {}", names[i], stderr.trim());
            }
            waiting.remove(&i);
        }
        Ok(held)
    }

    pub(super) fn len(&self) -> usize {
        self.connections
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        // All at once, so they close their sockets in parallel; each
        // Guarded then reaps its own.
        for holder in &mut self.holders {
            let _ = holder.0.kill();
        }
    }
}

/// `xtask bench-hold`: opens `n` loopback connections to listeners of this
/// process and accepts them, prints [`HOLD_READY`] and holds them until
/// stdin closes, which also happens when the benchmark dies.
pub(crate) fn hold(n: usize) -> Result<()> {
    raise_fd_limit(2 * n as u64 + FD_SPARE)?;
    // connect() gives a connection a source port from
    // net.ipv4.ip_local_port_range that no other connection to the same
    // address and port uses, trying those of one parity first (the others
    // are bind()'s): up to half the range per listener port keeps that
    // search short, more listeners make room for the rest.
    let per_listener = (ephemeral_ports()? / 2).max(1);
    let listeners = (0..n.div_ceil(per_listener))
        .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .collect::<std::io::Result<Vec<_>>>()
        .context("binding listeners on 127.0.0.1")?;
    let _ends = connect_and_accept(&listeners, n)?;
    println!("{HOLD_READY}");
    std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink())
        .context("waiting for stdin to close")?;
    Ok(())
}

/// `n` connections spread over `listeners`, both ends.
fn connect_and_accept(listeners: &[TcpListener], n: usize) -> Result<Vec<TcpStream>> {
    let mut ends = Vec::with_capacity(2 * n);
    for (listener, share) in listeners.iter().zip(split(n, listeners.len())) {
        let addr = listener.local_addr()?;
        let mut left = share;
        while left > 0 {
            let batch = left.min(ACCEPT_BATCH);
            for _ in 0..batch {
                let open = ends.len() / 2;
                let client = TcpStream::connect(addr)
                    .with_context(|| format!("connecting to {addr} with {open} of {n} open"))?;
                reset_on_close(&client)?;
                ends.push(client);
            }
            for _ in 0..batch {
                let (server, _) = listener
                    .accept()
                    .with_context(|| format!("accepting on {addr}"))?;
                ends.push(server);
            }
            left -= batch;
        }
    }
    Ok(ends)
}

/// SO_LINGER with a zero timeout: closing sends a reset, so neither end
/// lingers in TIME_WAIT after the benchmark (the peer of a reset just
/// closes).
fn reset_on_close(stream: &TcpStream) -> Result<()> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket fd and a linger struct of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    ensure!(
        rc == 0,
        "setting SO_LINGER: {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

/// How many ports net.ipv4.ip_local_port_range holds.
fn ephemeral_ports() -> Result<usize> {
    let path = "/proc/sys/net/ipv4/ip_local_port_range";
    let range = fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    let bounds: Vec<usize> = range
        .split_whitespace()
        .filter_map(|b| b.parse().ok())
        .collect();
    match bounds[..] {
        [low, high] if low <= high => Ok(high - low + 1),
        _ => bail!("unexpected {path}: {}", range.trim()),
    }
}

/// `total` in `parts` shares differing by at most one.
fn split(total: usize, parts: usize) -> impl Iterator<Item = usize> {
    (0..parts).map(move |i| total / parts + usize::from(i < total % parts))
}

/// This process's open-file limits.
fn fd_limit() -> Result<libc::rlimit> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid rlimit to fill.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    ensure!(
        rc == 0,
        "reading the open-file limit: {}",
        std::io::Error::last_os_error()
    );
    Ok(limit)
}

/// Raises the soft open-file limit to `fds`, which must be within the hard
/// limit.
fn raise_fd_limit(fds: u64) -> Result<()> {
    let mut limit = fd_limit()?;
    ensure!(
        fds <= limit.rlim_max,
        "{fds} fds needed, over the hard open-file limit of {}",
        limit.rlim_max
    );
    limit.rlim_cur = limit.rlim_cur.max(fds);
    // SAFETY: a valid rlimit for RLIMIT_NOFILE, within the hard limit.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
    ensure!(
        rc == 0,
        "raising the open-file limit to {fds}: {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;

    #[test]
    fn split_is_even_and_complete() {
        let shares: Vec<usize> = split(100_000, 11).collect();
        assert_eq!(shares.iter().sum::<usize>(), 100_000);
        assert_eq!(
            shares.iter().max().unwrap() - shares.iter().min().unwrap(),
            1
        );
        assert_eq!(split(5, 0).count(), 0);
    }

    #[test]
    fn both_ends_of_every_connection_are_held() {
        let listeners: Vec<TcpListener> = (0..3)
            .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap())
            .collect();
        // More than a batch per listener, not a multiple of either.
        let n = 3 * ACCEPT_BATCH + 7;
        let ends = connect_and_accept(&listeners, n).unwrap();
        assert_eq!(ends.len(), 2 * n);
        let mut clients: Vec<SocketAddr> = Vec::new();
        let mut accepted: Vec<SocketAddr> = Vec::new();
        for end in &ends {
            let local = end.local_addr().unwrap();
            if listeners.iter().any(|l| l.local_addr().unwrap() == local) {
                accepted.push(end.peer_addr().unwrap());
            } else {
                clients.push(local);
            }
        }
        clients.sort();
        accepted.sort();
        assert_eq!(clients, accepted);
    }
}
