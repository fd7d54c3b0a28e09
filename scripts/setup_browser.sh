#!/usr/bin/env bash
# Installs what the dashboard's browser tests drive, idempotently (quick when present):
# Debian's chromium (as root, through apt-get) and the pinned playwright-core from
# tests/browser/package-lock.json (npm ci). No browser is downloaded by npm.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "chromium is missing: install Debian's chromium package (apt-get install chromium)" >&2
    exit 1
  fi
  echo "installing chromium (apt-get)" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi

dir=tests/browser
stamp=$dir/node_modules/.installed-from-lock  # the lock file npm ci last installed
if [ ! -d "$dir/node_modules/playwright-core" ] || ! cmp -s "$dir/package-lock.json" "$stamp"; then
  (cd "$dir" && npm ci --silent --no-audit --no-fund)
  cp "$dir/package-lock.json" "$stamp"
fi
