#!/usr/bin/env bash
# Compiles Settlement.sol with the pinned solc-js of br2k-chain/contracts
# (package-lock.json there) and writes the committed artifact out/Settlement.json.
# Usage: contracts/build.sh [OUT]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
chain="$here/../../../br2k-chain/contracts"
out="${1:-$here/out/Settlement.json}"
if [ ! -d "$chain/node_modules/solc" ]; then
  (cd "$chain" && npm ci --no-audit --no-fund --silent >&2)
fi
mkdir -p "$(dirname "$out")"
# solc-js may print progress lines starting with ">>>" on stdout: keep only the JSON.
node "$here/build.js" | grep -v '^>>>' > "$out.tmp"
mv "$out.tmp" "$out"
