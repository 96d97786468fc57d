"""Every job state, in one enum: the registry's, the replicas' reports, the trainer's, the CLI's
and the metrics' (values are the strings stored in SQLite and sent over Ray)."""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    QUEUED = "queued"  # waiting for a replica (registry)
    RUNNING = "running"  # on a replica
    DONE = "done"  # trained to its last step, its adapter written
    FAILED = "failed"  # stopped for good, with the reason
    CANCELLED = "cancelled"  # stopped by its user
    # what a replica reports of a job it took off; the registry then requeues it
    PREEMPTED = "preempted"  # checkpointed to make room for another
    OOM = "oom"  # checkpointed after running out of memory: requeued with smaller micro-batches

    @property
    def is_terminal(self) -> bool:
        """The job will never run again."""
        return self in (JobState.DONE, JobState.FAILED, JobState.CANCELLED)

    @property
    def leaves_replica(self) -> bool:
        """A replica reports the job once in this state, then forgets it."""
        return self in (JobState.DONE, JobState.FAILED, JobState.OOM)


# the states a job has in the registry, and where each may go (running -> queued: a preemption or a
# lost replica; the job resumes from its checkpoint)
REGISTRY_STATES = (JobState.QUEUED, JobState.RUNNING, JobState.DONE, JobState.FAILED, JobState.CANCELLED)
TRANSITIONS = {
    JobState.QUEUED: {JobState.RUNNING, JobState.FAILED, JobState.CANCELLED},
    JobState.RUNNING: {JobState.QUEUED, JobState.DONE, JobState.FAILED, JobState.CANCELLED},
    JobState.DONE: set(),
    JobState.FAILED: set(),
    JobState.CANCELLED: set(),
}
