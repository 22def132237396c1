"""Reference profiles: per model version, the distribution of its features (and, when the
reference has them, of its outputs) that drift is measured against.

`SetReference` reads a Parquet table -- one given (`table_uri`), or by default the training set the
version's registry lineage names (`lineage.dataset_uri`) -- checks its columns against the model's
signature, and profiles them once with `drift.ReferenceProfile.from_columns`. The profile is what is
kept, not the table: for a numeric column every non-missing value, sorted, with its standard
deviation and distinct count; for a categorical one the categories and their counts. It is
written to the artifact store (`monitoring/references/<model>/<version>/profile-<sha>.npz`, numpy
arrays without pickles, plus a JSON manifest), and its description to SQL (`monitoring_references`);
a restart loads it as it is, and a later change of the table does not change it (SetReference
again to take a new one).

Column names are the model's: a tensor [N] or [N, 1] is its name, [N, F] gives "<name>[j]"
(`rows.ModelColumns`). A profiled table column must be an input or an output of the version, or the
source of an output named in `prediction_columns`; anything else is INVALID_ARGUMENT naming it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import fs as pafs
from sqlalchemy import select

from services.common.artifacts import ArtifactNotFound, ArtifactStore, LocalArtifactStore
from services.common.db import Database
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound, StrataError, quote
from services.common.limits import check_version
from services.common.names import check_name
from services.common.paths import Confinement, Place
from services.common.timeutil import as_utc, utc_now
from services.monitoring import tables as t
from services.monitoring.drift import (
    CategoricalReference, ColumnKind, NumericReference, ReferenceProfile,
)
from services.monitoring.rows import ModelColumns, column_values
from services.monitoring.types import ModelInfo, Reference, ReferenceColumn, ReferenceRequest, Role

#: Profiles kept in memory (each holds a numeric column's values: 8 bytes a reference row).
CACHED_PROFILES = 16


class ModelCatalog(Protocol):
    """Where model versions are described (the registry)."""

    def describe(self, model: str, version: int) -> ModelInfo:
        """NotFound for a version the registry does not have; Unavailable when it cannot be asked."""


@dataclass(frozen=True)
class Profiles:
    features: ReferenceProfile
    predictions: ReferenceProfile | None  # None: the reference has no output column


def version_name(model: str, version: int) -> str:
    return f"models/{quote(model, bare=True)}/versions/{version}"


class ReferenceStore:
    def __init__(self, db: Database, artifacts: ArtifactStore, confinement: Confinement,
                 catalog: ModelCatalog) -> None:
        self.db = db
        self.artifacts = artifacts
        self.confinement = confinement
        self.catalog = catalog
        self._cache: OrderedDict[tuple[str, int], tuple[str, Profiles]] = OrderedDict()
        self._cache_lock = threading.Lock()

    # -- SetReference --------------------------------------------------------------------------
    def set(self, req: ReferenceRequest, principal: str) -> Reference:
        check_name(req.model, "model")
        check_version(req.version, "version")
        for out, col in req.prediction_columns.items():
            if not col:
                raise InvalidArgument(f"prediction_columns[{quote(out)}]", "names no table column")
        info = self.catalog.describe(req.model, req.version)
        name = version_name(req.model, req.version)
        features = ModelColumns([(s.name, s.shape) for s in info.inputs])
        outputs = ModelColumns([(s.name, s.shape) for s in info.outputs])
        for out in req.prediction_columns:
            if out not in outputs:
                raise InvalidArgument(f"prediction_columns[{quote(out)}]", f"is not an output of {name} "
                                                                           f"(its outputs: {outputs.describe()})")
        if req.table_uri:
            uri, field, from_lineage = req.table_uri, "table_uri", False
        elif info.dataset_uri:
            uri, field, from_lineage = info.dataset_uri, "lineage.dataset_uri", True
        else:
            raise FailedPrecondition(f"{name} names no training set in its registry lineage "
                                     "(lineage.dataset_uri); give table_uri", field="table_uri")
        try:
            fs, files = self._files(uri, field)
        except InvalidArgument as e:
            if not from_lineage:
                raise
            raise FailedPrecondition(f"the registry's {e.message}", field=e.field) from None
        schema = _schema(fs, files[0], field, uri)
        renamed = _lineage_columns(info, features) if from_lineage else {}
        sources = self._columns(req, schema, features, outputs, from_lineage, name, renamed)
        table, digest = _read(fs, files, [s for s, _, _ in sources], field, uri)
        feature_cols = {n: column_values(table.column(s)) for s, n, role in sources if role is Role.FEATURE}
        prediction_cols = {n: column_values(table.column(s)) for s, n, role in sources if role is Role.PREDICTION}
        profiles = Profiles(_profile(feature_cols, field),
                            _profile(prediction_cols, field) if prediction_cols else None)
        blob = _serialise(profiles)
        key = f"monitoring/references/{req.model}/{req.version}/profile-{hashlib.sha256(blob).hexdigest()[:16]}.npz"
        self.artifacts.put(key, blob)
        source_of = {n: s for s, n, _ in sources}
        columns = tuple(_describe(n, source_of[n], Role.FEATURE, c) for n, c in profiles.features.columns.items())
        if profiles.predictions is not None:
            columns += tuple(_describe(n, source_of[n], Role.PREDICTION, c)
                             for n, c in profiles.predictions.columns.items())
        ref = Reference(req.model, req.version, uri, from_lineage, digest, table.num_rows, columns, principal,
                        utc_now())
        row = {"model": ref.model, "version": ref.version, "table_uri": ref.table_uri, "from_lineage": from_lineage,
               "table_sha256": digest, "rows": ref.rows, "columns": [c.to_dict() for c in columns],
               "profile_key": key, "created_by": principal, "create_time": ref.create_time}
        with self.db.session() as c:
            old = c.execute(select(t.references.c.profile_key).where(
                t.references.c.model == req.model, t.references.c.version == req.version)).scalar_one_or_none()
            self.db.upsert(c, t.references, [row], ["model", "version"])
        if old and old != key:
            self.artifacts.delete(old)
        with self._cache_lock:
            self._cache[(req.model, req.version)] = (key, profiles)
            self._trim()
        return ref

    def _columns(self, req: ReferenceRequest, schema: pa.Schema, features: ModelColumns, outputs: ModelColumns,
                 from_lineage: bool, name: str, renamed: Mapping[str, str]) -> list[tuple[str, str, Role]]:
        """(table column, model column, role) of each column to profile, features first. `renamed`:
        training set column -> model column, for a model whose inputs are one [N, F] tensor."""
        names = schema.names
        mapped = {col: out for out, col in req.prediction_columns.items()}
        for out, col in req.prediction_columns.items():
            if col not in names:
                raise InvalidArgument(f"prediction_columns[{quote(out)}]", f"the table has no column {quote(col)}")
        if req.columns:
            chosen, fields = list(req.columns), [f"columns[{i}]" for i in range(len(req.columns))]
            for col, field in zip(chosen, fields, strict=True):
                if col not in names:
                    raise InvalidArgument(field, f"the table has no column {quote(col)}")
            if len(set(chosen)) != len(chosen):
                raise InvalidArgument("columns", "names a column twice")
        elif from_lineage:  # a training set also holds keys, times and the label: take the model's
            chosen = [c for c in names if c in features or c in outputs or c in mapped or c in renamed]
            fields = ["lineage.dataset_uri"] * len(chosen)
            have = {renamed.get(c, c) for c in names}
            if missing := [c for c in features.names if c not in have]:
                raise FailedPrecondition(f"the training set of {name} lacks the model's input column(s) "
                                         f"{', '.join(quote(c) for c in missing[:10])}", field="lineage.dataset_uri")
        else:
            chosen, fields = names, ["table_uri"] * len(names)
        out: list[tuple[str, str, Role]] = []
        for col, field in zip(chosen, fields, strict=True):
            if col in mapped:
                out.append((col, mapped[col], Role.PREDICTION))
            elif col in renamed:
                out.append((col, renamed[col], Role.FEATURE))
            elif col in features:
                out.append((col, col, Role.FEATURE))
            elif col in outputs:
                out.append((col, col, Role.PREDICTION))
            else:
                raise InvalidArgument(field, f"column {quote(col)} is neither an input nor an output of {name} "
                                             f"(inputs: {features.describe()}; outputs: {outputs.describe()}); "
                                             "leave it out with `columns`, or map it in prediction_columns")
        seen: dict[str, str] = {}
        for col, model_col, _ in out:
            if model_col in seen:
                raise InvalidArgument("prediction_columns", f"{quote(model_col)} would be read from both "
                                                            f"{quote(seen[model_col])} and {quote(col)}")
            seen[model_col] = col
        if not any(role is Role.FEATURE for _, _, role in out):
            raise InvalidArgument("columns" if req.columns else "table_uri",
                                  f"profiles no input column of {name} (inputs: {features.describe()})")
        return sorted(out, key=lambda s: s[2] is not Role.FEATURE)

    def _files(self, uri: str, field: str) -> tuple[pafs.FileSystem | None, list[str]]:
        """The Parquet files `uri` names (a file, a directory's *.parquet, or a glob), checked by the
        service's confinement: local paths (filesystem None), or `bucket/key` paths on the S3 store's
        filesystem."""
        place: Place = self.confinement.readable(uri, field)
        fs = None
        if place.remote:
            if isinstance(self.artifacts, LocalArtifactStore):
                raise InvalidArgument(field, f"{quote(uri)}: s3:// paths need an S3 artifact store")
            if place.is_glob:
                raise InvalidArgument(field, f"{quote(uri)}: globs are for local paths; name an S3 file or prefix")
            fs = self.artifacts.arrow_filesystem()  # type: ignore[attr-defined]
            path = place.path[len("s3://"):]
            info = fs.get_file_info(path)
            if info.type == pafs.FileType.Directory:
                files = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(path)) if i.path.endswith(".parquet"))
            else:
                files = [path] if info.type == pafs.FileType.File else []
        elif os.path.isdir(place.path):
            files = sorted(os.path.join(place.path, f) for f in os.listdir(place.path) if f.endswith(".parquet"))
        else:
            files = self.confinement.expand(place, field) if place.is_glob else (
                [place.path] if os.path.isfile(place.path) else [])
        if not files:
            raise InvalidArgument(field, f"{quote(uri)} names no Parquet file")
        return fs, files

    # -- reading it back -----------------------------------------------------------------------
    def get(self, model: str, version: int) -> Reference:
        check_name(model, "model")
        check_version(version, "version")
        with self.db.read() as c:
            row = c.execute(select(t.references).where(t.references.c.model == model,
                                                       t.references.c.version == version)).one_or_none()
        if row is None:
            raise NotFound(f"{version_name(model, version)} has no reference; SetReference first")
        return Reference(row.model, row.version, row.table_uri, row.from_lineage, row.table_sha256, row.rows,
                         tuple(ReferenceColumn.from_dict(d) for d in row.columns), row.created_by,
                         as_utc(row.create_time))

    def exists(self, model: str, version: int) -> bool:
        with self.db.read() as c:
            return c.execute(select(t.references.c.model).where(
                t.references.c.model == model, t.references.c.version == version)).first() is not None

    def profiles(self, model: str, version: int) -> Profiles:
        """The version's profiles, from memory or the artifact store (FailedPrecondition: none set)."""
        with self.db.read() as c:
            key = c.execute(select(t.references.c.profile_key).where(
                t.references.c.model == model, t.references.c.version == version)).scalar_one_or_none()
        if key is None:
            raise FailedPrecondition(f"{version_name(model, version)} has no reference profile; SetReference first")
        with self._cache_lock:
            cached = self._cache.get((model, version))
            if cached is not None and cached[0] == key:
                self._cache.move_to_end((model, version))
                return cached[1]
        try:
            blob = b"".join(self.artifacts.open_read(key))
        except ArtifactNotFound:
            raise FailedPrecondition(f"the reference profile of {version_name(model, version)} is missing from "
                                     "the artifact store; SetReference again") from None
        profiles = _deserialise(blob)
        with self._cache_lock:
            self._cache[(model, version)] = (key, profiles)
            self._trim()
        return profiles

    def _trim(self) -> None:
        while len(self._cache) > CACHED_PROFILES:
            self._cache.popitem(last=False)


# -- the table -----------------------------------------------------------------------------------

def _lineage_columns(info: ModelInfo, features: ModelColumns) -> dict[str, str]:
    """Training set column -> model column, when the lineage lists the model's features in input
    order ("{view}:{feature}", the training set's column "{view}__{feature}") and the model takes
    them as input columns of another name (one [N, F] tensor: "input[0]".. "input[F-1]")."""
    if not info.features or len(info.features) != len(features.names):
        return {}
    table = [ref.replace(":", "__", 1) for ref in info.features]
    return {col: model_col for col, model_col in zip(table, features.names, strict=True) if col != model_col}


def _schema(fs: pafs.FileSystem | None, path: str, field: str, uri: str) -> pa.Schema:
    try:
        return pq.read_schema(path, filesystem=fs)
    except (OSError, pa.ArrowException) as e:
        raise InvalidArgument(field, f"{quote(uri)} is not readable Parquet: {quote(str(e), 200)}") from None


def _read(fs: pafs.FileSystem | None, files: Sequence[str], columns: list[str], field: str,
          uri: str) -> tuple[pa.Table, str]:
    """The columns of every file, and the sha256 of the files' bytes in path order."""
    digest = hashlib.sha256()
    tables = []
    try:
        for path in files:
            with (open(path, "rb") if fs is None else fs.open_input_stream(path)) as f:
                data = f.read()
            digest.update(data)
            tables.append(pq.read_table(pa.BufferReader(data), columns=columns))
        table = pa.concat_tables(tables, promote_options="default")
    except (OSError, pa.ArrowException) as e:
        raise InvalidArgument(field, f"{quote(uri)} is not readable Parquet with these columns: "
                                     f"{quote(str(e), 200)}") from None
    if table.num_rows == 0:
        raise InvalidArgument(field, f"{quote(uri)} has no rows")
    return table, digest.hexdigest()


def _profile(columns: Mapping[str, np.ndarray], field: str) -> ReferenceProfile:
    try:
        return ReferenceProfile.from_columns(columns)
    except StrataError as e:  # a column with no value: name the table, not the profile
        raise InvalidArgument(field, e.message.replace("reference[", "column [")) from None


def _describe(name: str, source: str, role: Role, c: NumericReference | CategoricalReference) -> ReferenceColumn:
    distinct = c.n_distinct if isinstance(c, NumericReference) else int(c.categories.size)
    return ReferenceColumn(name, source, role, c.kind, c.n, c.null_share, distinct)


# -- the stored profile --------------------------------------------------------------------------

def _serialise(p: Profiles) -> bytes:
    arrays: dict[str, np.ndarray] = {}
    manifest = []
    for role, profile in ((Role.FEATURE, p.features), (Role.PREDICTION, p.predictions)):
        for name, c in (profile.columns.items() if profile is not None else ()):
            i = len(manifest)
            entry: dict = {"name": name, "role": str(role), "kind": str(c.kind), "null_share": c.null_share}
            if isinstance(c, NumericReference):
                arrays[f"{i}.values"] = c.values
                entry.update(std=c.std, n_distinct=c.n_distinct)
            else:
                arrays[f"{i}.categories"] = c.categories
                arrays[f"{i}.counts"] = c.counts
            manifest.append(entry)
    out = io.BytesIO()
    np.savez(out, manifest=np.array(json.dumps(manifest)), **arrays)
    return out.getvalue()


def _deserialise(blob: bytes) -> Profiles:
    with np.load(io.BytesIO(blob), allow_pickle=False) as z:
        manifest = json.loads(str(z["manifest"]))
        columns: dict[Role, dict] = {Role.FEATURE: {}, Role.PREDICTION: {}}
        for i, e in enumerate(manifest):
            if ColumnKind(e["kind"]) is ColumnKind.NUMERIC:
                c: NumericReference | CategoricalReference = NumericReference(
                    _frozen(z[f"{i}.values"]), float(e["std"]), int(e["n_distinct"]), float(e["null_share"]))
            else:
                c = CategoricalReference(_frozen(z[f"{i}.categories"]), _frozen(z[f"{i}.counts"]),
                                         float(e["null_share"]))
            columns[Role(e["role"])][e["name"]] = c
    predictions = columns[Role.PREDICTION]
    return Profiles(ReferenceProfile(MappingProxyType(columns[Role.FEATURE])),
                    ReferenceProfile(MappingProxyType(predictions)) if predictions else None)


def _frozen(x: np.ndarray) -> np.ndarray:
    x.setflags(write=False)
    return x
