# flywheel-runner: Prefect flow runs, Prefect workers and Ray nodes (deployments/README.md, "Images").
# The checkout at /opt/flywheel (FLYWHEEL_REPO, where deployments/prefect.yaml's pull step
# changes to), requirements.lock in /opt/venv (prefect, ray, bentoml, mlflow... on the PATH),
# run as uid 1000, state under FLYWHEEL_HOME=/var/lib/flywheel.
#
# Needs BuildKit (secret and bind mounts); no `# syntax=` line on purpose: the Dockerfile
# frontend built into Docker >= 20.10 is enough, and a syntax line would pull an image.
# From the repository root (deployments/docker/build.sh does this, and more, for you):
#   DOCKER_BUILDKIT=1 docker build -f deployments/docker/runner.Dockerfile -t flywheel-runner:dev .
# The context is filtered by deployments/docker/runner.Dockerfile.dockerignore.
#
# Build arguments:
#   BASE_IMAGE           python:3.11-slim; any Debian-like image (a debootstrapped bookworm
#                        without Python: Python comes from apt then)
#   WHEELS_DIR           a context folder of local wheels for pip (default: deployments/docker/wheels, none);
#                        deployments/docker/build.sh stages the CPU torch wheel in build/wheels
#   PIP_EXTRA_INDEX_URL  PyTorch's CPU index (torch==2.13.0+cpu); empty when WHEELS_DIR has it
# Build secret (optional): `--secret id=extra_ca,src=FILE`, a CA (or bundle) pip must trust, e.g.
# behind a TLS-intercepting proxy. It is used during the install only, never stored.
ARG BASE_IMAGE=python:3.11-slim

FROM scratch AS wheels
ARG WHEELS_DIR=deployments/docker/wheels
COPY ${WHEELS_DIR}/ /

FROM ${BASE_IMAGE}
ARG PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV LANG=C.UTF-8 \
    LC_ALL=C.UTF-8 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# Early: WORKDIR makes a layer, which the vfs storage driver copies in full; here it is cheap.
WORKDIR /opt/flywheel

# Layer 1 (changes with requirements.lock only): Python, user 1000, the locked environment,
# and the state folders a volume mounted there inherits (uid 1000): FLYWHEEL_HOME and the
# cluster profile's Ray storage (config/cluster.yaml, deployments/compose.yaml).
RUN --mount=type=bind,source=requirements.lock,target=/tmp/flywheel-build/requirements.lock \
    --mount=type=bind,source=deployments/docker/provision.sh,target=/tmp/flywheel-build/provision.sh \
    --mount=type=bind,from=wheels,target=/tmp/flywheel-build/wheels \
    --mount=type=secret,id=extra_ca \
    --mount=type=cache,id=flywheel-pip,target=/root/.cache/pip,sharing=locked \
    PIP_EXTRA_INDEX_URL="$PIP_EXTRA_INDEX_URL" sh /tmp/flywheel-build/provision.sh \
        /opt/venv flywheel 1000 /tmp/flywheel-build/requirements.lock /tmp/flywheel-build/wheels \
    && mkdir -p /var/lib/flywheel /mnt/flywheel/ray \
    && chown 1000:1000 /var/lib/flywheel /mnt/flywheel/ray

# Layer 2 (changes with the code): the checkout, root-owned and read-only to the runtime user.
# A bind mount and tar rather than COPY: the context also carries the staged wheels (build/),
# which must not land in the checkout.
RUN --mount=type=bind,target=/tmp/flywheel-src \
    mkdir -p /opt/flywheel \
    && tar -C /tmp/flywheel-src --exclude=./build -cf - . | tar -C /opt/flywheel --no-same-owner -xf - \
    && chmod -R a+rX,go-w /opt/flywheel \
    && python -m compileall -q /opt/flywheel/core /opt/flywheel/flows /opt/flywheel/tasks \
        /opt/flywheel/compute /opt/flywheel/serving /opt/flywheel/monitoring

ENV FLYWHEEL_REPO=/opt/flywheel \
    PYTHONPATH=/opt/flywheel \
    FLYWHEEL_HOME=/var/lib/flywheel \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    GX_ANALYTICS_ENABLED=false \
    RAY_USAGE_STATS_ENABLED=0 \
    DO_NOT_TRACK=1 \
    GIT_PYTHON_REFRESH=quiet
USER 1000:1000
CMD ["python", "-m", "flows.train", "--help"]
