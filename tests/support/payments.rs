//! A payments API on a local port, speaking plain HTTP/1.1: it dedupes charges on
//! the `Idempotency-Key` header (replaying the first response) and counts them.
#![allow(dead_code)]

use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

#[derive(Default)]
struct Ledger {
    charges: usize,
    /// Requests per key, and the response first given for it.
    by_key: HashMap<String, (usize, Value)>,
    requests: Vec<(String, String, Value)>,
}

#[derive(Clone)]
pub struct Payments {
    pub addr: SocketAddr,
    ledger: Arc<Mutex<Ledger>>,
    /// Notified after each request is recorded.
    pub received: Arc<Notify>,
}

impl Payments {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let payments = Self {
            addr: listener.local_addr().expect("address"),
            ledger: Arc::default(),
            received: Arc::new(Notify::new()),
        };
        let server = payments.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let server = server.clone();
                tokio::spawn(async move { server.serve(stream).await });
            }
        });
        payments
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn charges(&self) -> usize {
        self.ledger.lock().expect("lock").charges
    }

    pub fn requests(&self) -> usize {
        self.ledger.lock().expect("lock").requests.len()
    }

    /// (path, idempotency key, body) of every request, in arrival order.
    pub fn request_log(&self) -> Vec<(String, String, Value)> {
        self.ledger.lock().expect("lock").requests.clone()
    }

    /// Waits until `n` requests have arrived.
    pub async fn wait_for_requests(&self, n: usize) {
        loop {
            // Created before the check: a request recorded in between still wakes it.
            let notified = self.received.notified();
            if self.requests() >= n {
                return;
            }
            notified.await;
        }
    }

    pub fn requests_with_key(&self, key: &str) -> usize {
        self.ledger
            .lock()
            .expect("lock")
            .by_key
            .get(key)
            .map_or(0, |(n, _)| *n)
    }

    async fn serve(&self, mut stream: TcpStream) {
        let Some((path, headers, body)) = read_request(&mut stream).await else {
            return;
        };
        let key = headers.get("idempotency-key").cloned().unwrap_or_default();
        let response = {
            let mut ledger = self.ledger.lock().expect("lock");
            ledger
                .requests
                .push((path.clone(), key.clone(), body.clone()));
            let next = ledger.charges + 1;
            let is_charge = path == "/charges";
            let entry = ledger
                .by_key
                .entry(key)
                .or_insert((0, json!({ "charge_id": format!("ch_{next}") })));
            entry.0 += 1;
            let (first_time, response) = (entry.0 == 1, entry.1.clone());
            if first_time && is_charge {
                ledger.charges += 1;
            }
            response
        };
        self.received.notify_waiters();
        let body = response.to_string();
        let reply = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = stream.write_all(reply.as_bytes()).await;
    }
}

async fn read_request(stream: &mut TcpStream) -> Option<(String, HashMap<String, String>, Value)> {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..n]);
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break end;
        }
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).to_string();
    let mut lines = head.split("\r\n");
    let path = lines.next()?.split(' ').nth(1)?.to_owned();
    let headers: HashMap<String, String> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    let length: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = buffer[head_end + 4..].to_vec();
    while body.len() < length {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Some((
        path,
        headers,
        serde_json::from_slice(&body).unwrap_or(Value::Null),
    ))
}

/// A client's `POST {url}` with an `Idempotency-Key`, over a plain TCP socket.
pub async fn post(addr: SocketAddr, path: &str, key: &str, body: &Value) -> std::io::Result<Value> {
    let mut stream = TcpStream::connect(addr).await?;
    let body = body.to_string();
    let request = format!(
        "POST {path} HTTP/1.1\r\nhost: {addr}\r\nidempotency-key: {key}\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let start = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(response.len(), |i| i + 4);
    serde_json::from_slice(&response[start..]).map_err(std::io::Error::other)
}
