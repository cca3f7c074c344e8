//! The HTTP/1.1 endpoint of `--metrics-addr`: `GET /metrics` answers the
//! last published text, anything else a short error; one request per
//! connection (`Connection: close`), which is how scrapers use it.
//!
//! It runs as a task on the agent's event loop and never blocks it: the
//! socket is non-blocking, every connection has a deadline and a bound on
//! what it may send, and at most `MAX_CONNECTIONS` are served at once
//! (more are closed at once). Its socket is bound while the agent still
//! has its privileges (a port below 1024 needs CAP_NET_BIND_SERVICE), and
//! the seccomp filter then allows accepting on it (accept4), nothing else
//! that makes or binds a socket.

use std::{
    io,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

use super::{Exposition, text::CONTENT_TYPE};

/// Connections served at once; a scraper needs one.
const MAX_CONNECTIONS: usize = 8;
/// The most a request may send before its headers end.
const MAX_REQUEST: usize = 8 * 1024;
/// A connection that has not sent its request and read the answer within
/// this is closed.
const DEADLINE: Duration = Duration::from_secs(10);
/// Connections waiting to be accepted.
const BACKLOG: i32 = 16;

/// Why `--metrics-addr` cannot be served.
#[derive(Debug, thiserror::Error)]
#[error("--metrics-addr {addr}: cannot listen there: {source}")]
pub(crate) struct BindError {
    pub addr: SocketAddr,
    #[source]
    pub source: io::Error,
}

impl BindError {
    /// An address this host does not have is the caller's mistake; a port
    /// below 1024 without CAP_NET_BIND_SERVICE is a missing privilege.
    pub(crate) fn is_usage(&self) -> bool {
        self.source.kind() == io::ErrorKind::AddrNotAvailable
    }

    pub(crate) fn is_permission(&self) -> bool {
        self.source.kind() == io::ErrorKind::PermissionDenied
    }
}

/// The bound socket, until the event loop serves it.
#[derive(Debug)]
pub(crate) struct Server {
    listener: std::net::TcpListener,
}

impl Server {
    /// Binds and listens on `addr` now, with the privileges the agent has.
    pub(crate) fn bind(addr: SocketAddr) -> Result<Self, BindError> {
        let err = |source| BindError { addr, source };
        let socket = match addr {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
        }
        .map_err(err)?;
        // A restarted agent gets its port back while the old connections
        // linger in TIME_WAIT.
        socket.set_reuseaddr(true).map_err(err)?;
        socket.bind(addr).map_err(err)?;
        let listener = socket.listen(BACKLOG as u32).map_err(err)?;
        let listener = listener.into_std().map_err(err)?;
        Ok(Self { listener })
    }

    /// Serves `exposition` on the current event loop until the agent ends.
    pub(crate) fn spawn(self, exposition: Exposition) -> io::Result<()> {
        let listener = TcpListener::from_std(self.listener)?;
        tokio::spawn(accept_loop(listener, exposition));
        Ok(())
    }
}

async fn accept_loop(listener: TcpListener, exposition: Exposition) {
    let open = Arc::new(AtomicUsize::new(0));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            // Out of descriptors or a connection reset before it was
            // accepted: the next one may do.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if open.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
            drop(stream);
            continue;
        }
        open.fetch_add(1, Ordering::Relaxed);
        let open = open.clone();
        let exposition = exposition.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(DEADLINE, answer(stream, &exposition)).await;
            open.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// Reads one request and answers it.
async fn answer(mut stream: TcpStream, exposition: &Exposition) -> io::Result<()> {
    let mut request = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        if request.len() >= MAX_REQUEST {
            return respond(&mut stream, "431 Request Header Fields Too Large", b"").await;
        }
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        request.extend_from_slice(&buf[..n]);
    }
    match route(&request) {
        Route::Metrics { head } => {
            let text = exposition.get();
            let body: &[u8] = if head { b"" } else { &text };
            write_response(&mut stream, "200 OK", CONTENT_TYPE, text.len(), body).await
        }
        Route::NotFound => {
            respond(&mut stream, "404 Not Found", b"metrics are at /metrics\n").await
        }
        Route::BadMethod => respond(&mut stream, "405 Method Not Allowed", b"GET /metrics\n").await,
        Route::Bad => respond(&mut stream, "400 Bad Request", b"").await,
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Route {
    Metrics { head: bool },
    NotFound,
    BadMethod,
    Bad,
}

/// What the request line asks for: `GET /metrics HTTP/1.x` (a query
/// string is ignored).
fn route(request: &[u8]) -> Route {
    let line = request.split(|&b| b == b'\r').next().unwrap_or_default();
    let Ok(line) = std::str::from_utf8(line) else {
        return Route::Bad;
    };
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Route::Bad;
    };
    if !version.starts_with("HTTP/1.") || parts.next().is_some() {
        return Route::Bad;
    }
    let path = target.split('?').next().unwrap_or_default();
    let head = match method {
        "GET" => false,
        "HEAD" => true,
        _ => return Route::BadMethod,
    };
    if path == "/metrics" {
        Route::Metrics { head }
    } else {
        Route::NotFound
    }
}

async fn respond(stream: &mut TcpStream, status: &str, body: &[u8]) -> io::Result<()> {
    write_response(
        stream,
        status,
        "text/plain; charset=utf-8",
        body.len(),
        body,
    )
    .await
}

async fn write_response(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    content_length: usize,
    body: &[u8],
) -> io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {content_length}\r\n\
         Connection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    stream.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_requests() {
        let r = |s: &str| route(s.as_bytes());
        assert_eq!(
            r("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Route::Metrics { head: false }
        );
        assert_eq!(
            r("GET /metrics?x=1 HTTP/1.0\r\n\r\n"),
            Route::Metrics { head: false }
        );
        assert_eq!(
            r("HEAD /metrics HTTP/1.1\r\n\r\n"),
            Route::Metrics { head: true }
        );
        assert_eq!(r("GET / HTTP/1.1\r\n\r\n"), Route::NotFound);
        assert_eq!(r("POST /metrics HTTP/1.1\r\n\r\n"), Route::BadMethod);
        assert_eq!(r("GET /metrics\r\n\r\n"), Route::Bad);
        assert_eq!(r("GET /metrics SPDY/3\r\n\r\n"), Route::Bad);
        assert_eq!(r("\u{ff}\r\n\r\n"), Route::Bad);
    }
}
