#!/usr/bin/env bash
# Installs the PostgreSQL server the store tests start (tests/postgres_server.py),
# idempotently (quick when present): Debian's postgresql package, as root through apt-get.
# Nothing is started here and no cluster of the package's own is used: each test session
# runs initdb into a temporary directory and starts its own server on a free loopback port.
# Prints the directory of initdb, pg_ctl and postgres.
set -euo pipefail

find_bindir() {
  local dir
  # Debian's layout (/usr/lib/postgresql/<major>/bin), newest major first; else PATH.
  for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -t/ -k5 -n -r); do
    if [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ] && [ -x "$dir/postgres" ]; then
      echo "$dir"
      return 0
    fi
  done
  if command -v initdb >/dev/null && command -v pg_ctl >/dev/null; then
    dirname "$(readlink -f "$(command -v initdb)")"
    return 0
  fi
  return 1
}

if ! find_bindir >/dev/null; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "PostgreSQL is missing: install Debian's postgresql package (apt-get install postgresql)" >&2
    exit 1
  fi
  echo "installing postgresql (apt-get)" >&2
  apt-get update -qq
  # The package may create (and start, where services run) a cluster of its own: the
  # tests never use it.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
find_bindir
