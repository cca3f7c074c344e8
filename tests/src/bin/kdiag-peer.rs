//! kdiag-peer: the TCP endpoint the integration tests run inside network
//! namespaces. A separate program (not a thread of the test) so that its pid
//! and comm are its own, as the agent must report them.
//!
//!   kdiag-peer listen ADDR PORT [--send-every-ms N] [--rename-after-listen NAME]
//!       accept connections and discard what they send; prints "ready"
//!       once listening. --send-every-ms: also write 100 bytes every N ms
//!       on each accepted connection. --rename-after-listen: set its own
//!       comm to NAME right after listen(), before printing "ready"
//!   kdiag-peer connect ADDR PORT [--send-every-ms N]
//!       blocking connect; prints "connected LOCAL_ADDR" once established,
//!       then optionally writes 100 bytes every N ms until an error

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::thread;
use std::time::Duration;

const USAGE: &str = "usage: kdiag-peer listen ADDR PORT [--send-every-ms N] \
                     [--rename-after-listen NAME] | kdiag-peer connect ADDR PORT \
                     [--send-every-ms N]";

/// Options after ADDR PORT; which ones a mode accepts is checked in `main`.
#[derive(Default)]
struct Options {
    send_every: Option<Duration>,
    rename_to: Option<String>,
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match args.as_slice() {
        [mode @ ("listen" | "connect"), addr, port, rest @ ..] => parse_addr(addr, port)
            .and_then(|a| Ok((a, parse_options(rest)?)))
            .and_then(|(a, opts)| match *mode {
                "listen" => listen(a, &opts),
                "connect" if opts.rename_to.is_none() => connect(a, &opts),
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
    while let [flag, value, tail @ ..] = rest {
        match *flag {
            "--send-every-ms" => {
                let ms = value
                    .parse()
                    .map_err(|e| format!("bad interval {value:?}: {e}"))?;
                opts.send_every = Some(Duration::from_millis(ms));
            }
            "--rename-after-listen" => opts.rename_to = Some((*value).to_owned()),
            _ => return Err(USAGE.to_owned()),
        }
        rest = tail;
    }
    if rest.is_empty() {
        Ok(opts)
    } else {
        Err(USAGE.to_owned())
    }
}

/// Prints a status line; the tests wait for it on a pipe, so flush at once.
fn say(line: &str) -> Result<(), String> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")
        .and_then(|()| out.flush())
        .map_err(|e| format!("stdout: {e}"))
}

fn listen(addr: SocketAddr, opts: &Options) -> Result<(), String> {
    let listener = TcpListener::bind(addr).map_err(|e| format!("bind {addr}: {e}"))?;
    if let Some(name) = &opts.rename_to {
        // The main thread's comm is what /proc/PID/comm shows; the agent
        // must keep reporting the name the socket was listened on with.
        std::fs::write("/proc/self/comm", name).map_err(|e| format!("rename to {name}: {e}"))?;
    }
    say("ready")?;
    for conn in listener.incoming() {
        let mut conn = conn.map_err(|e| format!("accept: {e}"))?;
        if let Some(every) = opts.send_every {
            let writer = conn.try_clone().map_err(|e| format!("clone socket: {e}"))?;
            // Ends when a write fails (the connection is gone).
            thread::spawn(move || drop(send_loop(writer, every)));
        }
        // Keep reading so the client's data is acknowledged (until the test
        // drops it) instead of filling the receive window.
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while matches!(conn.read(&mut buf), Ok(n) if n > 0) {}
        });
    }
    Ok(())
}

fn connect(addr: SocketAddr, opts: &Options) -> Result<(), String> {
    let stream = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
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
