//! kdiag-peer: the TCP endpoint the integration tests run inside network
//! namespaces. A separate program (not a thread of the test) so that its pid
//! and comm are its own, as the agent must report them.
//!
//!   kdiag-peer listen ADDR PORT
//!       accept connections and discard what they send; prints "ready"
//!       once listening
//!   kdiag-peer connect ADDR PORT [--send-every-ms N]
//!       blocking connect; prints "connected LOCAL_ADDR" once established,
//!       then optionally writes 100 bytes every N ms until an error

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::thread;
use std::time::Duration;

const USAGE: &str =
    "usage: kdiag-peer listen ADDR PORT | kdiag-peer connect ADDR PORT [--send-every-ms N]";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match args.as_slice() {
        ["listen", addr, port] => parse_addr(addr, port).and_then(listen),
        ["connect", addr, port] => parse_addr(addr, port).and_then(|a| connect(a, None)),
        ["connect", addr, port, "--send-every-ms", ms] => parse_addr(addr, port)
            .and_then(|a| {
                Ok((
                    a,
                    ms.parse()
                        .map_err(|e| format!("bad interval {ms:?}: {e}"))?,
                ))
            })
            .and_then(|(a, ms)| connect(a, Some(Duration::from_millis(ms)))),
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

/// Prints a status line; the tests wait for it on a pipe, so flush at once.
fn say(line: &str) -> Result<(), String> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")
        .and_then(|()| out.flush())
        .map_err(|e| format!("stdout: {e}"))
}

fn listen(addr: SocketAddr) -> Result<(), String> {
    let listener = TcpListener::bind(addr).map_err(|e| format!("bind {addr}: {e}"))?;
    say("ready")?;
    for conn in listener.incoming() {
        let mut conn = conn.map_err(|e| format!("accept: {e}"))?;
        // Keep reading so the client's data is acknowledged (until the test
        // drops it) instead of filling the receive window.
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while matches!(conn.read(&mut buf), Ok(n) if n > 0) {}
        });
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
