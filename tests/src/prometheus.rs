//! A real Prometheus server (Debian's `prometheus`, which `cargo xtask
//! setup` installs) scraping the agent's `--metrics-addr`: its own config
//! and data directory, loopback only, stopped in Drop; and plain HTTP/1.0
//! GETs for its query API and the agent's endpoint.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::cmd;
use crate::lines::LineLog;
use crate::tempdir::TempDir;

/// How long the server may take to answer `/-/ready` (about a second here).
const READY_WITHIN: Duration = Duration::from_secs(20);
/// A GET that takes longer is a failure.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

/// A Prometheus scraping one target every second; killed in Drop.
pub struct Prometheus {
    child: Child,
    addr: SocketAddr,
    stderr: LineLog,
    // Removed after the server is gone (fields drop in order).
    _dir: TempDir,
}

impl Prometheus {
    /// Starts `prometheus` on `127.0.0.1:port`, scraping `target`'s
    /// `/metrics` every second, and waits until it is ready.
    pub fn start(port: u16, target: SocketAddr) -> Prometheus {
        let dir = TempDir::new("prometheus");
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: kdiag\n    static_configs:\n      \
                 - targets: ['{target}']\n"
            ),
        )
        .unwrap_or_else(|e| panic!("writing {}: {e}", config.display()));
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run prometheus (Debian's `prometheus`; `cargo xtask setup`): {e}")
            });
        let stderr = LineLog::spawn(child.stderr.take().expect("piped stderr"));
        let prometheus = Prometheus {
            child,
            addr,
            stderr,
            _dir: dir,
        };
        let ready_within = crate::on_this_machine(READY_WITHIN);
        let deadline = Instant::now() + ready_within;
        while !get(addr, "/-/ready").is_ok_and(|(status, _)| status == 200) {
            if Instant::now() >= deadline {
                prometheus.fail(&format!("not ready on {addr} within {ready_within:?}"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        prometheus
    }

    /// The `data.result` of an instant query of `promql`.
    pub fn query(&self, promql: &str) -> Vec<Value> {
        let path = format!("/api/v1/query?query={}", percent_encode(promql));
        let (status, body) =
            get(self.addr, &path).unwrap_or_else(|e| self.fail(&format!("querying {promql}: {e}")));
        let v: Value = serde_json::from_slice(&body).unwrap_or_else(|e| {
            self.fail(&format!(
                "{promql}: answer is not JSON ({e}): {}",
                String::from_utf8_lossy(&body)
            ))
        });
        if status != 200 || v["status"] != "success" {
            self.fail(&format!("{promql}: HTTP {status}: {v}"));
        }
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    fn fail(&self, msg: &str) -> ! {
        panic!("prometheus: {msg}\nits stderr:\n{}", self.stderr.text())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = cmd::wait_timeout(&mut self.child, crate::on_this_machine(HTTP_TIMEOUT));
    }
}

/// `GET path` on `addr` over HTTP/1.0: the status and the body.
pub fn get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, Vec<u8>)> {
    let timeout = crate::on_this_machine(HTTP_TIMEOUT);
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no end of headers"))?;
    let head = String::from_utf8_lossy(&response[..split]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status in {head:?}")))?;
    Ok((status, response[split + 4..].to_vec()))
}

/// `s` for a URL's query string: unreserved characters as they are, the
/// rest as %XX.
fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_promql() {
        assert_eq!(
            percent_encode("{__name__=~\"kdiag_.+\"}[1m]"),
            "%7B__name__%3D~%22kdiag_.%2B%22%7D%5B1m%5D"
        );
    }
}
