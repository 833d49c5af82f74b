//! A TCP proxy in front of a Redis server that counts round trips: it reads the
//! RESP frames going each way (commands from the client, replies from the
//! server) and forwards the bytes unchanged. A round trip begins when the
//! client sends a command while it waits for no reply on that connection;
//! commands sent before the replies come back (a pipeline) belong to the same
//! round trip. Each is logged with its commands, an `EVALSHA` named by the
//! store's script it runs (`EVALSHA reserve`).
//!
//! Counting at the socket rather than on the server (`INFO commandstats`,
//! `MONITOR`) counts this client only, on a server other clients share, and
//! sees what the client waits for: a pipeline as one round trip, a `NOSCRIPT`
//! refusal and its `SCRIPT LOAD` as round trips of their own.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};

/// The store's scripts, by the SHA-1 `EVALSHA` names them with.
fn scripts() -> HashMap<String, &'static str> {
    super::redis_servers::SCRIPTS
        .iter()
        .map(|(name, source)| (redis::Script::new(source).get_hash().to_owned(), *name))
        .collect()
}

#[derive(Default)]
struct Log {
    /// The round trips so far, each the commands it carried.
    round_trips: Vec<Vec<String>>,
}

#[derive(Clone)]
pub struct RespProxy {
    addr: SocketAddr,
    log: Arc<Mutex<Log>>,
}

impl RespProxy {
    /// Listens on a local port and forwards to `upstream` (`redis://host:port`).
    pub async fn start(upstream: &str) -> Self {
        let upstream = upstream
            .trim_start_matches("redis://")
            .trim_end_matches('/')
            .to_owned();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let proxy = Self {
            addr: listener.local_addr().expect("proxy address"),
            log: Arc::default(),
        };
        let (log, scripts) = (Arc::clone(&proxy.log), Arc::new(scripts()));
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (log, scripts, upstream) = (log.clone(), scripts.clone(), upstream.clone());
                tokio::spawn(async move {
                    if let Err(err) = serve(client, &upstream, &log, &scripts).await {
                        eprintln!("resp proxy: {err}");
                    }
                });
            }
        });
        proxy
    }

    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// The round trips since the last call, each as its commands (`+` between
    /// the commands of a pipeline).
    pub fn take(&self) -> Vec<String> {
        std::mem::take(&mut self.log.lock().expect("log lock").round_trips)
            .into_iter()
            .map(|commands| commands.join(" + "))
            .collect()
    }
}

/// One client connection, until either side closes it.
async fn serve(
    client: TcpStream,
    upstream: &str,
    log: &Mutex<Log>,
    scripts: &HashMap<String, &'static str>,
) -> std::io::Result<()> {
    client.set_nodelay(true)?;
    let server = TcpStream::connect(upstream).await?;
    server.set_nodelay(true)?;
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    // Replies the client waits for on this connection.
    let outstanding = Mutex::new(0usize);
    // Logged before forwarded: the reply cannot overtake its command.
    let requests = forward(client_read, server_write, |frame| {
        let command = command(frame, scripts)?;
        let mut outstanding = outstanding.lock().expect("outstanding lock");
        let mut log = log.lock().expect("log lock");
        match log.round_trips.last_mut() {
            Some(round_trip) if *outstanding > 0 => round_trip.push(command),
            _ => log.round_trips.push(vec![command]),
        }
        *outstanding += 1;
        Ok(())
    });
    // Counted before forwarded: the client's next command comes after.
    let replies = forward(server_read, client_write, |_| {
        let mut outstanding = outstanding.lock().expect("outstanding lock");
        *outstanding = outstanding.saturating_sub(1);
        Ok(())
    });
    tokio::try_join!(requests, replies).map(|_| ())
}

/// Forwards the bytes `from` sends to `to` as they come, calling `seen` with
/// each whole frame before the bytes that end it go on; until `from` closes.
async fn forward(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut seen: impl FnMut(&[u8]) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let (mut pending, mut buf) = (Vec::new(), vec![0; 64 * 1024]);
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return to.shutdown().await;
        }
        pending.extend_from_slice(&buf[..n]);
        while let Some(len) = frame(&pending)? {
            seen(&pending[..len])?;
            pending.drain(..len);
        }
        to.write_all(&buf[..n]).await?;
    }
}

fn malformed(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, format!("RESP: {what}"))
}

/// The line at the start of `buf` (without its CRLF) and the length with it.
fn line(buf: &[u8]) -> Option<(&[u8], usize)> {
    let end = buf.windows(2).position(|w| w == b"\r\n")?;
    Some((&buf[..end], end + 2))
}

fn number(text: &[u8]) -> std::io::Result<i64> {
    std::str::from_utf8(text)
        .ok()
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| malformed("a bad length"))
}

/// The length of the RESP2 or RESP3 frame at the start of `buf`, if it is all
/// there.
fn frame(buf: &[u8]) -> std::io::Result<Option<usize>> {
    let Some(&kind) = buf.first() else {
        return Ok(None);
    };
    let Some((head, mut len)) = line(&buf[1..]) else {
        return Ok(None);
    };
    len += 1;
    let elements = match kind {
        b'+' | b'-' | b':' | b'_' | b',' | b'#' | b'(' => return Ok(Some(len)),
        b'$' | b'!' | b'=' => {
            let size = number(head)?;
            if size < 0 {
                return Ok(Some(len));
            }
            let end = len + size as usize + 2;
            return Ok((buf.len() >= end).then_some(end));
        }
        b'*' | b'~' | b'>' => number(head)?,
        b'%' | b'|' => number(head)? * 2,
        other => return Err(malformed(&format!("an unknown type byte {other:#x}"))),
    };
    for _ in 0..elements.max(0) {
        match frame(&buf[len..])? {
            Some(element) => len += element,
            None => return Ok(None),
        }
    }
    // An attribute map precedes the reply it annotates.
    if kind == b'|' {
        return Ok(frame(&buf[len..])?.map(|reply| len + reply));
    }
    Ok(Some(len))
}

/// The name of the command `frame` (a whole one): with the subcommand of
/// `SCRIPT`, the script of `EVALSHA`.
fn command(frame: &[u8], scripts: &HashMap<String, &'static str>) -> std::io::Result<String> {
    if frame.first() != Some(&b'*') {
        return Err(malformed("a command that is not an array"));
    }
    // The first two bulk strings.
    let (_, mut at) = line(&frame[1..]).ok_or_else(|| malformed("a cut frame"))?;
    at += 1;
    let mut words = Vec::new();
    while words.len() < 2 && at < frame.len() {
        let (head, head_len) = line(&frame[at + 1..]).ok_or_else(|| malformed("a cut frame"))?;
        let start = at + 1 + head_len;
        let end = start + number(head)?.max(0) as usize;
        words.push(String::from_utf8_lossy(&frame[start..end]).into_owned());
        at = end + 2;
    }
    let name = words
        .first()
        .map(|w| w.to_ascii_uppercase())
        .unwrap_or_default();
    Ok(match (name.as_str(), words.get(1)) {
        ("EVALSHA", Some(sha)) => match scripts.get(sha.as_str()) {
            Some(script) => format!("EVALSHA {script}"),
            None => format!("EVALSHA {}", &sha[..sha.len().min(8)]),
        },
        ("SCRIPT" | "CLIENT" | "CONFIG", Some(sub)) => {
            format!("{name} {}", sub.to_ascii_uppercase())
        }
        _ => name,
    })
}
