"""Put multi-adapter layers into any torch model and manage the adapters that live in them.

`AdapterModel` wraps a model (a Hugging Face causal LM, or any nn.Module with nn.Linear layers):
its base weights are frozen, each linear targeted by some adapter becomes a `MultiAdapterLinear`,
and adapters are added, removed, routed to rows, merged, read and written by name.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import cache
from typing import TYPE_CHECKING

import torch
from torch import nn

from rayft.adapters.layer import MultiAdapterLinear
from rayft.adapters.rng import AdapterRNG
from rayft.adapters.routing import Router, Segment
from rayft.adapters.variants import LoraWeights, SubspaceWeights, VeraProjection, VeraWeights
from rayft.config import AdapterConfig
from rayft.targets import select_targets

if TYPE_CHECKING:
    from rayft.adapters.compress import Subspace


class AdapterError(ValueError):
    """An adapter that cannot be placed on this model (targets, rank, names)."""


@cache
def _conv1d() -> type:
    # GPT-2-style models use transformers' Conv1D: a linear whose weight is stored (in, out)
    from transformers.pytorch_utils import Conv1D

    return Conv1D


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in, out) features of a linear layer, a Conv1D or an already wrapped MultiAdapterLinear."""
    if isinstance(module, _conv1d()):
        n_in, n_out = module.weight.shape
        return n_in, n_out
    return module.in_features, module.out_features


def adaptable_linears(model: nn.Module) -> dict[str, nn.Module]:
    """The layers an adapter may target, by full module name: every nn.Linear and Conv1D (as PEFT
    takes them) except the output head, and the multi-adapter layers already put in their place.
    The adapter injection and the memory model (`rayft.model.shape`) both read this list."""
    head = getattr(model, "get_output_embeddings", lambda: None)()
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, MultiAdapterLinear) or (
            isinstance(module, (nn.Linear, _conv1d())) and module is not head and not name.endswith(".base")
        ):
            found[name] = module
    return found


def left_out_of_all_linear(model: nn.Module) -> dict[str, str]:
    """Modules with weights that no adapter can target, by name, and why: those holding a matrix
    (or a stack of them) without being a linear layer, such as an MoE block's router and its fused
    experts. Embeddings, norms and the output head are left out by rule, as in PEFT, and not listed."""
    wrapped = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, MultiAdapterLinear))
    left = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, _conv1d(), nn.Embedding, MultiAdapterLinear)) or name.startswith(wrapped):
            continue
        shapes = [tuple(p.shape) for p in module.parameters(recurse=False) if p.dim() >= 2]
        if any(len(s) >= 3 for s in shapes):
            left[name] = (f"{type(module).__name__}: fused expert weights {shapes}, not linear layers; each expert sees "
                          f"a gathered subset of the tokens, which cannot be routed to jobs")
        elif shapes:
            left[name] = f"{type(module).__name__}: weight {shapes[0]} outside an nn.Linear (a router, say)"
    return left


def _call_or_none(model: nn.Module, method: str):
    """model.<method>() for Hugging Face accessors a model may lack or not implement."""
    try:
        return getattr(model, method)()
    except (AttributeError, NotImplementedError):
        return None


def _as_linear(module: nn.Module) -> nn.Linear:
    """A Conv1D (y = x W + b, W stored in × out) as the nn.Linear it is, over a transposed view of
    the same weight (no copy); an nn.Linear as itself."""
    if not isinstance(module, _conv1d()):
        return module
    n_in, n_out = module.weight.shape
    linear = nn.Linear(n_in, n_out, bias=False, device="meta")
    linear.weight = nn.Parameter(module.weight.detach().t(), requires_grad=False)
    linear.bias = module.bias
    return linear


class AdapterModel:
    def __init__(self, model: nn.Module, elsewhere: dict[str, tuple[int, int]] | None = None):
        """`elsewhere`: when `model` is one pipeline stage of a larger model, the (in, out) features of
        the linear layers the other stages hold, by full name. Adapters are then matched against
        the whole model's layers (the same targets, and errors, on any stage count) and placed on
        the ones here; weights of layers elsewhere are skipped when loading."""
        self.model = model
        self.elsewhere = dict(elsewhere or {})
        self.router = Router()
        self.configs: dict[str, AdapterConfig] = {}
        self.subspaces: dict[str, list[str]] = {}  # a compressed store's name -> its adapters, by member index
        self.vera_projections: dict[str, VeraProjection] = {}
        for p in model.parameters():
            p.requires_grad_(False)
        self._watch_layout(model)

    def _watch_layout(self, model: nn.Module) -> None:
        """Record each forward's token layout for the router: cleared when the model or its decoder
        starts a forward, set by the input embedding from the token ids it embeds."""
        for module in {id(m): m for m in (model, _call_or_none(model, "get_decoder"))}.values():
            if module is not None:
                module.register_forward_pre_hook(self.router.forget_layout, with_kwargs=True)
        embedding = _call_or_none(model, "get_input_embeddings")
        if embedding is not None:
            embedding.register_forward_pre_hook(self.router.record_layout, with_kwargs=True)

    # ---- adapters ----------------------------------------------------------------------------

    def linear_names(self) -> list[str]:
        """Names of the linear layers an adapter may target (the output head excluded, as in PEFT)."""
        return list(adaptable_linears(self.model))

    def match_targets(self, cfg: AdapterConfig) -> list[str]:
        """The layers the adapter targets, of the whole model (this stage's and the others')."""
        names = self.linear_names() + list(self.elsewhere)
        try:
            hits = select_targets(cfg.target_modules, names)
        except ValueError as e:
            raise AdapterError(f"adapter {cfg.name!r}: {e}") from None
        if not hits:
            suffixes = sorted({n.rsplit(".", 1)[-1] for n in names})
            raise AdapterError(
                f"adapter {cfg.name!r}: target_modules {cfg.target_modules!r} match no linear layer of this model "
                f"(its linear layers end with: {', '.join(suffixes)})"
            )
        return hits

    def add_adapter(self, cfg: AdapterConfig, seed: int = 0) -> list[str]:
        """Add an adapter to every layer it targets. `seed` draws its init and its dropout masks."""
        if cfg.name in self.configs:
            raise AdapterError(f"adapter {cfg.name!r} already exists")
        everywhere = self.match_targets(cfg)
        targets = [n for n in everywhere if n not in self.elsewhere]
        if not targets:
            raise AdapterError(f"adapter {cfg.name!r}: none of its {len(everywhere)} target layers is on this "
                               f"pipeline stage; every stage must hold some of an adapter's layers")
        # a rank above a layer's size is allowed, as in PEFT: the delta is then of full rank there
        layers = [self._wrap(n) for n in targets]
        if cfg.variant == "vera":
            # one projection for all its layers, sized by the largest of them, wherever they are
            features = [(layer.in_features, layer.out_features) for layer in layers]
            features += [self.elsewhere[n] for n in everywhere if n in self.elsewhere]
            proj = VeraProjection(
                cfg.r,
                max(f[0] for f in features),
                max(f[1] for f in features),
                cfg.vera_seed,
                layers[0].base.weight.device,
            )
            self.vera_projections[cfg.name] = proj
            for layer in layers:
                layer.adapters[cfg.name] = VeraWeights(cfg, layer.base, proj)
        rng = AdapterRNG(seed, layers[0].base.weight.device, targets)
        if cfg.variant != "vera":
            for name, layer in zip(targets, layers):
                layer.adapters[cfg.name] = LoraWeights(cfg, layer.base, layer.lora_stack(cfg.r),
                                                       rng.init_generator(name))
        self.configs[cfg.name] = cfg
        self.router.generators[cfg.name] = rng
        return targets

    def add_subspace(self, name: str, space: Subspace) -> list[str]:
        """Add every adapter of a compressed store under one name: its basis and loadings on the
        device, once. A segment routes rows to one of them by `member`, its index in the list
        returned (the store's order). Serving only: they are not trainable."""
        if name in self.configs or name in self.subspaces:
            raise AdapterError(f"adapter {name!r} already exists")
        here = adaptable_linears(self.model)
        for layer in space.layers:  # all checked before any layer changes
            if layer not in here and layer not in self.elsewhere:
                raise AdapterError(f"compressed store {name!r}: {layer} is not a linear layer of this model")
            (_, n_in), (n_out, _) = space.shapes[(layer, "A")], space.shapes[(layer, "B")]
            have = self.elsewhere.get(layer) or linear_features(here[layer])
            if (n_in, n_out) != tuple(have):
                raise AdapterError(f"compressed store {name!r}: {layer} is {n_in} -> {n_out} in the store, "
                                   f"{have[0]} -> {have[1]} in this model (another base model)")
        members = list(space.loadings)
        for layer_name in (n for n in space.layers if n not in self.elsewhere):
            layer = self._wrap(layer_name)
            keys = {side: (layer_name, side) for side in ("A", "B")}
            basis = {side: space.components[k] for side, k in keys.items()}
            basis |= {f"{side}_mean": space.means[k] for side, k in keys.items()}
            loadings = {side: torch.stack([space.loadings[m][k] for m in members]) for side, k in keys.items()}
            layer.adapters[name] = SubspaceWeights(space.shapes[keys["A"]][0], layer.in_features, layer.out_features,
                                                   basis, loadings, space.scales(layer_name), layer.base.weight.device)
        self.subspaces[name] = members
        return members

    def remove_adapter(self, name: str) -> None:
        self._require(name)
        for layer in self.layers().values():
            if layer.merged == name:
                layer.unmerge()
            if name in layer.adapters:
                weights = layer.adapters[name]
                if hasattr(weights, "release"):  # its slot of the layer's stacked storage
                    weights.release()
                del layer.adapters[name]
        self.configs.pop(name, None)
        self.subspaces.pop(name, None)
        self.vera_projections.pop(name, None)
        self.router.generators.pop(name, None)

    def layers(self) -> dict[str, MultiAdapterLinear]:
        return {n: m for n, m in self.model.named_modules() if isinstance(m, MultiAdapterLinear)}

    def _wrap(self, name: str) -> MultiAdapterLinear:
        module = self.model.get_submodule(name)
        if isinstance(module, MultiAdapterLinear):
            if module._router[0] is not self.router:  # its adapters would never see this one's routing
                raise AdapterError(f"{name}: a layer of another AdapterModel of this model; use that one "
                                   "(one AdapterModel per model)")
            return module
        parent_name, _, child = name.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        wrapped = MultiAdapterLinear(_as_linear(module), self.router, name)
        wrapped.fan_in_fan_out = isinstance(module, _conv1d())  # saved for PEFT, which needs the flag
        setattr(parent, child, wrapped)
        return wrapped

    def _require(self, name: str) -> None:
        if name not in self.configs and name not in self.subspaces:
            raise KeyError(f"no adapter named {name!r} (have {sorted([*self.configs, *self.subspaces])})")

    # ---- parameters --------------------------------------------------------------------------

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        """The trainable tensors of one adapter, keyed '<module path>.<tensor>' (lora_A, magnitude, ...)."""
        self._require(name)
        out = {}
        for path, layer in self.layers().items():
            if name in layer.adapters:
                for pname, p in layer.adapters[name].named_parameters():
                    out[f"{path}.{pname}"] = p
        return out

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.adapter_parameters(name).items()}

    def load_adapter_state(self, name: str, state: dict[str, torch.Tensor], strict: bool = True) -> None:
        params = self.adapter_parameters(name)
        state = {k: v for k, v in state.items() if k.rpartition(".")[0] not in self.elsewhere}
        missing, unexpected = set(params) - set(state), set(state) - set(params)
        if strict and (missing or unexpected):
            raise AdapterError(
                f"adapter {name!r}: weights do not fit this model: "
                f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
            )
        with torch.no_grad():
            for k, p in params.items():
                if k in state:
                    if state[k].shape != p.shape:
                        raise AdapterError(f"adapter {name!r}: {k} has shape {tuple(state[k].shape)}, expected {tuple(p.shape)}")
                    p.copy_(state[k].to(p.dtype))

    def param_groups(self, name: str, lr: float, weight_decay: float, loraplus_ratio: float | None) -> list[dict]:
        """Optimizer groups, with their parameters' names; with LoRA+ the B side (lora_B, VeRA's lambda_b) learns at lr * ratio."""
        params = self.adapter_parameters(name)
        is_b = lambda k: k.endswith(("lora_B", "lambda_b"))  # noqa: E731
        split = [(lambda k: True, lr)] if not loraplus_ratio else [
            (lambda k: not is_b(k), lr), (is_b, lr * loraplus_ratio)]
        # named, so optimizer state can be saved by name (rayft.train.optim.named_optimizer_state)
        return [{"params": [p for k, p in params.items() if pick(k)], "param_names": [k for k in params if pick(k)],
                 "lr": group_lr, "weight_decay": weight_decay} for pick, group_lr in split]

    def set_trainable(self, name: str, trainable: bool) -> None:
        self._require(name)
        for layer in self.layers().values():
            if name in layer.adapters:
                layer.adapters[name].requires_grad_(trainable)

    def adapter_bytes(self) -> dict[str, int]:
        """Memory the adapters hold, by kind: the LoRA stacks (every slot, used or free), the
        compressed stores (bases and loadings), the rest (DoRA magnitudes, VeRA's vectors and
        projections)."""
        out = {"lora_stacks": 0, "compressed_stores": 0, "other": 0}
        for layer in self.layers().values():
            out["lora_stacks"] += sum(s.A.nbytes + s.B.nbytes for s in layer.stacks.values())
            for _, w in layer.adapters.items():
                kind = "compressed_stores" if isinstance(w, SubspaceWeights) else "other"
                own = [t for n, t in w.named_parameters() if n not in ("lora_A", "lora_B")] + list(w.buffers())
                out[kind] += sum(t.nbytes for t in own)
        out["other"] += sum(b.nbytes for p in self.vera_projections.values() for b in p.buffers())
        return out

    # ---- routing and merging -----------------------------------------------------------------

    def route(self, segments: list[Segment], per_token: bool = False):
        """Route adapters to row ranges of the batch, or (per_token) to token ranges of its flattened tokens."""
        for s in segments:
            if s.adapter is not None:
                self._require(s.adapter)
                members = self.subspaces.get(s.adapter)
                if (members is None) != (s.member is None) or (members and not 0 <= s.member < len(members)):
                    raise ValueError(f"segment {s}: {s.adapter!r} is " + (
                        "a plain adapter (no member)" if members is None else
                        f"a compressed store: its member must be one of 0..{len(members) - 1}"))
        return self.router.route(segments, per_token)

    def use(self, name: str | None, rows: int):
        if name is not None:
            self._require(name)
        return self.router.use(name, rows)

    @contextmanager
    def merged(self, name: str):
        """Fold one adapter into the base weights (for merged inference, and to test equivalence)."""
        self._require(name)
        if name in self.subspaces:
            raise AdapterError(f"{name!r} is a compressed store: decompress one of its adapters to merge it")
        layers = [layer for layer in self.layers().values() if name in layer.adapters]
        try:
            for layer in layers:
                layer.merge(name)
            yield
        finally:
            for layer in layers:
                layer.unmerge()
