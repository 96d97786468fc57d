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
import torch
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


class _StagesOutOfMemory(Exception):
    def __init__(self, error: Exception):
        self.error = error


class StagedReplica:
    """S stage actors as one replica. Given a base model (`cfg` or `base`) the stages load their
    layers at once; else (a controller's replica) with the first job, and again, split anew, when
    an empty group is given a job on another base model."""

    def __init__(self, cfg: RunConfig | None, output_dir: str, stages: int, base: BaseModelConfig | None = None,
                 gpu: bool = False, cpus_per_stage: float = 1.0, storage_token: str | None = None,
                 node_ids: list[str] | None = None, ready_timeout_s: float = 600.0, worker: type = ReplicaWorker):
        self.cfg, self.output_dir, self.count, self.gpu = cfg, output_dir, stages, gpu
        self.worker = worker  # the stage actors' class (tests inject faults through a subclass)
        self.held: dict[str, str] = {}  # a controller's jobs here: id -> config (JSON), to re-add after a rebuild
        self.last: dict[str, dict] = {}  # every job's newest status
        self.notes: dict[str, list[str]] = {}  # warnings of jobs retried smaller, kept across rebuilds
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
        actor = ray.remote(self.worker)
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
                if isinstance(e, torch.OutOfMemoryError):  # the group goes, this replica stays
                    self.shutdown()
                    raise _StagesOutOfMemory(e) from e
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
        st = self._fan_out("add_job", job_id, cfg_json)[-1]
        if not JobState(st["state"]).leaves_replica:
            self.held[job_id] = cfg_json
        return self._seen([st])[0]

    def remove_job(self, job_id: str, state: JobState = JobState.PREEMPTED) -> dict | None:
        self.held.pop(job_id, None)
        return self._fan_out("remove_job", job_id, state)[-1]

    def report(self, n: int = 1) -> dict:
        out = self._stepped("report", n)
        for st in out["jobs"]:
            if JobState(st["state"]).leaves_replica:  # reported once, forgotten (as the stages do)
                self.held.pop(st["name"], None)
        return out

    def step(self, n: int = 1) -> dict:
        return self._stepped("step", n)

    def status(self) -> list[dict]:
        return self._seen(self._fan_out("status")[-1])

    def _stepped(self, method: str, n: int) -> dict:
        try:
            out = self._with_bubble(self._fan_out(method, n))
        except _StagesOutOfMemory as oom:
            return self._after_out_of_memory(oom.error)
        out["jobs"] = self._seen(out["jobs"])
        return out

    def _seen(self, statuses: list[dict]) -> list[dict]:
        for st in statuses:
            st["warnings"] = self.notes.get(st["name"], []) + st["warnings"]
            self.last[st["name"]] = st
        return statuses

    def _after_out_of_memory(self, error: Exception) -> dict:
        """A stage ran out of memory mid-step: every stage was stopped (the others waited on it). As
        one replica does, the job with the biggest micro-batch gives way (`out_of_memory_victim`):
        for a controller it is reported out of memory (the controller requeues it smaller), for
        `rayft train` it is put back here with half the rows per micro-batch. A new group takes the
        jobs back from their newest checkpoints."""
        from rayft.scheduler.plan import cannot_shrink, halve_micro_batch, retried_smaller
        from rayft.store.registry import job_config
        from rayft.train.trainer import out_of_memory_victim

        running = [name for name, st in self.last.items() if st["state"] == JobState.RUNNING]
        configs = ({j.name: job_config(self.cfg, j.name) for j in self.cfg.jobs} if self.cfg is not None
                   else {job: RunConfig.model_validate_json(c) for job, c in self.held.items()})
        running = [name for name in running if name in configs]
        if not running:
            self._tear_down(error)
        victim = out_of_memory_victim([(name, configs[name].jobs[0].tokens_per_micro_batch) for name in running])
        job = configs[victim].jobs[0]
        why = f"out of memory at tokens_per_micro_batch={job.tokens_per_micro_batch} on a pipeline stage"
        log.warning("staged replica: %s (job %s): %s", why, victim, error)
        gave_way = {**self.last[victim], "state": JobState.OOM, "error": f"{why}: {str(error)[:200]}"}
        if self.cfg is None:  # a controller's replica: the others resume here, the victim is requeued
            self._place()
            self.base = None
            self.held.pop(victim)
            others = dict(self.held)
            self.held.clear()
            for job_id, cfg_json in others.items():
                self.add_job(job_id, cfg_json)
            self.last.pop(victim)
            jobs = [gave_way] + [self.last[j] for j in others]
        else:
            smaller = halve_micro_batch(configs[victim])
            jobs_cfg = [j for j in self.cfg.jobs if j.name != victim]
            if smaller is None:
                gave_way.update(state=JobState.FAILED, error=f"{gave_way['error']}; {cannot_shrink(configs[victim])}")
            else:
                jobs_cfg.insert([j.name for j in self.cfg.jobs].index(victim), smaller.jobs[0])
                self.notes.setdefault(victim, []).append(retried_smaller(why, smaller))
            self.cfg = self.cfg.model_copy(update={"jobs": jobs_cfg})
            self._place()  # stages built anew with the changed config: each job resumes from its checkpoint
            self._load(self.cfg.base_model)
            jobs = self._fan_out("status")[-1]
            if smaller is None:
                self.notes.pop(victim, None)
                jobs = [gave_way] + jobs
            jobs = self._seen(jobs)
        running_now = sum(st["state"] == JobState.RUNNING for st in jobs)
        return {"jobs": jobs, "rows": [], "running": running_now, "tokens": 0, "seconds": 0.0, "padding": 0.0,
                "stages": self.count, "bubble": 0.0, "device": None, "node": None}

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
