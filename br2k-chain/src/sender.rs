//! Signing and sending transactions: nonce management, gas estimation, receipts and
//! confirmations.

use std::time::{Duration, Instant};

use alloy::eips::eip2718::Encodable2718;
use alloy::network::{EthereumWallet, NetworkTransactionBuilder, TransactionBuilder};
use alloy::primitives::{Address, B256, Bytes};
use alloy::providers::Provider;
use alloy::rpc::types::{TransactionReceipt, TransactionRequest};
use alloy::signers::local::PrivateKeySigner;
use tokio::sync::Mutex;

use crate::error::ChainError;
use crate::rpc::Endpoints;

/// Signs with one key. Writes of one handle are serialized (one nonce sequence).
pub(crate) struct Sender {
    wallet: EthereumWallet,
    pub(crate) from: Address,
    chain_id: u64,
    /// The next nonce, once known; reset after a failed send.
    nonce: Mutex<Option<u64>>,
    confirmations: u64,
    poll: Duration,
    receipt_timeout: Duration,
}

impl Sender {
    pub(crate) fn new(
        signer: PrivateKeySigner,
        chain_id: u64,
        confirmations: u64,
        poll: Duration,
        receipt_timeout: Duration,
    ) -> Self {
        let from = signer.address();
        Self {
            wallet: EthereumWallet::from(signer),
            from,
            chain_id,
            nonce: Mutex::new(None),
            confirmations: confirmations.max(1),
            poll,
            receipt_timeout,
        }
    }

    /// Estimates gas (a revert surfaces here with its custom error), signs, sends
    /// (failing over between endpoints with the same signed bytes) and waits for the
    /// receipt and the configured confirmations.
    pub(crate) async fn send(
        &self,
        rpc: &Endpoints,
        what: &str,
        tx: TransactionRequest,
    ) -> Result<TransactionReceipt, ChainError> {
        let mut slot = self.nonce.lock().await;
        let from = self.from;
        let nonce = match *slot {
            Some(n) => n,
            None => {
                let n = rpc
                    .run("nonce", |p| async move {
                        p.get_transaction_count(from).pending().await
                    })
                    .await?;
                *slot = Some(n);
                n
            }
        };
        let tx = tx
            .with_from(from)
            .with_nonce(nonce)
            .with_chain_id(self.chain_id);
        let gas = rpc
            .run(what, |p| {
                let tx = tx.clone();
                async move { p.estimate_gas(tx).await }
            })
            .await?;
        let price = rpc
            .run("gas price", |p| async move { p.get_gas_price().await })
            .await?;
        let tx = tx
            .with_gas_limit(gas + gas / 4 + 10_000)
            .with_gas_price(price);
        let envelope = tx
            .build(&self.wallet)
            .await
            .map_err(|e| ChainError::Config(format!("cannot sign the transaction: {e}")))?;
        let hash = *envelope.tx_hash();
        let raw = Bytes::from(envelope.encoded_2718());
        let sent = rpc
            .run(what, |p| {
                let raw = raw.clone();
                async move { p.send_raw_transaction(&raw).await.map(|_| ()) }
            })
            .await;
        let sent = match sent {
            // A failover may resend bytes the first endpoint did accept: then the chain
            // knows the transaction (whatever words the refusal uses).
            Err(e @ ChainError::Rpc { .. }) => match self.known(rpc, hash).await {
                true => Ok(()),
                false => Err(e),
            },
            other => other,
        };
        match sent {
            Ok(()) => *slot = Some(nonce + 1),
            Err(e) => {
                *slot = None;
                return Err(e);
            }
        }
        let receipt = self.wait(rpc, hash, &raw).await;
        if receipt.is_err() {
            // Unknown outcome: ask the chain for the nonce next time.
            *slot = None;
        }
        let receipt = receipt?;
        if !receipt.status() {
            return Err(ChainError::Reverted(hash));
        }
        Ok(receipt)
    }

    /// Whether an endpoint knows the transaction `hash` (pending or mined).
    async fn known(&self, rpc: &Endpoints, hash: B256) -> bool {
        rpc.run("transaction", |p| async move {
            p.get_transaction_by_hash(hash).await
        })
        .await
        .is_ok_and(|t| t.is_some())
    }

    /// Waits for the receipt of `hash` and its confirmations; after the confirmation
    /// depth the receipt is fetched again and its block must still be canonical. A
    /// transaction reorged out is sent again (`raw`) and waited for again; never
    /// reported confirmed.
    async fn wait(
        &self,
        rpc: &Endpoints,
        hash: B256,
        raw: &Bytes,
    ) -> Result<TransactionReceipt, ChainError> {
        let deadline = Instant::now() + self.receipt_timeout;
        let mut last = String::from("not mined yet");
        let receipt = |p: alloy::providers::RootProvider| async move {
            p.get_transaction_receipt(hash).await
        };
        loop {
            match rpc.run("receipt", receipt).await {
                Ok(Some(first)) => {
                    let mined = first.block_number.unwrap_or_default();
                    self.confirm(rpc, mined, deadline).await?;
                    let again = rpc.run("receipt", receipt).await?;
                    let canonical = match &again {
                        Some(r) => {
                            let n = r.block_number.unwrap_or_default();
                            n == mined
                                && r.block_hash.is_some()
                                && rpc.canonical_hash(n, 1).await? == r.block_hash
                        }
                        None => false,
                    };
                    if let (true, Some(r)) = (canonical, again) {
                        return Ok(r);
                    }
                    tracing::warn!(tx = %hash, block = mined, "transaction reorged out of its block; waiting for it again");
                    last = format!("reorged out of block {mined}");
                    // Back in the pool, or dropped by the node: send the same bytes.
                    let _ = rpc
                        .run("resend", |p| {
                            let raw = raw.clone();
                            async move { p.send_raw_transaction(&raw).await.map(|_| ()) }
                        })
                        .await;
                }
                Ok(None) => {}
                Err(ChainError::Unavailable(reason)) => last = reason,
                Err(e) => return Err(e),
            }
            if Instant::now() >= deadline {
                return Err(ChainError::Unavailable(format!(
                    "transaction {hash} not confirmed after {:?}: {last}",
                    self.receipt_timeout
                )));
            }
            tokio::time::sleep(self.poll).await;
        }
    }

    async fn confirm(
        &self,
        rpc: &Endpoints,
        mined: u64,
        deadline: Instant,
    ) -> Result<(), ChainError> {
        if self.confirmations <= 1 {
            return Ok(());
        }
        loop {
            let head = rpc
                .run(
                    "block number",
                    |p| async move { p.get_block_number().await },
                )
                .await?;
            if head + 1 >= mined + self.confirmations {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(ChainError::Unavailable(format!(
                    "block {mined} has {} of {} confirmations",
                    head + 1 - mined.min(head + 1),
                    self.confirmations
                )));
            }
            tokio::time::sleep(self.poll).await;
        }
    }
}
