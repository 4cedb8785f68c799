#!/bin/sh
# Run by both Dockerfiles inside one RUN step (one coarse layer): Python 3.11, a non-root user,
# a virtual environment with the given requirements, and nothing else left behind.
#
#   provision.sh VENV USER UID REQUIREMENTS [FIND_LINKS_DIR]
#
# - Python: the base image's python3 when it is 3.11 with venv (python:3.11-slim); otherwise
#   Debian's python3 and python3-venv through apt (a debootstrapped bookworm has no Python;
#   bookworm's python3 is 3.11).
# - pip's CA: when the build secret `extra_ca` is given (deployments/docker/build.sh: FLYWHEEL_EXTRA_CA),
#   pip trusts the system bundle plus that file, read from the secret mount at install time;
#   it is never written into the image. Without it, pip uses its own (certifi) bundle.
# - FIND_LINKS_DIR: local wheels pip may take (the CPU torch wheel where PyTorch's index is not
#   reachable); PIP_EXTRA_INDEX_URL (a build arg) reaches PyTorch's CPU index otherwise. Index
#   options written in REQUIREMENTS are ignored in favour of PIP_EXTRA_INDEX_URL.
set -eu

venv=$1 user=$2 uid=$3 requirements=$4 find_links=${5:-}

if python3 -c 'import sys, venv, ensurepip; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
    echo "provision: using $(command -v python3) ($(python3 -V))"
else
    echo "provision: no Python 3.11 with venv in the base image: installing Debian's"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    # ca-certificates rewrites /etc/ssl/certs/ca-certificates.crt: the extra CA is added
    # below, after this step, never copied over it.
    apt-get install -y -q --no-install-recommends python3 python3-venv ca-certificates
    apt-get clean
    rm -rf /var/lib/apt/lists/*
    python3 -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || {
        echo "provision: the base image's distribution ships $(python3 -V), not 3.11" >&2
        exit 1
    }
fi

if ! getent passwd "$user" >/dev/null; then
    if command -v useradd >/dev/null; then
        groupadd --gid "$uid" "$user"
        useradd --uid "$uid" --gid "$uid" --create-home --shell /bin/sh "$user"
    else  # busybox-style bases
        addgroup -g "$uid" -S "$user" && adduser -u "$uid" -G "$user" -S -D "$user"
    fi
fi

python3 -m venv "$venv"

ca=""
if [ -s /run/secrets/extra_ca ]; then
    ca=$(mktemp /tmp/pip-ca.XXXXXX)
    for bundle in /etc/ssl/certs/ca-certificates.crt /etc/pki/tls/certs/ca-bundle.crt; do
        [ -s "$bundle" ] && cat "$bundle" >>"$ca" && break
    done
    cat /run/secrets/extra_ca >>"$ca"
    export PIP_CERT="$ca"
    echo "provision: pip trusts the system CA bundle plus the extra CA"
fi
if [ -n "$find_links" ] && ls "$find_links"/*.whl >/dev/null 2>&1; then
    export PIP_FIND_LINKS="$find_links"
    echo "provision: local wheels: $(cd "$find_links" && ls ./*.whl | tr '\n' ' ')"
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT="${PIP_DEFAULT_TIMEOUT:-120}"
# Index options inside the requirements (a Bento's requirements.txt carries the bentofile's
# --extra-index-url) are dropped: PIP_EXTRA_INDEX_URL, the build argument, decides alone, so
# a build that has the wheel locally does not wait on an index it cannot reach.
reqs=$(mktemp /tmp/requirements.XXXXXX)
grep -v -E '^[[:space:]]*(--extra-index-url|--index-url|-i[[:space:]])' "$requirements" >"$reqs"
"$venv/bin/pip" install --quiet --upgrade pip
"$venv/bin/pip" install --progress-bar off -r "$reqs"
rm -f "$reqs"
[ -z "$ca" ] || rm -f "$ca"
