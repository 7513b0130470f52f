//! On-chain service registry (Solidity contract and alloy backend) for br2k.
