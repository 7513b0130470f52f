//! Loopback TCP proxies of a harness's own; one can answer 503.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinHandle;

use super::{free_port, poll};

/// A loopback TCP proxy: forwards to a target, or (in 503 mode) answers every HTTP
/// request with `503 Service Unavailable`. Stopping it drops the listener and every
/// live connection; it listens again on the same port.
pub struct TcpProxy {
    /// The port it listens on.
    pub port: u16,
    target: String,
    fail: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

/// The answer of a proxy in 503 mode.
pub(super) const ANSWER_503: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 20\r\nConnection: close\r\n\r\nbr2k-faults: 503 :)\n";

impl TcpProxy {
    /// A proxy to `target` (`host:port`) on a free loopback port.
    pub async fn start(target: &str) -> Result<Self, String> {
        let mut p = Self {
            port: free_port()?,
            target: target.to_owned(),
            fail: Arc::default(),
            accept: None,
            conns: Arc::default(),
        };
        p.resume().await?;
        Ok(p)
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// Switches the 503 mode; live connections are dropped either way, so that no
    /// keep-alive connection outlives the switch.
    pub async fn set_failing(&mut self, fail: bool) {
        self.fail.store(fail, Ordering::SeqCst);
        self.drop_conns().await;
    }

    /// Listens again on the same port (retrying while the port is still taken).
    pub async fn resume(&mut self) -> Result<(), String> {
        if self.accept.is_some() {
            return Ok(());
        }
        let addr: std::net::SocketAddr = self.addr().parse().map_err(|e| format!("{e}"))?;
        let listener = poll(Duration::from_secs(10), "proxy port free", async || {
            let s = TcpSocket::new_v4().map_err(|e| e.to_string())?;
            s.set_reuseaddr(true).map_err(|e| e.to_string())?;
            s.bind(addr).map_err(|e| e.to_string())?;
            s.listen(1024).map_err(|e| e.to_string())
        })
        .await?;
        let target = self.target.clone();
        let conns = self.conns.clone();
        let fail = self.fail.clone();
        self.accept = Some(tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let target = target.clone();
                let failing = fail.load(Ordering::SeqCst);
                let conn = tokio::spawn(async move {
                    if failing {
                        answer_503(&mut inbound).await;
                    } else if let Ok(mut outbound) = TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                let mut c = conns.lock().unwrap_or_else(|e| e.into_inner());
                c.retain(|t| !t.is_finished());
                c.push(conn);
            }
        }));
        Ok(())
    }

    /// Drops the listener and every live connection, and waits until they are gone.
    pub async fn stop(&mut self) {
        if let Some(a) = self.accept.take() {
            a.abort();
            let _ = a.await;
        }
        self.drop_conns().await;
    }

    async fn drop_conns(&mut self) {
        let conns: Vec<JoinHandle<()>> = self
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
            .collect();
        for c in conns {
            c.abort();
            let _ = c.await;
        }
    }
}

/// Reads one request head (up to 64 KiB or 5 s) and answers 503.
pub(super) async fn answer_503(s: &mut TcpStream) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let read_head = async {
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 64 * 1024 {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        true
    };
    if tokio::time::timeout(Duration::from_secs(5), read_head)
        .await
        .unwrap_or(false)
    {
        let _ = s.write_all(ANSWER_503).await;
        let _ = s.shutdown().await;
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        if let Some(a) = self.accept.take() {
            a.abort();
        }
        for c in self
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            c.abort();
        }
    }
}
