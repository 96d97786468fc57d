"""One pipeline stage of a Hugging Face causal LM: a contiguous slice of its decoder layers.

The model keeps its module tree and names (`model.layers.7.self_attn.q_proj` stays that on
whichever stage holds it, so adapters, checkpoints and PEFT files are the same on any stage
count). Layers of other stages become `SkippedLayer`s without weights; a stage other than the first
gets a weightless `ZeroEmbedding`, one other than the last no output head. The model's own forward
still runs, so its masks, rotary tables and per-layer settings are made as always: the first
layer of the stage takes the hidden states received from the stage before (a pre-hook swaps them
in), and the forward stops right after the stage's last layer (its output is the stage's).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rayft.adapters.model import adaptable_linears, linear_features


def decoder_layers(decoder: nn.Module) -> nn.ModuleList | None:
    """The decoder's stack of transformer blocks (`layers` in most models, `h` in GPT-2's)."""
    for name in ("layers", "h", "blocks"):
        found = getattr(decoder, name, None)
        if isinstance(found, nn.ModuleList):
            return found
    return None


# Families whose staged forward is checked to equal the whole model's (tests/test_stages.py). The
# cut assumes consecutive layers pass each other nothing but their hidden states (what the decoder
# computes before its first layer, positions included, is rebuilt on every stage); a family not
# checked is refused rather than trusted.
STAGEABLE = ("llama", "mistral", "qwen2", "qwen2_moe", "mixtral", "phi3", "gemma2", "gemma3_text",
             "gpt_neox", "opt", "gpt2")


@dataclass(frozen=True)
class StageSpec:
    index: int
    count: int
    layers: range  # the decoder layers this stage holds

    @property
    def first(self) -> bool:
        return self.index == 0

    @property
    def last(self) -> bool:
        return self.index == self.count - 1


class SkippedLayer(nn.Module):
    """A decoder layer another stage holds: no weights, its input passed on. It keeps the plain
    settings of the layer it stands for (attention type, index) that the decoder's loop reads."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        for k, v in vars(layer).items():
            if not k.startswith("_") and isinstance(v, (str, int, float, bool, type(None))):
                setattr(self, k, v)

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


class ZeroEmbedding(nn.Module):
    """The input embedding of a stage that is not the first: zeros of the right shape (the first
    layer's input is replaced by what the previous stage sent). It still sees the token ids, so
    the adapter router records the batch's layout from them."""

    def __init__(self, dim: int, dtype: torch.dtype):
        super().__init__()
        self.embedding_dim = dim
        self.register_buffer("anchor", torch.zeros(0, dtype=dtype), persistent=False)  # moves with the model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.anchor.new_zeros(*input_ids.shape, self.embedding_dim)


class _StageDone(Exception):
    def __init__(self, hidden: torch.Tensor):
        self.hidden = hidden


def _first_tensor(x):
    return x[0] if isinstance(x, (tuple, list)) else x


class StageModel:
    """A model cut down to one stage (`split_stage`); `forward` runs the stage's layers."""

    def __init__(self, model: nn.Module, spec: StageSpec, elsewhere: dict[str, tuple[int, int]]):
        self.model, self.spec, self.elsewhere = model, spec, elsewhere
        self.decoder = model.get_decoder()
        self.head = model.get_output_embeddings() if spec.last else None
        layers = decoder_layers(self.decoder)
        self._received: torch.Tensor | None = None
        if not spec.first:
            layers[spec.layers.start].register_forward_pre_hook(self._swap_in, with_kwargs=True)
        if not spec.last:
            layers[spec.layers.stop - 1].register_forward_hook(self._stop)

    def _swap_in(self, module, args, kwargs):
        if self._received is None:
            raise RuntimeError(f"stage {self.spec.index}: no hidden states received for its first layer")
        if args:
            return (self._received, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": self._received}

    @staticmethod
    def _stop(module, args, output):
        raise _StageDone(_first_tensor(output))

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                received: torch.Tensor | None = None) -> torch.Tensor:
        """The hidden states after this stage's layers (the last stage's: after the final norm).
        `received`: the previous stage's output, for every stage but the first."""
        if self.spec.first != (received is None):
            raise ValueError(f"stage {self.spec.index}: the first stage takes token ids only, the others "
                             "also the previous stage's hidden states")
        self._received = received
        try:
            return self.decoder(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
        except _StageDone as done:
            return done.hidden
        finally:
            self._received = None


def check_stageable(config) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in STAGEABLE:
        raise ValueError(f"model_type {model_type!r} cannot be split into pipeline stages (supported: "
                         f"{', '.join(STAGEABLE)}); run it on one-stage replicas")


def split_stage(model: nn.Module, spec: StageSpec) -> StageModel:
    """Cut `model` (in place) down to the stage `spec` describes."""
    check_stageable(model.config)
    decoder = model.get_decoder()
    layers = decoder_layers(decoder)
    if layers is None:
        raise ValueError(f"{type(decoder).__name__}: no stack of decoder layers to split into stages")
    n = len(layers)
    if not (0 <= spec.layers.start < spec.layers.stop <= n):
        raise ValueError(f"stage {spec.index}: layers {spec.layers.start}..{spec.layers.stop - 1} of a {n}-layer model")
    # the linears of every layer this stage gives up, named as in the whole model
    whole = {name: linear_features(m) for name, m in adaptable_linears(model).items()}
    embedding = model.get_input_embeddings()
    for i in range(n):
        if i not in spec.layers:
            layers[i] = SkippedLayer(layers[i])
    if not spec.first:
        model.set_input_embeddings(ZeroEmbedding(embedding.embedding_dim, embedding.weight.dtype))
    if not spec.last:
        model.set_output_embeddings(nn.Identity())
        model.config.tie_word_embeddings = False  # nothing to tie the identity to
    here = set(adaptable_linears(model))
    return StageModel(model, spec, {name: f for name, f in whole.items() if name not in here})


def stage_class(base: type, spec: StageSpec) -> type:
    """`base` (a transformers causal-LM class) cut down to `spec` while it is built, before any weight
    is read, so `from_pretrained` reads only the stage's tensors: another stage's layers are
    unexpected keys, never loaded. The class keeps `base`'s name and module because transformers
    picks a checkpoint's key conversions (renamed heads, fused experts) by them.

    Tied input and output embeddings are untied unless the stage holds both: a last stage that is
    not the first has its own head, which `load_base_model` fills from the checkpoint's embedding."""

    class Staged(base):
        def __init__(self, config, *args, **kwargs):
            if not (spec.first and spec.last):
                config.tie_word_embeddings = False
            super().__init__(config, *args, **kwargs)
            self.stage = split_stage(self, spec)

    Staged.__name__, Staged.__qualname__, Staged.__module__ = base.__name__, base.__qualname__, base.__module__
    return Staged
