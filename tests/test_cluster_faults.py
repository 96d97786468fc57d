"""On the cluster too, a job whose training goes non-finite fails alone in the registry, with the step,
and its adapter is never written or published; the job beside it ends as if alone."""

from pathlib import Path

from conftest import run_config
from test_cluster import (  # noqa: F401  (fixtures)
    adapter_weights,
    all_over,
    assert_same_adapter,
    controller,
    local_ray,
    straight_adapter,
    submit,
    wait_for,
)


def test_a_diverging_job_fails_in_the_registry_unpublished_and_its_neighbour_is_unharmed(
        controller, tiny_model_dir, task_files, tmp_path):  # noqa: F811
    jobs = {"upper": {"steps": 60, "checkpoint_every": 20},
            "diverge": {"task": "reverse", "steps": 8, "checkpoint_every": 1,
                        "optimizer": {"lr": 1e6, "max_grad_norm": None}}}
    ctl = controller()
    (up,) = submit(ctl, run_config(tiny_model_dir, task_files, {"upper": jobs["upper"]}), [task_files["upper"]])
    wait_for(ctl, lambda j, _: j[up]["state"] == "running" and j[up]["step"] >= 2)
    # the bad one arrives while the good one is running, and joins its replica's fused step
    (bad,) = submit(ctl, run_config(tiny_model_dir, task_files, {"diverge": jobs["diverge"]}), [task_files["reverse"]])
    now, st = wait_for(ctl, all_over([up, bad]))
    assert len(st["replicas"]) == 1, "one replica: the two jobs shared its fused steps"
    assert now[bad]["state"] == "failed", now[bad]
    assert "non-finite training at step" in now[bad]["error"]
    store = tmp_path / "store"
    assert not (store / "adapters" / "diverge").exists(), "a failed job is not published"
    assert not (store / "jobs" / bad / "adapters").exists(), "nor is its adapter written"
    assert now[up]["state"] == "done"
    assert (store / "adapters" / "upper").exists()
    assert_same_adapter(adapter_weights(Path(now[up]["adapter_path"])),
                        straight_adapter(tiny_model_dir, task_files, jobs, "upper", tmp_path))
