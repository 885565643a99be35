"""scripts/prepare_data.py: the MiniLM remapped to the DistilBERT architecture is the same encoder."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import torch
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from tests.tiny import MINILM

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "prepare_data.py"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("prepare_data", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_minilm_as_distilbert_gives_the_bert_hidden_states(tmp_path: Path) -> None:
    # Prepare: the remapped copy, and two sentences of different lengths (so one is padded)
    out = load_script().minilm_distilbert(tmp_path / "minilm-distilbert")
    tokenizer = AutoTokenizer.from_pretrained(out)
    batch = tokenizer(["A gripping, beautifully shot film about grief.", "Dull."], padding=True, return_tensors="pt")
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    # Execute: both encoders in eval mode (no dropout), as fedsilo feeds them (no token types)
    bert = AutoModel.from_pretrained(MINILM).eval()
    distilbert = AutoModel.from_pretrained(out).eval()
    with torch.no_grad():
        expected = bert(**inputs).last_hidden_state
        got = distilbert(**inputs).last_hidden_state

    # Assert: DistilBERT architecture, same shape of encoder, same outputs on real tokens
    assert type(distilbert).__name__ == "DistilBertModel"
    assert distilbert.config.dim == 384 and distilbert.config.n_layers == 6
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-4)
    # and fedsilo's classifier loads from it (its pre_classifier and classifier are new)
    classifier = AutoModelForSequenceClassification.from_pretrained(out, num_labels=3)
    assert type(classifier).__name__ == "DistilBertForSequenceClassification"
