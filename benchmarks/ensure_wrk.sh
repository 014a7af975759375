#!/usr/bin/env bash
# `make bench` drives the Serve endpoints with wrk (a separate load-generator process). Install it with
# the system's package manager when it is missing; say plainly what to do when that cannot happen.
set -euo pipefail
if command -v wrk >/dev/null 2>&1; then
  exit 0
fi
echo "make bench: wrk (the HTTP load generator) is missing; installing it" >&2
if command -v apt-get >/dev/null 2>&1; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo -n"
  if $sudo apt-get install -y --no-install-recommends wrk >/dev/null 2>&1 ||
     { $sudo apt-get update >/dev/null 2>&1 && $sudo apt-get install -y --no-install-recommends wrk >/dev/null 2>&1; }; then
    echo "make bench: installed $(command -v wrk)" >&2
    exit 0
  fi
fi
if command -v brew >/dev/null 2>&1 && brew install wrk >/dev/null 2>&1; then
  exit 0
fi
cat >&2 <<'MSG'
make bench: error: wrk is not installed and could not be installed here.
Install it, then run `make bench` again:
  Debian/Ubuntu:  sudo apt-get install wrk
  Fedora:         sudo dnf install wrk
  macOS:          brew install wrk
MSG
exit 1
