"""Example inputs that follow what a model really takes, for models built without data.

Tracing (the dependency graph), MAC counting, forward checks and ONNX export all need one input
batch. Most models take float images; a language model takes integer token ids, and a float
tensor there fails inside the embedding ("Expected tensor for argument #1 'indices' to have one
of the following scalar types: Long, Int"). The kind of input is read from the model itself:

- a Hugging Face model says it: ``model.main_input_name`` (``input_ids`` for BERT,
  ``pixel_values`` for ViT) and, for ids, ``model.config.vocab_size``;
- otherwise a model whose first parameterised layer (definition order) is an ``nn.Embedding``
  takes ids below its ``num_embeddings``;
- anything else takes standard-normal floats.

Token ids are drawn uniformly below the vocabulary size (valid for every embedding table); the
attention mask is left to the model's default (all tokens attended), which is what a batch
without padding means.
"""
from __future__ import annotations

import torch
from torch import nn

ID_INPUT_NAMES = frozenset({"input_ids", "decoder_input_ids", "input_features_ids"})


def token_vocabulary(model: nn.Module) -> int | None:
    """The number of token ids the model accepts when its main input is token ids, else None."""
    name = getattr(model, "main_input_name", None)
    config = getattr(model, "config", None)
    if isinstance(name, str):
        if name not in ID_INPUT_NAMES:
            return None
        vocab = getattr(config, "vocab_size", None)
        if isinstance(vocab, int) and vocab > 0:
            return vocab
    for module in model.modules():
        if next(module.parameters(recurse=False), None) is None:
            continue
        return module.num_embeddings if isinstance(module, nn.Embedding) else None
    return None


def example_input(model: nn.Module, input_shape, batch: int = 1, *, seed: int | None = 0,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """A ``(batch, *input_shape)`` tensor of the kind ``model`` takes (module docstring); the same
    values for the same ``seed`` (``None``: the global generator)."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    shape = (batch, *tuple(input_shape))
    vocab = token_vocabulary(model)
    if vocab is not None:
        return torch.randint(0, vocab, shape, generator=gen).to(device)
    return torch.randn(shape, generator=gen).to(device)


def is_token_input(x: torch.Tensor) -> bool:
    return not torch.is_floating_point(x)
