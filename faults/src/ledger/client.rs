//! The HTTP client of the ledger's load: follows redirects to the leader.

use super::*;

pub(super) fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(4))
        .connect_timeout(Duration::from_secs(2))
        .build()
        .expect("reqwest client")
}

/// What a request ended with.
#[derive(Debug, Clone)]
pub enum Reply {
    /// A final answer: status and JSON body.
    Final(u16, Value),
    /// None before the deadline; the last thing seen.
    NoAnswer(String),
}

/// A client of the 3 replicas: follows redirects to the leader, retries elections,
/// dead or paused replicas and requests stranded on a deposed leader (same key).
#[derive(Clone)]
pub struct Client {
    pub(super) http: reqwest::Client,
    /// The replicas' URLs.
    pub urls: Vec<String>,
    pub(super) last: Arc<Mutex<usize>>,
}

impl Client {
    /// A client of the replicas at `urls` (tried in order, the first one first).
    pub fn new(urls: Vec<String>) -> Self {
        Self {
            http: http(),
            urls,
            last: Arc::new(Mutex::new(0)),
        }
    }

    /// `GET /status` of one replica.
    pub async fn status(&self, url: &str) -> Option<Value> {
        let r = self.http.get(format!("{url}/status")).send().await.ok()?;
        r.json().await.ok()
    }

    /// The index of the replica that says it leads.
    pub async fn leader(&self) -> Option<usize> {
        for (i, u) in self.urls.iter().enumerate() {
            if let Some(s) = self.status(u).await
                && s["role"] == "leader"
            {
                return Some(i);
            }
        }
        None
    }

    /// Waits until some replica leads.
    pub async fn wait_leader(&self, within: Duration) -> Option<usize> {
        let start = Instant::now();
        loop {
            if let Some(l) = self.leader().await {
                return Some(l);
            }
            if start.elapsed() > within {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Sends a request until a final answer or the deadline.
    pub async fn call(
        &self,
        path: &str,
        key: Option<&str>,
        body: Option<&str>,
        deadline: Duration,
    ) -> Reply {
        let start = Instant::now();
        let mut next = *self.last.lock().expect("lock");
        let mut target = self.urls[next].clone();
        let mut last_seen = String::from("nothing sent");
        while start.elapsed() < deadline {
            let mut req = match body {
                Some(b) => self.http.post(format!("{target}{path}")).body(b.to_owned()),
                None => self.http.get(format!("{target}{path}")),
            };
            req = req.header("content-type", "application/json");
            if let Some(k) = key {
                req = req.header("idempotency-key", k);
            }
            match req.send().await {
                Ok(r) if r.status().as_u16() == 307 => {
                    if let Some(loc) = r.headers().get("location").and_then(|l| l.to_str().ok()) {
                        target = loc.strip_suffix(path).unwrap_or(loc).to_owned();
                        continue;
                    }
                }
                Ok(r) if r.status().as_u16() == 503 => {
                    last_seen = format!("{target}: 503");
                }
                Ok(r) => {
                    let s = r.status().as_u16();
                    let v = r.json().await.unwrap_or(Value::Null);
                    // 409 conflict: stranded on a deposed leader; retried (same key).
                    // 5xx other than 503: the replica could not finish (e.g. its
                    // registry or chain is down); retried (same key).
                    let retry = (s == 409 && v["error"] == "conflict") || s >= 500;
                    last_seen = format!("{target}: {s} {v}");
                    if !retry {
                        if let Some(i) = self.urls.iter().position(|u| *u == target) {
                            *self.last.lock().expect("lock") = i;
                        }
                        return Reply::Final(s, v);
                    }
                }
                Err(e) => last_seen = format!("{target}: {e}"),
            }
            next = (next + 1) % self.urls.len();
            target = self.urls[next].clone();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Reply::NoAnswer(last_seen)
    }

    /// `GET /accounts?local=true` of one replica.
    pub async fn local_accounts(&self, url: &str) -> Option<BTreeMap<String, u64>> {
        let r = self
            .http
            .get(format!("{url}/accounts?local=true"))
            .send()
            .await
            .ok()?;
        r.json().await.ok()
    }
}

/// Whether `mode` is the proxy's pass mode (for the heal's check).
pub fn passing(p: &Proxy) -> bool {
    p.mode() == Mode::Pass
}
