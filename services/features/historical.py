"""Point-in-time retrieval: the entity table in (Arrow IPC or a Parquet file), the definitions
turned into offline ViewSpecs, the join done by offline.historical_features (DuckDB), the result
as Arrow IPC messages. Writing it as a training set is training_sets.py."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

import pyarrow as pa

from services.common.errors import InvalidArgument
from services.features.definitions import Definitions, one_feature_list, parse_refs
from services.features.files import OfflineFiles
from services.features.offline import OfflineStoreError, ViewSpec, historical_features

BATCH_ROWS = 65_536


class Query(Protocol):
    """The fields HistoricalQuery and TrainingSetRequest share (types.py)."""

    features: Sequence[str]
    feature_set: str
    entity_arrow: bytes
    entity_uri: str
    timestamp_column: str
    filter_by_created_timestamp: bool


class HistoricalRetrieval:
    def __init__(self, definitions: Definitions, files: OfflineFiles) -> None:
        self.definitions = definitions
        self.files = files

    def run(self, request: Query) -> Iterator[bytes]:
        """The result as Arrow IPC streams of up to BATCH_ROWS rows each (at least one)."""
        result, _ = self.compute(request)
        for batch in result.to_batches(max_chunksize=BATCH_ROWS) or [pa.RecordBatch.from_pylist([], result.schema)]:
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, result.schema) as writer:
                writer.write_batch(batch)
            yield sink.getvalue().to_pybytes()

    def compute(self, request: Query) -> tuple[pa.Table, list[str]]:
        """The point-in-time result, and the feature references it holds with the view versions
        used ("view:feature@v2", for lineage)."""
        one_feature_list(request.features, request.feature_set)
        if request.feature_set:
            features = list(self.definitions.get_feature_set(request.feature_set).features)
        else:
            features = list(request.features)
        if not features:
            raise InvalidArgument("features", "no features requested")
        refs = parse_refs(features)
        specs, versions = {}, {}
        for view, _ in refs:
            if view not in specs:
                v = self.definitions.get_view(view)
                if not v.spec.source.path or not v.spec.source.timestamp_field:
                    raise InvalidArgument("features", f"view '{view}' has no offline source")
                specs[view] = ViewSpec(
                    name=view, entities=v.join_keys, features=tuple(f.name for f in v.spec.features),
                    timestamp_field=v.spec.source.timestamp_field,
                    created_timestamp_field=v.spec.source.created_timestamp_field or None,
                    ttl_seconds=v.spec.ttl_seconds, source=self.files.source(v.spec.source.path, "source.path"))
                versions[view] = v.spec.version
        entities = self._entity_table(request)
        try:
            result = historical_features(entities, list(specs.values()), refs,
                                         timestamp_column=request.timestamp_column or "event_timestamp",
                                         filter_by_created_timestamp=request.filter_by_created_timestamp)
        except OfflineStoreError as e:
            raise InvalidArgument("features", str(e)) from None
        return result, [f"{v}:{f}@v{versions[v]}" for v, f in refs]

    def _entity_table(self, request: Query) -> pa.Table:
        if bool(request.entity_arrow) == bool(request.entity_uri):
            raise InvalidArgument("entity_arrow", "give the entity table as entity_arrow or entity_uri (one)")
        if request.entity_arrow:
            try:
                return pa.ipc.open_stream(request.entity_arrow).read_all()
            except pa.ArrowInvalid as e:
                raise InvalidArgument("entity_arrow", f"not an Arrow IPC stream: {e}") from None
        return self.files.read_table(request.entity_uri, "entity_uri")
