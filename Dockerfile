# fedsilo: one image for the aggregator, the silos and the bundled MLflow server.
#
#   docker build -t fedsilo:0.1.0 .
#   docker run --rm fedsilo:0.1.0 --help
#   docker run --rm --gpus all --network=host -e FEDSILO_TOKEN=... fedsilo:0.1.0 silo --rank 1 ...
#   docker run --rm --user "$(id -u):$(id -g)" -e HOME=/tmp -e HF_HOME=/tmp/huggingface \
#     -v "$PWD/certs:/certs:ro" fedsilo:0.1.0 silo --rank 3 --transport tls \
#     --aggregator fl.example.org:443 --tls-cert /certs/silo-3.pem --tls-key /certs/silo-3.key \
#     --tls-ca /certs/ca.pem ...     (a site's silo over TLS: the site's uid reads its own key)
#
# torch 2.13.0 from PyPI is its CUDA 13.0 build (it pulls cuda-toolkit 13.0.3 and cuDNN 9 as
# wheels), so the default base is a CUDA 13.0 runtime image; hosts need an NVIDIA driver that
# supports CUDA 13.0 (>= 580). Change TORCH_VERSION and BASE together. torch brings its own
# CUDA libraries, so a smaller "-base-" flavour of the same CUDA release works as BASE too.
# For a CPU-only image: --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# For CUDA 12 (nodes whose driver predates CUDA 13, i.e. older than 580), torch's CUDA 12.6
# build and a CUDA 12.6 base; driver >= 525.60.13 (CUDA 12 minor-version compatibility):
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 \
#   --build-arg BASE=nvidia/cuda:12.6.3-runtime-ubuntu24.04
# BASE only needs a shell, coreutils and useradd; python3 with venv is installed when missing.
ARG BASE=nvidia/cuda:13.0.1-runtime-ubuntu24.04

# ---- Python on the base ---------------------------------------------------------------------
FROM ${BASE} AS python
# hadolint ignore=DL3008
RUN if ! python3 -c "import ensurepip, venv" 2>/dev/null; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            python3 python3-venv ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# ---- build the fedsilo wheel (its sources do not go into the image) ----------------------------
FROM python AS wheel
WORKDIR /src
# README* (pyproject.toml names README.md as the long description) may be absent in a bare tree.
COPY pyproject.toml README* ./
COPY fedsilo/ fedsilo/
RUN python3 -m venv /opt/build \
    && /opt/build/bin/pip wheel --no-deps --wheel-dir /dist .

# ---- the image ------------------------------------------------------------------------------
FROM python
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://pypi.org/simple

RUN groupadd --gid 10001 fedsilo \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/fedsilo \
        --shell /usr/sbin/nologin fedsilo \
    && python3 -m venv /opt/fedsilo
ENV PATH=/opt/fedsilo/bin:$PATH \
    VIRTUAL_ENV=/opt/fedsilo

# Layers from the least to the most often changed: torch (GBs), the other libraries, fedsilo.
COPY docker/constraints.txt /opt/fedsilo/constraints.txt
RUN pip install --index-url "${TORCH_INDEX_URL}" --extra-index-url https://pypi.org/simple \
        --constraint /opt/fedsilo/constraints.txt "torch==${TORCH_VERSION}"
COPY pyproject.toml /tmp/fedsilo-pyproject.toml
# fedsilo's dependencies and its "server" extra (PostgreSQL and S3 for the bundled MLflow server).
RUN python3 -c "import tomllib; p = tomllib.load(open('/tmp/fedsilo-pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['server']))" \
        > /tmp/requirements.txt \
    && pip install --constraint /opt/fedsilo/constraints.txt --requirement /tmp/requirements.txt \
    && rm /tmp/requirements.txt /tmp/fedsilo-pyproject.toml
COPY --from=wheel /dist/ /tmp/dist/
RUN pip install --no-deps /tmp/dist/*.whl \
    && rm -rf /tmp/dist \
    && pip check \
    && fedsilo --help >/dev/null

USER 10001:10001
WORKDIR /home/fedsilo
ENV HOME=/home/fedsilo \
    HF_HOME=/home/fedsilo/.cache/huggingface
# 29500: the aggregator's port. With --transport collective its rendezvous (the collectives use
# further, ephemeral ports); with --transport tls the one port it takes connections on.
EXPOSE 29500
ENTRYPOINT ["fedsilo"]
CMD ["--help"]
