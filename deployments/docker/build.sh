#!/usr/bin/env bash
# Build Flywheel's two images: flywheel-runner (flows, workers, Ray nodes) and flywheel-serving
# (the Bento under `bentoml serve`). Talks to whatever Docker engine DOCKER_HOST (or the
# default socket) names, e.g. the private one of deployments/docker/dockerd.sh.
#
#   deployments/docker/build.sh [--force] [runner] [serving]      (default: both)
#
# Environment:
#   FLYWHEEL_IMAGE_TAG      tag of both images (default: dev)
#   FLYWHEEL_BASE_IMAGE     the base image (e.g. python:3.11-slim). Unset: python:3.11-slim
#                           if present or pullable, else a Debian bookworm made here with
#                           debootstrap (flywheel-base:bookworm, made once and reused)
#   FLYWHEEL_DEBOOTSTRAP=1  make the debootstrap base (again) and use it, whatever is reachable
#   FLYWHEEL_DEBIAN_MIRROR  Debian mirror for debootstrap (default http://deb.debian.org/debian)
#   FLYWHEEL_EXTRA_CA       a CA file (or bundle) pip must trust inside the build, passed as a
#                           build secret (never stored in an image). Default: none
#   FLYWHEEL_WHEELS         folder searched for the lock's torch wheel to stage into
#                           build/wheels (default /opt/wheels); found: PyTorch's index is not
#                           used. Not found: pip takes torch from PyTorch's CPU index
#   FLYWHEEL_PIP_EXTRA_INDEX_URL  override the extra index passed to pip
#   FLYWHEEL_BUILD_NETWORK  network of RUN steps (default host: the private daemon has no bridge)
#   BENTOML                 the bentoml CLI (default .venv/bin/bentoml, else the PATH's)
#   DOCKER                  the docker CLI (default: the first one that can build with BuildKit)
#
# An image whose label flywheel.build-hash equals this build's hash (sources, base image id,
# build arguments) is kept as is; --force rebuilds (Docker's layer cache still applies).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo"
tag=${FLYWHEEL_IMAGE_TAG:-dev}
force=0
targets=()
for arg in "$@"; do
    case $arg in
        --force) force=1 ;;
        runner|serving) targets+=("$arg") ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $arg" >&2; exit 2 ;;
    esac
done
[[ ${#targets[@]} -gt 0 ]] || targets=(runner serving)

log() { printf '[build.sh %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
now() { date +%s; }

# A docker CLI that builds with BuildKit (secret and bind mounts): one with buildx, or a
# classic client (< 23) with DOCKER_BUILDKIT=1. Newer clients without buildx refuse.
pick_docker() {
    local candidate major
    for candidate in ${DOCKER:-} docker /usr/bin/docker /usr/local/bin/docker; do
        command -v "$candidate" >/dev/null 2>&1 || continue
        if "$candidate" buildx version >/dev/null 2>&1; then
            echo "$candidate"; return 0
        fi
        major=$("$candidate" version --format '{{.Client.Version}}' 2>/dev/null | cut -d. -f1 || true)
        if [[ $major =~ ^[0-9]+$ ]] && (( major < 23 )); then
            echo "$candidate"; return 0
        fi
    done
    return 1
}
docker=$(pick_docker) || {
    echo "no docker CLI that can build with BuildKit: install docker-buildx (or Debian's docker.io)" >&2
    exit 3
}
export DOCKER_BUILDKIT=1
"$docker" version --format '{{.Server.Version}}' >/dev/null || {
    echo "no Docker engine answers (DOCKER_HOST=${DOCKER_HOST:-unset}); try: eval \"\$(deployments/docker/dockerd.sh start DIR)\"" >&2
    exit 3
}

has_image() { "$docker" image inspect "$1" >/dev/null 2>&1; }

# --- the base image -------------------------------------------------------------------------
debootstrap_base() {
    local name=flywheel-base:bookworm mirror=${FLYWHEEL_DEBIAN_MIRROR:-http://deb.debian.org/debian} root start
    command -v debootstrap >/dev/null || { echo "debootstrap not found (apt-get install -y debootstrap)" >&2; exit 3; }
    [[ $(id -u) -eq 0 ]] || { echo "debootstrap needs root" >&2; exit 3; }
    start=$(now)
    root=$(mktemp -d "${TMPDIR:-/tmp}/flywheel-rootfs.XXXXXX")
    trap 'rm -rf "$root"' EXIT
    log "debootstrap --variant=minbase bookworm from $mirror"
    nice -n 10 debootstrap --variant=minbase bookworm "$root" "$mirror" >"$root.log" 2>&1 || {
        tail -n 20 "$root.log" >&2; exit 1; }
    rm -f "$root.log"
    cat >"$root/etc/apt/sources.list" <<EOF
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb ${mirror%/debian}/debian-security bookworm-security main
EOF
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/tmp/*
    chmod 755 "$root"  # mktemp's 0700 would become the image's / (no one but root gets in)
    tar -C "$root" -c . | "$docker" import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["bash"]' - "$name" >/dev/null
    rm -rf "$root"
    trap - EXIT
    log "made $name in $(( $(now) - start )) s"
    echo "$name"
}

choose_base() {
    if [[ ${FLYWHEEL_DEBOOTSTRAP:-0} == 1 ]]; then
        debootstrap_base
    elif [[ -n ${FLYWHEEL_BASE_IMAGE:-} ]]; then
        has_image "$FLYWHEEL_BASE_IMAGE" || "$docker" pull "$FLYWHEEL_BASE_IMAGE" >&2
        echo "$FLYWHEEL_BASE_IMAGE"
    elif has_image python:3.11-slim; then
        echo python:3.11-slim
    elif has_image flywheel-base:bookworm; then
        echo flywheel-base:bookworm
    elif timeout 300 "$docker" pull python:3.11-slim >/dev/null 2>&1; then
        echo python:3.11-slim
    else
        log "no registry reachable: making the base image with debootstrap"
        debootstrap_base
    fi
}

# --- wheels, index, CA ----------------------------------------------------------------------
stage_wheels() {
    local version wheel
    version=$(sed -n 's/^torch==//p' requirements.lock)
    rm -rf build/wheels
    wheel=$(ls "${FLYWHEEL_WHEELS:-/opt/wheels}"/torch-"$version"-cp311-*.whl 2>/dev/null | head -n 1 || true)
    if [[ -n $wheel ]]; then
        mkdir -p build/wheels
        ln -f "$wheel" build/wheels/ 2>/dev/null || cp -f "$wheel" build/wheels/
        log "staged $(basename "$wheel") in build/wheels"
        return 0
    fi
    return 1
}

# --- the Bento --------------------------------------------------------------------------------
# A fresh `bentoml build`; build/bento keeps the previous Bento when src/ and env/ are the
# same, so an unchanged service does not rebuild the image's last layer.
build_bento() {
    local bentoml=${BENTOML:-} home=build/bentoml tag_out folder
    [[ -n $bentoml ]] || { [[ -x .venv/bin/bentoml ]] && bentoml=.venv/bin/bentoml; } || bentoml=bentoml
    rm -rf "$home"
    tag_out=$(BENTOML_HOME=$repo/$home BENTOML_DO_NOT_TRACK=true "$bentoml" build -f serving/bentofile.yaml \
        --output tag . 2>"$home.log" | tail -n 1) || { cat "$home.log" >&2; exit 1; }
    tag_out=${tag_out#__tag__:}
    folder=$home/bentos/${tag_out%%:*}/${tag_out#*:}
    [[ -f $folder/bento.yaml ]] || { echo "bentoml build gave no Bento ($tag_out)" >&2; cat "$home.log" >&2; exit 1; }
    if [[ -d build/bento ]] && diff -rq build/bento/src "$folder/src" >/dev/null 2>&1 \
        && diff -rq build/bento/env "$folder/env" >/dev/null 2>&1; then
        log "Bento $tag_out: same service as build/bento, kept"
    else
        rm -rf build/bento
        cp -r "$folder" build/bento
        log "Bento $tag_out copied to build/bento"
    fi
    rm -rf "$home" "$home.log"
}

# What an image is made of: the files its context sends, the base image's id and the args.
build_hash() {
    local files
    files=$1; shift
    {
        printf '%s\n' "$@"
        # shellcheck disable=SC2086
        eval "$files" | LC_ALL=C sort | while IFS= read -r f; do
            [[ -f $f ]] && printf '%s %s\n' "$(sha1sum <"$f" | cut -c1-40)" "$f"
        done
    } | sha1sum | cut -c1-16
}
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    checkout_files="git ls-files -co --exclude-standard | grep -v -E '(^tests/|\\.md\$)'"
else  # not a git checkout: every file but the usual local state
    checkout_files="find . -type f -not -path './.git/*' -not -path './.venv/*' -not -path './build/*' \\
        -not -path './.flywheel/*' -not -path './tests/*' -not -name '*.pyc' -not -name '*.md' | sed 's|^\\./||'"
fi

current_hash() { "$docker" image inspect --format '{{ index .Config.Labels "flywheel.build-hash" }}' "$1" 2>/dev/null || true; }

build_image() {  # name dockerfile hash build-args...
    local image=$1 dockerfile=$2 hash=$3 start
    shift 3
    if [[ $force == 0 ]] && [[ $(current_hash "$image") == "$hash" ]]; then
        log "$image is up to date (build hash $hash): kept"
        return 0
    fi
    start=$(now)
    log "building $image from $dockerfile"
    local ca_mount=()
    if [[ -n ${FLYWHEEL_EXTRA_CA:-} ]]; then
        [[ -s $FLYWHEEL_EXTRA_CA ]] || { echo "FLYWHEEL_EXTRA_CA=$FLYWHEEL_EXTRA_CA: no such file" >&2; exit 2; }
        ca_mount=(--secret "id=extra_ca,src=$FLYWHEEL_EXTRA_CA")
    fi
    nice -n 10 "$docker" build --progress plain --network "${FLYWHEEL_BUILD_NETWORK:-host}" \
        -f "$dockerfile" "${ca_mount[@]}" "$@" \
        --label "flywheel.build-hash=$hash" \
        --label "org.opencontainers.image.revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)" \
        -t "$image" . >&2
    log "built $image in $(( $(now) - start )) s"
}

total_start=$(now)
base=$(choose_base)
base_id=$("$docker" image inspect --format '{{.Id}}' "$base")
log "base image: $base ($base_id)"
if stage_wheels; then
    wheels_dir=build/wheels
    extra_index=${FLYWHEEL_PIP_EXTRA_INDEX_URL-}
else
    wheels_dir=deployments/docker/wheels
    extra_index=${FLYWHEEL_PIP_EXTRA_INDEX_URL-https://download.pytorch.org/whl/cpu}
fi
args=(--build-arg "BASE_IMAGE=$base" --build-arg "WHEELS_DIR=$wheels_dir"
      --build-arg "PIP_EXTRA_INDEX_URL=$extra_index")

for target in "${targets[@]}"; do
    case $target in
    runner)
        # The files of the checkout (as git sees them, ignored ones excluded), minus
        # documentation and tests, which do not change what the image runs.
        hash=$(build_hash "$checkout_files" \
            runner "$base_id" "${args[@]}" "$(ls build/wheels 2>/dev/null)")
        build_image "flywheel-runner:$tag" deployments/docker/runner.Dockerfile "$hash" "${args[@]}"
        ;;
    serving)
        build_bento
        hash=$(build_hash "find build/bento/src build/bento/env deployments/docker/provision.sh deployments/docker/serving.Dockerfile -type f" \
            serving "$base_id" "${args[@]}" "$(ls build/wheels 2>/dev/null)")
        build_image "flywheel-serving:$tag" deployments/docker/serving.Dockerfile "$hash" "${args[@]}" \
            --build-arg BENTO_DIR=build/bento
        ;;
    esac
done
# The images these tags pointed to before (untagged now): ours only, by their label.
"$docker" image prune -f --filter label=flywheel.build-hash >/dev/null || true
log "done in $(( $(now) - total_start )) s: $(for t in "${targets[@]}"; do printf 'flywheel-%s:%s ' "$t" "$tag"; done)"
