"""--peft lora and decoder classifiers: what is trained, what travels, what is saved, and the lines
a bad combination gets. Real models (tiny, random-init, from their configs) and real processes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from fedsilo import checkpoint
from fedsilo import simulate as sim
from fedsilo.cli import app
from fedsilo.config import Settings, agreed_settings, build_settings, settings_fingerprint
from fedsilo.data import Encoded, collate, encode
from fedsilo.errors import EX_CONFIG, ConfigError
from fedsilo.last_layer import cls_only_last_layer
from fedsilo.launcher import free_port
from fedsilo.model import (
    architecture_fingerprint,
    base_fingerprint,
    bind_flat,
    build_classifier,
    draw_head,
    flat_size,
    float_tensors,
    load_tokenizer,
)
from fedsilo.train import local_train
from tests.procs import final_weights, finish, run, start
from tests.tiny import DECODERS, make_tiny_model, sentiment_rows, write_csv

TRAIN = {"batch_size": 16, "lr": 0.3, "local_epochs": 1, "seed": 3}
TRAIN_FLAGS = ["--batch-size", "16", "--lr", "0.3", "--local-epochs", "1", "--seed", "3"]
LABELS = ["neg", "pos"]


def settings_for(work: Path, model: Path, data: Path, **changes: Any) -> Settings:
    return build_settings(
        {
            "model": str(model),
            "dataset": str(data),
            "silos": 2,
            "rounds": 2,
            **TRAIN,
            "tracking_uri": f"sqlite:///{work}/mlflow.db",
            "checkpoint_dir": str(work / "ckpt"),
            **changes,
        }
    )


def lora_model(path: Path, **changes: Any) -> torch.nn.Module:
    settings = build_settings({"model": str(path), "peft": "lora", "seed": 3, **changes})
    return build_classifier(settings, LABELS, load_tokenizer(str(path)))


def lora_free(path: Path) -> torch.nn.Module:
    return build_classifier(build_settings({"model": str(path), "seed": 3}), LABELS, load_tokenizer(str(path)))


def frozen_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: make_tiny_model(root / arch, arch) for arch in ("bert", "distilbert", *DECODERS)}


# -- what LoRA trains and binds ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "arch, targets, head",
    [
        ("bert", {"query", "value"}, {"classifier"}),
        ("distilbert", {"q_lin", "v_lin"}, {"pre_classifier", "classifier"}),
        ("gpt2", {"c_attn"}, {"score"}),
        ("llama", {"q_proj", "v_proj"}, {"score"}),
        ("qwen2", {"q_proj", "v_proj"}, {"score"}),
        ("qwen3", {"q_proj", "v_proj"}, {"score"}),
        ("mistral", {"q_proj", "v_proj"}, {"score"}),
    ],
)
def test_lora_trains_the_familys_default_targets_and_the_whole_head(arch, targets, head, tiny_models) -> None:
    # Prepare, Execute
    model = lora_model(tiny_models[arch])
    # Assert: every layer of every block has adapters on the default targets, nothing else does
    adapted = {n.split(".lora_A.")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if ".lora_A." in n}
    assert adapted == targets
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(".lora_" in n or any(f".{h}.modules_to_save." in n for h in head) for n in trainable), trainable
    assert {h for h in head if any(f".{h}.modules_to_save." in n for n in trainable)} == head
    # the flat vector is the trainable tensors, nothing frozen
    assert flat_size(model) == sum(p.numel() for p in model.parameters() if p.requires_grad)
    flat = bind_flat(model)
    assert flat.numel() == flat_size(model) < sum(p.numel() for p in model.parameters()) / 2


def few_texts(path: Path, times: int) -> Encoded:
    texts = ["the film was great", "a dull plot", "really superb acting", "stale and weak"] * times
    return encode(texts, np.array([1, 0, 1, 0] * times), load_tokenizer(str(path)), 32)


def test_training_leaves_the_frozen_base_as_it_was(tiny_models) -> None:
    # Prepare
    model = lora_model(tiny_models["bert"])
    data = few_texts(tiny_models["bert"], 8)
    before, base, flat = frozen_state(model), base_fingerprint(model), bind_flat(model)
    start = flat.clone()
    # Execute
    local_train(model, data, epochs=2, batch_size=8, lr=0.5, seed=(0, 1, 1))
    # Assert: the adapters and head moved, in the flat vector; no frozen weight did
    assert (flat - start).abs().max() > 1e-4
    after = frozen_state(model)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert base_fingerprint(model) == base


def test_a_per_client_head_is_drawn_into_the_trained_copy(tiny_models) -> None:
    # Prepare: two clients' LoRA models from the same seed
    first, second = lora_model(tiny_models["distilbert"]), lora_model(tiny_models["distilbert"])
    frozen, base = frozen_state(first), base_fingerprint(first)
    # Execute: --head-init per-client draws each client's head
    draw_head(first, (3, 1))
    draw_head(second, (3, 2))
    # Assert: the trained heads differ, in the flat vector; PEFT's frozen originals are untouched
    trained = [n for n, p in first.named_parameters() if p.requires_grad and ".modules_to_save." in n]
    assert {n.split(".modules_to_save.")[0].rsplit(".", 1)[-1] for n in trained} == {"pre_classifier", "classifier"}
    assert not torch.equal(bind_flat(first), bind_flat(second))
    assert all(torch.equal(frozen[n], p) for n, p in first.named_parameters() if n in frozen)
    assert base_fingerprint(first) == base


def test_a_silo_on_other_pretrained_weights_has_another_fingerprint(tiny_models, tmp_path) -> None:
    # The same architecture, another seed's random weights: full fine-tuning would overwrite them with
    # the global model, LoRA never sends them, so they must be told apart at join
    other = make_tiny_model(tmp_path / "other", "bert")
    mine, theirs = lora_model(tiny_models["bert"]), lora_model(other)
    assert architecture_fingerprint(mine) != architecture_fingerprint(theirs)
    assert architecture_fingerprint(mine) == architecture_fingerprint(lora_model(tiny_models["bert"]))
    plain = build_settings({"model": str(other), "seed": 3})
    full = [build_classifier(plain, LABELS, load_tokenizer(str(p))) for p in (tiny_models["bert"], other)]
    assert architecture_fingerprint(full[0]) == architecture_fingerprint(full[1])


@pytest.mark.parametrize("arch", ["bert", "distilbert"])
def test_the_cls_only_last_layer_computes_through_the_adapters(arch, tiny_models) -> None:
    # Prepare: adapters that change the output (B is zero until trained)
    model = lora_model(tiny_models[arch]).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.5)
    batch = collate(few_texts(tiny_models[arch], 1), np.arange(4), attention_mask=True)
    with torch.no_grad():
        # Execute
        full = model(**batch)
        with cls_only_last_layer(model) as applied:
            fast = model(**batch)
        with model.disable_adapter():
            without = model(**batch)
    # Assert: the fast path ran, through the adapters
    assert applied
    assert torch.allclose(fast.logits, full.logits, atol=1e-7)
    assert not torch.allclose(without.logits, full.logits, atol=1e-5)  # the tiny heads shrink differences


# -- decoders ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", DECODERS)
def test_a_decoder_classifies_a_right_padded_batch_as_each_text_alone(arch, tiny_models) -> None:
    # Prepare: the tokenizer has no padding token of its own: it pads with end-of-sequence
    path = tiny_models[arch]
    tokenizer = load_tokenizer(str(path))
    assert tokenizer.pad_token == tokenizer.eos_token
    model = build_classifier(build_settings({"model": str(path)}), LABELS, tokenizer).eval()
    assert model.config.pad_token_id == tokenizer.pad_token_id
    texts = ["the film was a really great story", "dull", "the cast was superb"]
    data = encode(texts, np.zeros(3, dtype=np.int64), tokenizer, 64)
    # Execute
    with torch.no_grad():
        batch = collate(data, np.arange(3), attention_mask=True)
        assert (batch["input_ids"][1, -1] == tokenizer.pad_token_id).item()  # padded on the right
        together = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        alone = [
            model(**{k: v for k, v in collate(data, np.array([i]), True).items() if k != "labels"}).logits
            for i in range(3)
        ]
    # Assert: the head read each text's last token, not a padding position
    assert torch.allclose(together, torch.cat(alone), atol=1e-5)


@pytest.mark.parametrize("arch", DECODERS)
def test_each_decoder_family_federates_a_round_in_simulation(arch, tiny_models, sentiment_csv, tmp_path) -> None:
    outcome = sim.simulate(settings_for(tmp_path, tiny_models[arch], sentiment_csv, rounds=1), lambda _: None)
    initial = torch.cat([t.detach().reshape(-1) for t in float_tensors(lora_free(tiny_models[arch]))])
    assert outcome.weights.shape == initial.shape and (outcome.weights - initial).abs().max() > 1e-4


def test_gradient_checkpointing_gives_the_same_update(tiny_models) -> None:
    # Prepare: a decoder with LoRA, trained once plainly and once recomputing its activations
    path = tiny_models["llama"]
    data = few_texts(path, 4)
    flats = []
    for checkpointing in (False, True):
        model = lora_model(path, gradient_checkpointing=checkpointing, lora_dropout=0.1)
        assert model.is_activation_checkpointing == checkpointing
        flat = bind_flat(model)
        # Execute
        local_train(model, data, epochs=1, batch_size=4, lr=0.5, seed=(0, 1, 1))
        flats.append(flat)
    # Assert
    assert torch.allclose(flats[0], flats[1], atol=1e-6)


# -- the federation: simulate == run, the wire, the artifact ---------------------------------------------
@pytest.fixture(scope="module")
def lora_federation(tmp_path_factory, tiny_models, sentiment_csv) -> dict[str, Any]:
    """The same LoRA federation of the tiny BERT, simulated and as `fedsilo run` (three processes),
    with dropout on the adapters: its draws must be seeded alike in both."""
    work = tmp_path_factory.mktemp("lora")
    (work / "run").mkdir()
    settings = settings_for(work / "sim", tiny_models["bert"], sentiment_csv, peft="lora", lora_dropout=0.05)
    outcome = sim.simulate(settings, lambda _: None)
    result = run(
        "run",
        "--silos",
        "2",
        "--rounds",
        "2",
        "--model",
        str(tiny_models["bert"]),
        "--dataset",
        str(sentiment_csv),
        *TRAIN_FLAGS,
        "--peft",
        "lora",
        "--lora-dropout",
        "0.05",
        "--checkpoint-dir",
        "ckpt",
        cwd=work / "run",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return {"work": work, "simulated": outcome, "distributed": final_weights(work / "run" / "ckpt")}


def test_lora_run_and_simulate_reach_the_same_adapters(lora_federation, tiny_models) -> None:
    simulated, distributed = lora_federation["simulated"].weights, lora_federation["distributed"]
    initial = torch.cat([t.detach().reshape(-1) for t in float_tensors(lora_model(tiny_models["bert"]))])
    assert simulated.shape == distributed.shape == initial.shape
    assert (simulated - distributed).abs().max() <= 1e-6
    assert (simulated - initial).abs().max() > 1e-3  # it did train


@pytest.mark.slow  # real processes; each family federates in simulate in the default run
def test_a_decoder_federates_with_lora_as_fedsilo_run(tiny_models, sentiment_csv, tmp_path) -> None:
    # Prepare, Execute: GPT-2 (its attention is one Conv1D) with LoRA, one round, in process and as processes
    path = tiny_models["gpt2"]
    simulated = sim.simulate(settings_for(tmp_path / "sim", path, sentiment_csv, peft="lora", rounds=1), lambda _: None)
    result = run(
        "run",
        *("--silos", "2", "--rounds", "1", "--model", str(path), "--dataset", str(sentiment_csv)),
        *TRAIN_FLAGS,
        *("--peft", "lora", "--checkpoint-dir", "ckpt"),
        cwd=tmp_path,
    )
    # Assert
    assert result.returncode == 0, result.stdout + result.stderr
    assert (simulated.weights - final_weights(tmp_path / "ckpt")).abs().max() <= 1e-6


def test_only_the_adapters_and_head_travel(lora_federation, tiny_models) -> None:
    # megabytes_per_silo_round: the global model down and the update up, both float32, of the flat vector
    client = MlflowClient(tracking_uri=f"sqlite:///{lora_federation['work']}/run/mlflow.db")
    (found,) = client.search_runs([client.get_experiment_by_name("fedsilo").experiment_id])
    trainable = flat_size(lora_model(tiny_models["bert"]))
    full = flat_size(lora_free(tiny_models["bert"]))
    assert float(found.data.params["megabytes_per_silo_round"]) == pytest.approx(trainable * 8 / 1e6, abs=1e-3)
    assert trainable * 8 < full * 8 / 10
    assert found.data.params["peft"] == "lora"


def test_the_artifact_is_the_adapter_and_loads_onto_its_base(lora_federation, tiny_models) -> None:
    # Prepare: the run's model artifact
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    work = lora_federation["work"] / "run"
    client = MlflowClient(tracking_uri=f"sqlite:///{work}/mlflow.db")
    (found,) = client.search_runs([client.get_experiment_by_name("fedsilo").experiment_id])
    adapter = Path(client.download_artifacts(found.info.run_id, "model", str(work / "dl")))
    assert (adapter / "adapter_config.json").exists() and (adapter / "adapter_model.safetensors").exists()
    assert not (adapter / "model.safetensors").exists()  # the base is not copied
    # Execute: load it as a user would, onto the base named in adapter_config.json
    base_path = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base_path == str(tiny_models["bert"])
    base = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=2)
    loaded = PeftModel.from_pretrained(base, adapter).eval()
    # Assert: the federation's final adapters and head, on the same frozen weights
    ours = lora_model(tiny_models["bert"])
    flat = bind_flat(ours)
    flat.copy_(lora_federation["distributed"])
    ours.eval()
    tokenizer = load_tokenizer(str(adapter))
    batch = tokenizer(["the film was great", "a dull and stale plot"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.allclose(loaded(**batch).logits, ours(**batch).logits, atol=1e-5)


def test_a_merged_model_is_logged_beside_the_adapter_and_registered(tiny_models, sentiment_csv, tmp_path) -> None:
    # Execute: a LoRA simulation that also logs (and registers) the adapters merged into their base
    import mlflow
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    settings = settings_for(
        tmp_path,
        tiny_models["bert"],
        sentiment_csv,
        peft="lora",
        rounds=1,
        log_merged_model=True,
        register_model="notes",
    )
    lines: list[str] = []
    outcome = sim.simulate(settings, lines.append)
    # Assert: the adapter is still the run's model; merged_model is a full pipeline, the registered one
    client = MlflowClient(tracking_uri=settings.tracking.tracking_uri)
    adapter = Path(client.download_artifacts(outcome.run_id, "model", str(tmp_path / "a")))
    assert (adapter / "adapter_config.json").exists()
    (version,) = client.search_model_versions("name='notes'")
    assert version.run_id == outcome.run_id
    assert client.get_logged_model(version.source.removeprefix("models:/")).name == "merged_model"
    assert "registered the model as notes version 1" in lines
    mlflow.set_tracking_uri(settings.tracking.tracking_uri)
    pipeline = mlflow.transformers.load_model(f"runs:/{outcome.run_id}/merged_model")
    # the merged model computes what the base with the adapters computes
    base = AutoModelForSequenceClassification.from_pretrained(str(tiny_models["bert"]), num_labels=2)
    with_adapter = PeftModel.from_pretrained(base, adapter).eval()
    tokenizer = load_tokenizer(str(adapter))
    batch = tokenizer(["the film was great", "a dull and stale plot"], return_tensors="pt", padding=True)
    with torch.no_grad():
        merged = pipeline.model.eval()(**batch).logits
        assert torch.allclose(merged, with_adapter(**batch).logits, atol=1e-5)
    assert not any(
        isinstance(m, torch.nn.Module) and "lora" in type(m).__name__.lower() for m in pipeline.model.modules()
    )


def test_dp_sgd_on_the_adapters_federates_and_spends_its_budget(tiny_models, sentiment_csv, tmp_path) -> None:
    # Execute: DP-SGD with LoRA, calibrated to epsilon 8 over 2 rounds
    settings = settings_for(tmp_path, tiny_models["bert"], sentiment_csv, peft="lora", dp_epsilon=8.0, dp_delta=1e-3)
    outcome = sim.simulate(settings, lambda _: None)
    # Assert: each client's epsilon reaches the budget by the last round and not beyond; adapters moved
    client = MlflowClient(tracking_uri=settings.tracking.tracking_uri)
    spent = [m.value for m in client.get_metric_history(outcome.run_id, "dp_epsilon_max")]
    assert len(spent) == 2 and spent[0] < spent[1] <= 8.0 * (1 + 1e-6) and spent[1] > 7.5
    initial = torch.cat([t.detach().reshape(-1) for t in float_tensors(lora_model(tiny_models["bert"]))])
    assert outcome.weights.shape == initial.shape and (outcome.weights - initial).abs().max() > 1e-4


# -- bad combinations: one line each -------------------------------------------------------------------
def one_error_line(args: list[str]) -> str:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == EX_CONFIG, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedsilo: error: "), result.output
    return lines[0]


def test_lora_target_modules_the_model_lacks_are_named(tiny_models, sentiment_csv, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    line = one_error_line(
        [
            "simulate",
            "--model",
            str(tiny_models["bert"]),
            "--dataset",
            str(sentiment_csv),
            "--peft",
            "lora",
            "--lora-target-modules",
            "query,q_proj",
        ]
    )
    assert "lora_target_modules" in line and "no module named q_proj" in line and "query" in line


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--lora-r", "16"], "lora_r sets LoRA's adapters: add peft lora (--peft lora)"),
        (["--peft", "lora", "--lora-target-modules", ","], "invalid setting 'lora_target_modules'"),
    ],
    ids=["lora-without-peft", "no-targets"],
)
def test_settings_that_do_not_go_together(flags, expected, sentiment_csv, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert expected in one_error_line(["simulate", "--dataset", str(sentiment_csv), *flags])


def test_lora_refuses_a_full_fine_tuning_checkpoint(tiny_models, sentiment_csv, tmp_path) -> None:
    # Prepare: a full fine-tuning federation's checkpoint where the LoRA federation would look for its own
    full = settings_for(tmp_path, tiny_models["bert"], sentiment_csv, rounds=1)
    lora = full.replace(peft="lora", rounds=2)
    sim.simulate(full, lambda _: None)
    written = checkpoint.load(tmp_path / "ckpt", sim.simulation_key(full))
    assert written is not None
    key = sim.simulation_key(lora)
    checkpoint.save(tmp_path / "ckpt", checkpoint.Checkpoint(1, written.weights, written.run_id, LABELS, key))
    # Execute, Assert
    with pytest.raises(ConfigError, match="written by a full fine-tuning run"):
        sim.simulate(lora, lambda _: None)
    assert settings_fingerprint(lora) != settings_fingerprint(full)


def test_lora_names_another_federation_and_checkpointing_does_not() -> None:
    # Prepare: a federation as it was named before these settings existed
    before = build_settings({"dataset": "x.csv"})
    # Execute, Assert: at their defaults they leave the name alone; LoRA is another federation; the
    # recomputation of activations is a rank's own choice (it gives the same update)
    assert not {"peft", "lora_r", "gradient_checkpointing"} & set(agreed_settings(before))
    assert settings_fingerprint(before.replace(peft="lora")) != settings_fingerprint(before)
    assert settings_fingerprint(before.replace(peft="lora", lora_r=4)) != settings_fingerprint(
        before.replace(peft="lora")
    )
    assert settings_fingerprint(before.replace(gradient_checkpointing=True)) == settings_fingerprint(before)


@pytest.mark.slow  # real processes; the base fingerprint itself is checked in the default run
def test_a_silo_with_other_pretrained_weights_is_refused_at_join(tiny_models, tmp_path) -> None:
    # Prepare: every rank names its model ./model, as each organisation holds its own copy; silo 2's
    # copy has other weights of the same shapes. The settings agree, the architectures agree.
    homes = {rank: tmp_path / f"rank{rank}" for rank in (0, 1, 2)}
    for rank, home in homes.items():
        home.mkdir()
        if rank == 2:
            make_tiny_model(home / "model", "bert")
        else:
            (home / "model").symlink_to(tiny_models["bert"])
        write_csv(home / "data.csv", sentiment_rows(60, seed=rank))
    port = free_port()
    shared = ["--silos", "2", "--rounds", "1", "--model", "model", "--partition", "none", "--peft", "lora"]
    shared += ["--aggregator", f"127.0.0.1:{port}", "--join-timeout", "120", *TRAIN_FLAGS]
    # Execute
    aggregator = start("aggregator", *shared, cwd=homes[0], FEDSILO_TOKEN="t0ken")
    silos = [
        start("silo", "--rank", str(r), "--dataset", "data.csv", *shared, cwd=homes[r], FEDSILO_TOKEN="t0ken")
        for r in (1, 2)
    ]
    (agg_code, agg_out), *silo_results = [finish(p) for p in [aggregator, *silos]]
    # Assert: the aggregator names the silo and why; no round ran
    assert agg_code == EX_CONFIG, agg_out
    assert (
        "silo(s) [2] built a different model from the aggregator's (model) (with --peft lora, the same pretrained weights too)"
        in agg_out
    )
    assert all(code == EX_CONFIG for code, _ in silo_results), silo_results
    assert "round 1/1" not in agg_out


def test_registering_an_adapter_is_one_line(tiny_models, sentiment_csv, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    line = one_error_line(
        ["simulate", "--model", str(tiny_models["bert"]), "--dataset", str(sentiment_csv), "--peft", "lora",
         "--register-model", "clinic-notes"]
    )  # fmt: skip
    assert "register_model" in line and "LoRA adapter" in line and "--log-merged-model" in line


def test_a_merged_model_without_lora_is_one_line(tiny_models, sentiment_csv, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    line = one_error_line(
        ["simulate", "--model", str(tiny_models["bert"]), "--dataset", str(sentiment_csv), "--log-merged-model"]
    )
    assert "log_merged_model (--log-merged-model) merges LoRA adapters: add peft lora" in line
