#!/usr/bin/env bash
# A private Docker daemon for machines where none runs (CI containers, this kind of sandbox):
# Debian's docker.io (20.10) started by hand, with no iptables rules and no default bridge, so
# containers and builds use the host's network (`--network host`) or none.
#
# Storage driver: FLYWHEEL_DOCKER_STORAGE_DRIVER (e.g. vfs) or, unset, dockerd's own choice:
# the driver DIR/data already holds images with, else overlay2 where the kernel can mount
# overlayfs there, else vfs (which works anywhere, inside a container too, but copies every
# layer and every container's file system in full: measured here, starting a container of
# the 3.5 GB runner image took 60-100 s with vfs against 0.2 s with overlay2). `host-gateway`
# (what Prefect's Docker worker maps host.docker.internal to) is then 127.0.0.1.
#
#   deployments/docker/dockerd.sh start DIR    start it (idempotent) and print `export DOCKER_HOST=...`
#   deployments/docker/dockerd.sh stop DIR     stop it (idempotent); images stay in DIR/data
#   deployments/docker/dockerd.sh status DIR   exit 0 and print DOCKER_HOST when it answers, else exit 1
#   deployments/docker/dockerd.sh env DIR      print the `export DOCKER_HOST=...` line only
#
# DIR keeps the daemon's data root (images, build cache: DIR/data), its log, pid file and
# config. The socket and the exec root (containerd's sockets, which have a 108-byte path
# limit) live in a short folder /tmp/flywheel-dockerd-<hash of DIR>. Needs root, `dockerd`
# and `docker` (apt-get install -y docker.io). Use it as:
#   eval "$(deployments/docker/dockerd.sh start ~/.cache/flywheel/docker)"
set -euo pipefail

usage() { echo "usage: $0 start|stop|status|env DIR" >&2; exit 2; }
[[ $# -eq 2 ]] || usage
action=$1
mkdir -p "$2"
dir=$(cd "$2" && pwd -P)
hash=$(printf '%s' "$dir" | sha1sum | cut -c1-10)
run=/tmp/flywheel-dockerd-$hash
sock=$run/docker.sock
pidfile=$dir/dockerd.pid
host=unix://$sock
# The Debian client speaks the daemon's API version without negotiation trouble; any
# docker CLI will do for `version`.
docker_cli=${DOCKER:-$(command -v docker || true)}

answers() {
    [[ -S $sock ]] && [[ -n $docker_cli ]] && \
        DOCKER_HOST=$host timeout 10 "$docker_cli" version --format '{{.Server.Version}}' >/dev/null 2>&1
}

alive() { [[ -f $pidfile ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }

case $action in
start)
    if alive && answers; then
        echo "export DOCKER_HOST=$host"
        exit 0
    fi
    command -v dockerd >/dev/null || { echo "dockerd not found (apt-get install -y docker.io)" >&2; exit 3; }
    [[ $(id -u) -eq 0 ]] || { echo "a private dockerd needs root" >&2; exit 3; }
    if alive; then  # running but not answering: stop it before starting afresh
        "$0" stop "$dir" >/dev/null
    fi
    rm -f "$pidfile" "$sock"
    mkdir -p "$dir/data" "$run/exec"
    echo '{}' >"$dir/daemon.json"  # not /etc/docker/daemon.json, whatever it holds
    # setsid: its own session, so a test's process group signals do not reach it.
    driver=()
    [[ -z ${FLYWHEEL_DOCKER_STORAGE_DRIVER:-} ]] || driver=(--storage-driver "$FLYWHEEL_DOCKER_STORAGE_DRIVER")
    setsid dockerd --config-file "$dir/daemon.json" --data-root "$dir/data" --exec-root "$run/exec" \
        --pidfile "$pidfile" -H "$host" "${driver[@]}" --iptables=false --ip-masq=false \
        --bridge=none --host-gateway-ip 127.0.0.1 --log-level warn \
        </dev/null >>"$dir/dockerd.log" 2>&1 &
    for _ in $(seq 1 120); do
        if answers; then
            echo "dockerd started: storage driver $(DOCKER_HOST=$host "$docker_cli" info --format '{{.Driver}}'), data root $dir/data" >&2
            echo "export DOCKER_HOST=$host"
            exit 0
        fi
        if ! kill -0 $! 2>/dev/null; then
            echo "dockerd exited; last lines of $dir/dockerd.log:" >&2
            tail -n 20 "$dir/dockerd.log" >&2
            exit 1
        fi
        sleep 0.5
    done
    echo "dockerd did not answer on $sock within 60 s; see $dir/dockerd.log" >&2
    exit 1
    ;;
stop)
    if alive; then
        pid=$(cat "$pidfile")
        kill -TERM "$pid"
        for _ in $(seq 1 60); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.5
        done
        if kill -0 "$pid" 2>/dev/null; then
            kill -KILL "$pid"
            sleep 1
        fi
    fi
    rm -f "$pidfile"
    # dockerd leaves its default network namespace bind-mounted under the exec root.
    while read -r _ mnt _; do
        case $mnt in "$run"/*) umount -l "$mnt" 2>/dev/null || true ;; esac
    done </proc/mounts
    rm -rf "$run"
    ;;
status)
    if alive && answers; then
        echo "export DOCKER_HOST=$host"
    else
        exit 1
    fi
    ;;
env)
    echo "export DOCKER_HOST=$host"
    ;;
*)
    usage
    ;;
esac
