# varserve on a CUDA GPU. The image holds no models: mount a directory with models.toml and the
# checkpoints it names at /models (read-only is enough). Build: docker build -t varserve .
FROM nvidia/cuda:12.8.1-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# gcc, libc6-dev and python3-dev stay in the runtime image: Triton JIT-compiles a small C launcher
# with them at the first kernel launch. curl serves the health check. Ubuntu's archive moves
# package versions under a fixed release, so apt packages are not pinned (the base image is).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev curl ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv "$VIRTUAL_ENV"

WORKDIR /app
# torch in its own layer: it is most of the image and changes least. On Linux x86-64 this pin is
# the CUDA build (it brings its CUDA libraries and Triton with it).
RUN pip install torch==2.13.0
COPY pyproject.toml README.md ./
COPY models ./models
COPY kernels ./kernels
COPY service ./service
RUN pip install . && python -c "import service.api"

RUN groupadd --gid 10001 varserve && useradd --uid 10001 --gid 10001 --create-home varserve
# Triton and torch compile caches must be writable by the non-root user
ENV HOME=/home/varserve \
    TRITON_CACHE_DIR=/home/varserve/.triton \
    TORCHINDUCTOR_CACHE_DIR=/home/varserve/.inductor
USER 10001:10001
WORKDIR /home/varserve

VOLUME ["/models"]
EXPOSE 8000
# /health is liveness (the process and its worker threads); loading the models can take minutes
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["sh", "-c", "curl -fsS http://127.0.0.1:${VARSERVE_PORT:-8000}/health || exit 1"]
# SIGTERM (docker stop) drains: no new requests, running ones finish within VARSERVE_DRAIN_TIMEOUT_S
STOPSIGNAL SIGTERM
ENTRYPOINT ["varserve", "serve"]
CMD ["--config", "/models/models.toml", "--host", "0.0.0.0"]
