#!/usr/bin/env bash
# Installs what the Go client (clients/go) and the Go code generation (buf.gen.yaml) need,
# idempotently (quick when present), from Debian's packages only (as root, through
# apt-get): the Go toolchain (golang-go, Go 1.19 in bookworm), the protoc plugins
# protoc-gen-go and protoc-gen-go-grpc, and the Go sources of gRPC and protobuf under
# /usr/share/gocode. golang-github-golang-protobuf-1-5-dev is named explicitly: without it
# golang-google-grpc-dev pulls github.com/golang/protobuf 1.3, which panics on the code
# protoc-gen-go generates today.
#
# Then it lays out clients/go/vendor: links to those sources and a modules.txt matching
# clients/go/go.mod, so that `go build` with GOFLAGS=-mod=vendor downloads nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(
  golang-go
  protoc-gen-go
  protoc-gen-go-grpc
  golang-google-grpc-dev
  golang-github-golang-protobuf-1-5-dev
)
missing=()
for package in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$package")
  fi
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing Debian packages: ${missing[*]} (apt-get install them as root)" >&2
    exit 1
  fi
  echo "installing ${missing[*]} (apt-get)" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${PACKAGES[@]}" >/dev/null
fi

# The modules of clients/go's build: the two it requires (go.mod) and what they import.
# Debian keeps each module's source at /usr/share/gocode/src/<module path>.
GOCODE=/usr/share/gocode/src
REQUIRED=(google.golang.org/grpc google.golang.org/protobuf)
INDIRECT=(github.com/golang/protobuf golang.org/x/net golang.org/x/sys golang.org/x/text
  google.golang.org/genproto)
# go.mod's version of a required module, and the Debian package that ships it.
declare -A DEB=([google.golang.org/grpc]=golang-google-grpc-dev
  [google.golang.org/protobuf]=golang-google-protobuf-dev)

vendor=clients/go/vendor
manifest=""
for module in "${REQUIRED[@]}"; do
  version=$(awk -v m="$module" '$1 == m { print $2 }' clients/go/go.mod)
  debian=$(dpkg-query -W -f='${Version}' "${DEB[$module]}")
  debian=${debian#*:}
  if [ "v${debian%%-*}" != "$version" ]; then
    echo "clients/go/go.mod requires $module $version, Debian's ${DEB[$module]} is $debian" >&2
    exit 1
  fi
  manifest+="# $module $version"$'\n'"## explicit"$'\n'
done
if [ ! -f "$vendor/modules.txt" ] || [ "$(cat "$vendor/modules.txt")"$'\n' != "$manifest" ]; then
  rm -rf "$vendor"
  for module in "${REQUIRED[@]}" "${INDIRECT[@]}"; do
    mkdir -p "$vendor/$(dirname "$module")"
    ln -s "$GOCODE/$module" "$vendor/$module"
  done
  printf '%s' "$manifest" >"$vendor/modules.txt"
fi
