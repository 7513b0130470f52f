//! A settlement reorged out before its confirmations is never reported done: on a
//! private anvil (the test reverts the chain), the settlement effect waits for the
//! configured confirmations, re-checks its receipt, and reports a settlement that
//! really is on the canonical chain.

use alloy::node_bindings::{Anvil, AnvilInstance};
use alloy::providers::{Provider, ProviderBuilder};
use br2k_core::replica::Effect;
use br2k_ledger::{Command, SettleEffect};
use serde_json::{Value, json};

fn anvil() -> AnvilInstance {
    let bin = std::env::var("BR2K_ANVIL_BIN")
        .expect("BR2K_ANVIL_BIN must name the anvil binary (source .stack/env)");
    Anvil::at(bin)
        .arg("--host")
        .arg("127.0.0.1")
        .try_spawn()
        .expect("spawn anvil")
}

async fn raw(node: &AnvilInstance, method: &'static str, params: Value) -> Value {
    let p = ProviderBuilder::new().connect_http(node.endpoint_url());
    p.raw_request(method.into(), params)
        .await
        .unwrap_or_else(|e| panic!("{method}: {e}"))
}

async fn head(node: &AnvilInstance) -> u64 {
    let p = ProviderBuilder::new().connect_http(node.endpoint_url());
    p.get_block_number().await.expect("block number")
}

#[tokio::test]
#[ignore = "needs stack"]
async fn a_settlement_reorged_out_before_its_confirmations_is_not_done() {
    let node = anvil();
    let key = hex::encode(node.keys()[0].to_bytes());
    let address = SettleEffect::deploy(node.endpoint_url(), &key, None)
        .await
        .expect("deploy Settlement");
    let effect = SettleEffect::new(node.endpoint_url(), address, &key)
        .expect("settler")
        .with_confirmations(3);
    let command = Command::Settle {
        key: "reorged-settlement".into(),
        account: "alice".into(),
        amount: 7,
    };
    let snapshot = raw(&node, "evm_snapshot", json!([])).await;
    let start = head(&node).await;
    let run = tokio::spawn({
        let (effect, command) = (effect.clone(), command.clone());
        async move { effect.run("reorged-settlement", &command).await }
    });
    // Mined (auto-mine) and waiting for two more blocks: revert it away, and resend
    // it as the node's pool would after a reorg.
    while head(&node).await == start {
        tokio::task::yield_now().await;
    }
    let tx = {
        let p = ProviderBuilder::new().connect_http(node.endpoint_url());
        let block = p
            .get_block_by_number((start + 1).into())
            .full()
            .await
            .expect("block")
            .expect("mined");
        let hash = block.transactions.hashes().next().expect("the settlement");
        let raw_tx: Value = p
            .raw_request("eth_getRawTransactionByHash".into(), (hash,))
            .await
            .expect("raw tx");
        raw_tx
    };
    assert_eq!(
        raw(&node, "evm_revert", json!([snapshot])).await,
        json!(true)
    );
    assert!(
        effect
            .find("reorged-settlement")
            .await
            .expect("find")
            .is_none(),
        "reorged out"
    );
    // The other branch: an empty block first, then the settlement again.
    raw(&node, "anvil_mine", json!(["0x1"])).await;
    raw(&node, "eth_sendRawTransaction", json!([tx])).await;
    while !run.is_finished() {
        raw(&node, "anvil_mine", json!(["0x1"])).await;
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let done = run.await.expect("join").expect("settled");
    let receipt: Value = serde_json::from_slice(&done).expect("receipt json");
    let found = effect
        .find("reorged-settlement")
        .await
        .expect("find")
        .expect("the reported settlement is on the canonical chain");
    assert_eq!(receipt["tx"], json!(found.tx));
    assert_eq!(receipt["block"], json!(found.block));
}
