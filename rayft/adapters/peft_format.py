"""Adapters on disk in PEFT's format: adapter_config.json + adapter_model.safetensors.

A directory written here loads with `peft.PeftModel.from_pretrained`, and one written by PEFT loads
here to continue training. Only the name mapping lives in this file; the math is in variants.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rayft.adapters.model import AdapterError, AdapterModel
from rayft.atomic import atomic_dir
from rayft.config import AdapterConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."

# our per-layer tensor name -> PEFT's
_LORA_KEYS = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "magnitude": "lora_magnitude_vector"}
_VERA_KEYS = {"lambda_d": "vera_lambda_d", "lambda_b": "vera_lambda_b"}


def peft_config(cfg: AdapterConfig, targets: list[str], base_model: str | None, fan_in_fan_out: bool = False) -> dict:
    """PEFT's adapter_config.json. `fan_in_fan_out`: the targets store weights (in, out), as
    GPT-2's Conv1D layers do (PEFT keeps one flag per adapter)."""
    common = {
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "target_modules": sorted(targets),
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "inference_mode": True,
        "modules_to_save": None,
    }
    if cfg.variant == "vera":
        return common | {
            "peft_type": "VERA",
            "r": cfg.r,
            "vera_dropout": cfg.dropout,
            "projection_prng_key": cfg.vera_seed,
            "save_projection": True,
            "d_initial": cfg.vera_d_initial,
            "init_weights": True,
        }
    return common | {
        "peft_type": "LORA",
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "use_rslora": cfg.use_rslora,
        "use_dora": cfg.variant == "dora",
        "init_lora_weights": True if cfg.init == "default" else "gaussian",
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def adapter_config_from_peft(name: str, d: dict, source: str = CONFIG_FILE) -> AdapterConfig:
    kind = d.get("peft_type")
    if kind not in ("LORA", "VERA"):
        raise AdapterError(f"{source}: peft_type {kind!r} is not supported (LORA or VERA)")
    if d.get("target_parameters"):  # PEFT's all-linear adds them for fused MoE experts and routers
        raise AdapterError(f"{source}: target_parameters {sorted(d['target_parameters'])} (LoRA on weights outside "
                           f"linear layers, such as fused MoE experts) is not supported")
    for key in ("rank_pattern", "alpha_pattern"):
        if d.get(key):
            raise AdapterError(f"{source}: {key} (per-layer ranks) is not supported")
    if d.get("bias", "none") != "none":
        raise AdapterError(f"{source}: bias={d['bias']!r} is not supported, only 'none'")
    if d.get("modules_to_save"):
        raise AdapterError(f"{source}: modules_to_save is not supported")
    targets = d.get("target_modules")
    if isinstance(targets, list):
        targets = sorted(targets)
    if kind == "VERA":
        return AdapterConfig(
            name=name, variant="vera", r=d["r"], dropout=d.get("vera_dropout", 0.0), target_modules=targets,
            vera_seed=d.get("projection_prng_key", 0), vera_d_initial=d.get("d_initial", 0.1),
        )
    init = d.get("init_lora_weights", True)
    return AdapterConfig(
        name=name,
        variant="dora" if d.get("use_dora") else "lora",
        r=d["r"],
        alpha=d.get("lora_alpha", 8),
        dropout=d.get("lora_dropout", 0.0),
        target_modules=targets,
        use_rslora=d.get("use_rslora", False),
        init="gaussian" if init == "gaussian" else "default",
    )


def _to_peft_key(key: str, variant: str) -> str:
    path, _, tensor = key.rpartition(".")
    table = _VERA_KEYS if variant == "vera" else _LORA_KEYS
    return f"{KEY_PREFIX}{path}.{table[tensor]}"


def check_finite(state: dict[str, torch.Tensor], where: str | Path) -> None:
    """Refuse to write weights holding NaN or infinity: a server would load them and answer garbage."""
    bad = [k for k, v in state.items() if not bool(torch.isfinite(v).all())]
    if bad:
        raise AdapterError(f"{where}: not written: {len(bad)} of {len(state)} tensors are not finite "
                           f"(NaN or infinity), e.g. {bad[0]}")


def save_adapter(am: AdapterModel, name: str, out_dir: str | Path, base_model: str | None = None) -> Path:
    """Write one adapter in PEFT format, atomically (a temp dir renamed into place); never a non-finite one."""
    cfg = am.configs[name]
    layers = {n: layer for n, layer in am.layers().items() if name in layer.adapters}
    proj = am.vera_projections.get(name)
    return write_adapter(cfg, am.adapter_state(name), {n: layer.fan_in_fan_out for n, layer in layers.items()},
                         out_dir, base_model, None if proj is None else (proj.A, proj.B))


def write_adapter(cfg: AdapterConfig, weights: dict[str, torch.Tensor], fan_in_fan_out: dict[str, bool],
                  out_dir: str | Path, base_model: str | None = None,
                  vera_projection: tuple[torch.Tensor, torch.Tensor] | None = None) -> Path:
    """Write an adapter in PEFT format from its weights (keyed as `AdapterModel.adapter_state`) and
    its layers (name -> whether a Conv1D, PEFT's fan_in_fan_out): what `save_adapter` writes, and
    what a staged replica writes from the shards of all its stages."""
    state = {_to_peft_key(k, cfg.variant): v.float().contiguous().cpu() for k, v in weights.items()}
    check_finite(state, out_dir)  # on the host copies: no device sync of its own
    if cfg.variant == "vera":
        state["base_model.vera_A"] = vera_projection[0].float().contiguous().cpu()
        state["base_model.vera_B"] = vera_projection[1].float().contiguous().cpu()
    flags = set(fan_in_fan_out.values())
    if len(flags) > 1:  # PEFT has one flag per adapter: it would misread one kind
        raise AdapterError(f"adapter {cfg.name!r}: targets both Conv1D and nn.Linear layers, which one PEFT "
                           f"adapter_config cannot describe (fan_in_fan_out)")
    with atomic_dir(out_dir) as tmp:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        config = peft_config(cfg, list(fan_in_fan_out), base_model, fan_in_fan_out=flags == {True})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return Path(out_dir)


def read_adapter_config(path: str | Path, name: str) -> AdapterConfig:
    path = Path(path)
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise AdapterError(f"{cfg_file}: not found (is {path} a PEFT adapter directory?)")
    try:
        d = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"{cfg_file}: line {e.lineno}: not valid JSON: {e.msg}") from None
    return adapter_config_from_peft(name, d, str(cfg_file))


def load_adapter(am: AdapterModel, path: str | Path, name: str, config: AdapterConfig | None = None,
                 seed: int = 0) -> AdapterConfig:
    """Add an adapter saved in PEFT format (by rayft or by PEFT) to the model, ready to train or serve.

    With `config`, the adapter is built from it (a job's own settings) and the file must fit it:
    same variant, rank and target layers, else an error naming the file."""
    path = Path(path)
    # with `config`, the file's settings are only compared to it (and `name` may be an internal one,
    # such as a DPO job's frozen reference, outside the rule a config's names follow)
    saved = read_adapter_config(path, name if config is None else "saved")
    cfg = config or saved
    # the same function, not just the same shapes: scale (alpha, rsLoRA) and VeRA's projections too
    fields = ["variant", "r", "scale"] + (["vera_seed"] if cfg.variant == "vera" else [])
    for field in fields:
        if getattr(saved, field) != getattr(cfg, field):
            raise AdapterError(
                f"{path / CONFIG_FILE}: {field} is {getattr(saved, field)!r}, but adapter {name!r} asks for {getattr(cfg, field)!r}"
            )
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise AdapterError(f"{weights}: not found")
    try:
        raw = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise AdapterError(f"{weights}: cannot read weights: {e}") from None
    am.add_adapter(cfg, seed=seed)
    try:
        state = {}
        for k, v in raw.items():
            if k in ("base_model.vera_A", "base_model.vera_B"):
                continue
            if not k.startswith(KEY_PREFIX):
                raise AdapterError(f"{weights}: unexpected tensor {k!r}")
            body = k[len(KEY_PREFIX):].removesuffix(".weight")
            body = body.replace(".lora_magnitude_vector", ".magnitude").replace(".vera_lambda_", ".lambda_")
            state[body] = v
        try:
            am.load_adapter_state(name, state)
        except AdapterError as e:
            raise AdapterError(f"{weights}: {e}") from None
        if cfg.variant == "vera" and "base_model.vera_A" in raw:
            proj = am.vera_projections[name]
            with torch.no_grad():
                proj.A.copy_(raw["base_model.vera_A"])
                proj.B.copy_(raw["base_model.vera_B"])
    except Exception:
        am.remove_adapter(name)
        raise
    return cfg
