"""Settings, one pydantic model per concern.

Users see one flat namespace: a YAML key, a CLI flag and a ``FEDSILO_*`` variable share a name
(``local_epochs`` / ``--local-epochs`` / ``FEDSILO_LOCAL_EPOCHS``). Each flat key belongs to exactly
one section below; :func:`load_settings` routes keys to sections and rejects unknown ones.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from fedsilo.errors import ConfigError

# The choices of a setting, named so that its command-line option (fedsilo.options) is typed by them too.
Partition = Literal["iid", "none", "label-sorted", "dirichlet"]
Device = Literal["auto", "cpu", "cuda"]
Backend = Literal["auto", "gloo", "nccl"]
UpdatePolicy = Literal["fail", "skip"]
TransferDtype = Literal["float32", "bfloat16"]
Transport = Literal["collective", "tls"]
LocalOptimizer = Literal["sgd", "adamw"]
LrSchedule = Literal["constant", "linear", "cosine"]
HeadInit = Literal["shared", "per-client"]
ServerOptimizer = Literal["fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad"]
Accountant = Literal["rdp", "prv"]
OnExhausted = Literal["stop", "skip"]
Peft = Literal["none", "lora"]
# Server optimisers that scale each weight by its own history (Reddi et al. 2021): their step size
# depends on the task by orders of magnitude, so none is assumed.
ADAPTIVE = frozenset({"fedadam", "fedyogi", "fedadagrad"})


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Section):
    model: str = Field(
        "bert-base-cased",
        description="Hugging Face hub id or local directory of a pretrained model and tokenizer.",
    )
    max_length: int = Field(128, gt=0, description="Truncate texts to this many tokens (paper: 128).")
    attention_mask: bool = Field(
        True,
        description="Feed the attention mask. False reproduces the authors' code, which fed only "
        "input_ids so that padding was attended to.",
    )
    peft: Peft = Field(
        "none",
        description="Parameter-efficient fine-tuning: none trains and sends every weight; lora freezes the "
        "pretrained model and trains, sends and averages only low-rank adapters and the classification "
        "head (docs/peft.md).",
    )
    lora_r: int = Field(8, gt=0, description="Rank of the LoRA adapters (--peft lora).")
    lora_alpha: int = Field(
        16, gt=0, description="LoRA scaling: an adapter's product is multiplied by lora_alpha / lora_r."
    )
    lora_dropout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Dropout on the input of the LoRA adapters (seeded like the model's own dropout); 0, "
        "PEFT's default, saves its random draws: about 14% of LoRA's training time on a 2-thread CPU.",
    )
    lora_target_modules: list[str] | None = Field(
        None,
        description="Names of the linear layers that get LoRA adapters (comma-separated). Default per "
        "family: BERT query,value; DistilBERT q_lin,v_lin; GPT-2 c_attn; Llama, Qwen2/3, Mistral q_proj,v_proj.",
    )

    @field_validator("lora_target_modules", mode="before")
    @classmethod
    def _split_targets(cls, value: Any) -> Any:
        """Accept ``query,value`` from a flag or an environment variable."""
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("lora_target_modules")
    @classmethod
    def _some_targets(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not value:
            raise ValueError("name at least one module, or leave it unset for the model family's default")
        return value


class DataConfig(_Section):
    dataset: str | None = Field(
        None,
        description="Hub id, or a local CSV / JSONL / Parquet file or a directory of them. An "
        "aggregator whose silos use private data (partition none) needs none.",
    )
    test_dataset: str | None = Field(
        None,
        description="Test data (same kinds). Default: the dataset's test split, else a seeded "
        "held-out part of the data.",
    )
    text_column: str = Field("text", description="Column holding the text.")
    label_column: str = Field("label", description="Column holding the label (string or integer).")
    labels: list[str] | None = Field(
        None,
        description="The federation's label set, in order. Default: the sorted labels found in the training data.",
    )
    partition: Partition = Field(
        "iid",
        description="How a shared dataset is split into silo shards: iid (seeded equal shards, as "
        "the paper), label-sorted (contiguous shards of label-sorted data), dirichlet (label "
        "proportions drawn with concentration dirichlet_alpha), or none (each silo trains on "
        "all of its own --dataset).",
    )
    dirichlet_alpha: float = Field(0.5, gt=0, description="Concentration for partition=dirichlet.")
    eval_fraction: float = Field(
        0.1,
        gt=0,
        lt=1,
        description="Fraction held out for testing when no test split or test_dataset exists.",
    )
    max_examples: int | None = Field(None, gt=0, description="Use at most this many training examples (seeded sample).")

    @field_validator("labels", mode="before")
    @classmethod
    def _split_labels(cls, value: Any) -> Any:
        """Accept ``a,b,c`` from a flag or an environment variable."""
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("labels")
    @classmethod
    def _distinct_labels(cls, value: list[str] | None) -> list[str] | None:
        """A repeated label would get a head output that no row ever maps to."""
        if value is not None:
            repeated = sorted({label for label in value if value.count(label) > 1})
            if repeated:
                raise ValueError(f"label(s) listed more than once: {', '.join(repeated)}")
        return value


class TrainConfig(_Section):
    local_epochs: int = Field(2, gt=0, description="Local epochs per round (paper: 2).")
    batch_size: int = Field(32, gt=0, description="Local batch size (paper: 32).")
    lr: float = Field(2e-5, gt=0, description="Local learning rate (paper: 2e-5, plain SGD).")
    optimizer: LocalOptimizer = Field(
        "sgd",
        description="Local optimiser: sgd (plain SGD, the paper's) or adamw. It starts afresh each round: "
        "AdamW's moments are not carried from one round to the next.",
    )
    weight_decay: float = Field(
        0.0,
        ge=0,
        description="Local weight decay: decoupled for adamw, an L2 term in the gradient for sgd.",
    )
    lr_schedule: LrSchedule = Field(
        "constant",
        description="Learning-rate schedule over a silo's steps in the whole federation (rounds x local "
        "epochs x batches), after warmup: constant, linear or cosine decay to 0. Round r continues "
        "where round r-1 ended.",
    )
    warmup_ratio: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Fraction of a silo's steps in the whole federation over which the learning rate "
        "rises linearly from 0.",
    )
    fedprox_mu: float = Field(
        0.0,
        ge=0,
        description="FedProx: add mu/2 ||w - w_global||^2 to the local loss, pulling each silo towards "
        "the round's global model. 0 is FedAvg.",
    )
    head_init: HeadInit = Field(
        "shared",
        description="The classification head before round 1: shared (one seeded head for every silo) or "
        "per-client (each silo draws its own from its seed, as the paper's code did; the pretrained "
        "body stays shared).",
    )
    seed: int = Field(0, ge=0, description="Seed for model initialisation, splits and data order.")
    device: Device = Field("auto", description="Where to train: auto picks cuda when a GPU is visible.")
    eval_batch_size: int = Field(128, gt=0, description="Batch size for evaluation.")
    group_by_length: bool = Field(
        False,
        description="Batch texts of similar length together (less padding, faster; changes the data order).",
    )
    fast_paths: bool = Field(
        True,
        description="Speed-ups that give the same update: sparse embedding gradients, and a "
        "BERT/DistilBERT last layer that computes only the [CLS] position its head reads (dropout "
        "then draws other masks). Turn off to rule them out when debugging.",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute the layers' activations in the backward pass instead of keeping them: "
        "less memory for long texts or large decoders, about a third more compute; the same update.",
    )


class ServerConfig(_Section):
    server_optimizer: ServerOptimizer = Field(
        "fedavg",
        description="How the aggregator applies the averaged update: fedavg (add it), fedavgm (with "
        "momentum), or the adaptive fedadam, fedyogi, fedadagrad (Reddi et al. 2021).",
    )
    server_lr: float | None = Field(
        None,
        gt=0,
        description="Server learning rate applied to the averaged update. Default: 1 for fedavg and "
        "fedavgm; fedadam, fedyogi and fedadagrad need it set.",
    )
    server_momentum: float = Field(0.9, ge=0, lt=1, description="Momentum of fedavgm.")
    server_betas: tuple[float, float] = Field(
        (0.9, 0.99),
        description="beta1,beta2 of the adaptive server optimisers: beta1 for the momentum of the "
        "update, beta2 for fedadam's and fedyogi's second moment.",
    )
    server_tau: float = Field(
        1e-3,
        gt=0,
        description="tau of the adaptive server optimisers: added to sqrt(v), it bounds the step of a "
        "weight whose updates were small (smaller: more adaptive).",
    )

    @field_validator("server_betas", mode="before")
    @classmethod
    def _split_betas(cls, value: Any) -> Any:
        """Accept ``0.9,0.99`` from a flag or an environment variable."""
        if isinstance(value, str):
            return [part.strip() for part in value.split(",")]
        return value

    @field_validator("server_betas")
    @classmethod
    def _betas_below_one(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= beta < 1 for beta in value):
            raise ValueError(f"each beta must be in [0, 1), got {value[0]:g},{value[1]:g}")
        return value

    @property
    def step_size(self) -> float:
        """The server learning rate in force (plain averaging's 1 where none is set)."""
        return 1.0 if self.server_lr is None else self.server_lr


class FederationConfig(_Section):
    silos: int = Field(2, ge=1, description="Number of silos K (the group has K + 1 ranks).")
    rounds: int = Field(10, ge=1, description="Communication rounds.")
    aggregator: str | None = Field(
        None,
        description="HOST:PORT of the aggregator's rendezvous. Default: MASTER_ADDR:MASTER_PORT, else 127.0.0.1:29500.",
    )
    backend: Backend = Field("auto", description="torch.distributed backend: auto is nccl with a GPU, gloo without.")
    join_timeout: float = Field(600.0, gt=0, description="Seconds to wait for all ranks to join.")
    round_timeout: float = Field(
        7200.0,
        gt=0,
        description="Seconds any rank waits in one collective; must cover a silo's local training of one round.",
    )
    token_file: Path | None = Field(None, description="File holding the join token (else FEDSILO_TOKEN; never logged).")
    update_policy: UpdatePolicy = Field(
        "fail",
        description="What to do with a non-finite or outlying update: stop the federation, or "
        "leave that silo out of the round.",
    )
    transfer_dtype: TransferDtype = Field(
        "float32",
        description="dtype of the updates sent to the aggregator: bfloat16 halves the upload; the "
        "global model always travels in float32.",
    )
    norm_factor: float = Field(
        10.0,
        gt=1,
        description="An update whose norm exceeds this factor times the median norm is an outlier.",
    )
    transport: Transport = Field(
        "collective",
        description="How ranks talk: collective (torch.distributed, every rank to every rank, in clear: "
        "one cluster) or tls (each silo dials out to the aggregator's one port over mutually "
        "authenticated TLS 1.3: across organisations).",
    )
    secure_aggregation: bool = Field(
        False,
        description="Pairwise-masked updates (X25519 keys per pair of silos, 64-bit fixed point): the "
        "aggregator learns only the weighted sum of the updates, never one silo's (docs/privacy.md).",
    )
    tls_cert: Path | None = Field(
        None, description="This rank's certificate (PEM), for --transport tls (see `fedsilo certs`)."
    )
    tls_key: Path | None = Field(
        None, description="This rank's private key (PEM), for --transport tls; it never leaves this machine."
    )
    tls_ca: Path | None = Field(
        None, description="The federation CA's certificate (PEM), for --transport tls: peers must chain to it."
    )
    tls_revoked: Path | None = Field(
        None,
        description="Revoked certificates, for --transport tls on the aggregator: a CRL (PEM or DER) or a text "
        "file of serial numbers, one per line.",
    )
    tls_server_name: str | None = Field(
        None,
        description="The name the aggregator's certificate must carry, for --transport tls on a silo. "
        "Default: the host of --aggregator.",
    )

    @field_validator("aggregator")
    @classmethod
    def _host_port(cls, value: str | None) -> str | None:
        if value is not None:
            host, sep, port = value.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"expected HOST:PORT, got {value!r}")
        return value

    @field_validator("secure_aggregation")
    @classmethod
    def _two_silos(cls, value: bool, info: ValidationInfo) -> bool:
        if value and info.data.get("silos", 2) < 2:
            raise ValueError("needs at least 2 silos: the sum of one update is that update")
        return value


class TrackingConfig(_Section):
    tracking_uri: str = Field(
        "sqlite:///mlflow.db", description="MLflow tracking URI (written by the aggregator only)."
    )
    experiment: str = Field("fedsilo", description="MLflow experiment name.")
    register_model: str | None = Field(
        None,
        description="Register each federation's final model in the MLflow Model Registry under this name, as a "
        "new version.",
    )
    log_merged_model: bool = Field(
        False,
        description="Under --peft lora, also log the adapters merged into their base as a full MLflow "
        "transformers model, merged_model (servable alone; what --register-model registers).",
    )
    system_metrics: bool = Field(
        True,
        description="Record this process's CPU, memory, disk and network use (and GPU where visible) as system/ "
        "metrics of the run, every MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL seconds (10).",
    )


class CheckpointConfig(_Section):
    checkpoint_dir: Path = Field(
        Path("checkpoints"),
        description="Where the aggregator writes a checkpoint after every round; a restart with "
        "the same settings resumes from it.",
    )


class PrivacyConfig(_Section):
    dp_epsilon: float | None = Field(
        None,
        gt=0,
        description="Record-level DP-SGD in every silo with this epsilon as each silo's budget. Alone, it sets "
        "the noise so that the last planned round ends at the budget; with --dp-noise-multiplier it is a hard "
        "cap that can end the federation early (docs/privacy.md).",
    )
    dp_delta: float = Field(
        1e-5, gt=0, lt=1, description="delta of (epsilon, delta)-DP; must also be below 1/n on each silo."
    )
    dp_noise_multiplier: float | None = Field(
        None,
        ge=0,
        description="sigma: the Gaussian noise's standard deviation over the clipping norm. Default: "
        "calibrated from --dp-epsilon.",
    )
    dp_max_grad_norm: float = Field(1.0, gt=0, description="C: each example's gradient is clipped to this L2 norm.")
    dp_accountant: Accountant = Field(
        "rdp", description="How the privacy loss is composed: rdp (Renyi DP) or prv (privacy random variables)."
    )
    dp_on_exhausted: OnExhausted = Field(
        "stop",
        description="When a silo's next round would pass its --dp-epsilon: stop ends the federation after the "
        "last round every silo affords; skip lets that silo sit out the rounds left while the others go on "
        "(the federation ends once every budget is spent).",
    )

    @property
    def enabled(self) -> bool:
        return self.dp_epsilon is not None or self.dp_noise_multiplier is not None


SECTIONS: dict[str, type[_Section]] = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "server": ServerConfig,
    "privacy": PrivacyConfig,
    "federation": FederationConfig,
    "tracking": TrackingConfig,
    "checkpoint": CheckpointConfig,
}

# Keys that may differ between ranks: where a rank finds things, not what the federation computes.
LOCAL_KEYS = frozenset(
    {
        "aggregator",
        "backend",
        "device",
        "join_timeout",
        "round_timeout",
        "token_file",
        "tracking_uri",
        "experiment",
        "register_model",
        "log_merged_model",
        "system_metrics",
        "checkpoint_dir",
        "eval_batch_size",
        "tls_cert",
        "tls_key",
        "tls_ca",
        "tls_revoked",
        "tls_server_name",
        # Recomputation replays the forward pass with its random state: the same update, so a silo
        # short of memory may turn it on alone.
        "gradient_checkpointing",
    }
)


# Settings added after federations were first named (checkpoint folders, sweep cells): each is agreed
# only when set away from its default, so a federation or sweep started before it existed keeps its
# name across the upgrade and resumes. Every later setting that changes the result belongs here.
LATER_KEYS = frozenset(
    {
        "optimizer",
        "weight_decay",
        "lr_schedule",
        "warmup_ratio",
        "fedprox_mu",
        "head_init",
        "server_optimizer",
        "server_lr",
        "server_momentum",
        "server_betas",
        "server_tau",
        "secure_aggregation",
        "dp_epsilon",
        "dp_delta",
        "dp_noise_multiplier",
        "dp_max_grad_norm",
        "dp_accountant",
        "dp_on_exhausted",
        "peft",
        "lora_r",
        "lora_alpha",
        "lora_dropout",
        "lora_target_modules",
    }
)


# The settings only --peft lora reads: set without it, they are a mistake that would also rename the federation.
LORA_KEYS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")


class Settings(BaseModel):
    """The resolved configuration of one process."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: ModelConfig = Field(description="The model and its inputs.")
    data: DataConfig = Field(description="Where the data comes from and how it is split.")
    train: TrainConfig = Field(description="Local training.")
    server: ServerConfig = Field(description="The aggregator's optimiser.")
    privacy: PrivacyConfig = Field(description="Differential privacy in the silos.")
    federation: FederationConfig = Field(description="The group and its rounds.")
    tracking: TrackingConfig = Field(description="MLflow.")
    checkpoint: CheckpointConfig = Field(description="Checkpoints and resume.")

    @model_validator(mode="after")
    def _an_adapter_is_not_registered(self) -> Settings:
        lora = self.model.peft == "lora"
        if lora and self.tracking.register_model is not None and not self.tracking.log_merged_model:
            raise PydanticCustomError(
                "lora_not_registered",
                "register_model (--register-model) needs a full model: under --peft lora the run's model is "
                "the LoRA adapter, logged as files for PeftModel.from_pretrained; add log_merged_model "
                "(--log-merged-model) to register the adapters merged into their base (docs/peft.md)",
            )
        if self.tracking.log_merged_model and not lora:
            raise PydanticCustomError(
                "merged_needs_lora",
                "log_merged_model (--log-merged-model) merges LoRA adapters: add peft lora (--peft lora); "
                "a full fine-tuning run's model is already whole",
            )
        return self

    @model_validator(mode="after")
    def _skip_needs_a_budget(self) -> Settings:
        # Here, not on PrivacyConfig: a flag is checked alone in its section (parse_setting).
        privacy = self.privacy
        if privacy.dp_on_exhausted == "skip" and privacy.dp_epsilon is None:
            raise PydanticCustomError(
                "skip_needs_budget",
                "dp_on_exhausted skip (--dp-on-exhausted) needs a budget: add dp_epsilon (--dp-epsilon)",
            )
        return self

    @model_validator(mode="after")
    def _adaptive_needs_a_step_size(self) -> Settings:
        # Here, not on ServerConfig: a flag is checked alone in its section (parse_setting), where
        # --server-optimizer fedadam would not yet see the --server-lr beside it.
        server = self.server
        if server.server_optimizer in ADAPTIVE and server.server_lr is None:
            raise PydanticCustomError(
                "server_lr_required",
                f"server_optimizer {server.server_optimizer} needs server_lr (--server-lr): an adaptive "
                "server optimiser has no default step size",
            )
        return self

    @model_validator(mode="after")
    def _lora_settings_need_lora(self) -> Settings:
        model = self.model
        if model.peft == "none":
            fields = ModelConfig.model_fields
            stray = [k for k in LORA_KEYS if getattr(model, k) != fields[k].default]
            if stray:
                raise PydanticCustomError(
                    "lora_without_peft",
                    f"{', '.join(stray)} set{'s' if len(stray) == 1 else ''} LoRA's adapters: add peft lora (--peft lora)",
                )
        return self

    def flat(self) -> dict[str, Any]:
        """All settings as one flat mapping, the shape users write and MLflow records."""
        out: dict[str, Any] = {}
        for name in SECTIONS:
            out.update(getattr(self, name).model_dump(mode="json"))
        return out

    def replace(self, **changes: Any) -> Settings:
        """A copy with some flat keys changed (validated like user input)."""
        return build_settings({**self.flat(), **changes})


def _key_to_section() -> dict[str, str]:
    return {key: name for name, section in SECTIONS.items() for key in section.model_fields}


def build_settings(flat: dict[str, Any]) -> Settings:
    """Route flat keys to their sections and validate; errors name the offending key."""
    routes = _key_to_section()
    unknown = sorted(set(flat) - set(routes))
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(unknown)} (known: {', '.join(sorted(routes))})")
    grouped: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    for key, value in flat.items():
        grouped[routes[key]][key] = value
    try:
        return Settings.model_validate({name: SECTIONS[name](**values) for name, values in grouped.items()})
    except ValidationError as exc:
        raise _invalid(exc) from None


def parse_setting(key: str, value: Any) -> Any:
    """One setting's value from a flag or a ``FEDSILO_*`` variable, checked by its own field (type,
    bounds, validators) as the same value in YAML would be, so that it fails with the same line."""
    section = SECTIONS[_key_to_section()[key]]
    try:
        return getattr(section(**{key: value}), key)
    except ValidationError as exc:
        raise _invalid(exc) from None


def _invalid(exc: ValidationError) -> ConfigError:
    """The first validation error as one line naming the setting and quoting the value."""
    first = exc.errors()[0]
    if not first["loc"]:  # a check across sections (Settings' own validators)
        return ConfigError(f"invalid settings: {first['msg']}")
    key = ".".join(str(part) for part in first["loc"]) or "settings"
    value = first.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    return ConfigError(f"invalid setting '{key}': {first['msg']}{shown}")


def read_yaml_mapping(path: Path, what: str, holds: str = "settings") -> dict[str, Any]:
    """A YAML file holding one mapping (empty when the file is), with keys' dashes as underscores;
    ``what`` names the file in errors ("config file", "sweep file") and ``holds`` its contents."""
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{what} not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{what} {path} is not valid YAML{where}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{what} {path} must hold a mapping of {holds}, not {type(loaded).__name__}")
    return {str(k).replace("-", "_"): v for k, v in loaded.items()}


def read_config_file(path: Path) -> dict[str, Any]:
    """Read a flat YAML mapping of settings."""
    return read_yaml_mapping(path, "config file")


def load_settings(config_file: Path | None, overrides: dict[str, Any]) -> Settings:
    """File values first, then flags and environment variables (``overrides``) on top."""
    flat = read_config_file(config_file) if config_file else {}
    flat.update({k: v for k, v in overrides.items() if v is not None})
    return build_settings(flat)


# -- the federation's identity --------------------------------------------------------------------


def fingerprint(blob: str | bytes) -> str:
    """A short stable name for ``blob``: 16 hex digits of its SHA-256 (64 bits: no accidental
    collisions among the runs, cells and models one consortium will ever have)."""
    data = blob.encode() if isinstance(blob, str) else blob
    return hashlib.sha256(data).hexdigest()[:16]


def agreed_settings(settings: Settings) -> dict[str, Any]:
    """The settings every rank must share; with private data (partition none) the data paths may
    differ, and a later setting at its default is left out (:data:`LATER_KEYS`)."""
    private = {"dataset", "test_dataset"} if settings.data.partition == "none" else set()
    defaults = build_settings({}).flat()
    return {
        k: v
        for k, v in settings.flat().items()
        if k not in LOCAL_KEYS | private and not (k in LATER_KEYS and v == defaults[k])
    }


def settings_fingerprint(settings: Settings) -> str:
    """Names a federation: equal on every rank of it, different when anything it computes differs."""
    return fingerprint(json.dumps(agreed_settings(settings), sort_keys=True))
