#!/usr/bin/env bash
# Builds kube-apiserver, kube-controller-manager and kube-scheduler from the wrapper module
# in this folder into OUTDIR, stamped with the pinned version (file VERSION).
# Usage: stack/kubernetes/build.sh OUTDIR
set -euo pipefail
out="${1:?usage: build.sh OUTDIR}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
version="$(cat "$here/VERSION")"
major="${version#v}"; major="${major%%.*}"
minor="${version#v*.}"; minor="${minor%%.*}"
pkg=k8s.io/component-base/version
cpkg=k8s.io/client-go/pkg/version
ldflags="-s -w"
for p in "$pkg" "$cpkg"; do
  ldflags+=" -X $p.gitVersion=${version} -X $p.gitMajor=${major} -X $p.gitMinor=${minor}"
  ldflags+=" -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
done
mkdir -p "$out.tmp"
cd "$here"
CGO_ENABLED=0 go build -buildvcs=false -trimpath -ldflags "$ldflags" -o "$out.tmp/" \
  k8s.io/kubernetes/cmd/kube-apiserver \
  k8s.io/kubernetes/cmd/kube-controller-manager \
  k8s.io/kubernetes/cmd/kube-scheduler
mkdir -p "$out"
mv "$out.tmp"/* "$out/"
rmdir "$out.tmp"
