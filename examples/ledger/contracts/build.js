// Compiles Settlement.sol with the pinned solc-js of br2k-chain/contracts (standard
// JSON, same settings as ServiceRegistry) and prints a forge-style artifact (abi,
// bytecode.object, deployedBytecode.object) on stdout. Used by build.sh.
'use strict';
const fs = require('fs');
const path = require('path');
const solc = require(path.join(__dirname, '../../../br2k-chain/contracts/node_modules/solc'));

const source = fs.readFileSync(path.join(__dirname, 'Settlement.sol'), 'utf8');
const input = {
  language: 'Solidity',
  sources: { 'Settlement.sol': { content: source } },
  settings: {
    optimizer: { enabled: true, runs: 200 },
    evmVersion: 'cancun',
    metadata: { bytecodeHash: 'none' },
    outputSelection: {
      '*': { '*': ['abi', 'evm.bytecode.object', 'evm.deployedBytecode.object'] },
    },
  },
};
const output = JSON.parse(solc.compile(JSON.stringify(input)));
const errors = (output.errors || []).filter((e) => e.severity === 'error');
for (const e of output.errors || []) process.stderr.write(e.formattedMessage + '\n');
if (errors.length > 0) process.exit(1);
const c = output.contracts['Settlement.sol'].Settlement;
const artifact = {
  contractName: 'Settlement',
  compiler: { name: 'solc-js', version: solc.version(), optimizer: input.settings.optimizer, evmVersion: input.settings.evmVersion },
  abi: c.abi,
  bytecode: { object: '0x' + c.evm.bytecode.object },
  deployedBytecode: { object: '0x' + c.evm.deployedBytecode.object },
};
process.stdout.write(JSON.stringify(artifact, null, 2) + '\n');
