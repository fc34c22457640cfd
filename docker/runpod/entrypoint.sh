#!/usr/bin/env bash
# The RunPod pod's init: a Slurm head or worker plus exporter-watchdog, configured from env alone.
#
# Stage 1 (`exporter-watchdog pod render`) checks the whole environment and writes the key file and
# every config; on a bad or missing variable it exits non-zero naming it, and nothing is started.
# Stage 2 runs with the secrets removed from its environment (re-exec), starts munged, slurmctld
# (head), slurmd, the Slurm exporter (head) and the daemon, then supervises them: when one exits the
# pod stops (non-zero, so the platform restarts it); SIGTERM stops the daemon first (it stops the
# model server), then the rest.
#
# Outside a container (the project's tests) these override where things go; see README.md:
#   EW_ROOT             prefix for /etc and /var (default /); /run stays /run (give each pod its own)
#   GPU_DEVICE_DIR      where the nvidiaN devices are (default /dev; %n = the node name)
#   EW_SIMULATED_GPUS   1: simulated GPU metrics (machines without GPUs)
#   EW_MUNGE_USER       user munged runs as (default munge)
#   EXPORTER_WATCHDOG   the exporter-watchdog command (default: exporter-watchdog)
#   SLURM_EXPORTER_BIN  the Slurm exporter binary (default /usr/local/bin/slurm_exporter)
set -euo pipefail

log() { echo "entrypoint: $*" >&2; }

read -r -a EW <<<"${EXPORTER_WATCHDOG:-exporter-watchdog}"

if [ "${EW_POD_STAGE:-1}" = 1 ]; then
    "${EW[@]}" pod render || exit $?
    # Re-exec without the secrets: /proc/PID/environ keeps a process's initial environment, so
    # unsetting them would not be enough. Nothing started from here on ever sees them.
    exec env -u MUNGE_KEY -u EW_API_KEY EW_POD_STAGE=2 "$BASH" "$0" "$@"
fi

# shellcheck source=/dev/null
. /run/exporter-watchdog/pod.env
export SLURM_CONF="$POD_SLURM_CONF"

declare -A PIDS=()
ORDER=()
stopping=0

start() {  # start NAME CMD...: run CMD in the background, remember its PID
    local name=$1
    shift
    "$@" &
    PIDS[$name]=$!
    ORDER+=("$name")
    log "started $name (pid ${PIDS[$name]})"
}

stop_all() {  # the daemon first (it stops the model server), then the others in reverse start order
    local name pid i
    stopping=1
    for name in exporter-watchdog $(for ((i = ${#ORDER[@]} - 1; i >= 0; i--)); do echo "${ORDER[i]}"; done); do
        pid=${PIDS[$name]:-}
        [ -n "$pid" ] || continue
        unset "PIDS[$name]"
        if kill -0 "$pid" 2>/dev/null; then
            log "stopping $name (pid $pid)"
            kill -TERM "$pid" 2>/dev/null || true
            wait "$pid" 2>/dev/null || true
        fi
    done
}

on_term() {
    log "SIGTERM: stopping"
    stop_all
    log "stopped"
    exit 0
}
trap on_term TERM INT

wait_until() {  # wait_until SECONDS WHAT CMD...: poll CMD until it succeeds, bounded
    local seconds=$1 what=$2 waited=0
    shift 2
    until "$@" >/dev/null 2>&1; do
        if [ "$waited" -ge $((seconds * 10)) ]; then
            log "$what: not within ${seconds} s; stopping"
            stop_all
            exit 1
        fi
        sleep 0.1
        waited=$((waited + 1))
    done
}

# munged: as its own user where we are root, with the key only it can read.
munge_cmd=(munged --foreground --key-file="$POD_MUNGE_KEY_FILE" --socket=/run/munge/munge.socket.2
           --pid-file=/run/munge/munged.pid --seed-file="$POD_MUNGE_SEED_FILE" --log-file="$POD_MUNGE_LOG_FILE")
if [ -n "$POD_MUNGE_USER" ] && [ "$POD_MUNGE_USER" != root ]; then
    munge_cmd=(setpriv --reuid="$POD_MUNGE_USER" --regid="$POD_MUNGE_USER" --init-groups "${munge_cmd[@]}")
fi
start munged "${munge_cmd[@]}"
wait_until 30 "munged's socket" test -S /run/munge/munge.socket.2

if [ "$POD_ROLE" = head ]; then
    start slurmctld slurmctld -D -i -f "$SLURM_CONF"
    wait_until 60 "slurmctld to answer" scontrol ping
    start slurmd slurmd -D -Z -N "$POD_NODE_NAME" -f "$SLURM_CONF" --conf "$POD_SLURMD_CONF"
else
    "${EW[@]}" pod wait-head "$POD_HEAD_HOST" "$POD_CTLD_PORT" --timeout "$POD_HEAD_WAIT_SECONDS" || {
        stop_all
        exit 1
    }
    start slurmd slurmd -D -Z -N "$POD_NODE_NAME" --conf-server "$POD_HEAD_HOST:$POD_CTLD_PORT" \
        --conf "$POD_SLURMD_CONF"
fi
wait_until 120 "slurmd of $POD_NODE_NAME to register" scontrol show node "$POD_NODE_NAME"
log "slurmd registered $POD_NODE_NAME (Slurm $POD_SLURM_VERSION)"

if [ "$POD_ROLE" = head ]; then
    exporter_bin=${SLURM_EXPORTER_BIN:-/usr/local/bin/slurm_exporter}
    if [ -x "$exporter_bin" ]; then
        start slurm-exporter "$exporter_bin" --web.listen-address=:9341
    else
        log "no Slurm exporter at $exporter_bin: :9341 is not served (the image copies it from sckyzo/slurm-exporter)"
    fi
fi

serve_args=(serve --config "$POD_EW_CONFIG")
if [ -n "$POD_SIMULATED_GPUS" ]; then
    serve_args+=(--simulated-gpus)
fi
start exporter-watchdog "${EW[@]}" "${serve_args[@]}"

# Supervise: any child that exits ends the pod, non-zero, so the platform restarts it.
while :; do
    status=0
    wait -n || status=$?
    [ "$stopping" = 0 ] || continue
    for name in "${ORDER[@]}"; do
        pid=${PIDS[$name]:-}
        if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then
            unset "PIDS[$name]"
            log "$name (pid $pid) exited with status $status; stopping the pod"
            stop_all
            exit $((status == 0 ? 1 : status))
        fi
    done
done
