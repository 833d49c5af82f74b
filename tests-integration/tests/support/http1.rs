//! Plain HTTP/1.1 over loopback, just enough for the local servers of the tests
//! and the chaos run: read one request, send one `POST`. Shared by
//! `tests/support/payments.rs` and `examples/chaos.rs` (through `#[path]`).
#![allow(dead_code)]

use serde_json::Value;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One request: its path, headers (lowercase names) and JSON body (`null` if none).
pub async fn read_request(
    stream: &mut TcpStream,
) -> Option<(String, HashMap<String, String>, Value)> {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 || buffer.len() > 64 * 1024 {
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

/// `POST {path}` with an optional `Idempotency-Key`; the JSON body of the answer.
pub async fn post(addr: SocketAddr, path: &str, key: &str, body: &Value) -> std::io::Result<Value> {
    let exchange = async {
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
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| std::io::Error::other(format!("{path}: no answer in 10 s")))?
}
