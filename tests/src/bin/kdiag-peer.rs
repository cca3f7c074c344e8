//! kdiag-peer: the TCP endpoint the integration tests run inside network
//! namespaces. A separate program (not a thread of the test) so that its pid
//! and comm are its own, as the agent must report them.
//!
//!   kdiag-peer listen ADDR PORT [--hold]
//!       accept connections; prints "ready" once listening. Each accepted
//!       connection is read until EOF (what it sends is discarded) and then
//!       closed, or, with --hold, never read nor closed (the process keeps
//!       it until it exits, like a server that leaks sockets)
//!   kdiag-peer connect ADDR PORT [--send-every-ms N]
//!       blocking connect; prints "connected LOCAL_ADDR" once established,
//!       then optionally writes 100 bytes every N ms until an error
//!   kdiag-peer connect ADDR PORT --count N
//!       N connections one after the other: connect, half-close, wait for
//!       the server to close (EOF), close; prints "done N" at the end

use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::thread;
use std::time::Duration;

const USAGE: &str = "usage: kdiag-peer listen ADDR PORT [--hold] | \
                     kdiag-peer connect ADDR PORT [--send-every-ms N | --count N]";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match args.as_slice() {
        ["listen", addr, port] => parse_addr(addr, port).and_then(|a| listen(a, false)),
        ["listen", addr, port, "--hold"] => parse_addr(addr, port).and_then(|a| listen(a, true)),
        ["connect", addr, port] => parse_addr(addr, port).and_then(|a| connect(a, None)),
        ["connect", addr, port, "--send-every-ms", ms] => {
            let ms = parse_number(ms);
            parse_addr(addr, port).and_then(|a| connect(a, Some(Duration::from_millis(ms?))))
        }
        ["connect", addr, port, "--count", n] => {
            let n = parse_number(n);
            parse_addr(addr, port).and_then(|a| connect_many(a, n?))
        }
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

fn parse_number(s: &str) -> Result<u64, String> {
    s.parse().map_err(|e| format!("bad number {s:?}: {e}"))
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

fn listen(addr: SocketAddr, hold: bool) -> Result<(), String> {
    let listener = TcpListener::bind(addr).map_err(|e| format!("bind {addr}: {e}"))?;
    say("ready")?;
    let mut held = Vec::new();
    for conn in listener.incoming() {
        let mut conn = conn.map_err(|e| format!("accept: {e}"))?;
        if hold {
            held.push(conn);
            continue;
        }
        // Keep reading so the client's data is acknowledged (until the test
        // drops it) instead of filling the receive window; close at EOF.
        thread::spawn(move || drain(&mut conn));
    }
    Ok(())
}

fn connect(addr: SocketAddr, send_every: Option<Duration>) -> Result<(), String> {
    let mut stream = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    let local = stream
        .local_addr()
        .map_err(|e| format!("local address: {e}"))?;
    say(&format!("connected {local}"))?;
    let Some(every) = send_every else {
        // Hold the connection open until killed.
        loop {
            thread::park();
        }
    };
    let payload = [b'k'; 100];
    loop {
        stream
            .write_all(&payload)
            .map_err(|e| format!("send: {e}"))?;
        thread::sleep(every);
    }
}

/// One connection at a time, each fully closed on both sides before the
/// next: waiting for the server's EOF keeps the listener's accept queue
/// short, so no SYN is ever dropped for a full queue (which would add
/// retransmits and timing noise to the connections being counted).
fn connect_many(addr: SocketAddr, count: u64) -> Result<(), String> {
    for i in 0..count {
        let mut stream =
            TcpStream::connect(addr).map_err(|e| format!("connect {addr} (#{i}): {e}"))?;
        stream
            .shutdown(Shutdown::Write)
            .map_err(|e| format!("shutdown (#{i}): {e}"))?;
        drain(&mut stream);
    }
    say(&format!("done {count}"))
}
