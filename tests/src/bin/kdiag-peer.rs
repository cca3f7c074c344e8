//! TCP endpoint for the integration tests: one process per endpoint, run in
//! namespaces. A separate program (not a thread of the test) so that its pid
//! and comm are its own, as the agent must report them.
//!
//!   kdiag-peer listen ADDR PORT [--send-every-ms N] [--rename-after-listen NAME] [--hold]
//!                               [--reuseport] [--rcvbuf BYTES]
//!       accept connections; prints "ready" once listening. Each accepted
//!       connection is read until EOF (what it sends is discarded) and then
//!       closed. --send-every-ms: also write 100 bytes every N ms on each
//!       accepted connection. --rename-after-listen: set its own comm to
//!       NAME right after listen(), before printing "ready". --hold: never
//!       read nor close what it accepts (the process keeps it until it
//!       exits, like a server that leaks sockets). --reuseport: set
//!       SO_REUSEPORT before binding (IPv4), to share the port with others.
//!       --rcvbuf: SO_RCVBUF of the listener, which accepted sockets inherit
//!   kdiag-peer connect ADDR PORT [--send-every-ms N] [--from-port P]
//!       blocking connect; prints "connected LOCAL_ADDR" once established,
//!       then optionally writes 100 bytes every N ms until an error.
//!       --from-port: bind local port P first (IPv4)
//!   kdiag-peer connect ADDR PORT --count N [--from-port P]
//!       N connections one after the other: connect, half-close, wait for
//!       the server to close (EOF), close; prints "done N" at the end.
//!       --from-port: the i-th connection binds local port P + i (IPv4):
//!       the kernel may otherwise give two of them the same port, and the
//!       tests tell connections apart by it
//!   kdiag-peer udp ADDR PORT --count N
//!       sends N one-byte UDP datagrams to ADDR PORT from one socket; prints
//!       "sent LOCAL_PORT" once they are all handed to the kernel, then exits
//!   kdiag-peer udp-sink ADDR PORT RCVBUF
//!       binds a UDP socket to ADDR PORT with SO_RCVBUF RCVBUF, prints
//!       "ready" and never reads: once its receive buffer is full, the
//!       kernel drops what arrives (a receiver that does not keep up)
//!   kdiag-peer send ADDR PORT BYTES
//!       connect, write BYTES bytes, half-close, read until the server
//!       closes, close; prints "connected LOCAL_ADDR", then "done BYTES"
//!   kdiag-peer stall ADDR PORT BYTES MS
//!       connect with a send buffer that holds BYTES, write them (to a
//!       server that does not read, they wait on its receive window), wait
//!       MS ms, then reset the connection (SO_LINGER 0) so it closes at
//!       once; prints "connected LOCAL_ADDR", then "done BYTES"
//!   kdiag-peer probe ADDR PORT GO_FILE
//!       connect, write 100 bytes 5 times (the server acknowledges them),
//!       print "acknowledged", wait until GO_FILE exists, print the socket's TCP_INFO as "info
//!       srtt_us=N rttvar_us=N total_retrans=N", then write 100 bytes every
//!       50 ms until an error
//!   kdiag-peer bulk
//!       one TCP connection to itself over the namespace's loopback, written
//!       to as fast as it is read, until killed (a bulk transfer: tens of
//!       thousands of NET_RX softirqs a second); prints "bulk" once it sends
//!   kdiag-peer refused ADDR PORT
//!       connects to ADDR PORT, where nothing listens, again and again
//!       until killed; prints "refused" after the first refusal. Each
//!       attempt is a connection opened (`ActiveOpens`, two state changes)
//!       for the cost of a SYN and a reset: a faster churn than whole
//!       connections
//!   kdiag-peer huge-pages MIB
//!       not a TCP endpoint: faults MIB MiB of anonymous memory as
//!       transparent huge pages (MADV_HUGEPAGE), unmaps it, and again, until
//!       killed. Where memory has no free huge page left, each fault
//!       compacts memory directly (THP `defrag` madvise or always)

use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::thread;
use std::time::Duration;

const USAGE: &str = "usage: kdiag-peer listen ADDR PORT [--send-every-ms N] \
                     [--rename-after-listen NAME] [--hold] [--reuseport] [--rcvbuf BYTES] | \
                     kdiag-peer connect ADDR PORT [--send-every-ms N | --count N [--from-port P]] | \
                     kdiag-peer udp ADDR PORT --count N | kdiag-peer udp-sink ADDR PORT RCVBUF | \
                     kdiag-peer send ADDR PORT BYTES | kdiag-peer stall ADDR PORT BYTES MS | \
                     kdiag-peer probe ADDR PORT GO_FILE | kdiag-peer bulk | \
                     kdiag-peer refused ADDR PORT | kdiag-peer huge-pages MIB";

/// Options after ADDR PORT; which ones a mode accepts is checked in `main`.
#[derive(Default)]
struct Options {
    send_every: Option<Duration>,
    rename_to: Option<String>,
    hold: bool,
    reuseport: bool,
    count: Option<u64>,
    from_port: Option<u16>,
    rcvbuf: Option<u64>,
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match args.as_slice() {
        ["bulk"] => bulk(),
        ["refused", addr, port] => parse_addr(addr, port).and_then(refused),
        ["huge-pages", mib] => parse_number(mib).and_then(huge_pages),
        ["udp", addr, port, "--count", n] => {
            parse_addr(addr, port).and_then(|a| send_udp(a, parse_number(n)?))
        }
        ["udp-sink", addr, port, rcvbuf] => {
            parse_addr(addr, port).and_then(|a| udp_sink(a, parse_number(rcvbuf)?))
        }
        ["send", addr, port, bytes] => {
            parse_addr(addr, port).and_then(|a| send(a, parse_number(bytes)?))
        }
        ["stall", addr, port, bytes, ms] => {
            parse_addr(addr, port).and_then(|a| stall(a, parse_number(bytes)?, parse_number(ms)?))
        }
        ["probe", addr, port, go_file] => parse_addr(addr, port).and_then(|a| probe(a, go_file)),
        [mode @ ("listen" | "connect"), addr, port, rest @ ..] => parse_addr(addr, port)
            .and_then(|a| Ok((a, parse_options(rest)?)))
            .and_then(|(a, opts)| match (*mode, &opts) {
                (
                    "listen",
                    Options {
                        count: None,
                        from_port: None,
                        ..
                    },
                ) => listen(a, &opts),
                (
                    "connect",
                    Options {
                        rename_to: None,
                        hold: false,
                        reuseport: false,
                        count: None,
                        rcvbuf: None,
                        ..
                    },
                ) => connect(a, &opts),
                (
                    "connect",
                    Options {
                        send_every: None,
                        rename_to: None,
                        hold: false,
                        reuseport: false,
                        count: Some(count),
                        from_port,
                        rcvbuf: None,
                    },
                ) => connect_many(a, *count, *from_port),
                _ => Err(USAGE.to_owned()),
            }),
        _ => Err(USAGE.to_owned()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kdiag-peer: {e}");
            ExitCode::FAILURE
        }
    }
}

fn parse_addr(addr: &str, port: &str) -> Result<SocketAddr, String> {
    let ip: IpAddr = addr
        .parse()
        .map_err(|e| format!("bad address {addr:?}: {e}"))?;
    let port: u16 = port
        .parse()
        .map_err(|e| format!("bad port {port:?}: {e}"))?;
    Ok(SocketAddr::new(ip, port))
}

fn parse_options(mut rest: &[&str]) -> Result<Options, String> {
    let mut opts = Options::default();
    loop {
        rest = match rest {
            [] => return Ok(opts),
            ["--hold", tail @ ..] => {
                opts.hold = true;
                tail
            }
            ["--reuseport", tail @ ..] => {
                opts.reuseport = true;
                tail
            }
            ["--send-every-ms", ms, tail @ ..] => {
                opts.send_every = Some(Duration::from_millis(parse_number(ms)?));
                tail
            }
            ["--rcvbuf", n, tail @ ..] => {
                opts.rcvbuf = Some(parse_number(n)?);
                tail
            }
            ["--count", n, tail @ ..] => {
                opts.count = Some(parse_number(n)?);
                tail
            }
            ["--from-port", p, tail @ ..] => {
                let p = parse_number(p)?;
                opts.from_port = Some(u16::try_from(p).map_err(|e| format!("port {p}: {e}"))?);
                tail
            }
            ["--rename-after-listen", name, tail @ ..] => {
                opts.rename_to = Some((*name).to_owned());
                tail
            }
            _ => return Err(USAGE.to_owned()),
        };
    }
}

fn parse_number(s: &str) -> Result<u64, String> {
    s.parse().map_err(|e| format!("bad number {s:?}: {e}"))
}

/// Sends `count` one-byte datagrams to `to` from one socket.
fn send_udp(to: SocketAddr, count: u64) -> Result<(), String> {
    let any: SocketAddr = if to.is_ipv4() {
        "0.0.0.0:0".parse().map_err(|e| format!("{e}"))?
    } else {
        "[::]:0".parse().map_err(|e| format!("{e}"))?
    };
    let socket = std::net::UdpSocket::bind(any).map_err(|e| format!("bind: {e}"))?;
    for _ in 0..count {
        socket
            .send_to(b"x", to)
            .map_err(|e| format!("send to {to}: {e}"))?;
    }
    let local = socket.local_addr().map_err(|e| format!("{e}"))?;
    say(&format!("sent {}", local.port()))
}

/// Binds a UDP socket to `addr` with a receive buffer of `rcvbuf` bytes
/// and never reads it, until killed.
fn udp_sink(addr: SocketAddr, rcvbuf: u64) -> Result<(), String> {
    let socket = std::net::UdpSocket::bind(addr).map_err(|e| format!("bind {addr}: {e}"))?;
    let bytes = libc::c_int::try_from(rcvbuf).map_err(|e| format!("{rcvbuf}: {e}"))?;
    set_int_option(&socket, libc::SOL_SOCKET, libc::SO_RCVBUF, bytes)?;
    say("ready")?;
    loop {
        thread::park();
    }
}

/// Prints a status line; the tests wait for it on a pipe, so flush at once.
fn say(line: &str) -> Result<(), String> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")
        .and_then(|()| out.flush())
        .map_err(|e| format!("stdout: {e}"))
}

/// Reads until EOF or an error, discarding the data.
fn drain(conn: &mut TcpStream) {
    let mut buf = [0u8; 4096];
    while matches!(conn.read(&mut buf), Ok(n) if n > 0) {}
}

fn listen(addr: SocketAddr, opts: &Options) -> Result<(), String> {
    let listener = if opts.reuseport {
        reuseport_listener(addr)
    } else {
        TcpListener::bind(addr)
    }
    .map_err(|e| format!("bind {addr}: {e}"))?;
    if let Some(bytes) = opts.rcvbuf {
        // Accepted sockets inherit it, and their window is sized from it
        // when the SYN comes.
        let bytes = libc::c_int::try_from(bytes).map_err(|e| format!("{bytes}: {e}"))?;
        set_int_option(&listener, libc::SOL_SOCKET, libc::SO_RCVBUF, bytes)?;
    }
    if let Some(name) = &opts.rename_to {
        // The main thread's comm is what /proc/PID/comm shows; the agent
        // must keep reporting the name the socket was listened on with.
        std::fs::write("/proc/self/comm", name).map_err(|e| format!("rename to {name}: {e}"))?;
    }
    say("ready")?;
    let mut held = Vec::new();
    for conn in listener.incoming() {
        let mut conn = conn.map_err(|e| format!("accept: {e}"))?;
        if let Some(every) = opts.send_every {
            let writer = conn.try_clone().map_err(|e| format!("clone socket: {e}"))?;
            // Ends when a write fails (the connection is gone).
            thread::spawn(move || drop(send_loop(writer, every)));
        }
        if opts.hold {
            held.push(conn);
            continue;
        }
        // Keep reading so the client's data is acknowledged (until the test
        // drops it) instead of filling the receive window; close at EOF.
        thread::spawn(move || drain(&mut conn));
    }
    Ok(())
}

fn connect(addr: SocketAddr, opts: &Options) -> Result<(), String> {
    let stream = match opts.from_port {
        Some(port) => connect_from(port, addr),
        None => TcpStream::connect(addr),
    };
    let stream = stream.map_err(|e| format!("connect {addr}: {e}"))?;
    let local = stream
        .local_addr()
        .map_err(|e| format!("local address: {e}"))?;
    say(&format!("connected {local}"))?;
    let Some(every) = opts.send_every else {
        // Hold the connection open until killed.
        loop {
            thread::park();
        }
    };
    Err(format!("send: {}", send_loop(stream, every)))
}

/// Writes 100 bytes every `every` until a write fails; returns the error.
fn send_loop(mut stream: TcpStream, every: Duration) -> std::io::Error {
    let payload = [b'k'; 100];
    loop {
        if let Err(e) = stream.write_all(&payload) {
            return e;
        }
        thread::sleep(every);
    }
}

/// One connection at a time, each fully closed on both sides before the
/// next: waiting for the server's EOF keeps the listener's accept queue
/// short, so no SYN is ever dropped for a full queue (which would add
/// retransmits and timing noise to the connections being counted).
fn connect_many(addr: SocketAddr, count: u64, from_port: Option<u16>) -> Result<(), String> {
    for i in 0..count {
        let stream = match from_port {
            Some(first) => {
                let port = u16::try_from(u64::from(first) + i)
                    .map_err(|_| format!("--from-port {first} + {i} is past 65535"))?;
                connect_from(port, addr)
            }
            None => TcpStream::connect(addr),
        };
        let mut stream = stream.map_err(|e| format!("connect {addr} (#{i}): {e}"))?;
        stream
            .shutdown(Shutdown::Write)
            .map_err(|e| format!("shutdown (#{i}): {e}"))?;
        drain(&mut stream);
    }
    say(&format!("done {count}"))
}

/// Connects and says so.
fn connected(addr: SocketAddr) -> Result<TcpStream, String> {
    let stream = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    let local = stream
        .local_addr()
        .map_err(|e| format!("local address: {e}"))?;
    say(&format!("connected {local}"))?;
    Ok(stream)
}

fn send(addr: SocketAddr, bytes: u64) -> Result<(), String> {
    let mut stream = connected(addr)?;
    write_bytes(&mut stream, bytes)?;
    stream
        .shutdown(Shutdown::Write)
        .map_err(|e| format!("shutdown: {e}"))?;
    drain(&mut stream);
    drop(stream);
    say(&format!("done {bytes}"))
}

/// Writes `bytes` bytes in 64 KiB writes.
fn write_bytes(stream: &mut TcpStream, bytes: u64) -> Result<(), String> {
    let chunk = vec![b's'; 64 * 1024];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        stream
            .write_all(&chunk[..n])
            .map_err(|e| format!("send: {e}"))?;
        left -= n as u64;
    }
    Ok(())
}

fn stall(addr: SocketAddr, bytes: u64, ms: u64) -> Result<(), String> {
    let mut stream = connected(addr)?;
    // Room for all of it (and the kernel's overhead per buffer) in the
    // send buffer, so that the writes never wait for room: the connection
    // is then limited by the receiver alone, not by its send buffer.
    let sndbuf = libc::c_int::try_from(bytes * 4).map_err(|e| format!("{bytes}: {e}"))?;
    set_int_option(&stream, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, sndbuf)?;
    write_bytes(&mut stream, bytes)?;
    thread::sleep(Duration::from_millis(ms));
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    set_option(&stream, libc::SOL_SOCKET, libc::SO_LINGER, &linger)?;
    drop(stream);
    say(&format!("done {bytes}"))
}

fn probe(addr: SocketAddr, go_file: &str) -> Result<(), String> {
    let mut stream = connected(addr)?;
    for _ in 0..5 {
        stream
            .write_all(&[b'p'; 100])
            .map_err(|e| format!("send: {e}"))?;
        thread::sleep(Duration::from_millis(40));
    }
    // Longer than a delayed ACK can be held back (TCP_DELACK_MAX, 200 ms):
    // every ACK has come, and no later one changes the RTT estimate.
    thread::sleep(Duration::from_millis(300));
    say("acknowledged")?;
    while !std::path::Path::new(go_file).exists() {
        thread::sleep(Duration::from_millis(10));
    }
    let info = tcp_info(&stream)?;
    say(&format!(
        "info srtt_us={} rttvar_us={} total_retrans={}",
        info.tcpi_rtt, info.tcpi_rttvar, info.tcpi_total_retrans
    ))?;
    Err(format!(
        "send: {}",
        send_loop(stream, Duration::from_millis(50))
    ))
}

fn tcp_info(stream: &TcpStream) -> Result<libc::tcp_info, String> {
    use std::os::fd::AsRawFd;
    // SAFETY: all zero is a valid tcp_info (integers only).
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: a valid descriptor, and a buffer of `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &raw mut len,
        )
    };
    if rc < 0 {
        return Err(format!("TCP_INFO: {}", std::io::Error::last_os_error()));
    }
    Ok(info)
}

fn set_int_option(
    stream: &impl std::os::fd::AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> Result<(), String> {
    set_option(stream, level, name, &value)
}

fn set_option<T>(
    stream: &impl std::os::fd::AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: &T,
) -> Result<(), String> {
    // SAFETY: a valid descriptor and an option value of its size.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            level,
            name,
            ptr_of(value),
            size_of::<T>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(format!(
            "setsockopt {name}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

fn ptr_of<T>(value: &T) -> *const libc::c_void {
    std::ptr::from_ref(value).cast()
}

/// Sends 64 KiB writes to itself over 127.0.0.1 as fast as a second thread
/// reads them; returns only on an error.
fn bulk() -> Result<(), String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("local address: {e}"))?;
    let mut sender = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    let (mut receiver, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
    thread::spawn(move || drain(&mut receiver));
    let chunk = vec![b'b'; 64 * 1024];
    sender.write_all(&chunk).map_err(|e| format!("send: {e}"))?;
    say("bulk")?;
    loop {
        sender.write_all(&chunk).map_err(|e| format!("send: {e}"))?;
    }
}

/// See `refused` in the module comment; returns only on an error.
fn refused(addr: SocketAddr) -> Result<(), String> {
    let mut said = false;
    loop {
        match TcpStream::connect(addr) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
            Err(e) => return Err(format!("connect {addr}: {e}")),
            Ok(_) => return Err(format!("connect {addr}: accepted, where nothing listens")),
        }
        if !said {
            say("refused")?;
            said = true;
        }
    }
}

/// See `huge-pages` in the module comment.
fn huge_pages(mib: u64) -> Result<(), String> {
    const HUGE_PAGE: usize = 2 << 20;
    const PAGE: usize = 4096;
    let len = usize::try_from(mib << 20).map_err(|e| format!("{mib} MiB: {e}"))?;
    loop {
        // One huge page more than needed, to start on a huge page boundary.
        // SAFETY: a new private anonymous mapping; no existing memory is
        // touched.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len + HUGE_PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(format!("mmap: {}", std::io::Error::last_os_error()));
        }
        let start = (map as usize).next_multiple_of(HUGE_PAGE);
        // SAFETY: a range inside the mapping just made.
        check(unsafe { libc::madvise(start as *mut libc::c_void, len, libc::MADV_HUGEPAGE) })
            .map_err(|e| format!("madvise: {e}"))?;
        for page in (start..start + len).step_by(PAGE) {
            // SAFETY: a writable page of the mapping.
            unsafe { std::ptr::write_volatile(page as *mut u8, 1) };
        }
        // SAFETY: the whole mapping made above, no longer used.
        check(unsafe { libc::munmap(map, len + HUGE_PAGE) }).map_err(|e| format!("munmap: {e}"))?;
    }
}

/// A listener on the IPv4 `addr` with SO_REUSEPORT, which std cannot set
/// before binding.
fn reuseport_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let SocketAddr::V4(v4) = addr else {
        return Err(std::io::Error::other("--reuseport takes an IPv4 address"));
    };
    let fd = bound_socket(v4, true)?;
    // SAFETY: a valid, bound descriptor.
    check(unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&fd), 128) })?;
    Ok(TcpListener::from(fd))
}

/// A connection to `remote` from local port `port` (any local address).
fn connect_from(port: u16, remote: SocketAddr) -> std::io::Result<TcpStream> {
    let SocketAddr::V4(remote) = remote else {
        return Err(std::io::Error::other("--from-port takes an IPv4 address"));
    };
    let local = std::net::SocketAddrV4::new(std::net::Ipv4Addr::UNSPECIFIED, port);
    let fd = bound_socket(local, false)?;
    let sin = sockaddr_in(remote);
    // SAFETY: a valid descriptor and a sockaddr_in of its size.
    check(unsafe {
        libc::connect(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            (&raw const sin).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    })?;
    Ok(TcpStream::from(fd))
}

/// An IPv4 TCP socket bound to `addr`, with SO_REUSEPORT when asked.
fn bound_socket(
    addr: std::net::SocketAddrV4,
    reuseport: bool,
) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::{FromRawFd, OwnedFd};
    // SAFETY: socket(2) with constant arguments; the descriptor is owned at once.
    let fd =
        check(unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: a descriptor just returned and owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    if reuseport {
        let one: libc::c_int = 1;
        // SAFETY: a valid descriptor and a c_int option of its size.
        check(unsafe {
            libc::setsockopt(
                raw,
                libc::SOL_SOCKET,
                libc::SO_REUSEPORT,
                (&raw const one).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        })?;
    }
    let sin = sockaddr_in(addr);
    // SAFETY: a valid descriptor and a sockaddr_in of its size.
    check(unsafe {
        libc::bind(
            raw,
            (&raw const sin).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    })?;
    Ok(fd)
}

fn sockaddr_in(addr: std::net::SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(addr.ip().octets()),
        },
        sin_zero: [0; 8],
    }
}

/// A libc return code as an error when negative.
fn check(rc: libc::c_int) -> std::io::Result<libc::c_int> {
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}
