"""What the dashboard shows and does, through the cluster's controller actor: the same calls, and so
the same errors, as `rayft status`, `rayft cancel` and `rayft priority`. Needs a connected Ray."""

from __future__ import annotations


class SourceError(Exception):
    """The controller refused an action (its reason), or is not there."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class ControllerSource:
    def __init__(self, timeout_s: float = 30.0):
        self.timeout_s = timeout_s

    def _call(self, method: str, *args):
        import ray

        from rayft.cluster.controller import get_controller, refusal

        try:
            ctl = get_controller(start=False)
        except ValueError:
            raise SourceError("no rayft controller on this cluster (`rayft submit` starts one)", 503) from None
        try:
            return ray.get(getattr(ctl, method).remote(*args), timeout=self.timeout_s)
        except ray.exceptions.RayTaskError as e:  # the controller's own reason, as the CLI shows it
            raise SourceError(refusal(e)) from None
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
            raise SourceError(f"the controller did not answer ({type(e).__name__}); it may be restarting", 503) from None

    def status(self) -> dict:
        return self._call("status")

    def metrics(self, job_id: str, after_step: int) -> list:
        return [list(row) for row in self._call("metrics_history", job_id, after_step)]

    def cancel(self, job_id: str) -> str:
        return str(self._call("cancel", job_id))

    def set_priority(self, job_id: str, priority: int) -> int:
        return self._call("set_priority", job_id, priority)
