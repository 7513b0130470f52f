//! Solidity bindings generated from the committed artifact
//! `contracts/out/ServiceRegistry.json` (ABI and bytecode of `ServiceRegistry.sol`).
#![allow(missing_docs)]

alloy::sol!(
    #[sol(rpc, all_derives)]
    ServiceRegistry,
    "contracts/out/ServiceRegistry.json"
);
