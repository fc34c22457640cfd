#!/usr/bin/env bash
# Creates .venv with the project installed (editable) and, as root, the Debian packages the tests use.
# Sourced by demo.sh and test.sh; safe to run again (it only installs what is missing).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

apt_install() {
    [ "$(id -u)" = 0 ] || { echo "bootstrap: not root, cannot install $*" >&2; return 0; }
    command -v apt-get >/dev/null || { echo "bootstrap: no apt-get, cannot install $*" >&2; return 0; }
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

ensure_python() {
    local py="${PYTHON:-python3}"
    if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
        echo "bootstrap: Python >= 3.10 is needed (found: $("$py" --version 2>&1))" >&2
        exit 1
    fi
    if [ ! -x .venv/bin/python ]; then
        "$py" -m venv .venv 2>/dev/null || { apt_install python3-venv && "$py" -m venv .venv; }
    fi
    local stamp=.venv/.installed
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        .venv/bin/python -m pip install -q --upgrade pip >/dev/null
        .venv/bin/python -m pip install -q -e ".[test]"
        touch "$stamp"
    fi
}

ensure_test_packages() {
    # command -> Debian package; Slurm's daemons live in /usr/sbin.
    local need=() pair cmd pkg
    for pair in slurmctld:slurmctld slurmd:slurmd sinfo:slurm-client munged:munge mungekey:munge \
                prometheus:prometheus promtool:prometheus prometheus-alertmanager:prometheus-alertmanager \
                amtool:prometheus-alertmanager ip:iproute2 nsenter:util-linux shellcheck:shellcheck \
                slurmdbd:slurmdbd mariadbd:mariadb-server; do
        cmd=${pair%%:*}; pkg=${pair#*:}
        if ! PATH="$PATH:/usr/sbin:/sbin" command -v "$cmd" >/dev/null; then
            case " ${need[*]-} " in *" $pkg "*) ;; *) need+=("$pkg") ;; esac
        fi
    done
    if [ ${#need[@]} -gt 0 ]; then
        echo "bootstrap: installing ${need[*]}" >&2
        apt_install "${need[@]}"
    fi
}
