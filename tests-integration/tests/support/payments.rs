//! A payments API on a local port, speaking plain HTTP/1.1: it dedupes charges on
//! the `Idempotency-Key` header (replaying the first response) and counts them.
//! Other paths (`/refunds`, `/stock/reservations`, `/stock/releases`) are deduped
//! the same way and counted per path; a path can be made to fail its next requests.
#![allow(dead_code)]

use super::http1::read_request;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

#[derive(Default)]
struct Ledger {
    charges: usize,
    /// Requests per key, and the response first given for it.
    by_key: HashMap<String, (usize, Value)>,
    requests: Vec<(String, String, Value)>,
    /// Distinct keys applied, per path.
    applied: HashMap<String, usize>,
    /// Requests still to be refused (503, not applied), per path.
    failing: HashMap<String, usize>,
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

    /// How many times a request to `path` was applied (distinct keys).
    pub fn applied(&self, path: &str) -> usize {
        let ledger = self.ledger.lock().expect("lock");
        ledger.applied.get(path).copied().unwrap_or_default()
    }

    /// The next `n` requests to `path` get a 503 (`{"error": ..}`) and are not applied.
    pub fn fail_next(&self, path: &str, n: usize) {
        let mut ledger = self.ledger.lock().expect("lock");
        ledger.failing.insert(path.to_owned(), n);
    }

    /// The keys of the requests to `path`, in arrival order.
    pub fn keys_on(&self, path: &str) -> Vec<String> {
        let ledger = self.ledger.lock().expect("lock");
        ledger
            .requests
            .iter()
            .filter(|(p, _, _)| p == path)
            .map(|(_, k, _)| k.clone())
            .collect()
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
        let refused = {
            let mut ledger = self.ledger.lock().expect("lock");
            match ledger.failing.get_mut(&path) {
                Some(left @ 1..) => {
                    *left -= 1;
                    ledger
                        .requests
                        .push((path.clone(), key.clone(), body.clone()));
                    true
                }
                _ => false,
            }
        };
        if refused {
            self.received.notify_waiters();
            let body = json!({ "error": "unavailable" }).to_string();
            let reply = format!(
                "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(reply.as_bytes()).await;
            return;
        }
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
            if first_time {
                *ledger.applied.entry(path).or_default() += 1;
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
