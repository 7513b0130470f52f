// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.37;

/// @title br2k ledger settlements
/// @notice Records each settlement of the example ledger service once, keyed by the
/// client's idempotency key, so that a new leader can find out whether a settlement
/// sent by a failed leader already happened (`settledAt`) instead of sending it again.
/// @dev Only `keccak256` of the account name is stored; no secret is ever stored.
contract Settlement {
    /// A settlement: the account (hashed), the amount and the block it happened in.
    struct Record {
        bytes32 account;
        uint128 amount;
        uint64 blockNumber;
        address settler;
    }

    /// Settlements by idempotency key (keccak256 of the client's key).
    mapping(bytes32 => Record) internal records;

    /// Number of settlements recorded.
    uint256 public count;

    /// The only account that may settle (the ledger's leader signs with its key).
    address public immutable settler;

    /// Emitted once per key.
    event Settled(bytes32 indexed key, bytes32 indexed account, uint128 amount, address settler);

    /// The key was settled before.
    error AlreadySettled(bytes32 key, uint64 blockNumber);
    /// Zero key or zero amount.
    error InvalidSettlement();
    /// The caller is not the settler.
    error NotSettler(address caller);
    /// The zero address cannot settle.
    error ZeroSettler();

    /// A contract whose settlements only `settler_` may record.
    constructor(address settler_) {
        if (settler_ == address(0)) revert ZeroSettler();
        settler = settler_;
    }

    /// Records the settlement `key` of `amount` for `account`; refuses a key twice.
    function settle(bytes32 key, bytes32 account, uint128 amount) external {
        if (msg.sender != settler) revert NotSettler(msg.sender);
        if (key == bytes32(0) || amount == 0) revert InvalidSettlement();
        Record storage r = records[key];
        if (r.blockNumber != 0) revert AlreadySettled(key, r.blockNumber);
        records[key] = Record(account, amount, uint64(block.number), msg.sender);
        count += 1;
        emit Settled(key, account, amount, msg.sender);
    }

    /// The settlement recorded for `key` (`blockNumber == 0` if none).
    function settledAt(bytes32 key)
        external
        view
        returns (bytes32 account, uint128 amount, uint64 blockNumber, address settledBy)
    {
        Record storage r = records[key];
        return (r.account, r.amount, r.blockNumber, r.settler);
    }
}
