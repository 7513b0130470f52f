//! The settling client: a balance to settle from, one settlement every 200 ms under a
//! new idempotency key, and the final check of the settlements on chain.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::json;

use super::member::Member;
use super::rig::Rig;
use crate::ledger::{Client, Reply, settlement_txs};

impl Rig {
    /// Puts a balance on the account the client settles from.
    pub(super) async fn deposit(&self) -> Result<(), String> {
        let c = self.client();
        let body = json!({"account": "treasury", "amount": 1_000_000_000u64}).to_string();
        match c
            .call(
                "/deposit",
                Some(&format!("fo-{}-fund", self.run)),
                Some(&body),
                Duration::from_secs(30),
            )
            .await
        {
            Reply::Final(200, _) => Ok(()),
            other => Err(format!("deposit: {other:?}")),
        }
    }

    /// A client of every replica of both clusters.
    pub fn client(&self) -> Client {
        Client::new(self.members.iter().flat_map(Member::urls).collect())
    }

    /// Settles 1 unit under a new key every 200 ms until stopped.
    pub(super) fn start_load(&mut self) {
        let stop = Arc::new(AtomicBool::new(false));
        let (c, run, acked, s) = (
            self.client(),
            self.run.clone(),
            self.acked.clone(),
            stop.clone(),
        );
        let task = tokio::spawn(async move {
            let mut unknown = Vec::new();
            let body = json!({"account": "treasury", "amount": 1}).to_string();
            let mut n = 0u64;
            while !s.load(Ordering::Relaxed) {
                n += 1;
                let key = format!("fo-{run}-s-{n}");
                let r = c
                    .call("/settle", Some(&key), Some(&body), Duration::from_secs(15))
                    .await;
                match &r {
                    Reply::Final(200, _) => acked.lock().await.push(key),
                    _ => unknown.push((key, r)),
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            unknown
        });
        self.load = Some((stop, task));
    }

    /// Stops the load, resolves every unknown outcome with its key, and checks that
    /// every acknowledged settlement is on chain exactly once and no other.
    pub async fn finish(
        &mut self,
        trials: Vec<super::TrialResult>,
    ) -> Result<super::Summary, String> {
        let mut problems = Vec::new();
        let unknown = match self.load.take() {
            Some((stop, task)) => {
                stop.store(true, Ordering::Relaxed);
                task.await.map_err(|e| e.to_string())?
            }
            None => Vec::new(),
        };
        let c = self.client();
        let body = json!({"account": "treasury", "amount": 1}).to_string();
        for (key, first) in unknown {
            self.sync_pods().await;
            match c
                .call("/settle", Some(&key), Some(&body), Duration::from_secs(60))
                .await
            {
                Reply::Final(200, _) => self.acked.lock().await.push(key),
                other => problems.push(format!(
                    "settlement {key}: {first:?}, then still {other:?} after a retry with its key"
                )),
            }
        }
        let acked = self.acked.lock().await.clone();
        let on_chain = settlement_txs(&self.rpc, self.settlement, self.first_block).await?;
        let keys: BTreeMap<_, _> = acked
            .iter()
            .map(|k| (br2k_ledger::settle::settlement_key(k), k.clone()))
            .collect();
        let lost = keys.keys().filter(|k| !on_chain.contains_key(*k)).count();
        let duplicated = on_chain.values().filter(|n| **n > 1).count();
        let unexpected = on_chain.keys().filter(|k| !keys.contains_key(*k)).count();
        Ok(super::Summary {
            trials,
            acknowledged: acked.len(),
            lost,
            duplicated,
            unexpected,
            problems,
        })
    }
}
