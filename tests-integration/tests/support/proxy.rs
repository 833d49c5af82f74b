//! A TCP proxy in front of LocalStack that loses chosen responses: the request is
//! forwarded and applied, its response read in full, then the client's connection
//! is closed without it. The SDK sees an incomplete message and sends the same
//! request again on a new connection — an ambiguous write.
//!
//! It speaks just enough HTTP/1.1 for the SDK: requests framed by
//! `Content-Length`, responses by `Content-Length`, chunked encoding or the end of
//! the connection; one request at a time per client connection, each on a fresh
//! upstream connection.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// One request that went through the proxy.
#[derive(Clone, Debug)]
pub struct Entry {
    /// The client connection it came on, numbered from 1 in the order accepted.
    pub connection: usize,
    /// The DynamoDB operation (`PutItem`, from `X-Amz-Target`), or `METHOD path`.
    pub operation: String,
    /// Whether its response was withheld from the client.
    pub dropped: bool,
    /// The upstream response's status code.
    pub status: u16,
    /// The request body.
    pub request: String,
    /// The upstream response body (decoded when chunked).
    pub response: String,
}

/// Which request loses its response: the `nth` (from 1, counted from when the
/// rule is armed) whose operation is `operation` and in which every string of
/// `contains` is found. Fires once.
#[derive(Debug)]
struct Rule {
    operation: String,
    contains: Vec<String>,
    nth: usize,
    seen: usize,
    fired: bool,
}

#[derive(Debug)]
struct Losses<E> {
    rules: Vec<Rule>,
    log: Vec<E>,
}

/// What the connections of a proxy share: the losses armed and the log of
/// entries `E`. This HTTP proxy's and the RESP proxy's (`resp_proxy.rs`).
pub struct Shared<E>(Arc<Mutex<Losses<E>>>);

impl<E> Clone for Shared<E> {
    fn clone(&self) -> Self {
        Self(Arc::clone(&self.0))
    }
}

impl<E> Default for Shared<E> {
    fn default() -> Self {
        Self(Arc::new(Mutex::new(Losses {
            rules: Vec::new(),
            log: Vec::new(),
        })))
    }
}

impl<E: Clone> Shared<E> {
    /// Loses the response of the `nth` `operation` (from now on) in which
    /// every string of `contains` is found.
    pub fn arm(&self, operation: &str, contains: &[&str], nth: usize) {
        assert!(nth >= 1, "nth counts from 1");
        self.lock().rules.push(Rule {
            operation: operation.to_owned(),
            contains: contains.iter().map(|s| (*s).to_owned()).collect(),
            nth,
            seen: 0,
            fired: false,
        });
    }

    /// Rules armed and not fired yet.
    pub fn armed(&self) -> usize {
        self.lock().rules.iter().filter(|r| !r.fired).count()
    }

    /// Whether the request `operation`, in which `found` says whether a string
    /// is, loses its response: counted by every rule it matches, it fires the
    /// first whose turn it is.
    pub fn should_drop(&self, operation: &str, found: impl Fn(&str) -> bool) -> bool {
        let mut losses = self.lock();
        for rule in losses.rules.iter_mut().filter(|r| !r.fired) {
            if rule.operation == operation && rule.contains.iter().all(|s| found(s)) {
                rule.seen += 1;
                if rule.seen == rule.nth {
                    rule.fired = true;
                    return true;
                }
            }
        }
        false
    }

    pub fn record(&self, entry: E) {
        self.lock().log.push(entry);
    }

    /// Every entry so far, in the order their responses came back.
    pub fn log(&self) -> Vec<E> {
        self.lock().log.clone()
    }

    /// The log so far, emptying it.
    pub fn take_log(&self) -> Vec<E> {
        std::mem::take(&mut self.lock().log)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Losses<E>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Serves each connection accepted on `listener` with `serve` on a task of
/// its own, numbered from 1 in the order accepted; `name` heads its errors.
pub fn accept<F, Fut>(listener: TcpListener, name: &'static str, serve: F)
where
    F: Fn(TcpStream, usize) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = std::io::Result<()>> + Send + 'static,
{
    tokio::spawn(async move {
        let mut connections = 0;
        while let Ok((client, _)) = listener.accept().await {
            connections += 1;
            let served = serve(client, connections);
            tokio::spawn(async move {
                if let Err(err) = served.await {
                    eprintln!("{name}: {err}");
                }
            });
        }
    });
}

#[derive(Clone)]
pub struct Proxy {
    pub addr: SocketAddr,
    shared: Shared<Entry>,
}

impl Proxy {
    /// Listens on a local port and forwards to `upstream` (`http://host:port`).
    pub async fn start(upstream: &str) -> Self {
        let upstream = upstream
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_owned();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let proxy = Self {
            addr: listener.local_addr().expect("proxy address"),
            shared: Shared::default(),
        };
        let shared = proxy.shared.clone();
        accept(listener, "proxy", move |client, connection| {
            let (shared, upstream) = (shared.clone(), upstream.clone());
            async move { serve(client, connection, &upstream, &shared).await }
        });
        proxy
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Loses the response of the `nth` `operation` request (from now on) whose
    /// body contains every string of `contains`.
    pub fn drop_response(&self, operation: &str, contains: &[&str], nth: usize) {
        self.shared.arm(operation, contains, nth);
    }

    /// Rules armed and not fired yet.
    pub fn armed(&self) -> usize {
        self.shared.armed()
    }

    /// Every request so far, in the order their responses came back.
    pub fn log(&self) -> Vec<Entry> {
        self.shared.log()
    }

    /// The log so far, emptying it.
    pub fn take_log(&self) -> Vec<Entry> {
        self.shared.take_log()
    }
}

/// One client connection: request after request until the client closes it, or
/// until a response is dropped (the connection is closed then).
async fn serve(
    client: TcpStream,
    connection: usize,
    upstream: &str,
    shared: &Shared<Entry>,
) -> std::io::Result<()> {
    let (read, mut write) = client.into_split();
    let mut read = BufReader::new(read);
    while let Some(request) = read_message(&mut read, Framing::Request).await? {
        let operation = request
            .header("x-amz-target")
            .map(|t| t.rsplit('.').next().unwrap_or(t).to_owned())
            .unwrap_or_else(|| {
                request
                    .start_line
                    .split(' ')
                    .take(2)
                    .collect::<Vec<_>>()
                    .join(" ")
            });
        let request_body = String::from_utf8_lossy(&request.body).into_owned();
        let dropped = shared.should_drop(&operation, |s| request_body.contains(s));

        let upstream_stream = TcpStream::connect(upstream).await?;
        let (up_read, mut up_write) = upstream_stream.into_split();
        up_write.write_all(&request.raw).await?;
        let mut up_read = BufReader::new(up_read);
        let response = read_message(&mut up_read, Framing::Response)
            .await?
            .ok_or_else(|| std::io::Error::other("upstream closed without a response"))?;
        let status = response
            .start_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let close = response
            .header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"));
        shared.record(Entry {
            connection,
            operation,
            dropped,
            status,
            request: request_body,
            response: String::from_utf8_lossy(&response.body).into_owned(),
        });
        if dropped {
            // Applied upstream, response read; the client gets nothing but the close.
            return Ok(());
        }
        write.write_all(&response.raw).await?;
        write.flush().await?;
        if close {
            return Ok(());
        }
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq)]
enum Framing {
    Request,
    Response,
}

/// An HTTP/1.1 message: its bytes as received (to forward) and its decoded body.
struct Message {
    start_line: String,
    headers: Vec<(String, String)>,
    raw: Vec<u8>,
    body: Vec<u8>,
}

impl Message {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Reads one message; `None` when the peer closed before one began.
async fn read_message<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
    framing: Framing,
) -> std::io::Result<Option<Message>> {
    let mut raw = Vec::new();
    let mut line = String::new();
    if reader.read_line(&mut line).await? == 0 {
        return Ok(None);
    }
    raw.extend_from_slice(line.as_bytes());
    let start_line = line.trim_end().to_owned();
    let mut headers = Vec::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).await? == 0 {
            return Err(std::io::Error::other(
                "connection closed inside the headers",
            ));
        }
        raw.extend_from_slice(line.as_bytes());
        let trimmed = line.trim_end();
        if trimmed.is_empty() {
            break;
        }
        if let Some((name, value)) = trimmed.split_once(':') {
            headers.push((name.trim().to_owned(), value.trim().to_owned()));
        }
    }
    let mut message = Message {
        start_line,
        headers,
        raw,
        body: Vec::new(),
    };
    let status = message.start_line.split(' ').nth(1).unwrap_or("");
    let bodiless = framing == Framing::Response
        && (status.starts_with('1') || status == "204" || status == "304");
    let chunked = message
        .header("transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    let length = message
        .header("content-length")
        .and_then(|v| v.parse::<usize>().ok());
    if bodiless {
    } else if chunked {
        loop {
            line.clear();
            reader.read_line(&mut line).await?;
            message.raw.extend_from_slice(line.as_bytes());
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| std::io::Error::other(format!("bad chunk size {line:?}")))?;
            if size == 0 {
                // Trailers, up to the empty line.
                loop {
                    line.clear();
                    if reader.read_line(&mut line).await? == 0 {
                        break;
                    }
                    message.raw.extend_from_slice(line.as_bytes());
                    if line.trim_end().is_empty() {
                        break;
                    }
                }
                break;
            }
            let mut chunk = vec![0; size + 2];
            reader.read_exact(&mut chunk).await?;
            message.raw.extend_from_slice(&chunk);
            message.body.extend_from_slice(&chunk[..size]);
        }
    } else if let Some(length) = length {
        let mut body = vec![0; length];
        reader.read_exact(&mut body).await?;
        message.raw.extend_from_slice(&body);
        message.body = body;
    } else if framing == Framing::Response {
        // Delimited by the end of the connection.
        let mut body = Vec::new();
        reader.read_to_end(&mut body).await?;
        message.raw.extend_from_slice(&body);
        message.body = body;
    }
    Ok(Some(message))
}
