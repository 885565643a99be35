"""The rendered chart really federates: its pods, run as local processes, train and log to MLflow.

The chart is rendered with ``helm template`` (silos=2) and every pod it would create (the
MLflow Deployment, the aggregator's Job, each index of the silos' Indexed Job, or each silo's
own Job when siloOverrides is set) is started as a local process with exactly the rendered
command, args and env. What a cluster would provide is emulated, and nothing else is changed:

- volumes: ConfigMaps and Secrets are written to files, PVCs and emptyDirs are directories,
  hostPaths are themselves; a path under a mountPath in env, args or workingDir is mapped to
  the directory behind that volume (what the kubelet's mount does);
- Kubernetes' own env: JOB_COMPLETION_INDEX for each index of an Indexed Job, and an env var
  read from a Secret's key (valueFrom.secretKeyRef) is that key's value;
- cluster DNS: a ``*.svc.cluster.local`` name becomes 127.0.0.1 (every "pod" is on loopback).

Settings that a real cluster would have too come in as values: loopback as the socket
interface, free ports, a tiny model and small CSVs on hostPath data volumes; the join and round
timeouts are the chart's defaults, which a loaded machine cannot break.
"""

from __future__ import annotations

import base64
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fedsilo.launcher import free_port
from tests.procs import HANG_GUARD, stop_group
from tests.test_chart import ROOT, one, pods, render
from tests.tiny import make_tiny_model, sentiment_rows, write_csv

CLUSTER_DNS = re.compile(r"\b[a-z0-9]([-a-z0-9.]*[a-z0-9])?\.svc\.cluster\.local\b")
# How long a test waits for its federation: only a hang guard, beyond the chart's join timeout
# (900 s), so that a rank that waits in vain names its own failure first.
FEDERATION_GUARD = 1200.0


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace").splitlines()
        return f"---- {self.name} (exit {self.popen.poll()}) ----\n" + "\n".join(text[-lines:])


class LocalCluster:
    """Runs rendered pod specs as local processes (see the module docstring)."""

    def __init__(self, docs: list[dict[str, Any]], root: Path) -> None:
        self.docs = docs
        self.root = root
        self.processes: list[Process] = []
        self.rewrites: set[tuple[str, str]] = set()

    # -- volumes --------------------------------------------------------------------------------
    def _volume_dir(self, pod_name: str, volume: dict[str, Any]) -> Path:
        if "hostPath" in volume:
            return Path(volume["hostPath"]["path"])
        if "persistentVolumeClaim" in volume:
            claim = volume["persistentVolumeClaim"]["claimName"]
            path = self.root / "pvc" / claim  # shared by every pod that mounts the claim
        elif "emptyDir" in volume:
            path = self.root / "pods" / pod_name / volume["name"]
        elif "configMap" in volume:
            data = one(self.docs, "ConfigMap", volume["configMap"]["name"])["data"]
            path = self._write(pod_name, volume, data, volume["configMap"].get("items"))
        elif "secret" in volume:
            secret = one(self.docs, "Secret", volume["secret"]["secretName"])
            data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
            path = self._write(pod_name, volume, data, volume["secret"].get("items"))
        else:
            raise AssertionError(f"no local stand-in for volume {volume}")
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _write(
        self, pod_name: str, volume: dict[str, Any], data: dict[str, str], items: list[dict[str, str]] | None
    ) -> Path:
        path = self.root / "pods" / pod_name / volume["name"]
        path.mkdir(parents=True, exist_ok=True)
        for item in items or [{"key": k, "path": k} for k in data]:
            (path / item["path"]).write_text(data[item["key"]], encoding="utf-8")
        return path

    def _mounts(self, pod_name: str, spec: dict[str, Any]) -> dict[str, Path]:
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        (container,) = spec["containers"]
        mounts = container.get("volumeMounts", [])
        return {m["mountPath"]: self._volume_dir(pod_name, volumes[m["name"]]) for m in mounts}

    # -- what a container sees ------------------------------------------------------------------
    def _translate(self, text: str, mounts: dict[str, Path]) -> str:
        original = text
        if mounts:
            # One pass, longest mount path first: a translated path is never translated again.
            paths = {p.rstrip("/"): d for p, d in mounts.items()}
            alternatives = "|".join(re.escape(p) for p in sorted(paths, key=len, reverse=True))
            pattern = rf"(?<![\w.-])({alternatives})(?=/|$)"
            text = re.sub(pattern, lambda m: str(paths[m.group(1)]), text)
        text = CLUSTER_DNS.sub("127.0.0.1", text)
        if text != original:
            self.rewrites.add((original, text))
        return text

    @staticmethod
    def _executable(name: str) -> list[str]:
        script = Path(sys.executable).parent / name
        return [str(script)] if script.exists() else [sys.executable, "-m", name]

    def start(self, pod_name: str, spec: dict[str, Any], extra_env: dict[str, str] | None = None) -> Process:
        mounts = self._mounts(pod_name, spec)
        (container,) = spec["containers"]
        command = container["command"]
        assert len(command) == 1, command
        argv = self._executable(command[0]) + [self._translate(a, mounts) for a in container.get("args", [])]
        home = self.root / "pods" / pod_name / "home"
        home.mkdir(parents=True, exist_ok=True)
        env = {
            # The image's environment: fedsilo and mlflow on PATH, a writable HOME.
            "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "HOME": str(home),
            "PYTHONPATH": str(ROOT),
            # This machine has no hub access: fail at once on a hub name instead of hanging.
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            **(extra_env or {}),
        }
        for item in container.get("env", []):
            if "valueFrom" in item:  # the kubelet reads a Secret's key; so do we
                ref = item["valueFrom"]["secretKeyRef"]
                secret = one(self.docs, "Secret", ref["name"])
                env[item["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
                continue
            assert "value" in item, f"{pod_name}: env {item['name']} is neither a value nor a Secret's key"
            env[item["name"]] = self._translate(item["value"], mounts)
        cwd = self._translate(container["workingDir"], mounts) if "workingDir" in container else str(home)
        log = self.root / f"{pod_name}.log"
        handle = log.open("wb")
        popen = subprocess.Popen(
            argv, env=env, cwd=cwd, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )
        process = Process(pod_name, popen, log)
        self.processes.append(process)
        return process

    def stop(self) -> None:
        for process in self.processes:
            stop_group(process.popen, grace=20)

    def logs(self) -> str:
        return "\n".join(p.tail() for p in self.processes)


def wait_ready(process: Process, url: str, timeout: float) -> None:
    """The readiness probe: poll ``url`` until it answers 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.popen.poll() is None, f"{process.name} exited early\n{process.tail()}"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{process.name} not ready within {timeout:g}s\n{process.tail()}")


def probe_url(spec: dict[str, Any]) -> str:
    (container,) = spec["containers"]
    probe = container["readinessProbe"]["httpGet"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    port = ports.get(probe["port"], probe["port"])
    return f"http://127.0.0.1:{port}{probe['path']}"


def run_chart(
    docs: list[dict[str, Any]], root: Path, mlflow_port: int, while_up: Callable[[], None] | None = None
) -> Any:
    """Start MLflow and every member pod; wait for the federation; return the MLflow run.
    ``while_up`` runs once the run is read back, while the MLflow server still runs."""
    members = pods(docs)
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    mlflow_spec = deployment["spec"]["template"]["spec"]
    cluster = LocalCluster(docs, root)
    try:
        # MLflow first, until its readiness probe answers (the aggregator would retry its HTTP
        # calls anyway; waiting keeps the test's timing simple). Then the silos before the
        # aggregator: they must wait for it.
        server = cluster.start("mlflow", mlflow_spec)
        wait_ready(server, probe_url(mlflow_spec), timeout=HANG_GUARD)
        for pod in sorted(members, key=lambda p: -p.rank):
            index = pod.completion_index
            name = pod.job if index is None else f"{pod.job}-{index}"
            cluster.start(name, pod.spec, {} if index is None else {"JOB_COMPLETION_INDEX": str(index)})
        federation = [p for p in cluster.processes if p is not server]
        deadline = time.monotonic() + FEDERATION_GUARD
        while any(p.popen.poll() is None for p in federation) and time.monotonic() < deadline:
            if any(p.popen.poll() not in (None, 0) for p in federation):
                # One rank failed: the others follow within seconds (or at their timeouts).
                deadline = min(deadline, time.monotonic() + 15)
            time.sleep(0.5)
        codes = {p.name: p.popen.poll() for p in federation}
        assert all(code == 0 for code in codes.values()), f"exit codes {codes}\n{cluster.logs()}"

        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=f"http://127.0.0.1:{mlflow_port}")
        experiment = client.get_experiment_by_name("chart-e2e")
        assert experiment is not None, cluster.logs()
        (run,) = client.search_runs([experiment.experiment_id])
        if while_up is not None:
            while_up()
    finally:
        cluster.stop()
    # Only mount paths and cluster DNS names were translated.
    for original, translated in cluster.rewrites:
        assert "svc.cluster.local" in original or original.startswith(("/", "sqlite:")), (original, translated)
    return run


def base_values(model: Path, mlflow_port: int) -> dict[str, Any]:
    return {
        "silos": 2,
        "config": {
            "experiment": "chart-e2e",
            "model": str(model),
            "rounds": 2,
            "local_epochs": 1,
            "batch_size": 16,
            "max_length": 32,
            "eval_batch_size": 64,
        },
        # Loopback is this test's pod network. The join and round timeouts are the chart's defaults:
        # a loaded machine cannot break them, and only a failing test waits on them.
        "comm": {"rendezvousPort": free_port(), "socketIfname": "lo"},
        "mlflow": {"server": {"port": mlflow_port, "service": {"port": mlflow_port}}},
    }


@pytest.mark.timeout(HANG_GUARD + FEDERATION_GUARD)
@pytest.mark.parametrize("workload", ["jobs", pytest.param("jobset", marks=pytest.mark.slow)])
def test_indexed_job_federates_on_a_shared_dataset_and_logs_to_mlflow(tmp_path: Path, workload: str) -> None:
    # Prepare: a node directory with a tiny model and a CSV, mounted in every pod at its own path.
    node = tmp_path / "node"
    node.mkdir()
    model = make_tiny_model(node / "model")
    write_csv(node / "train.csv", sentiment_rows(160))
    mlflow_port = free_port()
    values = base_values(model, mlflow_port)
    values["config"].update(dataset=str(node / "train.csv"), partition="iid")
    volume = {"hostPath": {"path": str(node), "type": "Directory"}}
    values.update(dataMountPath=str(node), aggregator={"dataVolume": volume}, silo={"dataVolume": volume})
    values["workload"] = workload  # the JobSet's Jobs run the same pods
    docs = render(values)
    assert sorted((p.rank, p.completion_index) for p in pods(docs)) == [(0, None), (1, 0), (2, 1)]

    # Execute
    run = run_chart(docs, tmp_path / "cluster", mlflow_port)

    # Assert: the run finished with both silos, its checkpoint and database on their PVCs.
    assert run.info.status == "FINISHED"
    assert run.data.params["silos"] == "2"
    assert "test_accuracy" in run.data.metrics and {"silo/1/examples", "silo/2/examples"} <= set(run.data.params)
    assert int(run.data.params["silo/1/examples"]) + int(run.data.params["silo/2/examples"]) > 100
    assert any((tmp_path / "cluster" / "pvc" / "exp-fedsilo-checkpoints").iterdir())
    assert (tmp_path / "cluster" / "pvc" / "exp-fedsilo-mlflow" / "mlflow.db").exists()


@pytest.mark.timeout(HANG_GUARD + FEDERATION_GUARD)
def test_job_per_silo_federates_each_on_its_own_data_volume(tmp_path: Path) -> None:
    # Prepare: two "hospital nodes" with different amounts of their own data, the same file name
    # on each, and a held-out set on the aggregator's volume.
    model = make_tiny_model(tmp_path / "image" / "model")  # as if baked into the image
    sizes = {1: 120, 2: 60}
    overrides = {}
    for rank, rows in sizes.items():
        node = tmp_path / f"hospital-{rank}"
        node.mkdir()
        write_csv(node / "notes.csv", sentiment_rows(rows, seed=rank))
        overrides[str(rank)] = {
            "nodeSelector": {"fedsilo.dev/site": f"hospital-{rank}"},
            "dataVolume": {"hostPath": {"path": str(node), "type": "Directory"}},
        }
    coordinator = tmp_path / "coordinator"
    coordinator.mkdir()
    write_csv(coordinator / "test.csv", sentiment_rows(40, seed=9))
    mlflow_port = free_port()
    values = base_values(model, mlflow_port)
    # No shared dataset: each silo's comes from its own volume, the aggregator has only a test set.
    values["config"].update(partition="none", labels=["neg", "pos"])
    values.update(
        siloOverrides=overrides,
        silo={"config": {"dataset": "/data/notes.csv"}},
        aggregator={
            "dataVolume": {"hostPath": {"path": str(coordinator), "type": "Directory"}},
            "config": {"test_dataset": "/data/test.csv"},
        },
    )
    docs = render(values)
    assert sorted((p.rank, p.env.get("FEDSILO_RANK")) for p in pods(docs)) == [(0, None), (1, "1"), (2, "2")]

    # Execute
    run = run_chart(docs, tmp_path / "cluster", mlflow_port)

    # Assert: each silo trained on all of its own file (partition none), nothing else.
    assert run.info.status == "FINISHED"
    examples = {rank: int(run.data.params[f"silo/{rank}/examples"]) for rank in sizes}
    assert examples[1] > examples[2], f"each silo must read its own volume: {examples}"
    assert all(examples[rank] <= sizes[rank] for rank in sizes), examples
    assert "test_accuracy" in run.data.metrics, "the aggregator evaluated on its own test set"


def _secret(name: str, files: dict[str, Path]) -> dict[str, Any]:
    """What `kubectl create secret generic NAME --from-file=KEY=PATH ...` would make."""
    data = {key: base64.b64encode(path.read_bytes()).decode() for key, path in files.items()}
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "type": "Opaque", "data": data}


@pytest.mark.timeout(420)
def test_tls_transport_federates_each_member_on_its_own_certificate(tmp_path: Path) -> None:
    certs = pytest.importorskip("fedsilo.certs")
    # Prepare: a shared dataset on a node directory, as in the first test; transport tls with the
    # aggregator's Secret named, the name its certificate carries, and a revocation list.
    node = tmp_path / "node"
    node.mkdir()
    model = make_tiny_model(node / "model")
    write_csv(node / "train.csv", sentiment_rows(160))
    mlflow_port = free_port()
    values = base_values(model, mlflow_port)
    values["config"].update(dataset=str(node / "train.csv"), partition="iid")
    volume = {"hostPath": {"path": str(node), "type": "Directory"}}
    values.update(
        dataMountPath=str(node),
        aggregator={"dataVolume": volume},
        silo={"dataVolume": volume},
        transport="tls",
        # The in-cluster name becomes 127.0.0.1 here, so the certificate carries an outside name.
        tls={
            "existingSecret": "fl-aggregator",
            "serverName": "fl.example.org",
            "revoked": {"configMap": "fl-revoked", "key": "serials"},
        },
    )
    docs = render(values)
    assert sorted((p.rank, p.env.get("FEDSILO_RANK")) for p in pods(docs)) == [(0, None), (1, "1"), (2, "2")]
    # The operator's part, as docs/deploy.md says: a CA, the aggregator's certificate, one per
    # in-cluster silo in the Secret the chart names, and a retired silo certificate revoked.
    pki = tmp_path / "pki"
    ca_cert, ca_key = certs.init_ca(pki)
    key, cert = certs.issue(pki, ca_cert, ca_key, "aggregator", hosts=["fl.example.org"])
    cluster = [_secret("fl-aggregator", {"tls.crt": cert, "tls.key": key, "ca.crt": ca_cert})]
    for rank in (1, 2):
        key, cert = certs.issue(pki, ca_cert, ca_key, "silo", rank)
        cluster.append(_secret(f"exp-fedsilo-silo-{rank}-tls", {"tls.crt": cert, "tls.key": key, "ca.crt": ca_cert}))
    _, retired = certs.issue(pki / "retired", ca_cert, ca_key, "silo", 1)
    serial = certs.load_certificate(retired).serial_number
    cluster.append(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "fl-revoked"},
            "data": {"serials": f"{serial:#x}  # silo 1's old certificate\n"},
        }
    )

    # Execute
    run = run_chart(docs + cluster, tmp_path / "cluster", mlflow_port)

    # Assert: the run finished with both silos over TLS.
    assert run.info.status == "FINISHED"
    assert run.data.params["transport"] == "tls"
    assert "test_accuracy" in run.data.metrics and {"silo/1/examples", "silo/2/examples"} <= set(run.data.params)


# ---- the bundled MLflow server on PostgreSQL ----------------------------------------------------


def _postgres_bin() -> Path | None:
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    return versions[-1].parent if versions else None


def _install_postgres() -> Path:
    """Debian's PostgreSQL server binaries, installed with apt when missing (root only)."""
    found = _postgres_bin()
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(
            ["apt-get", "install", "-y", "--no-install-recommends", "postgresql"],
            env=env,
            capture_output=True,
            timeout=600,
            check=False,
        )
        found = _postgres_bin()
    if found is None:
        pytest.skip("PostgreSQL is not installed and cannot be (apt-get install postgresql needs root and a mirror)")
    return found


@pytest.fixture
def postgres() -> Any:
    """A throwaway PostgreSQL server on a free loopback port with a database "mlflow": its URI."""
    pytest.importorskip("psycopg", reason="MLflow's PostgreSQL driver (the image's server extra)")
    bindir = _install_postgres()
    data = Path(tempfile.mkdtemp(prefix="fedsilo-pg-"))
    as_postgres: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        try:
            account = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("no 'postgres' user to run PostgreSQL as (it refuses root)")
        os.chown(data, account.pw_uid, account.pw_gid)
        as_postgres = ["runuser", "-u", "postgres", "--"]
    port = free_port()

    def pg(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*as_postgres, *argv], capture_output=True, text=True, timeout=120, check=False)

    started = False
    try:
        init = pg(str(bindir / "initdb"), "-D", str(data / "db"), "-U", "postgres", "-A", "trust", "-E", "UTF8")
        if init.returncode != 0:
            pytest.skip(f"initdb failed: {init.stderr.strip()[-300:]}")
        options = f"-p {port} -c listen_addresses=127.0.0.1 -k {data}"
        start = pg(
            str(bindir / "pg_ctl"), "-D", str(data / "db"), "-o", options, "-l", str(data / "log"), "-w", "start"
        )
        if start.returncode != 0:
            pytest.skip(f"PostgreSQL did not start: {start.stderr.strip()[-300:]}")
        started = True
        created = pg(str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "mlflow")
        assert created.returncode == 0, created.stderr
        yield f"postgresql://postgres@127.0.0.1:{port}/mlflow"
    finally:
        if started:
            pg(str(bindir / "pg_ctl"), "-D", str(data / "db"), "-m", "fast", "-w", "stop")
        shutil.rmtree(data, ignore_errors=True)


@pytest.mark.slow  # PostgreSQL, MLflow and a federation of three processes: a minute or two
@pytest.mark.timeout(HANG_GUARD + FEDERATION_GUARD)
def test_bundled_mlflow_on_postgresql_with_basic_auth_records_the_federation(
    tmp_path: Path, postgres: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import psycopg

    # Prepare: the chart with its MLflow server's backend store in a Secret (PostgreSQL), MLflow's
    # basic auth with the admin from another Secret, and the usual tiny federation.
    node = tmp_path / "node"
    node.mkdir()
    model = make_tiny_model(node / "model")
    write_csv(node / "train.csv", sentiment_rows(160))
    mlflow_port = free_port()
    values = base_values(model, mlflow_port)
    values["config"].update(dataset=str(node / "train.csv"), partition="iid")
    volume = {"hostPath": {"path": str(node), "type": "Directory"}}
    values.update(dataMountPath=str(node), aggregator={"dataVolume": volume}, silo={"dataVolume": volume})
    values["mlflow"]["server"].update(
        backendStore={"existingSecret": "mlflow-db"},
        auth={"enabled": True, "existingSecret": "mlflow-admin"},
    )
    docs = render(values)
    password = "adm1n-" + os.urandom(8).hex()
    secrets = [
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "mlflow-db"},
            "data": {"uri": base64.b64encode(postgres.encode()).decode()},
        },
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "mlflow-admin"},
            "data": {
                "username": base64.b64encode(b"fl-admin").decode(),
                "password": base64.b64encode(password.encode()).decode(),
                "secretKey": base64.b64encode(os.urandom(24).hex().encode()).decode(),
            },
        },
    ]
    # Reading the run back is a client of the server too: it needs the admin's password.
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "fl-admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)

    def refuses_strangers() -> None:
        url = f"http://127.0.0.1:{mlflow_port}/api/2.0/mlflow/experiments/search?max_results=1"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url, timeout=10)
        assert refused.value.code == 401, "without a password the server refuses"

    # Execute
    run = run_chart(docs + secrets, tmp_path / "cluster", mlflow_port, while_up=refuses_strangers)

    # Assert: the run, read back through the server, is FINISHED with both silos...
    assert run.info.status == "FINISHED"
    assert "test_accuracy" in run.data.metrics and {"silo/1/examples", "silo/2/examples"} <= set(run.data.params)
    # ...and it lives in PostgreSQL, not in a sqlite file on the volume.
    with psycopg.connect(postgres) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT run_uuid, status FROM runs")
        assert cursor.fetchall() == [(run.info.run_id, "FINISHED")]
        cursor.execute("SELECT count(*) FROM metrics WHERE run_uuid = %s AND key = 'test_accuracy'", (run.info.run_id,))
        assert cursor.fetchone()[0] == 2, "one test_accuracy per round"
    volume_dir = tmp_path / "cluster" / "pvc" / "exp-fedsilo-mlflow"
    assert not (volume_dir / "mlflow.db").exists()
    assert (volume_dir / "basic_auth.db").exists(), "the auth database is on the volume"
    assert any((volume_dir / "artifacts").rglob("*")), "the model was uploaded through the server"
