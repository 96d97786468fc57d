"""The controller: one named, detached actor that owns the job registry and drives the replicas.

It keeps nothing that matters in memory. Jobs, their states, progress and metric history are in
the registry (SQLite under the storage root); replicas are detached, named actors that a restarted
controller finds and adopts, so killing the controller loses neither jobs nor progress.

One loop thread does the work, a tick at a time, under one lock shared with the API methods:
  1. replicas: `decisions.lifecycle` starts one per GPU of every alive node (or
     `cpu_replicas_per_node` on a node without GPUs; with `replica.stages` = S, a staged replica of
     S stage actors per S GPUs, over several nodes when no node has S left), as nodes join; a
     replica whose actor or node died has its jobs requeued (they resume from their newest
     checkpoint on another replica);
  2. reports: each replica runs `steps_per_call` fused steps per call and reports every job;
     `decisions.read_report` says what each report means (progress, done, failed, requeued);
  3. scheduling: `decisions.schedule` places queued jobs (memory, priority, aging, no starvation)
     and may preempt lower-priority ones (checkpoint, requeue).
The decisions are pure (`rayft.cluster.decisions`, tested without Ray); this class gathers what
they need and applies what they return (`_apply`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import ray

from rayft.cluster import decisions
from rayft.config import ClusterConfig, ConfigError, RunConfig
from rayft.states import REGISTRY_STATES, JobState
from rayft.store.registry import JobRecord, JobRegistry, RegistryError, new_job_ids
from rayft.store.storage import Storage

log = logging.getLogger(__name__)

NAME = "rayft-controller"
NAMESPACE = "rayft"
REPLICA_PREFIX = "rayft-replica-"


@dataclass
class _Replica:
    name: str
    actor: object
    nodes: tuple[str, ...]  # each stage's node
    gpu: bool
    ready: object | None  # the ObjectRef of its first call, until it answers
    base: str | None = None  # the base model config (JSON) it holds, None while empty
    jobs: dict[str, JobRecord] = field(default_factory=dict)
    inflight: object | None = None  # the ObjectRef of its running `report`
    fresh: set[str] = field(default_factory=set)  # jobs added after `inflight` was sent: not in its report
    device_memory: int | None = None  # bytes of its GPU, as the replica reports it

    @property
    def stages(self) -> int:
        return len(self.nodes)


class Controller:
    def __init__(self, settings: dict):
        self.settings = ClusterConfig.model_validate(settings)
        # auto: one-stage replicas, and a staged one made from idle ones for a job no device holds
        self.auto = self.settings.replica.stages == "auto"
        self.stages: int = 1 if self.auto else self.settings.replica.stages
        st = self.settings
        self.policy = decisions.Policy(st.memory_budget, st.aging_s, st.starve_after_s, self.auto, self.stages)
        self._retired: set[str] = set()  # names of replicas retired into a staged one (released lazily)
        self.storage = Storage(self.settings.storage)
        self.storage.pull_registry()
        self.registry = JobRegistry(self.storage.registry_path)
        self.token = self.storage.write_marker()
        self.lock = threading.RLock()
        self.replicas: dict[str, _Replica] = {}
        self.events: deque[str] = deque(maxlen=200)
        self.refused_nodes: dict[str, str] = {}  # node id -> why no replica runs there
        # preempted jobs until their replica has checkpointed them: only then may another take them
        self.draining: dict[str, object] = {}
        self.metrics = _Metrics()
        from rayft.scheduler.memory import DEFAULT_COEFFICIENTS, load_coefficients

        path = self.settings.memory_coefficients
        self.coefficients = load_coefficients(path) if path else DEFAULT_COEFFICIENTS
        self._dirty = False  # the registry changed since the last push to a remote root
        self._adopt()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rayft-controller-loop", daemon=True)
        self._thread.start()

    # ---- API ------------------------------------------------------------------------------------

    def submit(self, cfg_json: str, files: dict[str, bytes] | None = None, attach: bool = False) -> list[str]:
        """Queue every job of a config; returns their ids. The config's dataset files come along as
        bytes (read where the user submitted) and are kept under each job's directory, so every node
        can read them for as long as the job lives.

        With `attach`, a job already queued or running under the same name with the same adapter,
        training settings and base model is followed instead of refused (re-running a RayJob whose
        cluster died picks up its jobs where their checkpoints left them)."""
        from rayft.model.load import ensure_model

        try:
            cfg = RunConfig.model_validate_json(cfg_json)
        except Exception as e:
            raise ConfigError(str(e)) from e
        ensure_model(cfg.base_model)
        with self.lock:
            live = {r.name: r for r in self.registry.list((JobState.QUEUED, JobState.RUNNING))}
            attached = {}
            if attach:
                for job in cfg.jobs:
                    rec = live.get(job.name)
                    if rec is not None and _same_training(rec.config, cfg, job.name):
                        attached[job.name] = rec.id
            new = [j for j in cfg.jobs if j.name not in attached]
            ids = {}
            if new:
                sub = cfg.model_copy(update={"jobs": new})
                new_ids = new_job_ids(sub)
                sub = self._snapshot_data(sub, new_ids, files or {})
                ids = dict(zip((j.name for j in new), self.registry.submit(sub, new_ids)))
                self._dirty = True
                self._event(f"submitted {', '.join(ids.values())}")
            if attached:
                self._event(f"attached to {', '.join(attached.values())}")
            return [attached.get(j.name) or ids[j.name] for j in cfg.jobs]

    def cancel(self, job_id: str) -> str:
        with self.lock:
            rec = self.registry.cancel(job_id)
            for r in self.replicas.values():
                if job_id in r.jobs:
                    r.jobs.pop(job_id)
                    r.actor.remove_job.remote(job_id, JobState.CANCELLED)
            self._dirty = True
            self.metrics.state(rec, JobState.CANCELLED)
            return rec.state

    def set_priority(self, job_id: str, priority: int) -> int:
        """A queued or running job's new priority; the scheduler uses it from its next tick (a higher
        one may preempt, a lower one may be preempted)."""
        with self.lock:
            before = self.registry.get(job_id).priority
            rec = self.registry.set_priority(job_id, priority)
            for r in self.replicas.values():
                if job_id in r.jobs:
                    r.jobs[job_id] = rec
            self._dirty = True
            self._event(f"{job_id}: priority {before} -> {rec.priority}")
            return rec.priority

    def status(self) -> dict:
        with self.lock:
            return {
                "jobs": [self._job_dict(r) for r in self.registry.list()],
                "replicas": [{"name": r.name, "node": r.nodes[0], "nodes": list(r.nodes), "gpu": r.gpu,
                              "ready": r.ready is None, "stages": r.stages, "base_model": r.base, "jobs": sorted(r.jobs),
                              "memory": decisions.replica_memory(self._view(r), _model_shape, self.coefficients)}
                             for r in self.replicas.values()],
                "refused_nodes": dict(self.refused_nodes),
                "events": list(self.events),
                "storage": self.storage.root,
            }

    def list_jobs(self, states: list[str] | None = None) -> list[dict]:
        with self.lock:
            return [self._job_dict(r) for r in self.registry.list(tuple(states) if states else None)]

    def metrics_history(self, job_id: str, after_step: int = -1) -> list[tuple]:
        """The job's MetricRows (step, loss, tokens/s, padding, eval loss), after `after_step` only."""
        with self.lock:
            self.registry.get(job_id)  # unknown id: a clear error
            return self.registry.metrics(job_id, after_step)

    def settings_dict(self) -> dict:
        return self.settings.model_dump()

    def shutdown(self) -> None:
        """Stop the loop and the replicas (jobs keep their state and resume when a controller returns)."""
        self._stop.set()
        self._thread.join(timeout=30)
        with self.lock:
            for r in self.replicas.values():
                ray.kill(r.actor)
            self.replicas.clear()
            self._push_registry()

    # ---- the loop -------------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                with self.lock:
                    self._tick()
            except Exception as e:  # a bug in one tick must not stop the cluster
                log.exception("controller tick failed")
                self._event(f"tick failed: {type(e).__name__}: {e}")
            with self.lock:
                refs = [r.inflight for r in self.replicas.values() if r.inflight is not None]
                refs += [r.ready for r in self.replicas.values() if r.ready is not None]
                refs += list(self.draining.values())
            if refs:
                ray.wait(refs, num_returns=1, timeout=self.settings.poll_s)
            else:
                self._stop.wait(self.settings.poll_s)

    def _tick(self) -> None:
        self._sync_replicas()
        self._collect()
        self._schedule()
        for r in self.replicas.values():
            if r.ready is None and r.jobs and r.inflight is None:
                r.inflight = r.actor.report.remote(self.settings.steps_per_call)
                r.fresh.clear()
        self._push_registry()

    # ---- replicas come and go -------------------------------------------------------------------

    def _sync_replicas(self) -> None:
        for r in list(self.replicas.values()):
            if r.ready is not None:
                done, _ = ray.wait([r.ready], timeout=0)
                if done:
                    try:
                        r.device_memory = ray.get(r.ready)["device_memory"]
                        r.ready = None
                        self._event(f"replica {r.name} ready on node {r.nodes[0][:8]}")
                    except Exception as e:
                        for node in set(r.nodes):
                            self.refused_nodes[node] = _short(e)
                        self._lost(r, f"it failed to start: {_short(e)}")
        for action in decisions.lifecycle(self._nodes(), [self._view(r) for r in self.replicas.values()], self.policy):
            self._apply(action)

    def _nodes(self) -> list[decisions.NodeView]:
        """The alive nodes and their stage slots: a GPU each, or on a CPU node `cpu_replicas_per_node`
        replicas' worth, each replica's CPUs shared by its `replica.stages` stages."""
        out = []
        for node in ray.nodes():
            if node.get("Alive"):
                gpus = int(node.get("Resources", {}).get("GPU", 0))
                slots = gpus if gpus else self._slots(node) * self.stages
                out.append(decisions.NodeView(node["NodeID"], slots, bool(gpus), node["NodeID"] in self.refused_nodes))
        return out

    def _slots(self, node: dict) -> int:
        """One-device replicas a node holds: its GPUs, or on a CPU node `cpu_replicas_per_node`."""
        res, s = node.get("Resources", {}), self.settings
        gpus = int(res.get("GPU", 0))
        return gpus if gpus else min(s.cpu_replicas_per_node, int(res.get("CPU", 0)) // s.replica_cpus)

    def _start_replica(self, nodes: tuple[str, ...], gpu: bool) -> None:
        """A replica whose stage i runs on nodes[i] (one-stage: one actor pinned to its node)."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        taken = {r.name for r in self.replicas.values()} | self._retired
        name = next(n for i in range(len(taken) + 1) if (n := self._replica_name(nodes[0], i)) not in taken)
        where = dict(name=name, namespace=NAMESPACE, lifetime="detached", max_concurrency=1, max_restarts=0,
                     scheduling_strategy=NodeAffinitySchedulingStrategy(nodes[0], soft=False))
        cpus = self.settings.replica_cpus
        if len(nodes) == 1:
            from rayft.cluster.replica import ReplicaWorker

            resources = {"num_gpus": 1, "num_cpus": 1} if gpu else {"num_cpus": cpus}
            actor = ray.remote(ReplicaWorker).options(**where, **resources).remote(
                None, self.storage.root, None if gpu else cpus, self.token)
        else:  # the stage actors hold the resources, in a placement group pinned to their nodes
            from rayft.cluster.staged import StagedReplica

            actor = ray.remote(StagedReplica).options(**where, num_cpus=0).remote(
                None, self.storage.root, len(nodes), gpu=gpu, cpus_per_stage=cpus / self.stages,
                storage_token=self.token, node_ids=list(nodes))
        self.replicas[name] = _Replica(name, actor, tuple(nodes), gpu, ready=actor.holds.remote())
        where = nodes[0][:8] if len(set(nodes)) == 1 else ", ".join(sorted({n[:8] for n in nodes}))
        self._event(f"starting replica {name} on node {where}")

    @staticmethod
    def _replica_name(node_id: str, index: int) -> str:
        return f"{REPLICA_PREFIX}{node_id[:12]}-{index}"

    def _lost(self, r: _Replica, why: str) -> None:
        self.replicas.pop(r.name, None)
        try:
            ray.kill(r.actor)
        except Exception:
            pass
        for job_id in r.jobs:
            if self.registry.get(job_id).state == JobState.RUNNING:
                self.registry.transition(job_id, JobState.QUEUED, replica=None)
        self._dirty = True
        self._event(f"replica {r.name} lost ({why}); requeued {', '.join(r.jobs) or 'no jobs'}")

    def _adopt(self) -> None:
        """After a restart: take back the replicas still alive; requeue running jobs no replica holds."""
        held: set[str] = set()
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["namespace"] == NAMESPACE and a["name"].startswith(REPLICA_PREFIX)]
        for name in names:
            try:
                actor = ray.get_actor(name, namespace=NAMESPACE)
                info = ray.get(actor.holds.remote(), timeout=60)
            except Exception as e:
                self._event(f"replica {name} not adopted: {_short(e)}")
                continue
            r = _Replica(name, actor, tuple(info.get("nodes") or [info["node"]]), info["gpu"], ready=None,
                         base=info["base_model"], device_memory=info["device_memory"])
            for st in info["jobs"]:
                try:
                    rec = self.registry.get(st["name"])
                except RegistryError:
                    continue
                if rec.state == JobState.RUNNING and rec.replica == name:
                    r.jobs[rec.id] = rec
                else:
                    actor.remove_job.remote(st["name"], JobState.CANCELLED)
            held |= set(r.jobs)
            self.replicas[name] = r
            self._event(f"adopted replica {name} with {len(r.jobs)} job(s)")
        for rec in self.registry.list((JobState.RUNNING,)):
            if rec.id not in held:
                self.registry.transition(rec.id, JobState.QUEUED, replica=None)
                self._event(f"requeued {rec.id}: its replica is gone")

    # ---- reports --------------------------------------------------------------------------------

    def _collect(self) -> None:
        for job_id, ref in list(self.draining.items()):
            done, _ = ray.wait([ref], timeout=0)
            if done:
                del self.draining[job_id]
                if self.registry.get(job_id).state == JobState.RUNNING:
                    self.registry.transition(job_id, JobState.QUEUED, replica=None)
                    self._dirty = True
        for r in list(self.replicas.values()):
            if r.inflight is None:
                continue
            done, _ = ray.wait([r.inflight], timeout=0)
            if not done:
                continue
            ref, r.inflight = r.inflight, None
            try:
                report = ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorDiedError,
                    ray.exceptions.ActorUnavailableError) as e:
                self._lost(r, _short(e))
                continue
            self._take_report(r, report)

    def _take_report(self, r: _Replica, report: dict) -> None:
        if "bubble" in report and report["seconds"]:
            self.metrics.bubble.set(report["bubble"], {"replica": r.name})
        by_job: dict[str, list] = {}
        for job_id, *row in report["rows"]:  # (step, loss, tokens/s, padding, eval loss): a MetricRow
            by_job.setdefault(job_id, []).append(tuple(row))
        for job_id, rows in by_job.items():
            if job_id in r.jobs:
                self.registry.record_metrics(job_id, rows)
        for st in report["jobs"]:
            if st["name"] in r.jobs:
                self.metrics.progress(st["name"], r.name, st)
        for action in decisions.read_report(self._view(r), report):
            self._apply(action, r)
        self._dirty = True

    # ---- scheduling -----------------------------------------------------------------------------

    def _schedule(self) -> None:
        queued = self.registry.list((JobState.QUEUED,))
        views = [self._view(r) for r in self.replicas.values()]
        nodes = [n for n in self._nodes() if not n.refused] if self.auto else []
        for action in decisions.schedule(queued, views, _model_shape, self.coefficients, self.policy, time.time(),
                                         nodes):
            self._apply(action)

    def _view(self, r: _Replica) -> decisions.ReplicaView:
        return decisions.ReplicaView(r.name, r.ready is None, r.base, dict(r.jobs), self._budget(r), frozenset(r.fresh),
                                     r.nodes)

    def _apply(self, action: decisions.Action, reporter: _Replica | None = None) -> None:
        """Carry out one decision on the registry and the replicas."""
        a = action
        if isinstance(a, decisions.Place):
            r = self.replicas[a.replica]
            rec = self.registry.transition(a.job, JobState.RUNNING, replica=r.name)
            r.jobs[rec.id] = rec
            if r.inflight is not None:
                r.fresh.add(rec.id)
            r.base = a.base
            r.actor.add_job.remote(rec.id, rec.config.model_dump_json())
            self.metrics.state(rec, JobState.RUNNING)
            self._event(f"placed {rec.id} on {r.name}")
        elif isinstance(a, decisions.Preempt):
            r = self.replicas[a.replica]
            r.jobs.pop(a.job)
            # checkpointed before the replica's next step; requeued once that is done (`_collect`)
            self.draining[a.job] = r.actor.remove_job.remote(a.job, JobState.PREEMPTED)
            self._event(a.event)
        elif isinstance(a, decisions.Fail):
            rec = self.registry.transition(a.job, JobState.FAILED, error=a.error)
            self.metrics.state(rec, JobState.FAILED)
            self._event(a.event)
        elif isinstance(a, decisions.Requeue):
            if a.config is not None:
                self.registry.set_config(a.job, a.config)
            rec = self.registry.transition(a.job, JobState.QUEUED, replica=None)
            self.metrics.state(rec, JobState.QUEUED)
            self._event(a.event)
        elif isinstance(a, decisions.Finish):
            rec = self.registry.transition(a.job, JobState.DONE, step=a.step, total_steps=a.total_steps)
            self.storage.publish_adapter(a.job, rec.adapter)
            self.metrics.state(rec, JobState.DONE)
            self._event(f"{a.job} done: adapter at {self.storage.adapter_dir(a.job)}")
        elif isinstance(a, decisions.Regroup):
            retired = [self.replicas.pop(name) for name in a.replicas]
            for r in retired:
                ray.kill(r.actor, no_restart=True)
            self._retired |= set(a.replicas)
            self._event(a.event)
            self._start_replica(a.nodes, gpu=retired[0].gpu)  # each stage on a retired replica's device
            return
        elif isinstance(a, decisions.StartReplica):
            self._start_replica(a.nodes, a.gpu)
            return
        elif isinstance(a, decisions.LoseReplica):
            self._lost(self.replicas[a.replica], a.why)
            return
        elif isinstance(a, decisions.StopReplica):
            r = self.replicas.pop(a.replica)
            try:
                ray.get(r.actor.shutdown.remote(), timeout=60)  # its stages and their placement group
            except Exception:
                pass
            ray.kill(r.actor, no_restart=True)
            self._retired.add(a.replica)
            self._event(a.event)
            return
        elif isinstance(a, decisions.Progress):
            rec = self.registry.transition(a.job, JobState.RUNNING, step=a.step, total_steps=a.total_steps)
            self.metrics.state(rec, JobState.RUNNING)
            if reporter is not None:
                reporter.jobs[a.job] = rec
            return
        if reporter is not None and not isinstance(a, (decisions.Place, decisions.Preempt)):
            reporter.jobs.pop(a.job, None)  # ended, failed or requeued: off the replica's books
        self._dirty = True

    def _budget(self, r: _Replica) -> int | None:
        """Bytes the estimate may use on this replica; None for a GPU replica that has not said its size yet."""
        from rayft.scheduler.memory import GIB

        if r.device_memory:
            total = r.device_memory
        elif r.gpu and r.ready is not None:
            return None
        else:
            total = int(self.settings.cpu_replica_memory_gib * GIB)
        return int(total * self.settings.memory_budget)

    # ---- helpers --------------------------------------------------------------------------------

    def _snapshot_data(self, cfg: RunConfig, ids: list[str], files: dict[str, bytes]) -> RunConfig:
        """Write the submitted dataset files under each job's directory and point its config there
        (each job gets its own dataset entry, named after the job)."""
        datasets, jobs = [], []
        for job, job_id in zip(cfg.jobs, ids):
            ds = cfg.dataset(job.dataset)
            update = {"name": job.name}
            for field_name in ("path", "eval_path"):
                src = getattr(ds, field_name)
                if src is not None and str(src) in files:
                    dst = self.storage.job_dir(job_id) / "data" / f"{field_name}-{src.name}"
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    dst.write_bytes(files[str(src)])
                    update[field_name] = dst
            datasets.append(ds.model_copy(update=update))
            jobs.append(job.model_copy(update={"dataset": job.name}))
            self.storage.push_job(job_id)
        return cfg.model_copy(update={"datasets": datasets, "jobs": jobs})

    def _job_dict(self, rec: JobRecord) -> dict:
        return {
            "id": rec.id, "name": rec.name, "adapter": rec.adapter, "state": rec.state, "priority": rec.priority,
            "step": rec.step, "total_steps": rec.total_steps, "replica": rec.replica, "error": rec.error,
            "submitted_at": rec.submitted_at, "updated_at": rec.updated_at,
            "adapter_path": self.storage.adapter_dir(rec.id) if rec.state == JobState.DONE else None,
            "loss": self.metrics.last_loss.get(rec.id), "tokens_per_s": self.metrics.last_tps.get(rec.id),
        }

    def _push_registry(self) -> None:
        if self._dirty:
            self.storage.push_registry()
            self._dirty = False

    def _event(self, msg: str) -> None:
        self.events.append(f"{time.strftime('%H:%M:%S')} {msg}")
        log.info(msg)


def _same_training(stored: RunConfig, cfg: RunConfig, job_name: str) -> bool:
    """Whether a stored job trains what `cfg`'s job of that name would (the dataset path aside: the
    stored one points at the job's own copy)."""
    job = next(j for j in cfg.jobs if j.name == job_name)
    mine = stored.jobs[0]
    return (stored.base_model == cfg.base_model and stored.adapters[0] == cfg.adapter(job.adapter)
            and mine.model_copy(update={"dataset": job.dataset}) == job)


_SHAPES: dict[str, object] = {}


def _model_shape(cfg: RunConfig):
    """The base model's shape (its config read from a local dir or the hub cache, its tree built on
    the meta device), once per base model."""
    from rayft.model.shape import model_shape

    key = cfg.base_model.model_dump_json()
    if key not in _SHAPES:
        _SHAPES[key] = model_shape(cfg.base_model)
    return _SHAPES[key]


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


# the gauges, by the names Prometheus sees with Ray's `ray_` prefix (rayft/dashboard/grafana reads them)
GAUGES = {
    "tps": ("rayft_job_tokens_per_second", "Training tokens per second of a job.", ("job", "replica")),
    "loss": ("rayft_job_loss", "Training loss of a job's last step.", ("job", "replica")),
    "step": ("rayft_job_step", "Optimizer steps a job has taken.", ("job", "replica")),
    "states": ("rayft_job_state", "1 for a job's current state, 0 for the others.", ("job", "state")),
    "bubble": ("rayft_replica_bubble_fraction",
               "Share of a staged replica's stage time spent waiting for a neighbour, last report.", ("replica",)),
}


class _Metrics:
    """Per-job gauges through ray.util.metrics (Prometheus, the Ray dashboard), tagged job and replica."""

    def __init__(self):
        from ray.util.metrics import Gauge

        for attr, (name, description, tags) in GAUGES.items():
            setattr(self, attr, Gauge(name, description, tag_keys=tags))
        self.last_loss: dict[str, float] = {}
        self.last_tps: dict[str, float] = {}

    def progress(self, job_id: str, replica: str, st: dict) -> None:
        tags = {"job": job_id, "replica": replica}
        self.step.set(st["step"], tags)
        self.tps.set(st["tokens_per_s"], tags)
        self.last_tps[job_id] = st["tokens_per_s"]
        if st["loss"] is not None:
            self.loss.set(st["loss"], tags)
            self.last_loss[job_id] = st["loss"]

    def state(self, rec: JobRecord, state: str) -> None:
        for s in REGISTRY_STATES:
            self.states.set(1.0 if s == state else 0.0, {"job": rec.id, "state": s})


# ---- the client side: find or start the controller ---------------------------------------------

def refusal(error: Exception) -> str:
    """Why the controller refused a call (the RayTaskError's cause), as the user is shown it."""
    cause = getattr(error, "cause", None)
    return str(cause) if cause is not None else str(error).splitlines()[-1]


def get_controller(settings: ClusterConfig | None = None, start: bool = True):
    """The cluster's controller; started (detached) when absent and `start`, with `settings`."""
    try:
        return ray.get_actor(NAME, namespace=NAMESPACE)
    except ValueError:
        if not start:
            raise
    settings = settings or ClusterConfig()
    actor_cls = ray.remote(Controller).options(
        name=NAME, namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
        num_cpus=0, max_concurrency=8, max_restarts=-1,
    )
    return actor_cls.remote(settings.model_dump())
