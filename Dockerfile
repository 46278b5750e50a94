# syntax=docker/dockerfile:1
# sam-fast-serve's TorchServe image. Installed exactly as on a fresh machine: Java first, then
# install_segment_anything_fast.sh (the .venv, the pinned requirements.txt, this checkout editable).
# The model archive is not in the image: it is mounted at /home/model-server/model_store (the
# Kubernetes manifests mount it read-only from a volume). Not built here: no container runtime.
#   docker build -t sam-fast-serve:0.3.0 .
FROM python:3.11-slim-bookworm

# Java 17 for TorchServe's frontend; tini as PID 1 so a stop signal reaches both the torchserve
# launcher and its JVM. The man directory must exist for the JRE's postinst on slim images.
RUN mkdir -p /usr/share/man/man1 \
    && apt-get update \
    && apt-get install -y --no-install-recommends openjdk-17-jre-headless tini \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --uid 1000 --user-group --create-home --home-dir /home/model-server model-server

WORKDIR /opt/sam-fast-serve
COPY . .
# The install script's own steps; pip's cache is kept between builds, never in the image.
RUN --mount=type=cache,target=/root/.cache/pip bash install_segment_anything_fast.sh

ENV PATH=/opt/sam-fast-serve/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1

# The in-pod config (the same file the Kubernetes ConfigMap is generated from) as the default.
COPY deploy/kubernetes/config.properties /home/model-server/config/config.properties
RUN mkdir -p /home/model-server/model_store /home/model-server/run \
    && chown model-server:model-server /home/model-server/model_store /home/model-server/run

USER 1000:1000
# TorchServe writes key_file.json and its logs into its working directory.
WORKDIR /home/model-server/run
EXPOSE 8080 8081 8082
ENTRYPOINT ["tini", "-g", "--", "torchserve", "--start", "--foreground", "--ts-config", "/home/model-server/config/config.properties", "--models", "sam-fast=sam-fast.tar.gz", "--ncs"]
