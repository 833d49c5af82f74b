//! A TCP proxy in front of a Redis server that loses chosen replies: the
//! command is forwarded and applied, its reply read in full, then the client's
//! connection is closed without it. The client sees its connection dropped
//! with a command unanswered, and `RedisStore` sends the command again on a new
//! connection — an ambiguous write, as `proxy.rs` makes them for DynamoDB.
//!
//! It speaks RESP, the protocol's framing only: a command is an array of bulk
//! strings, a reply any RESP2 or RESP3 value. Each client connection gets an
//! upstream connection of its own for its lifetime (a connection's state, its
//! database and client name, is the client's), and its commands are forwarded
//! one at a time, in order: a pipelined command waits for the reply before it.
#![allow(dead_code)]

use super::proxy::{accept, Shared};
use std::net::SocketAddr;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// A RESP value as read: what the tests look at.
#[derive(Clone, Debug, PartialEq)]
pub enum Resp {
    /// A simple string, a bulk string or a verbatim string (lossy UTF-8).
    Text(String),
    /// A simple or bulk error.
    Error(String),
    Integer(i64),
    /// Nil, of any encoding (RESP2's null bulk string and array, RESP3's `_`).
    Nil,
    /// An array, set, push or map (a map flattened, key then value).
    Array(Vec<Resp>),
    /// A RESP3 double, boolean or big number, as its text.
    Other(String),
}

impl Resp {
    pub fn text(&self) -> Option<&str> {
        match self {
            Resp::Text(text) => Some(text),
            _ => None,
        }
    }
}

/// One command that went through the proxy, with its reply.
#[derive(Clone, Debug)]
pub struct Entry {
    /// The client connection it came on, numbered from 1 in the order accepted.
    pub connection: usize,
    /// The command's name, upper case (`EVALSHA`), and its arguments.
    pub name: String,
    pub args: Vec<String>,
    /// Whether its reply was withheld from the client.
    pub dropped: bool,
    pub reply: Resp,
    /// The command's bytes as sent, to compare a repeat with.
    pub raw: Vec<u8>,
}

#[derive(Clone)]
pub struct RespProxy {
    pub addr: SocketAddr,
    shared: Shared<Entry>,
}

impl RespProxy {
    /// Listens on a local port and forwards to the server at `upstream`
    /// (`host:port`).
    pub async fn start(upstream: &str) -> Self {
        let upstream = upstream.to_owned();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let proxy = Self {
            addr: listener.local_addr().expect("proxy address"),
            shared: Shared::default(),
        };
        let shared = proxy.shared.clone();
        accept(listener, "resp proxy", move |client, connection| {
            let (shared, upstream) = (shared.clone(), upstream.clone());
            async move { serve(client, connection, &upstream, &shared).await }
        });
        proxy
    }

    /// `redis://` and the proxy's address, with `/db` when `db` is given.
    pub fn url(&self, db: Option<u32>) -> String {
        match db {
            Some(db) => format!("redis://{}/{db}", self.addr),
            None => format!("redis://{}", self.addr),
        }
    }

    /// Loses the reply of the `nth` command (from now on, counted from 1)
    /// named `name` each string of whose `contains` is in one of its
    /// arguments (for a script, its SHA1, or a part of a record it writes).
    pub fn drop_reply(&self, name: &str, contains: &[&str], nth: usize) {
        self.shared.arm(&name.to_ascii_uppercase(), contains, nth);
    }

    /// Rules armed and not fired yet.
    pub fn armed(&self) -> usize {
        self.shared.armed()
    }

    /// The log so far, emptying it.
    pub fn take_log(&self) -> Vec<Entry> {
        self.shared.take_log()
    }
}

/// One client connection: command after command until the client closes it,
/// or until a reply is dropped (both connections are closed then).
async fn serve(
    client: TcpStream,
    connection: usize,
    upstream: &str,
    shared: &Shared<Entry>,
) -> std::io::Result<()> {
    let (read, mut write) = client.into_split();
    let mut read = BufReader::new(read);
    let server = TcpStream::connect(upstream).await?;
    let (up_read, mut up_write) = server.into_split();
    let mut up_read = BufReader::new(up_read);
    loop {
        let mut raw = Vec::new();
        let command = match read_value(&mut read, &mut raw).await? {
            Some(command) => command,
            None => return Ok(()),
        };
        let Resp::Array(parts) = command else {
            return Err(std::io::Error::other(format!(
                "not a command: {:?}",
                String::from_utf8_lossy(&raw)
            )));
        };
        let mut words = parts.into_iter().map(|p| match p {
            Resp::Text(t) => t,
            other => format!("{other:?}"),
        });
        let name = words.next().unwrap_or_default().to_ascii_uppercase();
        let args: Vec<String> = words.collect();
        let dropped = shared.should_drop(&name, |s| args.iter().any(|a| a.contains(s)));

        up_write.write_all(&raw).await?;
        let mut reply_raw = Vec::new();
        let reply = read_value(&mut up_read, &mut reply_raw)
            .await?
            .ok_or_else(|| std::io::Error::other("the server closed without a reply"))?;
        shared.record(Entry {
            connection,
            name,
            args,
            dropped,
            reply,
            raw,
        });
        if dropped {
            // Applied upstream, reply read; the client gets nothing but the close.
            return Ok(());
        }
        write.write_all(&reply_raw).await?;
        write.flush().await?;
    }
}

/// Reads one RESP value, appending its bytes to `raw`; `None` when the peer
/// closed before one began.
async fn read_value<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
    raw: &mut Vec<u8>,
) -> std::io::Result<Option<Resp>> {
    let mut line = Vec::new();
    if reader.read_until(b'\n', &mut line).await? == 0 {
        return Ok(None);
    }
    raw.extend_from_slice(&line);
    if line.len() < 3 || !line.ends_with(b"\r\n") {
        return Err(std::io::Error::other(format!(
            "not a RESP line: {:?}",
            String::from_utf8_lossy(&line)
        )));
    }
    let (kind, rest) = (
        line[0],
        String::from_utf8_lossy(&line[1..line.len() - 2]).into_owned(),
    );
    let number = || {
        rest.parse::<i64>()
            .map_err(|_| std::io::Error::other(format!("not a length: {rest:?}")))
    };
    let value = match kind {
        b'+' => Resp::Text(rest),
        b'-' => Resp::Error(rest),
        b':' => Resp::Integer(number()?),
        b'_' => Resp::Nil,
        b',' | b'#' | b'(' => Resp::Other(rest),
        b'$' | b'!' | b'=' => {
            let length = number()?;
            if length < 0 {
                Resp::Nil
            } else {
                let mut bytes = vec![0; length as usize + 2];
                reader.read_exact(&mut bytes).await?;
                raw.extend_from_slice(&bytes);
                let text = String::from_utf8_lossy(&bytes[..length as usize]).into_owned();
                match kind {
                    b'!' => Resp::Error(text),
                    _ => Resp::Text(text),
                }
            }
        }
        b'*' | b'~' | b'>' | b'%' | b'|' => {
            let count = number()?;
            if count < 0 {
                Resp::Nil
            } else {
                // A map's and an attribute's entries are pairs.
                let count = if matches!(kind, b'%' | b'|') {
                    2 * count
                } else {
                    count
                };
                let mut items = Vec::new();
                for _ in 0..count {
                    let item = Box::pin(read_value(reader, raw))
                        .await?
                        .ok_or_else(|| std::io::Error::other("closed inside an aggregate"))?;
                    items.push(item);
                }
                if kind == b'|' {
                    // Attributes come before the value they describe.
                    return Box::pin(read_value(reader, raw)).await;
                }
                Resp::Array(items)
            }
        }
        other => {
            return Err(std::io::Error::other(format!(
                "unknown RESP type {:?}",
                other as char
            )))
        }
    };
    Ok(Some(value))
}
