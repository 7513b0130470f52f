// Compiles ServiceRegistry.sol with the pinned solc-js (standard JSON) and prints a
// forge-style artifact (abi, bytecode.object, deployedBytecode.object, storageLayout)
// on stdout. Used by build.sh and by the artifact test.
'use strict';
const fs = require('fs');
const path = require('path');
const solc = require('solc');

const source = fs.readFileSync(path.join(__dirname, 'ServiceRegistry.sol'), 'utf8');
const input = {
  language: 'Solidity',
  sources: { 'ServiceRegistry.sol': { content: source } },
  settings: {
    optimizer: { enabled: true, runs: 200 },
    evmVersion: 'cancun',
    metadata: { bytecodeHash: 'none' },
    outputSelection: {
      '*': { '*': ['abi', 'evm.bytecode.object', 'evm.deployedBytecode.object', 'storageLayout'] },
    },
  },
};
const output = JSON.parse(solc.compile(JSON.stringify(input)));
const errors = (output.errors || []).filter((e) => e.severity === 'error');
for (const e of output.errors || []) process.stderr.write(e.formattedMessage + '\n');
if (errors.length > 0) process.exit(1);
const c = output.contracts['ServiceRegistry.sol'].ServiceRegistry;
const artifact = {
  contractName: 'ServiceRegistry',
  compiler: { name: 'solc-js', version: solc.version(), optimizer: input.settings.optimizer, evmVersion: input.settings.evmVersion },
  abi: c.abi,
  bytecode: { object: '0x' + c.evm.bytecode.object },
  deployedBytecode: { object: '0x' + c.evm.deployedBytecode.object },
  storageLayout: c.storageLayout,
};
process.stdout.write(JSON.stringify(artifact, null, 2) + '\n');
