"""The Prefect flows: ``edit_video`` (one clip) and ``edit_catalog`` (a catalog), stage tasks keyed by the store.

Each stage call is one Prefect task run whose cache key is the artifact key (:class:`StoreKeyPolicy`); what
Prefect persists is the small reference the task returns, never arrays. The Zarr store stays the source of
truth: the policy only offers Prefect a key when the artifact is committed, and the task itself returns at
once when it is, so an empty (or deleted) Prefect database changes nothing. Retries are for transient errors
only (I/O hiccups, lost connections); a bad input fails at once with its reason.

Importing this module imports Prefect; the CLI does so only when a run has work to do.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows.orchestrate import prefect_env

prefect_env.configure()

from prefect import flow, task  # noqa: E402
from prefect.cache_policies import CachePolicy  # noqa: E402
from prefect.context import TaskRunContext  # noqa: E402
from prefect.task_runners import ThreadPoolTaskRunner  # noqa: E402

from flows.config.profiles import Profile  # noqa: E402
from flows.config.request import CatalogArg, RunRequest, SingleVideo  # noqa: E402
from flows.exports.outputs import OutputsConfig  # noqa: E402
from flows.orchestrate.job_tasks import run_job_tasks, use_job_tasks  # noqa: E402
from flows.plan.planner import StagePlan  # noqa: E402
from flows.plan.run_plan import stream_catalog  # noqa: E402
from flows.run.executors import run_stage  # noqa: E402
from flows.run.lease import run_lease  # noqa: E402
from flows.run.outcomes import BLOCKED, Done, Failed, FailureKind, TaskOutcome, failure_of  # noqa: E402
from flows.run.results import Reporter, RunReport  # noqa: E402
from flows.run.scheduler import schedule  # noqa: E402
from storage.store import ArtifactStore  # noqa: E402
from storage.write_behind import store_for  # noqa: E402


@dataclass
class StoreKeyPolicy(CachePolicy):
    """Prefect cache key = the artifact key, offered only while the artifact is committed in the store."""

    def compute_key(self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> str | None:
        call = inputs.get("call")
        if call is None:
            return None
        store = store_for(inputs["store_url"], inputs.get("store_options"))
        return f"v2v-{call.stage}-{call.key}" if store.exists(call.ref) else None


_TRANSIENT_ERRNOS = {errno.EIO, errno.EAGAIN, errno.EBUSY, errno.ETIMEDOUT, errno.ECONNRESET, errno.EPIPE}


def transient(task_: Any, task_run: Any, state: Any) -> bool:
    """Retry only what may pass on its own: lost connections, timeouts, transient I/O errors."""
    from stages.base import StageInputError

    try:
        exc = state.result(raise_on_failure=False)
    except Exception as err:  # the result itself could not be read
        exc = err
    if isinstance(exc, StageInputError | MemoryError):
        return False
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    return isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS


@task(name="stage", cache_policy=StoreKeyPolicy(), persist_result=True, retries=2, retry_delay_seconds=2,
      retry_condition_fn=transient)
def stage_task(call: Any, store_url: str, store_options: dict[str, Any] | None, device: str,
               externals: dict[str, Any] | None, threads: int | None = None, write_behind: bool = False,
               ray_resources: dict[str, Any] | None = None, compute_slots: int | None = None) -> dict[str, Any]:
    """One stage call (submitted once the artifacts it reads exist); ``ray_resources``: its body runs as a
    Ray task with that reservation (``dispatch: ray``)."""
    if ray_resources is not None:
        from flows.orchestrate import ray_dispatch

        return ray_dispatch.call(run_stage, ray_resources, call, store_url, store_options, device, externals,
                                 threads)
    return run_stage(call, store_url, store_options, device, externals, threads, write_behind, compute_slots)


@task(name="export", retries=1, retry_condition_fn=transient)
def outputs_task(ray_resources: dict[str, Any] | None = None, **kwargs: Any) -> dict[str, str]:
    """A finished job's video files and contact sheet (no-op when up to date)."""
    from flows.exports.outputs import job_outputs

    if ray_resources is not None:
        from flows.orchestrate import ray_dispatch

        return ray_dispatch.call(job_outputs, ray_resources, **kwargs)
    return job_outputs(**kwargs)


class PrefectExecutor:
    """Submits stage tasks to the flow's task runner (threads or Ray)."""

    name = "prefect"

    def __init__(self, store: ArtifactStore, profile: Profile) -> None:
        self.store, self.profile = store, profile
        # Local threads: max_workers stages compute at once (a gate inside the task), one more stage task is in
        # flight so that Prefect's ~20 ms per task and its input reads overlap the computing stage, and the
        # runner has a thread for exports on top. Ray workers commit before returning (the next stage may run
        # in another process); prefect-ray's runner queues tasks itself.
        r = profile.runner
        self.in_process = r.kind == "local"
        self.ray_tasks = r.kind == "ray" and r.dispatch == "ray"
        self.stage_slots: int | None = r.max_workers + 1 if self.in_process else None
        if self.ray_tasks:
            from flows.orchestrate import ray_dispatch

            self.stage_slots = ray_dispatch.stage_slots(profile)

    def submit(self, job_id: str, sp: StagePlan, externals: dict[str, Any] | None) -> Any:
        t = stage_task.with_options(name=sp.stage, task_run_name=f"{job_id}:{sp.stage}")
        args = {"call": sp.call, "store_url": self.store.url, "store_options": self.store.storage_options or None,
                "device": self.profile.device, "externals": externals, "threads": self._threads(),
                "write_behind": self.in_process}
        if self.in_process:
            args["compute_slots"] = self.profile.runner.max_workers
        return self._submit(t, args, gpu=sp.gpu)

    def submit_outputs(self, job_id: str, kwargs: dict[str, Any]) -> Any:
        return self._submit(outputs_task.with_options(task_run_name=f"{job_id}:export"), kwargs, gpu=False)

    def _resources(self, gpu: bool) -> dict[str, Any]:
        opts = self.profile.runner
        resources: dict[str, Any] = {"num_cpus": opts.cpus_per_task}
        if gpu and self.profile.device.startswith("cuda"):
            # Ray retires a GPU task's worker after one call by default (max_calls=1): keep it, so the
            # model it loaded stays loaded for the next task.
            resources.update(num_gpus=opts.gpus_per_task, max_calls=0)
        return resources

    def _threads(self) -> int | None:
        """Ray workers: threads per task = the CPUs the task reserves (local threads keep the defaults)."""
        r = self.profile.runner
        return max(1, int(r.cpus_per_task)) if r.kind == "ray" else None

    def _submit(self, t: Any, args: dict[str, Any], *, gpu: bool) -> Any:
        if self.ray_tasks:
            return t.submit(**args, ray_resources=self._resources(gpu))
        if self.profile.runner.kind == "ray":
            from prefect_ray.context import remote_options

            with remote_options(**self._resources(gpu)):
                return t.submit(**args)
        return t.submit(**args)

    def on_done(self, handle: Any, fn: Callable[[], None]) -> None:
        handle.add_done_callback(lambda _: fn())

    def outcome(self, handle: Any) -> TaskOutcome:
        handle.wait()
        state = handle.state
        if state.is_completed():
            result = handle.result()
            prefect_env.forget_result_links(result)
            return Done(result)
        # A task whose upstream failed never starts (Prefect leaves it Pending / NotReady).
        if not state.is_final() or state.name == "NotReady" or "upstream" in str(state.message or "").lower():
            return BLOCKED
        try:
            exc = state.result(raise_on_failure=False)
        except Exception as err:  # the failure itself could not be read back
            exc = err
        if isinstance(exc, BaseException):
            return failure_of(exc)
        return Failed(FailureKind.INTERNAL, state.message or state.name)


def task_runner_for(profile: Profile) -> Any:
    r = profile.runner
    if r.kind == "ray" and r.dispatch == "prefect-ray":
        from prefect_ray import RayTaskRunner

        from flows.orchestrate.ray_dispatch import init_kwargs

        return RayTaskRunner(address=r.address, init_kwargs=init_kwargs(profile))
    if r.kind == "ray":  # threads waiting on Ray tasks: one per slot, + 1 for exports
        from flows.orchestrate.ray_dispatch import stage_slots

        return ThreadPoolTaskRunner(max_workers=stage_slots(profile) + 1)
    return ThreadPoolTaskRunner(max_workers=r.max_workers + 2)  # see PrefectExecutor.stage_slots


# ---- the flows: parameters in, plan and run inside ------------------------------------------------------

# Progress bars of the `v2v` process that calls the flow (display only; a deployment's run has none).
_REPORTER: contextvars.ContextVar[Reporter | None] = contextvars.ContextVar("v2v_reporter", default=None)


def _summary_artifact(report: RunReport, title: str) -> None:
    from prefect.artifacts import create_table_artifact

    try:
        create_table_artifact(table=report.rows(), key="v2v-summary",
                              description=f"{title}: {len(report.jobs)} jobs, {len(report.failed)} failed, "
                                          f"{report.wall_seconds:.1f} s")
    except Exception:  # the summary is printed anyway; never fail a run over the UI table
        pass


def _body(catalog: CatalogArg | None, profile: str | Profile, store: str | None, request: RunRequest | None,
          title: str) -> dict[str, Any]:
    start = time.perf_counter()
    prof, st, total, plans = stream_catalog(catalog, profile, store, request)
    if use_job_tasks(total, prof.runner):
        with run_lease(st) as lease:
            report = run_job_tasks(plans, st, prof.device, prof.runner.max_workers, _REPORTER.get(),
                                   OutputsConfig.of(prof), start, total=total, lease=lease)
    else:
        with run_lease(st) as lease:
            report = schedule(plans, PrefectExecutor(st, prof), st, _REPORTER.get(), OutputsConfig.of(prof),
                              start=start, window=prof.runner.plan_ahead, total=total, lease=lease)
    _summary_artifact(report, title)
    return {"jobs": report.rows(), "wall_seconds": round(report.wall_seconds, 3),
            "compute_seconds": round(report.compute_seconds, 3), "failed": len(report.failed),
            "_report": report}


@flow(name="edit_catalog", log_prints=False, validate_parameters=True)
def edit_catalog(catalog: CatalogArg, profile: str | Profile = "local", store: str | None = None,
                 request: RunRequest | None = None) -> dict[str, Any]:
    """Run every job of a catalog (a file, or an in-memory catalog's entries); finished stages are cache hits,
    new rows run. The flow plans the catalog itself: its parameters are the whole run."""
    title = f"catalog {Path(catalog).name}" if isinstance(catalog, str) else "catalog (in memory)"
    return _body(catalog, profile, store, request, title)


@flow(name="edit_video", log_prints=False, validate_parameters=True)
def edit_video(video: str, prompt: str, profile: str | Profile = "local", store: str | None = None,
               request: RunRequest | None = None) -> dict[str, Any]:
    """Edit one clip; ``request.video`` carries its edit input (first_frame, instruction, masks, ...)."""
    req = RunRequest.coerce(request)
    one = req.video or SingleVideo(source=video, prompt=prompt)
    req = req.model_copy(update={"video": one.model_copy(update={"source": video, "prompt": prompt})})
    return _body(None, profile, store, req, f"video {Path(video).name}")


def run_flow(flow_name: str, params: dict[str, Any], profile: Profile, reporter: Reporter | None = None
             ) -> RunReport:
    """Call a flow with the profile's task runner inside a managed Prefect session."""
    fl = {"edit_catalog": edit_catalog, "edit_video": edit_video}[flow_name]
    r = profile.runner
    token = _REPORTER.set(reporter)
    try:
        with prefect_env.prefect_session(), contextlib.ExitStack() as stack:
            if r.kind == "ray" and r.dispatch == "ray":
                from flows.orchestrate.ray_dispatch import ray_session

                stack.enter_context(ray_session(profile))
            result = fl.with_options(task_runner=task_runner_for(profile))(**params)
    finally:
        _REPORTER.reset(token)
    return result["_report"]
