"""A run on one replica: the base model, every job's adapter and data, the fused engine, checkpoints.

This is plain Python (no Ray): the replica actor wraps it, and tests drive it directly. A job whose
data or adapter is bad fails alone, with its error recorded; the other jobs carry on.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rayft import layout
from rayft.adapters import AdapterError, AdapterModel, save_adapter
from rayft.config import BaseModelConfig, JobConfig, RunConfig
from rayft.data import DataError, prepare_job_data, prompt_and_answer
from rayft.data.pairs import encode_pairs
from rayft.model.load import load_base_model, resolve_device
from rayft.states import JobState
from rayft.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from rayft.train.engine import FusedEngine, FusedStepStats
from rayft.train.evaluate import exact_match, greedy_generate, heldout_loss, preference_accuracy
from rayft.train.job import Job, StepRecord
from rayft.train.staged import Stage, StageEngine

log = logging.getLogger(__name__)

# what a failed save raises: the disk (full, read-only, a path taken by a file) or a non-finite adapter
SAVE_ERRORS = (OSError, AdapterError)


def out_of_memory_victim(jobs: list[tuple[str, int]]) -> str:
    """Which of (name, tokens per micro-batch), in the order they were added, gives way after an
    out-of-memory step: the biggest micro-batch, the latest added among equals."""
    return max(enumerate(jobs), key=lambda p: (p[1][1], p[0]))[1][0]


@dataclass
class JobStatus:
    name: str
    adapter: str
    state: JobState
    step: int = 0
    total_steps: int = 0
    loss: float | None = None
    tokens: int = 0
    seconds: float = 0.0  # wall time of the fused steps this job took part in
    padding: float = 0.0
    resumed_from: int | None = None
    warnings: list[str] = field(default_factory=list)
    error: str | None = None
    metrics: dict = field(default_factory=dict)  # a preference job's, at its last step (TRL's names)
    eval_loss: float | None = None  # its last held-out loss (eval.loss_every), with the step it was measured at
    eval_step: int | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


class Trainer:
    """Jobs on one base model. Built from a RunConfig (its jobs are added, writing under output_dir),
    or from a BaseModelConfig alone, jobs then coming one at a time from any config on that base
    (the controller's replicas), each with its own output directory.

    on_saved(job name, output dir) is called after a checkpoint or adapter is written (the replica
    uses it to upload to a remote storage root).

    A job that runs out of memory is checkpointed and taken off (state "oom", for the controller to
    requeue it smaller), or with retry_out_of_memory, as `rayft train` has no controller, put back
    here at once with smaller micro-batches (scheduler.plan.halve_micro_batch, as the controller does)."""

    def __init__(self, cfg: RunConfig | BaseModelConfig, output_dir: str | Path, on_saved=None,
                 retry_out_of_memory: bool = False, stage: Stage | None = None):
        base = cfg.base_model if isinstance(cfg, RunConfig) else cfg
        self.base_model = base
        self.output = Path(output_dir)
        self.on_saved = on_saved or (lambda name, out: None)
        self.retry_out_of_memory = retry_out_of_memory
        self.stage = stage  # None: the whole model in this process; else one stage of a staged replica
        if stage is None:
            self.model, self.tokenizer = load_base_model(base)
            self.am = AdapterModel(self.model)
            self.engine = FusedEngine(self.am, resolve_device(base), base.attn_implementation, compile=base.compile)
        else:
            if base.compile:
                raise ValueError("base_model.compile: not supported on pipeline stages; set it false or use one stage")
            part, self.tokenizer = load_base_model(base, stage.spec)
            self.model = part.model
            self.am = AdapterModel(self.model, part.elsewhere)
            self.engine = StageEngine(part, self.am, resolve_device(base), stage.links, base.attn_implementation)
        self.jobs: dict[str, Job] = {}
        self.status: dict[str, JobStatus] = {}
        self.configs: dict[str, RunConfig] = {}  # the config each job came from
        self.outputs: dict[str, Path] = {}  # where each job's checkpoints and adapter go
        self.eval_rows: dict[str, list[dict]] = {}
        self._eval_encoded: dict[str, list] = {}  # held-out rows encoded, for eval.loss_every
        self.majority_answer: dict[str, str] = {}  # the training set's most common answer, per job
        if isinstance(cfg, RunConfig):
            for job_cfg in cfg.jobs:
                self.add_job(job_cfg, cfg)

    def add_job(self, jc: JobConfig, cfg: RunConfig, output_dir: str | Path | None = None) -> JobStatus:
        if jc.name in self.jobs:
            raise ValueError(f"job {jc.name!r} is already on this replica")
        st = JobStatus(jc.name, jc.adapter, JobState.RUNNING)
        self.status[jc.name] = st
        self.configs[jc.name] = cfg
        out = self.outputs[jc.name] = Path(output_dir) if output_dir is not None else self.output
        if self.stage is not None and jc.task == "dpo":  # its reference would need a pipelined pass of its own
            return self._fail(st, "task dpo: not on pipeline stages yet (cpo and orpo are); train it on a "
                                  "one-stage replica")
        try:
            data = prepare_job_data(jc, cfg.dataset(jc.dataset), self.tokenizer)
            self.eval_rows[jc.name], self.majority_answer[jc.name] = data.eval_rows, data.majority_answer
            job = Job.create(jc, cfg.adapter(jc.adapter), self.am, data.packer)
        except (DataError, AdapterError) as e:
            return self._fail(st, str(e))
        ckpt = latest_checkpoint(out, jc.name)
        if ckpt is not None:
            try:
                load_checkpoint(job, ckpt)
            except Exception as e:  # another setup's checkpoint, or a damaged one: this job only
                job.remove_adapters()
                return self._fail(st, f"{ckpt}: cannot resume from this checkpoint: {type(e).__name__}: {e}")
            st.resumed_from = job.step
        st.warnings += job.packer.report.warnings(jc.max_seq_len, jc.long_examples)
        self.jobs[jc.name] = job
        st.step, st.total_steps = job.step, job.total_steps
        if job.done:
            st.state = JobState.DONE
        return st

    def remove_job(self, name: str, state: str = JobState.PREEMPTED, checkpoint: bool = True) -> JobStatus:
        """Take a job off this replica between steps (preemption, cancel, rebalancing) and forget it.
        A running job is checkpointed first (unless told not to), so wherever it is added next it
        resumes exactly where it stopped."""
        st = self.status.pop(name)
        job = self.jobs.pop(name, None)
        if job is not None:
            if not job.done:
                st.state = state
                if checkpoint:
                    try:
                        self._checkpoint(job)
                    except SAVE_ERRORS as e:  # it cannot resume where it stopped: say so, do not raise
                        self._fail(st, self._save_error(job, "checkpoint", e))
            job.remove_adapters()
        for d in (self.configs, self.outputs, self.eval_rows, self.majority_answer, self._eval_encoded):
            d.pop(name, None)
        return st

    @staticmethod
    def _fail(st: JobStatus, error: str) -> JobStatus:
        st.state, st.error = JobState.FAILED, error
        log.error("job %s failed: %s", st.name, error)
        return st

    def _stop(self, job: Job, error: str) -> None:
        """Fail a running job alone: off the replica, its adapter gone, nothing of it saved."""
        self.jobs.pop(job.name)
        job.remove_adapters()
        self._fail(self.status[job.name], error)

    def _save_error(self, job: Job, what: str, e: Exception) -> str:
        return f"job {job.name}: cannot write its {what} under {self.outputs[job.name]}: {type(e).__name__}: {e}"

    @property
    def running(self) -> list[Job]:
        return [j for j in self.jobs.values() if not j.done]

    def step(self) -> FusedStepStats | None:
        """One optimizer step of every running job, fused; checkpoints jobs that reach their interval."""
        done = self.steps(1)
        return done[0] if done else None

    def steps(self, n: int = 1) -> list[FusedStepStats]:
        """Up to n optimizer steps of every running job, each step's stats. On a pipeline stage they
        run in as few pipelines as the jobs' saves allow (one drains whenever a job ends or is due a
        checkpoint), so the pipeline stays full across steps; fused, one step at a time."""
        out: list[FusedStepStats] = []
        while len(out) < n and self.running:
            jobs = self.running
            if self.stage is None:
                out.append(self._fused_step(jobs))
                continue
            run = self.engine.run(jobs, min([n - len(out)] + [steps_until_saved(j) for j in jobs]))
            for stats in run:
                self._take(jobs, stats, save=False)
            for job in jobs:
                if job.name in self.jobs:
                    self._save_due(job)
            out += run
        return out

    def _fused_step(self, jobs: list[Job]) -> FusedStepStats:
        snaps = {j.name: j.snapshot() for j in jobs}
        try:
            stats = self.engine.step(jobs)
        except torch.OutOfMemoryError as e:
            stats = self._out_of_memory(jobs, snaps, e)
        self._take(jobs, stats, save=True)
        return stats

    def _take(self, jobs: list[Job], stats: FusedStepStats, save: bool) -> None:
        """A step's records into the jobs' status; a non-finite one stops its job."""
        for job in jobs:
            if job.name not in stats.records or job.name not in self.jobs:
                continue  # undone after an out-of-memory step, or stopped at an earlier step
            st, rec = self.status[job.name], stats.records[job.name]
            if not rec.finite:
                self._stop(job, _non_finite_error(job, rec))
                continue
            st.step, st.loss, st.metrics = rec.step, rec.loss, dict(rec.metrics)
            st.tokens += rec.tokens
            st.seconds += stats.seconds
            st.padding = rec.padding
            if self._eval_due(job):
                rec.eval_loss = st.eval_loss = self._heldout_loss(job)
                st.eval_step = rec.step
            if save:
                self._save_due(job)

    def _eval_due(self, job: Job) -> bool:
        every = self.configs[job.name].eval.loss_every
        return (bool(every) and self.stage is None and not job.preference and bool(self.eval_rows.get(job.name))
                and (job.step % every == 0 or job.done))

    def _heldout_loss(self, job: Job) -> float:
        """The job's loss on its held-out rows (up to eval.max_examples), encoded once."""
        from rayft.data import encode_examples

        if job.name not in self._eval_encoded:
            cfg = self.configs[job.name]
            rows = self.eval_rows[job.name][: cfg.eval.max_examples]
            self._eval_encoded[job.name] = encode_examples(rows, self.tokenizer, cfg.dataset(job.cfg.dataset).template)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        return heldout_loss(self.am, self._eval_encoded[job.name], job.adapter.name, pad)

    def _save_due(self, job: Job) -> None:
        """The adapter of a finished job, then its checkpoint (a final checkpoint means the adapter is
        on disk), or a checkpoint at its interval. A save that fails fails this job alone."""
        every = job.cfg.checkpoint_every
        what, adapter = "adapter", None
        try:
            if job.done:
                adapter = self.save_adapter(job.name)
            what = "checkpoint"
            if job.done or (every and job.step % every == 0):
                self._checkpoint(job)
        except SAVE_ERRORS as e:
            if adapter is not None:  # a failed job leaves no adapter behind for a server to pick up
                shutil.rmtree(adapter, ignore_errors=True)
            self._stop(job, self._save_error(job, what, e))
            return
        if job.done:
            self.status[job.name].state = JobState.DONE

    def _out_of_memory(self, jobs: list[Job], snaps: dict, error: Exception) -> FusedStepStats:
        """Undo the failed step for every job, then take off the job with the biggest micro-batch,
        checkpointed (state "oom": the controller requeues it with a smaller token budget). The
        others go on as if the step had never been tried."""
        # a job whose accumulation ended before the failing micro-batch keeps its step
        completed = {j.name: j.history[-1] for j in jobs if not j.rollback(snaps[j.name])}
        pending = [j for j in jobs if j.name not in completed]
        victim = self.jobs[out_of_memory_victim([(j.name, j.cfg.tokens_per_micro_batch) for j in pending])]
        cfg, out = self.configs[victim.name], self.outputs[victim.name]
        st = self.remove_job(victim.name, state=JobState.OOM)
        why = f"out of memory at tokens_per_micro_batch={victim.cfg.tokens_per_micro_batch}"
        if st.state == JobState.OOM:
            st.error = f"{why}: {str(error)[:200]}"
            log.warning("job %s: %s", victim.name, st.error)
        self.status[victim.name] = st  # reported once, then forgotten (the replica's report)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if st.state == JobState.OOM and self.retry_out_of_memory:
            from rayft.store.registry import job_config

            self._retry_smaller(st, why, job_config(cfg, victim.name), out)
        return FusedStepStats(0.0, 0, 0, completed)

    def _retry_smaller(self, st: JobStatus, why: str, cfg: RunConfig, out: Path) -> None:
        """Put an out-of-memory job back with 1/d the rows per micro-batch and d times the
        accumulation (the same training), resumed from the checkpoint it was just given."""
        from rayft.scheduler.plan import cannot_shrink, halve_micro_batch, retried_smaller

        smaller = halve_micro_batch(cfg)  # the controller's rule, so the same shrinking
        if smaller is None:
            self._fail(st, f"{st.error}; {cannot_shrink(cfg)}")
            return
        new = self.add_job(smaller.jobs[0], smaller, out)
        new.warnings = st.warnings + [retried_smaller(why, smaller)]
        new.tokens, new.seconds = new.tokens + st.tokens, new.seconds + st.seconds

    def _checkpoint(self, job: Job) -> None:
        if self.stage is None:
            save_checkpoint(job, self.outputs[job.name])
        else:  # every stage's shard, written as one checkpoint by the first stage
            self.engine.save_checkpoint(job, self.outputs[job.name])
        if self.stage is None or self.stage.spec.first:
            self.on_saved(job.name, self.outputs[job.name])

    def run(self, max_steps: int | None = None) -> None:
        n = 0
        while self.running and (max_steps is None or n < max_steps):
            self.step()
            n += 1

    def save_adapter(self, job_name: str) -> Path:
        job = self.jobs[job_name]
        out = self.outputs[job_name] / layout.adapter(job.adapter.name)
        if self.stage is not None:
            return self.engine.save_adapter(job, out, self.base_model.path)
        return save_adapter(self.am, job.adapter.name, out, base_model=self.base_model.path)

    def evaluate(self, max_examples: int | None = None, max_new_tokens: int | None = None) -> dict[str, dict]:
        """Greedy exact match of each job's adapter, and of the base model, on that job's held-out rows
        (a preference job: preference accuracy, `rayft.train.evaluate.preference_accuracy`). None on a
        pipeline stage (generation needs the whole model; evaluate the saved adapter)."""
        if self.stage is not None:
            return {}
        results = {}
        for name, job in self.jobs.items():
            cfg = self.configs[name]
            n = cfg.eval.max_examples if max_examples is None else max_examples
            new = max_new_tokens or cfg.eval.max_new_tokens
            rows = self.eval_rows.get(name, [])[:n]
            if not rows:
                continue
            if job.preference:
                t0 = time.perf_counter()
                pairs = encode_pairs(rows, self.tokenizer)
                pad = self.tokenizer.pad_token_id
                results[name] = {
                    "examples": len(rows),
                    "adapter_preference_accuracy": preference_accuracy(self.am, pairs, job.adapter.name, pad),
                    "base_preference_accuracy": preference_accuracy(self.am, pairs, None, pad),
                    "seconds": time.perf_counter() - t0,
                }
                continue
            template = cfg.dataset(job.cfg.dataset).template
            pairs = [prompt_and_answer(r, self.tokenizer, template) for r in rows]
            prompts, answers = [p for p, _ in pairs], [a for _, a in pairs]
            t0 = time.perf_counter()
            tuned = greedy_generate(self.am, self.tokenizer, prompts, job.adapter.name, new)
            base = greedy_generate(self.am, self.tokenizer, prompts, None, new)
            results[name] = {
                "examples": len(rows),
                "adapter_exact_match": exact_match(tuned, answers),
                "base_exact_match": exact_match(base, answers),
                # the score of always giving the training set's most common answer: an adapter
                # that only learned the answer format lands here, not above
                "majority_exact_match": exact_match([self.majority_answer[name]] * len(answers), answers),
                "sample": {"answer": answers[0], "adapter": tuned[0], "base": base[0]},
                "seconds": time.perf_counter() - t0,
            }
        return results


def steps_until_saved(job: Job) -> int:
    """Optimizer steps until the job ends or reaches its next checkpoint (at least 1)."""
    left = job.total_steps - job.step
    every = job.cfg.checkpoint_every
    return max(1, min(left, every - job.step % every) if every else left)


def _non_finite_error(job: Job, rec: StepRecord) -> str:
    return (f"non-finite training at step {rec.step} of {job.total_steps}: loss {rec.loss}, gradient norm "
            f"{rec.grad_norm}; that step was skipped and the job stopped (its last checkpoint stands, its "
            f"adapter is not saved): lower optimizer.lr (now {job.cfg.optimizer.lr:g})")
