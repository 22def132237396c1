"""The training service's one facade (as MLServer's data plane): what the gRPC servicer calls,
in plain types, and what a REST front would call alike. It checks specs, keeps the job store
and the MLflow queries off the event loop, and streams a job's progress."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

from mlflow.exceptions import MlflowException

from services.common.errors import InvalidArgument, NotFound, quote
from services.common.limits import check_filter
from services.common.paging import PageRequest, PageToken
from services.common.paths import Confinement
from services.training import datasets
from services.training import spec as specs
from services.training.datasets import FeatureSource
from services.training.jobs import JobStore
from services.training.schedules import ScheduleStore, check_cron
from services.training.tracking import PARENT_TAG, Tracker
from services.training.types import Job, JobSpec, JobState, Schedule

WATCH_POLL_SECONDS = 0.5
MAX_COMPARE = 50


@dataclass(frozen=True)
class Experiment:
    experiment_id: str
    name: str
    artifact_location: str


@dataclass(frozen=True)
class RunView:
    run_id: str
    experiment_id: str
    run_name: str
    status: str
    parent_run_id: str
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]
    start_time: datetime | None
    end_time: datetime | None
    artifact_uri: str


@dataclass(frozen=True)
class Compared:
    key: str
    values: list[str]
    differs: bool


@dataclass
class Comparison:
    runs: list[RunView]
    rows: list[Compared] = field(default_factory=list)


def _ms(t: int | None) -> datetime | None:
    return datetime.fromtimestamp(t / 1000, UTC) if t else None


def _run_view(r) -> RunView:
    tags = dict(r.data.tags)
    return RunView(run_id=r.info.run_id, experiment_id=r.info.experiment_id, run_name=r.info.run_name or "",
                   status=r.info.status, parent_run_id=tags.get(PARENT_TAG, ""), params=dict(r.data.params),
                   metrics=dict(r.data.metrics), tags={k: v for k, v in tags.items() if not k.startswith("mlflow.")},
                   start_time=_ms(r.info.start_time), end_time=_ms(r.info.end_time), artifact_uri=r.info.artifact_uri)


class TrainingDataPlane:
    def __init__(self, jobs: JobStore, tracker: Tracker, confinement: Confinement,
                 features: FeatureSource | None = None, schedules: ScheduleStore | None = None) -> None:
        self.jobs = jobs
        self.schedules = schedules or ScheduleStore(jobs.db, jobs)
        self.tracker = tracker
        self.confinement = confinement
        self.features = features

    # -- jobs --------------------------------------------------------------------------------------
    async def submit(self, spec: JobSpec, principal: str, request_id: str) -> Job:
        spec = await self._checked(spec)
        return await asyncio.to_thread(self.jobs.submit, spec, principal, request_id)

    async def _checked(self, spec: JobSpec, field: str = "spec") -> JobSpec:
        spec = specs.check(spec)
        ds = spec.dataset
        # What can be known now is refused now, not when a worker runs the job: paths, columns,
        # the feature set.
        await asyncio.to_thread(datasets.check_table, ds, self.confinement)
        if ds.entity_table_uri:
            self.confinement.readable(ds.entity_table_uri, "spec.dataset.features.entity_table_uri")
        if ds.from_features:
            if self.features is None:
                raise InvalidArgument("spec.dataset.features", "this training service has no feature store "
                                      "configured")
            await asyncio.to_thread(self.features.check, ds)
        return spec

    async def get(self, job_id: str) -> Job:
        return await asyncio.to_thread(self.jobs.get, job_id)

    async def list(self, state: JobState | None, page_size: int, page_token: str) -> tuple[list[Job], str]:
        return await asyncio.to_thread(self.jobs.list, state, page_size, page_token)

    async def cancel(self, job_id: str) -> Job:
        return await asyncio.to_thread(self.jobs.cancel, job_id)

    async def watch(self, job_id: str) -> AsyncIterator[Job]:
        """The job now, then on every change of state or progress, until it finishes."""
        last = None
        while True:
            job = await asyncio.to_thread(self.jobs.get, job_id)
            seen = (job.state, job.progress, job.error)
            if seen != last:
                last = seen
                yield job
            if job.state.finished:
                return
            await asyncio.sleep(WATCH_POLL_SECONDS)

    # -- schedules ---------------------------------------------------------------------------------
    async def create_schedule(self, description: str, cron: str, spec: JobSpec, principal: str,
                              request_id: str) -> Schedule:
        check_cron(cron)
        spec = await self._checked(spec)
        return await asyncio.to_thread(self.schedules.create, description, cron, spec, principal, request_id)

    async def schedules_page(self, page_size: int, page_token: str) -> tuple[list[Schedule], str]:
        return await asyncio.to_thread(self.schedules.list, page_size, page_token)

    async def pause_schedule(self, schedule_id: str, paused: bool) -> Schedule:
        return await asyncio.to_thread(self.schedules.pause, schedule_id, paused)

    async def delete_schedule(self, schedule_id: str) -> None:
        await asyncio.to_thread(self.schedules.delete, schedule_id)

    async def trigger(self, schedule_id: str, principal: str, reason: str, request_id: str) -> Job:
        return await asyncio.to_thread(self.schedules.trigger, schedule_id, principal, reason, request_id)

    async def tick(self) -> list[str]:
        return await asyncio.to_thread(self.schedules.tick)

    # -- runs (MLflow) -----------------------------------------------------------------------------
    async def experiments(self, page_size: int, page_token: str) -> tuple[list[Experiment], str]:
        page = PageRequest.parse("ListExperiments", page_size, page_token, key=str)

        def query() -> tuple[list[Experiment], str]:
            got = self.tracker.client.search_experiments(max_results=page.size, page_token=page.after)
            items = [Experiment(e.experiment_id, e.name, e.artifact_location) for e in got]
            return items, _token(page, got.token)
        return await asyncio.to_thread(query)

    async def search_runs(self, experiment_ids: list[str], filter_string: str, order_by: list[str], page_size: int,
                          page_token: str) -> tuple[list[RunView], str]:
        check_filter(filter_string, "filter")
        if len(order_by) > 10:
            raise InvalidArgument("order_by", "at most 10 clauses")
        page = PageRequest.parse("SearchRuns", page_size, page_token, {
            "experiments": sorted(experiment_ids), "filter": filter_string, "order": list(order_by)}, key=str)

        def query() -> tuple[list[RunView], str]:
            ids = list(experiment_ids) or [e.experiment_id for e in self.tracker.client.search_experiments()]
            try:
                got = self.tracker.client.search_runs(ids, filter_string=filter_string, order_by=list(order_by) or None,
                                                      max_results=page.size, page_token=page.after)
            except MlflowException as e:
                raise InvalidArgument("filter", f"MLflow refused the search: {quote(e.message, bare=True)}") from None
            return [_run_view(r) for r in got], _token(page, got.token)
        return await asyncio.to_thread(query)

    async def get_run(self, run_id: str) -> RunView:
        return await asyncio.to_thread(self._run, run_id, "run_id")

    def _run(self, run_id: str, field_name: str) -> RunView:
        if not run_id or len(run_id) > 64 or not run_id.isalnum():
            raise InvalidArgument(field_name, f"{quote(run_id)} is not an MLflow run id")
        try:
            return _run_view(self.tracker.client.get_run(run_id))
        except MlflowException:
            raise NotFound(f"runs/{run_id} does not exist") from None

    async def compare(self, run_ids: list[str]) -> Comparison:
        if not 2 <= len(run_ids) <= MAX_COMPARE:
            raise InvalidArgument("run_ids", f"give 2 to {MAX_COMPARE} run ids")

        def query() -> Comparison:
            runs = [self._run(r, f"run_ids[{i}]") for i, r in enumerate(run_ids)]
            rows = []
            for kind in ("params", "metrics"):
                keys = sorted({k for r in runs for k in getattr(r, kind)})
                for k in keys:
                    values = [str(getattr(r, kind).get(k, "")) for r in runs]
                    rows.append(Compared(f"{kind}.{k}", values, len(set(values)) > 1))
            return Comparison(runs, rows)
        return await asyncio.to_thread(query)


def _token(page: PageRequest, mlflow_token: str | bytes | None) -> str:
    """Our token around MLflow's: bound to the query like every list's."""
    if isinstance(mlflow_token, bytes):  # the SQL store hands out bytes
        mlflow_token = mlflow_token.decode()
    return PageToken.encode(mlflow_token, page.query) if mlflow_token else ""
