//! A TCP proxy on 127.0.0.1 in front of a server, whose mode a fault switches: pass
//! everything, refuse (accept and close at once, as a stopped server's port), answer
//! every HTTP request `503`, or mute (requests reach the server, its answers are lost).
//! Switching to `Refuse` or `Http503` cuts the open connections; switching from `Mute`
//! back to `Pass` cuts the connections that lost answers.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the proxy does with a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forward to the server.
    Pass,
    /// Close every connection at once.
    Refuse,
    /// Answer every request `503 Service Unavailable`.
    Http503,
    /// Forward requests, drop every answer: the server acts on a request whose caller
    /// never learns it (e.g. a committed etcd transaction whose answer is lost).
    Mute,
    /// Pass until a request carries a logged once-intent of the replica runtime (the
    /// bytes [`INTENT`]), then [`Mode::Mute`] for every proxy of the group, that
    /// request's answer included: the worst moment for an answer to be lost.
    MuteAtIntent,
}

/// How a logged intent starts in the log (`br2k_core::replica`'s `Op::Intent` as JSON).
pub const INTENT: &[u8] = br#"{"op":"intent""#;

/// A running proxy; dropped, it stops listening.
#[derive(Debug)]
pub struct Proxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    mode: Arc<watch::Sender<Mode>>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free port of 127.0.0.1 and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Result<Self, String> {
        Self::start_in(upstream, Arc::new(watch::Sender::new(Mode::Pass))).await
    }

    /// Proxies to each of `upstreams` sharing one mode (a client's connections to
    /// every member of a cluster).
    pub async fn start_group(upstreams: &[SocketAddr]) -> Result<Vec<Self>, String> {
        let mode = Arc::new(watch::Sender::new(Mode::Pass));
        let mut v = Vec::new();
        for u in upstreams {
            v.push(Self::start_in(*u, mode.clone()).await?);
        }
        Ok(v)
    }

    async fn start_in(
        upstream: SocketAddr,
        mode: Arc<watch::Sender<Mode>>,
    ) -> Result<Self, String> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| format!("proxy bind: {e}"))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let tx = mode.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((conn, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(serve(conn, upstream, tx.clone()));
            }
        });
        Ok(Self { addr, mode, task })
    }

    /// Switches the mode (of the whole group).
    pub fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        *self.mode.borrow()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Whether `data`, after the `tail` of what came before, contains [`INTENT`]; keeps
/// the new tail.
fn carries_intent(tail: &mut Vec<u8>, data: &[u8]) -> bool {
    tail.extend_from_slice(data);
    let found = tail.windows(INTENT.len()).any(|w| w == INTENT);
    let keep = tail.len().min(INTENT.len() - 1);
    tail.drain(..tail.len() - keep);
    found
}

async fn serve(mut conn: TcpStream, upstream: SocketAddr, tx: Arc<watch::Sender<Mode>>) {
    let mut rx = tx.subscribe();
    let mode = *rx.borrow_and_update();
    match mode {
        Mode::Refuse => {}
        Mode::Http503 => {
            // Read one request head, answer 503, close.
            let mut buf = vec![0u8; 16384];
            let mut have = 0;
            while have < buf.len() {
                match conn.read(&mut buf[have..]).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => have += n,
                }
                if buf[..have].windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            let body = "fault matrix: 503";
            let answer = format!(
                "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(answer.as_bytes()).await;
            let _ = conn.shutdown().await;
        }
        Mode::Pass | Mode::Mute | Mode::MuteAtIntent => {
            let Ok(mut up) = TcpStream::connect(upstream).await else {
                return;
            };
            let _ = conn.set_nodelay(true);
            let _ = up.set_nodelay(true);
            let (mut client_r, mut client_w) = conn.split();
            let (mut up_r, mut up_w) = up.split();
            let requests = async {
                let mut buf = vec![0u8; 16384];
                let mut tail = Vec::new();
                loop {
                    let n = match client_r.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    // Muted before the request goes on: its answer is lost too.
                    if *tx.borrow() == Mode::MuteAtIntent && carries_intent(&mut tail, &buf[..n]) {
                        tx.send_replace(Mode::Mute);
                    }
                    if up_w.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                let _ = up_w.shutdown().await;
                // The answers may still come: the connection ends with them.
                std::future::pending::<()>().await
            };
            let answers = async {
                let mut buf = vec![0u8; 16384];
                loop {
                    let n = match up_r.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    // Muted: the answer is lost.
                    if *tx.borrow() != Mode::Mute && client_w.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            };
            let cut = async {
                let mut muted = mode == Mode::Mute;
                while rx.changed().await.is_ok() {
                    match *rx.borrow() {
                        Mode::Mute => muted = true,
                        Mode::Pass | Mode::MuteAtIntent if !muted => {}
                        // Refused, 503, or passing again after answers were lost.
                        _ => return,
                    }
                }
                std::future::pending::<()>().await
            };
            tokio::select! {
                _ = requests => {}
                _ = answers => {}
                _ = cut => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_intent_split_across_reads_is_found() {
        let mut tail = Vec::new();
        assert!(!carries_intent(
            &mut tail,
            br#"xx{"op":"cmd","id":1}{"op":"in"#
        ));
        assert!(carries_intent(&mut tail, br#"tent","id":2}"#));
        let mut tail = Vec::new();
        assert!(carries_intent(&mut tail, br#"{"op":"intent""#));
        assert!(!carries_intent(&mut Vec::new(), b"short"));
    }
}
