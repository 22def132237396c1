"""Training sets: a point-in-time result (historical.py) written as Parquet for a training job,
with a dataset id and sha256 for lineage (training jobs record them; the registry keeps them with
the model).

A write, governed as one: the RPC needs the developer role and is audited; the file goes only
under the artifact store's `training-sets/` prefix (services/common/paths.py checks the place);
an existing training set is replaced only when the request says `overwrite`, and only by the
principal that wrote it; a file there that no CreateTrainingSet wrote is never replaced. The
`training_sets` row claims the place before the (expensive) join runs, so two writers cannot both
take it; the file itself appears whole or not at all (offline.write_parquet / the S3 store's
put), and a failed run gives the place back as it was.

Request ids follow the platform's rule (services/common/idempotency.py: bounded ids, a retry
with the same id and payload answers the first result, another payload is INVALID_ARGUMENT
naming request_id); the id and the payload's digest are kept on the training set's own row,
which is what claims the place, so the claim and the id are one write. The digest comes with the
request (TrainingSetRequest.request_hash): the transport's, of the request as it arrived, so the
digests stored before this module knew no protobuf still match their retries.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import delete, insert, select, update
from sqlalchemy.engine import Row
from sqlalchemy.exc import IntegrityError

from services.common.db import Database
from services.common.errors import Aborted, AlreadyExists, InvalidArgument, PermissionDenied, quote
from services.common.idempotency import check_request_id, reused
from services.features import tables as t
from services.features.files import OfflineFiles
from services.features.historical import HistoricalRetrieval
from services.features.records import dataset_from_json, dataset_json
from services.features.types import Dataset, TrainingSetRequest

TRAINING_SETS = "training-sets"
PENDING, READY = "PENDING", "READY"


class TrainingSets:
    def __init__(self, db: Database, historical: HistoricalRetrieval, files: OfflineFiles) -> None:
        self.db = db
        self.historical = historical
        self.files = files

    def create(self, request: TrainingSetRequest, principal: str) -> Dataset:
        """Compute and write the training set `request` describes; see the module docstring."""
        if not request.output_uri:
            raise InvalidArgument("output_uri", "is required")
        place = self.files.writable(request.output_uri, "output_uri", under=TRAINING_SETS)
        if not place.endswith(".parquet"):
            raise InvalidArgument("output_uri", "must end with .parquet")
        check_request_id(request.request_id)
        payload_hash = request.request_hash  # what a retry with the same id must repeat
        if request.request_id and (prior := self._by_request_id(request.request_id)) is not None:
            if prior.request_hash != payload_hash or prior.created_by != principal:
                raise reused(request.request_id)
            if prior.state != READY:
                raise Aborted(f"training set {quote(request.output_uri)} is still being written; retry later")
            return dataset_from_json(prior.dataset)
        previous = self._claim(place, request, principal, payload_hash)
        try:
            result, features = self.historical.compute(request)
            digest = self.files.write_parquet(result, request.output_uri, "output_uri", under=TRAINING_SETS)
        except BaseException:
            self._release(place, previous)
            raise
        now = datetime.now(UTC)
        dataset = Dataset(dataset_id=f"ds-{digest[:16]}", uri=request.output_uri, sha256=digest,
                          rows=result.num_rows, features=tuple(features), feature_set=request.feature_set,
                          created_by=principal, create_time=now)
        with self.db.session() as c:
            c.execute(update(t.training_sets).where(t.training_sets.c.uri == place)
                      .values(state=READY, dataset=dataset_json(dataset), update_time=now))
        return dataset

    def _by_request_id(self, request_id: str) -> Row | None:
        with self.db.read() as c:
            return c.execute(select(t.training_sets)
                             .where(t.training_sets.c.request_id == request_id)).one_or_none()

    def _claim(self, place: str, request: TrainingSetRequest, principal: str,
               payload_hash: str) -> Row | None:
        """Take `place` for this request (PENDING); returns the row it had before (None: new)."""
        now = datetime.now(UTC)
        claim = {"state": PENDING, "created_by": principal, "request_id": request.request_id or None,
                 "request_hash": payload_hash, "update_time": now}
        shown = quote(request.output_uri)
        try:
            with self.db.session() as c:
                row = c.execute(select(t.training_sets).where(t.training_sets.c.uri == place)
                                .with_for_update()).one_or_none()
                if row is None:
                    if self.files.exists(place):  # a file no CreateTrainingSet wrote
                        if request.overwrite:
                            raise PermissionDenied(f"output_uri: {shown} was not written by CreateTrainingSet; "
                                                   "it is never replaced")
                        raise AlreadyExists(f"output_uri: {shown} exists")
                    c.execute(insert(t.training_sets).values(uri=place, create_time=now, **claim))
                    return None
                if not request.overwrite:
                    raise AlreadyExists(f"output_uri: training set {shown} exists (written by {row.created_by}); "
                                        "set overwrite to replace it")
                if row.created_by != principal:
                    raise PermissionDenied(f"output_uri: training set {shown} was written by {row.created_by}; "
                                           "only they may replace it")
                c.execute(update(t.training_sets).where(t.training_sets.c.uri == place).values(**claim))
                return row
        except IntegrityError:  # another request took the place (or the request id) first
            raise AlreadyExists(f"output_uri: training set {shown} is being written by another request") from None

    def _release(self, place: str, previous: Row | None) -> None:
        """A failed write gives the place back as it was (the file itself was never touched)."""
        with self.db.session() as c:
            if previous is None:
                c.execute(delete(t.training_sets).where(t.training_sets.c.uri == place))
            else:
                c.execute(update(t.training_sets).where(t.training_sets.c.uri == place)
                          .values(**{k: previous._mapping[k] for k in
                                     ("state", "created_by", "request_id", "request_hash", "dataset",
                                      "update_time")}))
