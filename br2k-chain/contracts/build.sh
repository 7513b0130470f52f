#!/usr/bin/env bash
# Compiles ServiceRegistry.sol with the pinned solc-js (package-lock.json) and writes
# the committed artifact out/ServiceRegistry.json. Usage: contracts/build.sh [OUT]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/out/ServiceRegistry.json}"
if [ ! -d "$here/node_modules/solc" ]; then
  (cd "$here" && npm ci --no-audit --no-fund --silent >&2)
fi
mkdir -p "$(dirname "$out")"
# solc-js may print progress lines starting with ">>>" on stdout: keep only the JSON.
node "$here/build.js" | grep -v '^>>>' > "$out.tmp"
mv "$out.tmp" "$out"
