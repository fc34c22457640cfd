#!/usr/bin/env bash
# Quick start 1: set up .venv and run the daemon on an embedded demo node (metrics on :9400).
# Extra arguments go to `exporter-watchdog serve --demo`, e.g. --listen 127.0.0.1:9400.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=bootstrap.sh
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
ensure_python
exec .venv/bin/exporter-watchdog serve --demo "$@"
