"""base_model.compile: the fused step under torch.compile trains as it does eagerly, and steps of
other token counts or job sets reuse the compiled code instead of recompiling.

The compiler backend here is aot_eager (dynamo's tracing, dynamic shapes and guards, and
AOTAutograd's joint graph, without inductor's minute-long C++ builds on a CI core); the inductor
path is what benchmarks/fused_vs_peft.py --compile measures."""

from __future__ import annotations

import pytest
import torch
from conftest import run_config, without_adam_outliers

from rayft.train.engine import compiled_graphs
from rayft.train.trainer import Trainer

JOBS = {
    "upper": {"adapter": {"r": 4, "dropout": 0.1}, "max_seq_len": 48, "tokens_per_micro_batch": 96, "steps": 6},
    "reverse": {"adapter": {"variant": "dora", "r": 8}, "max_seq_len": 64, "steps": 3,
                "optimizer": {"grad_accumulation": 2}},
    "double": {"adapter": {"r": 4}, "max_seq_len": 32, "tokens_per_micro_batch": 64, "steps": 4},
}


@pytest.fixture
def aot_eager(monkeypatch):
    import torch._dynamo

    torch._dynamo.reset()
    compile_module = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile",
                        lambda self, **kw: compile_module(self, **{**kw, "backend": "aot_eager"}))
    yield
    torch._dynamo.reset()


def test_compiled_fused_step_trains_as_eager_without_recompiling_per_step(aot_eager, tiny_model_dir, task_files,
                                                                          tmp_path):
    eager = Trainer(run_config(tiny_model_dir, task_files, JOBS), tmp_path / "eager")
    eager.run()
    cfg = run_config(tiny_model_dir, task_files, JOBS)
    cfg = cfg.model_copy(update={"base_model": cfg.base_model.model_copy(update={"compile": True})})
    compiled = Trainer(cfg, tmp_path / "compiled")
    graphs = []
    while compiled.running:
        compiled.step()  # token counts change every step; "reverse" leaves after 3, "double" after 4
        graphs.append(compiled_graphs())
    assert graphs[0] > 0, "nothing was compiled"
    # the later steps (other token counts, fewer jobs) reuse what the first steps compiled
    assert graphs[-1] - graphs[2] <= 2, graphs
    for name in JOBS:
        got, want = compiled.jobs[name], eager.jobs[name]
        torch.testing.assert_close([r.loss for r in got.history], [r.loss for r in want.history], atol=1e-5, rtol=1e-5)
        w_got, w_want = compiled.am.adapter_state(name), eager.am.adapter_state(name)
        lr = got.cfg.optimizer.lr * got.total_steps
        for k in w_want:
            diff = without_adam_outliers(w_got[k], w_want[k], lr)
            assert diff is not None and bool((diff <= 1e-5 + 1e-4 * w_want[k].abs().flatten()).all()), (name, k)
