# flywheel-serving: the Bento of serving/bentofile.yaml served by `bentoml serve` on port 3000 as
# BentoML's user 1034 (deployments/README.md, "Images"). Models come from the MLflow registry at start
# (FLYWHEEL_TRAIN__TRACKING_URI), the lake from FLYWHEEL_LAKE_ROOT.
#
# Built from the Bento, not the checkout: `bentoml build -f serving/bentofile.yaml .` writes a
# Bento (src/: serving/, core/, config/; env/python/requirements.txt: the service's pinned
# requirements), which deployments/docker/build.sh copies to build/bento. This file does what
# `bentoml containerize` would, without its generated Dockerfile (that one starts with a
# `# syntax=` line and FROM python:3.11-slim, both pulled from a registry) and with the same
# Python provisioning as the runner image, so it builds on any base the runner builds on.
#
#   bentoml build -f serving/bentofile.yaml . && cp -r ~/bentoml/bentos/flywheel/<version> build/bento
#   DOCKER_BUILDKIT=1 docker build -f deployments/docker/serving.Dockerfile -t flywheel-serving:dev .
#
# Build arguments: BASE_IMAGE, WHEELS_DIR, PIP_EXTRA_INDEX_URL as in runner.Dockerfile;
# BENTO_DIR: the Bento's folder in the context (default build/bento). Optional build secret
# `extra_ca` as in runner.Dockerfile.
ARG BASE_IMAGE=python:3.11-slim

FROM scratch AS wheels
ARG WHEELS_DIR=deployments/docker/wheels
COPY ${WHEELS_DIR}/ /

FROM scratch AS bento
ARG BENTO_DIR=build/bento
COPY ${BENTO_DIR}/ /

FROM ${BASE_IMAGE}
ARG PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV LANG=C.UTF-8 \
    LC_ALL=C.UTF-8 \
    PYTHONUNBUFFERED=1 \
    PYTHONIOENCODING=UTF-8 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# Early: WORKDIR makes a layer, which the vfs storage driver copies in full; here it is cheap.
WORKDIR /home/bentoml/bento

# Layer 1 (changes with the Bento's requirements only): Python, user bentoml (1034), the
# service's environment, and writable homes for Flywheel and BentoML (emptyDirs in Kubernetes,
# whose root file system is read-only).
RUN --mount=type=bind,from=bento,source=env/python,target=/tmp/flywheel-build/python \
    --mount=type=bind,source=deployments/docker/provision.sh,target=/tmp/flywheel-build/provision.sh \
    --mount=type=bind,from=wheels,target=/tmp/flywheel-build/wheels \
    --mount=type=secret,id=extra_ca \
    --mount=type=cache,id=flywheel-pip,target=/root/.cache/pip,sharing=locked \
    PIP_EXTRA_INDEX_URL="$PIP_EXTRA_INDEX_URL" sh /tmp/flywheel-build/provision.sh \
        /opt/venv bentoml 1034 /tmp/flywheel-build/python/requirements.txt /tmp/flywheel-build/wheels \
    && mkdir -p /var/lib/flywheel /var/lib/bentoml \
    && chown 1034:1034 /var/lib/flywheel /var/lib/bentoml

# Layer 2 (changes with the code): the Bento, root-owned and read-only to the service.
COPY --from=bento / /home/bentoml/bento

# The bentofile's envs (host 0.0.0.0 inside a container, dataset flights), the port, and one
# BentoML home per server (its Prometheus multiprocess folder must not be shared).
ENV BENTO_PATH=/home/bentoml/bento \
    BENTOML_HOME=/var/lib/bentoml \
    BENTOML_CONTAINERIZED=true \
    BENTOML_DO_NOT_TRACK=true \
    FLYWHEEL_HOME=/var/lib/flywheel \
    FLYWHEEL_SERVING__HOST=0.0.0.0 \
    FLYWHEEL_SERVING__PORT=3000 \
    FLYWHEEL_SERVING__DATASET=flights
USER 1034:1034
EXPOSE 3000
# The service reads its host and port from FLYWHEEL_SERVING__HOST/__PORT (serving/service.py).
CMD ["bentoml", "serve", "/home/bentoml/bento"]
