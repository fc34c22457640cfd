#!/usr/bin/env bash
# Quick start 2: install what the tests need (as root also Slurm, munge, Prometheus, Alertmanager from
# Debian) and run the whole suite: lint, types, then pytest. Extra arguments go to pytest.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=bootstrap.sh
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
ensure_python
ensure_test_packages
export PATH="$PATH:/usr/sbin:/sbin"
.venv/bin/ruff check exporter_watchdog tests benchmarks scripts
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
