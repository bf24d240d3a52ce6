#!/usr/bin/env bash
# Installs what the tests and scripts need and is missing: redis-server and redis-cli
# (Debian redis-server, redis-tools); with --bench also redis-benchmark and nutcracker.
# Safe to run again; does nothing when everything is there.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"

need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || need+=(redis-tools)
if [[ "${1:-}" == "--bench" ]]; then
  command -v redis-benchmark >/dev/null 2>&1 || need+=(redis-tools)
  command -v nutcracker >/dev/null 2>&1 || need+=(nutcracker)
fi
if ((${#need[@]})); then apt_install "${need[@]}"; fi
