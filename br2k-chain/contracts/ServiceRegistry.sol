// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.37;

/// @title br2k service registry
/// @notice The on-chain record of what must run: per service an owner, operators,
/// replica accounts, a lifecycle state, an append-only list of versions and an active
/// version pointer, the newest state checkpoint, the leader location and the placement
/// (the cluster that runs a multi-cluster service, and its epoch).
/// @dev Storage holds only fixed-size values (hashes, numbers, addresses): the full
/// canonical spec bytes and the location endpoint travel in events, and their hashes
/// are stored so that readers can verify what they fetch from the log. Nothing secret
/// is ever stored. A service is keyed by `keccak256(bytes(name))`, computed here from
/// the name, so ids cannot be forged; whoever registers a name becomes its owner.
/// Ownership moves in two steps (the owner proposes, the proposed account accepts);
/// checkpoint log indexes and terms, location terms and placement epochs grow by
/// bounded steps (the owner may reset the first three); every event names the account
/// that caused it.
contract ServiceRegistry {
    // ---------------------------------------------------------------- types

    /// Lifecycle states, as `ServiceState::code` in br2k-core.
    uint8 internal constant READY = 0;
    uint8 internal constant RUNNING = 1;
    uint8 internal constant PAUSED = 2;
    uint8 internal constant STOPPED = 3;

    /// Role bits granted per account and service.
    uint8 public constant ROLE_OPERATOR = 1;
    uint8 public constant ROLE_REPLICA = 2;

    /// Most replicas a service may ask for (`MAX_REPLICAS` in br2k-core).
    uint32 public constant MAX_REPLICAS = 1000;

    /// Largest accepted canonical spec (`MAX_SPEC_BYTES` in br2k-core).
    uint256 public constant MAX_SPEC_BYTES = 65536;

    /// Largest accepted location endpoint.
    uint256 public constant MAX_ENDPOINT_BYTES = 256;

    /// Largest increase of the checkpoint log index per `recordCheckpoint` (entries
    /// between two checkpoints). Reaching 2^64-1 takes 2^32 transactions.
    uint64 public constant MAX_LOG_INDEX_STEP = 2 ** 32;

    /// Largest increase of a term (checkpoint or location) or a placement epoch per
    /// call. Terms and epochs are fencing tokens such as etcd revisions, which grow
    /// with every write of the cluster; reaching 2^64-1 takes 2^24 transactions.
    uint64 public constant MAX_TERM_STEP = 2 ** 40;

    /// Counters bounded per call, as named by `JumpTooLarge`.
    uint8 public constant COUNTER_LOG_INDEX = 1;
    uint8 public constant COUNTER_CHECKPOINT_TERM = 2;
    uint8 public constant COUNTER_LOCATION_TERM = 3;
    uint8 public constant COUNTER_PLACEMENT_EPOCH = 4;

    /// One published version. The spec bytes are in the `Registered` (version 1) or
    /// `Published` event emitted in block `blockNumber`.
    struct Version {
        bytes32 specHash;
        bytes32 imageDigest;
        address publisher;
        uint32 replicas;
        uint64 publishedAt;
        uint64 blockNumber;
    }

    /// The newest state checkpoint.
    struct Checkpoint {
        bytes32 snapshot;
        uint64 logIndex;
        uint64 term;
        uint64 stateVersion;
    }

    /// The leader location: keccak256 of the endpoint (the endpoint itself is in the
    /// `Relocated` event of block `blockNumber`; 0 means none recorded) and its term.
    struct Location {
        bytes32 endpointHash;
        uint64 term;
        uint64 blockNumber;
    }

    /// The placement of a multi-cluster service: the name of the cluster that runs it
    /// (a DNS label of 1-32 bytes, left-aligned and zero padded; 0 means none
    /// recorded), the epoch of its placement lease (a fencing token: above 0, and
    /// strictly greater for every new placement) and the block it was recorded in.
    struct Placement {
        bytes32 cluster;
        uint64 epoch;
        uint64 blockNumber;
    }

    struct Service {
        address owner;
        uint8 state;
        uint32 replicas;
        uint64 active;
        uint64 registeredBlock;
        Checkpoint checkpoint;
        Location location;
        Version[] versions;
        mapping(address => uint8) roles;
        /// Proposed by the owner, the owner once it accepts (zero: none). Last, so
        /// the earlier members keep their slots.
        address pendingOwner;
        /// The active cluster and its epoch. After `pendingOwner`, so the earlier
        /// members keep their slots.
        Placement placement;
    }

    /// What a read returns for one service (`exists` is false for unknown ids).
    struct Record {
        bool exists;
        bytes32 id;
        address owner;
        uint8 state;
        uint32 replicas;
        uint64 active;
        uint64 latest;
        uint64 registeredBlock;
        Version activeVersion;
        Checkpoint checkpoint;
        Location location;
        Placement placement;
    }

    // ---------------------------------------------------------------- errors

    error NotRegistered(bytes32 id);
    error AlreadyRegistered(bytes32 id);
    error InvalidName();
    error NotOwner(bytes32 id, address caller);
    error NotOperator(bytes32 id, address caller);
    error NotReplica(bytes32 id, address caller);
    error InvalidSpec();
    error InvalidReplicas(uint32 replicas);
    error InvalidState(uint8 state);
    error InvalidTransition(bytes32 id, uint8 from, uint8 to);
    error UnknownVersion(bytes32 id, uint64 version);
    error RollForward(bytes32 id, uint64 version, uint64 active);
    error CheckpointOutOfOrder(bytes32 id, uint64 stateVersion, uint64 logIndex);
    error StaleTerm(bytes32 id, uint64 term, uint64 recordedTerm);
    error InvalidEndpoint();
    error InvalidRole(uint8 role);
    error ZeroAddress();
    error NotPendingOwner(bytes32 id, address caller);
    /// A cluster name that is not a DNS label of 1-32 bytes, left-aligned and zero
    /// padded.
    error InvalidCluster();
    /// A placement epoch not above the recorded one (0 when none is recorded).
    error StaleEpoch(bytes32 id, uint64 epoch, uint64 recorded);
    /// `counter` (COUNTER_*) would move from `recorded` to `value`, more than `maxStep`.
    error JumpTooLarge(bytes32 id, uint8 counter, uint64 value, uint64 recorded, uint64 maxStep);

    // ---------------------------------------------------------------- events
    // Every event names the account that caused it: `owner` of Registered,
    // `publisher` of Published, `newOwner` (the accepting account) of
    // OwnershipTransferred, `owner` of the transfer proposals, `by` elsewhere.

    event Registered(
        bytes32 indexed id,
        address indexed owner,
        string name,
        bytes32 specHash,
        bytes32 imageDigest,
        uint32 replicas,
        bytes spec
    );
    event Published(
        bytes32 indexed id,
        uint64 indexed version,
        address indexed publisher,
        bytes32 specHash,
        bytes32 imageDigest,
        uint32 replicas,
        bytes spec
    );
    event Scaled(bytes32 indexed id, address indexed by, uint32 replicas);
    event StateChanged(bytes32 indexed id, address indexed by, uint8 state);
    event RolledBack(bytes32 indexed id, address indexed by, uint64 version);
    /// Emitted by `recordCheckpoint` and by the owner's `resetCheckpoint`.
    event Checkpointed(
        bytes32 indexed id, address indexed by, bytes32 snapshot, uint64 logIndex, uint64 term, uint64 stateVersion
    );
    /// Emitted by `setLocation` and by the owner's `resetLocation`.
    event Relocated(bytes32 indexed id, address indexed by, uint64 term, string endpoint);
    /// Emitted by `setPlacement`.
    event Placed(bytes32 indexed id, address indexed by, uint64 epoch, bytes32 cluster);
    event RoleGranted(bytes32 indexed id, address indexed account, address indexed by, uint8 role);
    event RoleRevoked(bytes32 indexed id, address indexed account, address indexed by, uint8 role);
    event OwnershipTransferStarted(bytes32 indexed id, address indexed owner, address indexed pendingOwner);
    event OwnershipTransferCanceled(bytes32 indexed id, address indexed owner, address indexed pendingOwner);
    event OwnershipTransferred(bytes32 indexed id, address indexed previousOwner, address indexed newOwner);

    // ---------------------------------------------------------------- storage

    /// Block in which the registry was deployed (where log scans start).
    uint64 public immutable deployBlock;

    mapping(bytes32 => Service) internal services;

    /// Every registered id, in registration order (append-only, read by index).
    bytes32[] internal ids;

    constructor() {
        deployBlock = uint64(block.number);
    }

    // ---------------------------------------------------------------- modifiers

    function _service(bytes32 id) internal view returns (Service storage s) {
        s = services[id];
        if (s.owner == address(0)) revert NotRegistered(id);
    }

    function _operated(bytes32 id) internal view returns (Service storage s) {
        s = _service(id);
        if (s.owner != msg.sender && (s.roles[msg.sender] & ROLE_OPERATOR) == 0) {
            revert NotOperator(id, msg.sender);
        }
    }

    function _owned(bytes32 id) internal view returns (Service storage s) {
        s = _service(id);
        if (s.owner != msg.sender) revert NotOwner(id, msg.sender);
    }

    function _replicated(bytes32 id) internal view returns (Service storage s) {
        s = _service(id);
        if ((s.roles[msg.sender] & ROLE_REPLICA) == 0) revert NotReplica(id, msg.sender);
    }

    function _checkName(string calldata name) internal pure {
        bytes calldata b = bytes(name);
        if (b.length == 0 || b.length > 63 || b[0] == "-" || b[b.length - 1] == "-") revert InvalidName();
        for (uint256 i = 0; i < b.length; i++) {
            bytes1 c = b[i];
            if (!((c >= "a" && c <= "z") || (c >= "0" && c <= "9") || c == "-")) revert InvalidName();
        }
    }

    function _checkVersion(bytes32 specHash, bytes32 imageDigest, uint32 replicas, bytes calldata spec)
        internal
        pure
    {
        if (specHash == bytes32(0) || imageDigest == bytes32(0)) revert InvalidSpec();
        if (spec.length == 0 || spec.length > MAX_SPEC_BYTES) revert InvalidSpec();
        // The recorded hash is the spec's: readers need not trust the writer for it.
        if (sha256(spec) != specHash) revert InvalidSpec();
        if (replicas > MAX_REPLICAS) revert InvalidReplicas(replicas);
    }

    function _push(Service storage s, bytes32 specHash, bytes32 imageDigest, uint32 replicas)
        internal
        returns (uint64 version)
    {
        s.versions.push(
            Version({
                specHash: specHash,
                imageDigest: imageDigest,
                publisher: msg.sender,
                replicas: replicas,
                publishedAt: uint64(block.timestamp),
                blockNumber: uint64(block.number)
            })
        );
        version = uint64(s.versions.length);
        s.active = version;
        s.replicas = replicas;
    }

    // ---------------------------------------------------------------- writes

    /// Registers `name` with its first version; the caller becomes the owner.
    function register(string calldata name, bytes32 specHash, bytes32 imageDigest, uint32 replicas, bytes calldata spec)
        external
        returns (bytes32 id)
    {
        _checkName(name);
        _checkVersion(specHash, imageDigest, replicas, spec);
        id = keccak256(bytes(name));
        Service storage s = services[id];
        if (s.owner != address(0)) revert AlreadyRegistered(id);
        s.owner = msg.sender;
        s.state = READY;
        s.registeredBlock = uint64(block.number);
        _push(s, specHash, imageDigest, replicas);
        ids.push(id);
        emit Registered(id, msg.sender, name, specHash, imageDigest, replicas, spec);
    }

    /// Publishes a new version and makes it active; a spec equal to the active one is
    /// a no-op. Owner or operator.
    function publish(bytes32 id, bytes32 specHash, bytes32 imageDigest, uint32 replicas, bytes calldata spec)
        external
        returns (uint64 version)
    {
        Service storage s = _operated(id);
        _checkVersion(specHash, imageDigest, replicas, spec);
        if (s.versions[s.active - 1].specHash == specHash) return s.active;
        version = _push(s, specHash, imageDigest, replicas);
        emit Published(id, version, msg.sender, specHash, imageDigest, replicas, spec);
    }

    /// Sets the desired replica count. Owner or operator; idempotent.
    function setReplicas(bytes32 id, uint32 replicas) external {
        Service storage s = _operated(id);
        if (replicas > MAX_REPLICAS) revert InvalidReplicas(replicas);
        if (s.replicas == replicas) return;
        s.replicas = replicas;
        emit Scaled(id, msg.sender, replicas);
    }

    /// Moves the lifecycle state. Owner or operator; idempotent for the current state.
    function setState(bytes32 id, uint8 to) external {
        Service storage s = _operated(id);
        if (to > STOPPED) revert InvalidState(to);
        uint8 from = s.state;
        if (from == to) return;
        bool allowed = (to == RUNNING && from != RUNNING) || (to == PAUSED && from == RUNNING)
            || (to == STOPPED && from != STOPPED);
        if (!allowed) revert InvalidTransition(id, from, to);
        s.state = to;
        emit StateChanged(id, msg.sender, to);
    }

    /// Moves the active pointer to an earlier version (its replica count becomes the
    /// desired one). Owner or operator; idempotent for the active version.
    function rollback(bytes32 id, uint64 version) external {
        Service storage s = _operated(id);
        if (version == 0 || version > s.versions.length) revert UnknownVersion(id, version);
        if (version == s.active) return;
        if (version > s.active) revert RollForward(id, version, s.active);
        s.active = version;
        s.replicas = s.versions[version - 1].replicas;
        emit RolledBack(id, msg.sender, version);
    }

    /// Refuses `value` if it exceeds `recorded` by more than `maxStep`.
    function _bounded(bytes32 id, uint8 counter, uint64 value, uint64 recorded, uint64 maxStep) internal pure {
        if (value > recorded && value - recorded > maxStep) {
            revert JumpTooLarge(id, counter, value, recorded, maxStep);
        }
    }

    /// Records a state checkpoint. Replica accounts only; re-recording the newest is a
    /// no-op; otherwise the state version must grow by one, the log index must not
    /// decrease, and neither the log index nor the term may grow by more than
    /// MAX_LOG_INDEX_STEP / MAX_TERM_STEP (from 0 for the first checkpoint).
    function recordCheckpoint(bytes32 id, bytes32 snapshot, uint64 logIndex, uint64 term, uint64 stateVersion)
        external
    {
        Service storage s = _replicated(id);
        Checkpoint storage c = s.checkpoint;
        if (
            c.stateVersion != 0 && c.snapshot == snapshot && c.logIndex == logIndex && c.term == term
                && c.stateVersion == stateVersion
        ) return;
        if (stateVersion != c.stateVersion + 1 || logIndex < c.logIndex) {
            revert CheckpointOutOfOrder(id, stateVersion, logIndex);
        }
        _bounded(id, COUNTER_LOG_INDEX, logIndex, c.logIndex, MAX_LOG_INDEX_STEP);
        _bounded(id, COUNTER_CHECKPOINT_TERM, term, c.term, MAX_TERM_STEP);
        s.checkpoint = Checkpoint({snapshot: snapshot, logIndex: logIndex, term: term, stateVersion: stateVersion});
        emit Checkpointed(id, msg.sender, snapshot, logIndex, term, stateVersion);
    }

    /// Resets the checkpoint to `snapshot` at `logIndex` and `term`, which may be lower
    /// than or far above the recorded ones (recovery after a compromised replica
    /// account pushed them up). Owner only. The state version still grows by one, so
    /// readers never see the checkpoint go back.
    function resetCheckpoint(bytes32 id, bytes32 snapshot, uint64 logIndex, uint64 term) external {
        Service storage s = _owned(id);
        uint64 stateVersion = s.checkpoint.stateVersion + 1;
        s.checkpoint = Checkpoint({snapshot: snapshot, logIndex: logIndex, term: term, stateVersion: stateVersion});
        emit Checkpointed(id, msg.sender, snapshot, logIndex, term, stateVersion);
    }

    function _checkEndpoint(string calldata endpoint) internal pure returns (bytes32) {
        uint256 len = bytes(endpoint).length;
        if (len == 0 || len > MAX_ENDPOINT_BYTES) revert InvalidEndpoint();
        return keccak256(bytes(endpoint));
    }

    /// Records the leader location. Replica accounts only; the same location is a
    /// no-op; a term below the recorded one is refused, and so is one more than
    /// MAX_TERM_STEP above it (above 0 when none is recorded).
    function setLocation(bytes32 id, uint64 term, string calldata endpoint) external {
        Service storage s = _replicated(id);
        bytes32 h = _checkEndpoint(endpoint);
        Location storage l = s.location;
        if (l.blockNumber != 0) {
            if (l.term == term && l.endpointHash == h) return;
            if (term < l.term) revert StaleTerm(id, term, l.term);
        }
        _bounded(id, COUNTER_LOCATION_TERM, term, l.term, MAX_TERM_STEP);
        s.location = Location({endpointHash: h, term: term, blockNumber: uint64(block.number)});
        emit Relocated(id, msg.sender, term, endpoint);
    }

    /// Sets the leader location to `endpoint` at `term`, which may be lower than or
    /// far above the recorded one (recovery after a compromised replica account
    /// pushed the term up). Owner only.
    function resetLocation(bytes32 id, uint64 term, string calldata endpoint) external {
        Service storage s = _owned(id);
        bytes32 h = _checkEndpoint(endpoint);
        s.location = Location({endpointHash: h, term: term, blockNumber: uint64(block.number)});
        emit Relocated(id, msg.sender, term, endpoint);
    }

    /// Refuses a cluster name that is not a DNS label of 1-32 bytes (lowercase letters,
    /// digits and `-`, not at either end; `check_cluster_name` in br2k-core),
    /// left-aligned and zero padded: readers decode what is stored without a doubt.
    function _checkCluster(bytes32 cluster) internal pure {
        uint256 len = 0;
        while (len < 32 && cluster[len] != 0) len++;
        if (len == 0 || cluster[0] == "-" || cluster[len - 1] == "-") revert InvalidCluster();
        for (uint256 i = 0; i < 32; i++) {
            bytes1 c = cluster[i];
            if (i >= len) {
                if (c != 0) revert InvalidCluster();
            } else if (!((c >= "a" && c <= "z") || (c >= "0" && c <= "9") || c == "-")) {
                revert InvalidCluster();
            }
        }
    }

    /// Records the placement: `cluster` (a DNS label, left-aligned and zero padded)
    /// runs the service at `epoch`, the fencing token of its placement lease. Owner
    /// or operator; the recorded placement again is a no-op; an epoch not above the
    /// recorded one (0 when none is recorded) is refused, and so is one more than
    /// MAX_TERM_STEP above it (the epoch is an etcd revision).
    function setPlacement(bytes32 id, uint64 epoch, bytes32 cluster) external {
        Service storage s = _operated(id);
        _checkCluster(cluster);
        Placement storage p = s.placement;
        if (p.cluster == cluster && p.epoch == epoch) return;
        if (epoch <= p.epoch) revert StaleEpoch(id, epoch, p.epoch);
        _bounded(id, COUNTER_PLACEMENT_EPOCH, epoch, p.epoch, MAX_TERM_STEP);
        s.placement = Placement({cluster: cluster, epoch: epoch, blockNumber: uint64(block.number)});
        emit Placed(id, msg.sender, epoch, cluster);
    }

    /// Grants `role` (ROLE_OPERATOR or ROLE_REPLICA) to `account`. Owner only;
    /// idempotent.
    function grant(bytes32 id, address account, uint8 role) external {
        Service storage s = _owned(id);
        if (role != ROLE_OPERATOR && role != ROLE_REPLICA) revert InvalidRole(role);
        if (account == address(0)) revert ZeroAddress();
        uint8 roles = s.roles[account];
        if ((roles & role) != 0) return;
        s.roles[account] = roles | role;
        emit RoleGranted(id, account, msg.sender, role);
    }

    /// Revokes `role` from `account`. Owner only; idempotent.
    function revoke(bytes32 id, address account, uint8 role) external {
        Service storage s = _owned(id);
        if (role != ROLE_OPERATOR && role != ROLE_REPLICA) revert InvalidRole(role);
        uint8 roles = s.roles[account];
        if ((roles & role) == 0) return;
        s.roles[account] = roles & ~role;
        emit RoleRevoked(id, account, msg.sender, role);
    }

    /// Proposes `newOwner` as the next owner; nothing else changes until it calls
    /// `acceptOwnership` (the owner keeps every right meanwhile). Owner only; a new
    /// proposal replaces the pending one; proposing the owner cancels it; proposing
    /// the pending owner again is a no-op.
    function transferOwnership(bytes32 id, address newOwner) external {
        Service storage s = _owned(id);
        if (newOwner == address(0)) revert ZeroAddress();
        if (newOwner == s.owner) {
            _cancel(id, s);
            return;
        }
        if (s.pendingOwner == newOwner) return;
        s.pendingOwner = newOwner;
        emit OwnershipTransferStarted(id, msg.sender, newOwner);
    }

    /// Withdraws the pending proposal. Owner only; a no-op when none is pending.
    function cancelOwnershipTransfer(bytes32 id) external {
        _cancel(id, _owned(id));
    }

    function _cancel(bytes32 id, Service storage s) internal {
        address pending = s.pendingOwner;
        if (pending == address(0)) return;
        s.pendingOwner = address(0);
        emit OwnershipTransferCanceled(id, msg.sender, pending);
    }

    /// Makes the caller the owner. Only the pending owner.
    function acceptOwnership(bytes32 id) external {
        Service storage s = _service(id);
        if (s.pendingOwner != msg.sender) revert NotPendingOwner(id, msg.sender);
        address previous = s.owner;
        s.owner = msg.sender;
        s.pendingOwner = address(0);
        emit OwnershipTransferred(id, previous, msg.sender);
    }

    // ---------------------------------------------------------------- reads

    function _record(bytes32 id) internal view returns (Record memory r) {
        Service storage s = services[id];
        r.id = id;
        if (s.owner == address(0)) return r;
        r.exists = true;
        r.owner = s.owner;
        r.state = s.state;
        r.replicas = s.replicas;
        r.active = s.active;
        r.latest = uint64(s.versions.length);
        r.registeredBlock = s.registeredBlock;
        r.activeVersion = s.versions[s.active - 1];
        r.checkpoint = s.checkpoint;
        r.location = s.location;
        r.placement = s.placement;
    }

    /// The record of `id` and the block it was read at; reverts for unknown ids.
    function getRecord(bytes32 id) external view returns (uint64 blockNumber, Record memory record) {
        _service(id);
        return (uint64(block.number), _record(id));
    }

    /// Many records in one call (unknown ids have `exists == false`), and the block
    /// they were read at.
    function getRecords(bytes32[] calldata keys) external view returns (uint64 blockNumber, Record[] memory records) {
        records = new Record[](keys.length);
        for (uint256 i = 0; i < keys.length; i++) {
            records[i] = _record(keys[i]);
        }
        return (uint64(block.number), records);
    }

    /// One version (1-based).
    function getVersion(bytes32 id, uint64 version) external view returns (Version memory) {
        Service storage s = _service(id);
        if (version == 0 || version > s.versions.length) revert UnknownVersion(id, version);
        return s.versions[version - 1];
    }

    /// Up to `count` versions starting at `start` (1-based), oldest first.
    function getVersions(bytes32 id, uint64 start, uint64 count) external view returns (Version[] memory out) {
        Service storage s = _service(id);
        uint256 total = s.versions.length;
        if (start == 0) start = 1;
        if (start > total) return new Version[](0);
        uint256 end = start - 1 + uint256(count);
        if (end > total) end = total;
        out = new Version[](end - (start - 1));
        for (uint256 i = start - 1; i < end; i++) {
            out[i - (start - 1)] = s.versions[i];
        }
    }

    /// The proposed next owner of `id` (zero when none is pending).
    function pendingOwnerOf(bytes32 id) external view returns (address) {
        return _service(id).pendingOwner;
    }

    /// Role bits of `account` on `id`.
    function rolesOf(bytes32 id, address account) external view returns (uint8) {
        return _service(id).roles[account];
    }

    /// Number of registered services.
    function serviceCount() external view returns (uint256) {
        return ids.length;
    }

    /// Up to `count` registered ids starting at index `start` (0-based), in
    /// registration order.
    function serviceIds(uint256 start, uint256 count) external view returns (bytes32[] memory out) {
        uint256 total = ids.length;
        if (start >= total) return new bytes32[](0);
        uint256 end = start + count;
        if (end > total) end = total;
        out = new bytes32[](end - start);
        for (uint256 i = start; i < end; i++) {
            out[i - start] = ids[i];
        }
    }
}
