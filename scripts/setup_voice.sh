#!/usr/bin/env bash
# Installs what the voice engine's tests and benchmark need beyond the Python packages (the
# `voice` extra, which the dev extra includes), idempotently (quick when present): Debian's
# espeak-ng, as root through apt-get. The tests speak with it, and `car-grpc voice-engine`
# serves its text-to-speech provider with it.
set -euo pipefail

if ! command -v espeak-ng >/dev/null; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "espeak-ng is missing: install Debian's espeak-ng package (apt-get install espeak-ng)" >&2
    exit 1
  fi
  echo "installing espeak-ng (apt-get)" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng >/dev/null
fi
