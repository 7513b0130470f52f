//! A TCP proxy on 127.0.0.1 in front of a server, whose mode a fault switches: pass
//! everything, refuse (accept and close at once, as a stopped server's port), or answer
//! every HTTP request `503`. Switching away from `Pass` cuts the open connections.

use std::net::SocketAddr;

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
}

/// A running proxy; dropped, it stops listening.
#[derive(Debug)]
pub struct Proxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    mode: watch::Sender<Mode>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free port of 127.0.0.1 and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Result<Self, String> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| format!("proxy bind: {e}"))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let (tx, rx) = watch::channel(Mode::Pass);
        let task = tokio::spawn(async move {
            loop {
                let Ok((conn, _)) = listener.accept().await else {
                    continue;
                };
                let rx = rx.clone();
                tokio::spawn(serve(conn, upstream, rx));
            }
        });
        Ok(Self {
            addr,
            mode: tx,
            task,
        })
    }

    /// Switches the mode.
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

async fn serve(mut conn: TcpStream, upstream: SocketAddr, mut rx: watch::Receiver<Mode>) {
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
        Mode::Pass => {
            let Ok(mut up) = TcpStream::connect(upstream).await else {
                return;
            };
            let _ = conn.set_nodelay(true);
            let _ = up.set_nodelay(true);
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut conn, &mut up) => {}
                _ = async {
                    while rx.changed().await.is_ok() {
                        if *rx.borrow() != Mode::Pass {
                            break;
                        }
                    }
                } => {}
            }
        }
    }
}
