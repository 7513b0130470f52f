#!/usr/bin/env bash
# Builds imagecopy (containers/image's copy, the code behind `skopeo copy`, current
# release, current Go) into ${BR2K_CACHE:-~/.cache/br2k}/imagecopy/bin and prints its path.
# Only the docker:// transport is needed: no cgo, no storage drivers, no gpgme.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
out="${BR2K_CACHE:-$HOME/.cache/br2k}/imagecopy-$(sed -n 's#^require go.podman.io/image/v5 ##p' go.mod)/bin"
mkdir -p "$out"
CGO_ENABLED=0 go build -trimpath -buildvcs=false \
  -tags "containers_image_openpgp containers_image_storage_stub containers_image_docker_daemon_stub exclude_graphdriver_btrfs exclude_graphdriver_devicemapper" \
  -o "$out/imagecopy" .
echo "$out/imagecopy"
