"""A staged replica: one base model over S stage actors, seen from outside as one replica.

The stages are `ReplicaWorker`s, each holding a contiguous slice of the decoder layers (the split
balanced by parameters, `rayft.scheduler.stages`), placed together by a Ray placement group (all on
one node when one node has room for every stage, STRICT_PACK; else as few nodes as will hold them,
PACK; a controller names each stage's node, and each bundle is pinned to it by its node-id label).
They join one torch.distributed group, bootstrapped as Ray Train bootstraps its workers: stage 0
names a free port on its node, every stage connects to it by TCP with its rank. Activations and
gradients then move stage to stage over that group (gloo on CPUs, NCCL on GPUs), never through Ray's
object store.

`StagedReplica` (itself an actor, with the replica's methods) fans each call out to every stage and
answers with the last stage's reply (all stages hold the same jobs; the last also has the losses). A
stage that dies or fails leaves its neighbours blocked in a receive: so at the first failure of any
stage the whole group is torn down (every stage killed, the placement group removed) and this actor
exits, which its caller sees as a lost replica, never a hang.
"""

from __future__ import annotations

import logging
from pathlib import Path

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rayft.cluster.replica import ReplicaWorker
from rayft.config import BaseModelConfig, RunConfig
from rayft.states import JobState

log = logging.getLogger(__name__)


def stage_layers(base: BaseModelConfig, stages: int) -> list[range]:
    """The decoder layers of each of `stages` stages of `base` (`rayft.scheduler.stages.stage_split`)."""
    from rayft.model.shape import model_shape
    from rayft.scheduler.stages import stage_split

    return stage_split(model_shape(base), stages)


def placement_strategy(bundle: dict[str, float], stages: int, nodes: list[dict]) -> str:
    """STRICT_PACK when one alive node has room for every stage's bundle, else PACK."""
    for node in nodes:
        if node.get("Alive") and all(node["Resources"].get(k, 0) >= v * stages for k, v in bundle.items()):
            return "STRICT_PACK"
    return "PACK"


class GroupLost(RuntimeError):
    """A stage of a staged replica died or failed: the whole group was torn down."""


class StagedReplica:
    """S stage actors as one replica. Given a base model (`cfg` or `base`) the stages load their
    layers at once; else (a controller's replica) with the first job, and again, split anew, when
    an empty group is given a job on another base model."""

    def __init__(self, cfg: RunConfig | None, output_dir: str, stages: int, base: BaseModelConfig | None = None,
                 gpu: bool = False, cpus_per_stage: float = 1.0, storage_token: str | None = None,
                 node_ids: list[str] | None = None, ready_timeout_s: float = 600.0):
        self.cfg, self.output_dir, self.count, self.gpu = cfg, output_dir, stages, gpu
        self.storage_token, self.ready_timeout_s = storage_token, ready_timeout_s
        self.bundle = {"CPU": 1.0, "GPU": 1.0} if gpu else {"CPU": cpus_per_stage}
        if node_ids is not None and len(node_ids) != stages:
            raise ValueError(f"{stages} stages, but nodes for {len(node_ids)}")
        self.node_ids = node_ids  # a controller's replica: stage i on the node the controller chose for it
        self.threads = None if gpu else max(1, int(cpus_per_stage))
        self.base: BaseModelConfig | None = None
        self.stages, self.layers, self.pg = [], [], None
        self._place()
        base = cfg.base_model if cfg is not None else base
        if base is not None:
            self._load(base)

    def _place(self) -> None:
        """The placement group and the stage actors (which load nothing yet)."""
        bundles = [dict(self.bundle) for _ in range(self.count)]
        if self.node_ids is None:
            self.strategy = placement_strategy(self.bundle, self.count, ray.nodes())
            self.pg = placement_group(bundles, strategy=self.strategy)
        else:  # each bundle pinned by the node-id label every Ray node carries
            self.strategy = "STRICT_PACK" if len(set(self.node_ids)) == 1 else "PACK"
            self.pg = placement_group(bundles, strategy=self.strategy,
                                      bundle_label_selector=[{"ray.io/node-id": n} for n in self.node_ids])
        try:
            ray.get(self.pg.ready(), timeout=self.ready_timeout_s)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(self.pg)
            raise RuntimeError(f"{self.count} stages of {self.bundle} each: the cluster has no room for them "
                               f"({self.strategy}) after {self.ready_timeout_s:.0f} s") from None
        actor = ray.remote(ReplicaWorker)
        resources = self.bundle
        self.stages = [
            actor.options(num_cpus=resources["CPU"], num_gpus=resources.get("GPU", 0), max_concurrency=1,
                          scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i))
            .remote(self.cfg, self.output_dir, self.threads, self.storage_token, (i, self.count))
            for i in range(self.count)
        ]

    def _load(self, base: BaseModelConfig) -> None:
        """Split `base` over the stages and join them in one process group."""
        self.layers = stage_layers(base, self.count)
        address, port = self._all_or_tear_down([self.stages[0].rendezvous.remote()])[0]
        backend = "nccl" if self.gpu else "gloo"
        self._all_or_tear_down([s.connect.remote(address, port, backend, (r.start, r.stop))
                                for s, r in zip(self.stages, self.layers)])
        self.base = base

    # ---- fanning out -------------------------------------------------------------------------------

    def _all_or_tear_down(self, refs: list) -> list:
        """Every result, or, at the first stage that fails or dies, the group torn down and this
        actor gone (waiting for the others would wait forever: they block on the failed one)."""
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            try:
                ray.get(done[0])
            except Exception as e:
                self._tear_down(e)
        return ray.get(refs)

    def _fan_out(self, method: str, *args) -> list:
        return self._all_or_tear_down([getattr(s, method).remote(*args) for s in self.stages])

    def shutdown(self) -> None:
        """Stop every stage and free their placement group. A placement group outlives the actor
        that made it (unless that actor is detached), so whoever ends a group calls this first."""
        for s in self.stages:
            ray.kill(s, no_restart=True)
        remove_placement_group(self.pg)

    def _tear_down(self, error: Exception) -> None:
        log.error("staged replica: a stage failed, tearing the group down: %s", error)
        self.shutdown()
        if ray.get_runtime_context().get_actor_id() is not None:
            ray.actor.exit_actor()  # the caller sees a dead replica, as when a one-actor replica dies
        raise GroupLost(f"a stage of the staged replica failed: {type(error).__name__}: {error}")

    # ---- the replica's methods ---------------------------------------------------------------------

    def add_job(self, job_id: str, cfg_json: str) -> dict:
        base = RunConfig.model_validate_json(cfg_json).base_model
        if self.base != base:
            if self.base is not None:
                if self._fan_out("status")[-1]:
                    return self._fan_out("add_job", job_id, cfg_json)[-1]  # the stages refuse it, by name
                self.shutdown()  # empty: split the new base model afresh
                self._place()
            self._load(base)
        return self._fan_out("add_job", job_id, cfg_json)[-1]

    def remove_job(self, job_id: str, state: JobState = JobState.PREEMPTED) -> dict | None:
        return self._fan_out("remove_job", job_id, state)[-1]

    def report(self, n: int = 1) -> dict:
        return self._with_bubble(self._fan_out("report", n))

    def step(self, n: int = 1) -> dict:
        return self._with_bubble(self._fan_out("step", n))

    def status(self) -> list[dict]:
        return self._fan_out("status")[-1]

    def holds(self) -> dict:
        """As a replica's `holds`; its device memory is one stage's (the budget is per stage)."""
        replies = self._fan_out("holds")
        return {**replies[-1], "stages": self.count, "nodes": [r["node"] for r in replies]}

    def evaluate(self) -> dict:
        return {}  # generation needs the whole model in one process

    def layout(self) -> dict:
        """How the model is split and placed: each stage's layers and node."""
        nodes = self._fan_out("node_id")
        return {"strategy": self.strategy, "placement_group": self.pg.id.hex(),
                "stages": [{"layers": [r.start, r.stop], "node": n} for r, n in zip(self.layers, nodes)]}

    def stage_pids(self) -> list[int]:
        return self._fan_out("pid")

    @staticmethod
    def _with_bubble(replies: list[dict]) -> dict:
        """The last stage's reply, with the measured bubble: the share of all stages' step time spent
        waiting for a neighbour."""
        out = dict(replies[-1])
        seconds = max(r["seconds"] for r in replies)
        out["stages"] = len(replies)
        out["bubble"] = sum(r["wait_seconds"] for r in replies) / (len(replies) * seconds) if seconds else 0.0
        return out


def start_staged_replica(cfg: RunConfig, output_dir: str | Path, stages: int, name: str = "rayft-train-replica"):
    """`rayft train --stages N`'s replica: N stages on GPUs where the config asks for CUDA, else
    sharing the largest node's CPUs."""
    from rayft.model.load import resolve_device

    gpu = resolve_device(cfg.base_model) == "cuda"
    cpus = max([n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")] + [1])
    per_stage = 1.0 if gpu else max(cpus / stages, 0.01)
    actor = ray.remote(StagedReplica).options(name=name, namespace="rayft", num_cpus=0, max_concurrency=1)
    return actor.remote(cfg, str(Path(output_dir).resolve()), stages, gpu=gpu, cpus_per_stage=per_stage)
