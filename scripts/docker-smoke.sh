#!/usr/bin/env bash
# Build the image for real and run it: `fedsilo --help`, then a 2-silo federation of three
# containers (--network=host) that must finish and write its MLflow run, then the same over
# `--transport tls` with certificates made by the image's own `fedsilo certs`. Every container runs
# hardened as the chart's pods do: --read-only --tmpfs /tmp --user 10001:10001 --cap-drop ALL.
# Records the outcome in docs/deploy.md ("Docker smoke test"). Needs root (it starts its own
# Docker engine).
#
#   sudo scripts/docker-smoke.sh
#
# No registry can be reached from here, so the image is built FROM a base made locally:
# Debian bookworm by debootstrap (python3, venv, and this machine's CA bundle, so pip inside
# the build trusts the same TLS roots as pip outside it). When a CPU wheel of the pinned torch
# lies on this machine (pip's find-links), it is served to the build on loopback: the CUDA
# wheels of the default build are several GB and no GPU is here to use them. Everything else
# is the repository's Dockerfile as is.
#
# State (the engine's data, the base image, layer cache) is kept in $STATE between runs;
# remove that directory to start from nothing.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${FEDSILO_SMOKE_STATE:-/var/tmp/fedsilo-docker-smoke}"
BASE_IMAGE="fedsilo-smoke-base:bookworm"
IMAGE="fedsilo:smoke"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
TORCH_VERSION="$(sed -n 's/^ARG TORCH_VERSION=//p' "$ROOT/Dockerfile")"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
[[ -x "$PYTHON" ]] || PYTHON=python3
export DOCKER_HOST="unix://$STATE/docker.sock"
export DOCKER_BUILDKIT=0  # the classic builder: no BuildKit daemon or buildx plugin needed

log() { echo "docker-smoke: $*" >&2; }
started_dockerd=""
http_pid=""
containers=()

cleanup() {
    local name
    for name in "${containers[@]}"; do docker rm -f "$name" >/dev/null 2>&1 || true; done
    [[ -n "$http_pid" ]] && kill "$http_pid" 2>/dev/null || true
    if [[ -n "$started_dockerd" ]]; then
        kill "$started_dockerd" 2>/dev/null || true
        wait "$started_dockerd" 2>/dev/null || true
    fi
}
trap cleanup EXIT

[[ "$(id -u)" -eq 0 ]] || { log "needs root (it runs its own dockerd)"; exit 1; }
mkdir -p "$STATE"

# ---- tools: Debian's Docker engine and debootstrap ----------------------------------------------
if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
    log "installing docker.io and debootstrap"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io debootstrap >/dev/null
fi

# ---- a private Docker engine (no iptables or bridge: containers use the host network) -------------
if ! docker info >/dev/null 2>&1; then
    log "starting dockerd ($STATE)"
    dockerd --iptables=false --ip6tables=false --bridge=none \
        --data-root "$STATE/data" --exec-root "$STATE/exec" \
        --pidfile "$STATE/dockerd.pid" -H "$DOCKER_HOST" >"$STATE/dockerd.log" 2>&1 &
    started_dockerd=$!
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
    docker info >/dev/null 2>&1 || { tail -20 "$STATE/dockerd.log" >&2; exit 1; }
fi

# ---- the local base image -----------------------------------------------------------------------
if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    log "debootstrap bookworm (minbase + python3, python3-venv)"
    rm -rf "$STATE/rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$STATE/rootfs" "$MIRROR" >"$STATE/debootstrap.log" 2>&1 \
        || { tail -20 "$STATE/debootstrap.log" >&2; exit 1; }
    cp /etc/ssl/certs/ca-certificates.crt "$STATE/rootfs/etc/ssl/certs/ca-certificates.crt"
    rm -rf "$STATE/rootfs/var/cache/apt/archives/"*.deb "$STATE/rootfs/var/lib/apt/lists/"*
    tar -C "$STATE/rootfs" -c . | docker import \
        -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        -c 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
        - "$BASE_IMAGE" >/dev/null
    rm -rf "$STATE/rootfs"
fi

# ---- torch: the CPU wheel of the pinned version, if this machine has one ------------------------
build_args=(--build-arg "BASE=$BASE_IMAGE")
torch_source="PyPI (CUDA build)"
wheel=""
for dir in ${PIP_FIND_LINKS:-} /opt/wheels; do
    found="$(ls "$dir"/torch-"$TORCH_VERSION"+cpu-cp311-*.whl 2>/dev/null | head -n1 || true)"
    [[ -n "$found" ]] && { wheel="$found"; break; }
done
if [[ -n "$wheel" ]]; then
    index="$STATE/torch-index"
    rm -rf "$index" && mkdir -p "$index/simple/torch"
    ln -s "$wheel" "$index/simple/torch/$(basename "$wheel")"
    printf '<a href="%s">%s</a>\n' "$(basename "$wheel")" "$(basename "$wheel")" >"$index/simple/torch/index.html"
    # A fixed port when free: the URL is a build argument, and a new one invalidates the layer cache.
    port="$(python3 -c 'import socket, sys
s = socket.socket()
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])' "${FEDSILO_SMOKE_INDEX_PORT:-38765}")"
    python3 -m http.server --bind 127.0.0.1 --directory "$index" "$port" >/dev/null 2>&1 &
    http_pid=$!
    build_args+=(--build-arg "TORCH_INDEX_URL=http://127.0.0.1:$port/simple")
    torch_source="$(basename "$wheel") (this machine's CPU wheel)"
else
    log "no CPU wheel of torch $TORCH_VERSION here: the build downloads the CUDA one (several GB)"
fi

# ---- build --------------------------------------------------------------------------------------
log "docker build ($torch_source)"
start=$SECONDS
docker build --network=host "${build_args[@]}" -t "$IMAGE" "$ROOT" >"$STATE/build.log" 2>&1 \
    || { tail -40 "$STATE/build.log" >&2; exit 1; }
build_seconds=$((SECONDS - start))
image_size="$(docker image inspect --format '{{.Size}}' "$IMAGE" | awk '{printf "%.2f GB", $1 / 1e9}')"
image_user="$(docker image inspect --format '{{.Config.User}}' "$IMAGE")"
log "built $IMAGE in ${build_seconds}s, $image_size, user $image_user"

# ---- how every container runs: as a Kubernetes pod of the chart would --------------------------
# A read-only root filesystem with a writable /tmp (caches, the working directory), uid/gid
# 10001, no Linux capabilities, no privilege gain: the chart's securityContext. Anything that
# writes outside /tmp and the mounted /out fails here as it would in the cluster.
hardened=(
    --read-only --tmpfs /tmp --user 10001:10001 --cap-drop ALL --security-opt no-new-privileges
    -e HOME=/tmp -e HF_HOME=/tmp/huggingface -e MPLCONFIGDIR=/tmp/matplotlib -w /tmp
)

# ---- fedsilo --help -----------------------------------------------------------------------------
help_out="$(docker run --rm "${hardened[@]}" "$IMAGE" --help)"
grep -q "aggregator" <<<"$help_out" && grep -q "silo" <<<"$help_out" \
    || { log "fedsilo --help did not list the commands"; echo "$help_out" >&2; exit 1; }
log "fedsilo --help: ok"

# ---- a 2-silo federation: three containers on the host network ------------------------------------
work="$STATE/run"
rm -rf "$work" && mkdir -p "$work/out"
(cd "$ROOT" && "$PYTHON" - "$work" <<'EOF'
import sys
from pathlib import Path
from tests.tiny import make_tiny_model, sentiment_rows, write_csv

work = Path(sys.argv[1])
make_tiny_model(work / "model")
write_csv(work / "train.csv", sentiment_rows(160))
EOF
) >"$STATE/fixtures.log" 2>&1 || { tail -20 "$STATE/fixtures.log" >&2; exit 1; }
chmod -R a+rX "$work" && chmod a+rwx "$work/out"  # the image runs as uid 10001
rendezvous="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
token="$(python3 -c 'import secrets; print(secrets.token_hex(24))')"
common=(
    --aggregator "127.0.0.1:$rendezvous" --silos 2 --rounds 2 --local-epochs 1
    --batch-size 16 --max-length 32 --model /work/model --dataset /work/train.csv
    --experiment docker-smoke --device cpu --backend gloo --join-timeout 180 --round-timeout 180
)
run_container() {  # run_container NAME ARGS...
    local name="$1"
    shift
    containers+=("$name")
    docker rm -f "$name" >/dev/null 2>&1 || true
    docker run -d --name "$name" --network=host "${hardened[@]}" \
        -v "$work:/work:ro" -v "$work/out:/out" \
        -e FEDSILO_TOKEN="$token" -e GLOO_SOCKET_IFNAME=lo \
        -e HF_HUB_OFFLINE=1 -e HF_DATASETS_OFFLINE=1 \
        "$IMAGE" "$@" >/dev/null
}
start=$SECONDS
run_container fedsilo-smoke-silo-1 silo --rank 1 "${common[@]}"
run_container fedsilo-smoke-silo-2 silo --rank 2 "${common[@]}"
run_container fedsilo-smoke-aggregator aggregator "${common[@]}" \
    --tracking-uri sqlite:////out/mlflow.db --checkpoint-dir /out/checkpoints
codes=()
for name in "${containers[@]}"; do
    codes+=("$name=$(timeout 600 docker wait "$name" || echo timeout)")
done
federation_seconds=$((SECONDS - start))
for name in "${containers[@]}"; do docker logs "$name" >"$STATE/$name.log" 2>&1 || true; done

outcome="PASS"
for code in "${codes[@]}"; do [[ "${code##*=}" == "0" ]] || outcome="FAIL"; done
run_status="$("$PYTHON" -c "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); print(','.join(r[0] for r in c.execute('select status from runs')))" "$work/out/mlflow.db" 2>/dev/null || echo "no database")"
[[ "$run_status" == "FINISHED" ]] || outcome="FAIL"
last_round="$(grep -E '^round [0-9]+/[0-9]+' "$STATE/fedsilo-smoke-aggregator.log" | tail -n1 || true)"
log "federation: ${codes[*]}; MLflow run: $run_status; $last_round"
if [[ "$outcome" != "PASS" ]]; then
    for name in "${containers[@]}"; do echo "---- $name" >&2; tail -20 "$STATE/$name.log" >&2; done
fi

# ---- the same federation over --transport tls, certificates made by the image's `fedsilo certs` ----
# The operator's steps and a hospital's (request, then sign) as docs/certificates.md gives them.
in_image() { docker run --rm --network=none "${hardened[@]}" -v "$work/out:/out" "$IMAGE" "$@" >>"$STATE/certs.log" 2>&1; }
: >"$STATE/certs.log"
certs_made="ok"
in_image certs init --dir /out/pki \
    && in_image certs issue --role aggregator --host 127.0.0.1 --dir /out/pki \
    && in_image certs request --rank 1 --site "smoke hospital" --dir /out/pki \
    && in_image certs sign /out/pki/silo-1.csr --rank 1 --dir /out/pki \
    && in_image certs issue --role silo --rank 2 --dir /out/pki \
    || { certs_made="FAIL"; tail -20 "$STATE/certs.log" >&2; }
tls_port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
tls_common=("${common[@]:2}" --aggregator "127.0.0.1:$tls_port" --transport tls --tls-ca /out/pki/ca.pem)
identity() { echo --tls-cert "/out/pki/$1.pem" --tls-key "/out/pki/$1.key"; }
start=$SECONDS
tls_containers=(fedsilo-smoke-tls-silo-1 fedsilo-smoke-tls-silo-2 fedsilo-smoke-tls-aggregator)
# shellcheck disable=SC2046  # identity's words are meant to split
{
    run_container fedsilo-smoke-tls-silo-1 silo --rank 1 "${tls_common[@]}" $(identity silo-1)
    run_container fedsilo-smoke-tls-silo-2 silo --rank 2 "${tls_common[@]}" $(identity silo-2)
    run_container fedsilo-smoke-tls-aggregator aggregator "${tls_common[@]}" $(identity aggregator) \
        --tracking-uri sqlite:////out/mlflow-tls.db --checkpoint-dir /out/checkpoints-tls
}
tls_codes=()
for name in "${tls_containers[@]}"; do
    tls_codes+=("$name=$(timeout 600 docker wait "$name" || echo timeout)")
done
tls_seconds=$((SECONDS - start))
for name in "${tls_containers[@]}"; do docker logs "$name" >"$STATE/$name.log" 2>&1 || true; done
[[ "$certs_made" == "ok" ]] || outcome="FAIL"
for code in "${tls_codes[@]}"; do [[ "${code##*=}" == "0" ]] || outcome="FAIL"; done
tls_status="$("$PYTHON" -c "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); print(','.join(r[0] for r in c.execute('select status from runs')))" "$work/out/mlflow-tls.db" 2>/dev/null || echo "no database")"
[[ "$tls_status" == "FINISHED" ]] || outcome="FAIL"
tls_last_round="$(grep -E '^round [0-9]+/[0-9]+' "$STATE/fedsilo-smoke-tls-aggregator.log" | tail -n1 || true)"
log "TLS federation: certs $certs_made; ${tls_codes[*]}; MLflow run: $tls_status; $tls_last_round"
if [[ "$outcome" != "PASS" ]]; then
    for name in "${tls_containers[@]}"; do echo "---- $name" >&2; tail -20 "$STATE/$name.log" >&2; done
fi

# ---- record the outcome in docs/deploy.md ------------------------------------------------------
"$PYTHON" - "$ROOT/docs/deploy.md" <<EOF
import re, sys
from pathlib import Path

path = Path(sys.argv[1])
block = """<!-- docker-smoke:begin (written by scripts/docker-smoke.sh) -->
Last run: $(date -u +%Y-%m-%d) UTC, \`scripts/docker-smoke.sh\`: **$outcome**

| step | result |
|---|---|
| engine | $(docker version --format 'Docker {{.Server.Version}}'), classic builder, \`--network=host\` |
| base | \`$BASE_IMAGE\` (debootstrap bookworm minbase + python3, python3-venv) via \`--build-arg BASE\` |
| torch | $torch_source |
| build | ${build_seconds} s; image $image_size; runs as user $image_user |
| containers | \`${hardened[*]:0:9}\` |
| \`fedsilo --help\` | ok |
| federation | aggregator + 2 silos in 3 containers, tiny BERT, 2 rounds: ${codes[*]} in ${federation_seconds} s |
| MLflow run | $run_status; aggregator's last round: \`$last_round\` |
| \`fedsilo certs\` in the image | init, issue (aggregator, silo 2), request + sign (silo 1): $certs_made |
| federation over \`--transport tls\` | the same 3 containers, mutual TLS 1.3 on one port: ${tls_codes[*]} in ${tls_seconds} s |
| MLflow run (TLS) | $tls_status; aggregator's last round: \`$tls_last_round\` |
<!-- docker-smoke:end -->"""
text = path.read_text(encoding="utf-8")
pattern = re.compile(r"<!-- docker-smoke:begin.*?<!-- docker-smoke:end -->", re.S)
if not pattern.search(text):
    sys.exit("docs/deploy.md has no docker-smoke markers")
path.write_text(pattern.sub(lambda _: block, text), encoding="utf-8")
EOF
log "recorded in docs/deploy.md: $outcome"
[[ "$outcome" == "PASS" ]]
