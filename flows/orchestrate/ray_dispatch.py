"""Stage bodies as plain Ray tasks, called from Prefect tasks that run in this process (``dispatch: ray``).

prefect-ray's ``RayTaskRunner`` runs Prefect's whole task engine inside the Ray worker: on this 2-core machine
that costs about 150 ms per task, against 22 ms for a Prefect task on threads, with or without its body sent to
Ray, and 1 ms for a plain Ray task (no-op tasks, ``bench/orchestration.py``). With ``dispatch: ray`` (the default)
each stage stays one Prefect task run, with its cache key, retries and state, in this process's threads, and
only its body, :func:`flows.engine.run_stage`, goes to Ray with the stage's CPU/GPU reservation. Ray keeps
worker processes alive between tasks (GPU tasks too, ``max_calls=0``), so models load once per worker; the
workers need the store but not the Prefect API. ``dispatch: prefect-ray`` keeps prefect-ray's runner.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

from flows.config.profiles import Profile
from flows.orchestrate import lifeline

_REMOTES: dict[str, Any] = {}
_REMOTES_LOCK = threading.Lock()


class _DefaultAuthNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


_DEFAULT_AUTH_NOTICE = _DefaultAuthNotice()  # one instance: addFilter then adds it once, however many runs


def init_kwargs(profile: Profile) -> dict[str, Any]:
    """``ray.init`` arguments of a profile: quiet (no dashboard, worker output stays in Ray's logs)."""
    r = profile.runner
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING}
    if r.address is None:
        # Ray runs its workers at nice 15 by default, behind every other process of the machine; a local Ray
        # started for v2v is the main compute, so keep it at normal priority (inherited by the raylet).
        os.environ.setdefault("RAY_worker_niceness", "0")
        # Ray's head processes die with the driver, but its dashboard and runtime-env agents outlive a killed
        # one (re-parented to init, deaf to SIGTERM): the lifeline reaps them (prefect-ray's runner too).
        lifeline.ensure()
        if r.num_cpus:
            kwargs["num_cpus"] = r.num_cpus
        if r.num_gpus is not None:
            kwargs["num_gpus"] = r.num_gpus
    return kwargs


@contextlib.contextmanager
def ray_session(profile: Profile) -> Iterator[None]:
    """Ray connected for the run: joins one already initialised in this process, else starts (and later stops)
    a local Ray or connects to ``runner.address``."""
    import ray

    if ray.is_initialized():
        yield
        return
    if profile.runner.address is None:
        # Ray announces, once per new local cluster, that it enabled token authentication by default: true
        # and not actionable for a cluster v2v starts and stops itself, and it would cut into the progress bars.
        logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(_DEFAULT_AUTH_NOTICE)
    ray.init(address=profile.runner.address, **init_kwargs(profile))
    if profile.runner.address is None:
        lifeline.rescan()
    try:
        yield
    finally:
        ray.shutdown()


def stage_slots(profile: Profile) -> int:
    """Stage tasks the cluster can run at once (its CPUs / the CPUs a task reserves)."""
    import ray

    cpus = float(ray.cluster_resources().get("CPU", 1.0))
    return max(1, int(cpus // profile.runner.cpus_per_task))


def call(fn: Callable[..., Any], resources: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
    """Run ``fn(*args, **kwargs)`` as a Ray task with ``resources`` and wait for it; a failure raises the
    task's own exception (a bad input stays a bad input, with its message)."""
    import ray

    name = f"{fn.__module__}.{fn.__qualname__}"
    with _REMOTES_LOCK:  # stage threads start together: one remote function (one export to the cluster)
        if name not in _REMOTES:
            _REMOTES[name] = ray.remote(fn)
    ref = _REMOTES[name].options(**resources).remote(*args, **kwargs)
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as err:
        cause = getattr(err, "cause", None)
        if isinstance(cause, BaseException):
            raise cause from None
        raise
