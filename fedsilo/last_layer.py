"""A BERT or DistilBERT classifier's last encoder layer, computed for the one position its head reads.

``BertForSequenceClassification`` (through its pooler) and ``DistilBertForSequenceClassification``
classify from the [CLS] position of the last layer's output, nothing else. That layer still needs
the keys and values of every position, but its query, attention output, feed-forward block and
layer norms only at [CLS]: for every other position they are 10/12 of the layer's matrix products
(and its dropout masks) spent on values nobody reads. In MiniLM (6 layers) that is ~11 % of a
training step; in bert-base-cased or distilbert-base-cased, 1/12 or 1/6 of the layers' work.

While :func:`cls_only_last_layer` is active, the last layer of a model recognised here does the
same arithmetic at [CLS] and nothing else, so the loss, logits and every gradient are the full
model's to float rounding. Dropout draws fewer random numbers, so its masks differ from the full
model's for the same seed (they are as random). A model not recognised (ALBERT, whose layers share
one module; a decoder; a chunked feed-forward) is left alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from fedsilo.model import unwrapped

LayerForward = Callable[..., torch.Tensor]


def _attend_from_cls(
    attention: Any,
    query: Any,
    key: Any,
    value: Any,
    heads: int,
    eager: Callable[..., Any],
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None,
) -> torch.Tensor:
    """Self-attention with [CLS] as the only query: ``(batch, 1, hidden)``, before the output projection.
    ``eager`` is the model's own attention function for ``attn_implementation="eager"``."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    batch, length, _ = hidden_states.shape
    size = hidden_states.shape[-1] // heads
    q = query(hidden_states[:, :1]).view(batch, 1, heads, size).transpose(1, 2)
    k = key(hidden_states).view(batch, length, heads, size).transpose(1, 2)
    v = value(hidden_states).view(batch, length, heads, size).transpose(1, 2)
    if attention_mask is not None and attention_mask.dim() == 4:
        attention_mask = attention_mask[:, :, :1]  # the [CLS] query's row: which keys it may see
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(attention.config._attn_implementation, eager)
    context, _ = interface(
        attention,
        q,
        k,
        v,
        attention_mask,
        dropout=attention.dropout.p if attention.training else 0.0,
        scaling=attention.scaling,
    )
    return context.reshape(batch, 1, -1)


def _bert_forward(layer: Any) -> LayerForward:
    """``BertLayer.forward`` at [CLS] (attention, ``BertSelfOutput``, ``BertIntermediate``, ``BertOutput``)."""
    from transformers.models.bert.modeling_bert import eager_attention_forward

    attention = layer.attention.self

    # An encoder (no decoder, no cross-attention: see _last_layer) gets no encoder states or cache.
    def forward(
        hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, *_: Any, **__: Any
    ) -> torch.Tensor:
        context = _attend_from_cls(
            attention,
            attention.query,
            attention.key,
            attention.value,
            attention.num_attention_heads,
            eager_attention_forward,
            hidden_states,
            attention_mask,
        )
        attended = layer.attention.output(context, hidden_states[:, :1])
        return layer.output(layer.intermediate(attended), attended)

    return forward


def _distilbert_forward(layer: Any) -> LayerForward:
    """``TransformerBlock.forward`` at [CLS] (attention, ``sa_layer_norm``, ``FFN``, ``output_layer_norm``)."""
    from transformers.models.distilbert.modeling_distilbert import eager_attention_forward

    attention = layer.attention

    def forward(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **__: Any) -> torch.Tensor:
        context = _attend_from_cls(
            attention,
            attention.q_lin,
            attention.k_lin,
            attention.v_lin,
            attention.n_heads,
            eager_attention_forward,
            hidden_states,
            attention_mask,
        )
        attended = layer.sa_layer_norm(attention.out_lin(context) + hidden_states[:, :1])
        return layer.output_layer_norm(layer.ffn(attended) + attended)

    return forward


def _last_layer(model: torch.nn.Module) -> tuple[torch.nn.Module, LayerForward] | None:
    """The last layer of a recognised classifier and its [CLS]-only forward, or None.

    A LoRA model (PEFT) is recognised by the classifier inside it: its adapters replace the
    attention's projection modules, which the [CLS]-only forward calls as modules.
    """
    from transformers.models.bert import modeling_bert as bert
    from transformers.models.distilbert import modeling_distilbert as distilbert

    model = unwrapped(model)
    config = getattr(model, "config", None)
    # A decoder, cross-attention or a chunked feed-forward would take code paths this module
    # does not reproduce; flash or flex attention kernels might not take a one-row query.
    if (
        config is None
        or getattr(config, "is_decoder", False)
        or getattr(config, "add_cross_attention", False)
        or config.chunk_size_feed_forward
        or config._attn_implementation not in ("sdpa", "eager")
    ):
        return None
    if type(model) is bert.BertForSequenceClassification and model.bert.pooler is not None:
        layer = model.bert.encoder.layer[-1]
        if type(layer) is bert.BertLayer and type(layer.attention.self) is bert.BertSelfAttention:
            return layer, _bert_forward(layer)
    if type(model) is distilbert.DistilBertForSequenceClassification:
        layer = model.distilbert.transformer.layer[-1]
        if type(layer) is distilbert.TransformerBlock and type(layer.attention) is distilbert.DistilBertSelfAttention:
            return layer, _distilbert_forward(layer)
    return None


@contextlib.contextmanager
def cls_only_last_layer(model: torch.nn.Module) -> Iterator[bool]:
    """Within the block, ``model``'s last layer computes [CLS] only; yields whether it applied."""
    found = _last_layer(model)
    if found is None:
        yield False
        return
    layer, forward = found
    layer.forward = forward  # an instance attribute: nn.Module.__call__ finds it first
    try:
        yield True
    finally:
        del layer.forward
