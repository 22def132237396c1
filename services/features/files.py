"""Where the feature service's offline data lives: view sources, entity tables, training sets
and pushed rows, on the artifact store (a local directory by default, or S3 / MinIO).

A path in a request or a definition is either relative (a key in the artifact store), an
absolute local path, or, with an S3 artifact store, an `s3://bucket/key` URI on the same
endpoint. DuckDB reads S3 objects in place, range by range, through pyarrow's S3 client
(registered as an fsspec filesystem for the `s3` protocol), so one query plan serves both.
Writes (training sets, pushed rows) go through the artifact store, whole or not at all, and
only inside it: a service writes nowhere it was not given.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from services.common.artifacts import ArtifactStore, LocalArtifactStore, open_artifact_store
from services.common.errors import InvalidArgument, NotFound, Unavailable
from services.features.offline import write_parquet

S3 = "s3://"


_GLOB = re.compile(r"[*?\[]")


class OfflineFiles:
    def __init__(self, artifact_store_url: str, local_paths: Sequence[str] = ()) -> None:
        """`local_paths`: directories outside the artifact store that absolute paths may name
        (STRATA_FEATURES_OFFLINE_PATHS); anything else on the service's disk is refused."""
        self.store: ArtifactStore = open_artifact_store(artifact_store_url)
        self.local_root: Path | None = self.store.root if isinstance(self.store, LocalArtifactStore) else None
        roots = [*([self.local_root] if self.local_root is not None else []), *map(Path, local_paths)]
        self._local_roots = [os.path.realpath(r) for r in roots]
        self.fs: Any = None  # fsspec filesystem for s3:// (DuckDB and pyarrow read through it)
        self._reachable_until = 0.0
        if self.local_root is None:
            self.fs = _s3_fsspec(self.store.arrow_filesystem())  # type: ignore[attr-defined]
            self._root_uri = self.store.uri("x")[:-1]  # s3://bucket/prefix/

    def resolve(self, path: str, field: str = "path") -> str:
        """A local path or an s3:// URI for `path` (relative = a key in the artifact store);
        UNAVAILABLE when it is on S3 and S3 does not answer."""
        where = self.locate(path, field)
        if where.startswith(S3):
            self._ensure_reachable()
        return where

    def locate(self, path: str, field: str = "path") -> str:
        """`resolve` without touching the store: INVALID_ARGUMENT for a path the service may not use."""
        if path.startswith(S3):
            if self.fs is None:
                raise InvalidArgument(field, f"{path}: s3:// paths need an S3 artifact store "
                                      "(STRATA_ARTIFACT_STORE=s3://bucket/prefix?endpoint=host:port)")
            return path
        if "://" in path:
            raise InvalidArgument(field, f"{path}: expected a key in the artifact store, an absolute path or s3://")
        if os.path.isabs(path):
            return self._allowed_local(path, field)
        if not path or ".." in path.split("/") or path.startswith("~"):
            raise InvalidArgument(field, f"{path!r}: a key in the artifact store must be relative, without '..'")
        if self.local_root is not None:
            return self._allowed_local(str(self.local_root / path), field)
        return self._root_uri + path

    def _allowed_local(self, path: str, field: str) -> str:
        """`path` when it lies under the artifact store or an allowed directory (symbolic links
        resolved up to the first glob character), else INVALID_ARGUMENT: a caller must not make
        the service read or write arbitrary files on its host."""
        fixed = _GLOB.split(path, 1)[0]
        real = os.path.realpath(fixed if fixed.endswith("/") or fixed == path else os.path.dirname(fixed))
        if not any(real == root or real.startswith(root.rstrip("/") + "/") for root in self._local_roots):
            raise InvalidArgument(field, f"{path}: outside the artifact store and STRATA_FEATURES_OFFLINE_PATHS")
        return path

    def _ensure_reachable(self) -> None:
        """UNAVAILABLE when the S3 endpoint does not answer, before anything reads a listing or
        a file: a listing that failed must not pass for "no such file". One request, at most
        once a second."""
        if time.monotonic() < self._reachable_until:
            return
        try:
            self.fs.fs.get_file_info(self._root_uri[len(S3):].rstrip("/"))
        except OSError as e:
            raise Unavailable(f"offline store {self._root_uri} unreachable: {str(e).splitlines()[0]}") from None
        self._reachable_until = time.monotonic() + 1.0

    def connect(self, **config: Any) -> duckdb.DuckDBPyConnection:
        """A DuckDB connection that can read this store's paths."""
        con = duckdb.connect(":memory:", config=config)
        if self.fs is not None:
            con.register_filesystem(self.fs)
        return con

    def exists(self, path: str) -> bool:
        return self.fs.isfile(path) if path.startswith(S3) else os.path.isfile(path)

    def read_table(self, uri: str, field: str) -> pa.Table:
        path = self.resolve(uri, field)
        if not self.exists(path):
            raise NotFound(f"{field} {uri} not found")
        try:
            return pq.read_table(path, filesystem=self.fs if path.startswith(S3) else None)
        except (OSError, pa.ArrowException) as e:
            raise InvalidArgument(field, f"{uri} is not readable Parquet: {e}") from None

    def write_parquet(self, table: pa.Table, uri: str, field: str) -> str:
        """Writes `table` to `uri` whole or not at all; returns the file's sha256."""
        path = self.resolve(uri, field)
        if not path.endswith(".parquet"):
            raise InvalidArgument(field, "must end with .parquet")
        if not path.startswith(S3):
            return write_parquet(table, Path(path))
        key = self._key(path, field)
        with tempfile.NamedTemporaryFile(suffix=".parquet") as tmp:
            pq.write_table(table, tmp.name)
            digest = hashlib.sha256()
            with open(tmp.name, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            self.store.put_file(key, tmp.name)
        return digest.hexdigest()

    def append_dir(self, source: str) -> str | None:
        """Where rows pushed to a view go: the source's directory (a local directory or a
        `dir/*.parquet` glob; on S3 a `prefix/*.parquet` glob or a `prefix/`), or None when the
        source is a single file."""
        path = self.resolve(source, "source.path")
        name = path.rsplit("/", 1)[-1]
        if name in ("*.parquet", "*"):
            return path[: -len(name)]
        if path.startswith(S3):
            return path if path.endswith("/") else None
        return path + "/" if os.path.isdir(path) else None

    def add_file(self, directory: str, name: str, table: pa.Table) -> None:
        """A new Parquet file `name` in `directory` (from append_dir), visible only when complete."""
        if not directory.startswith(S3):
            final = Path(directory) / name
            final.parent.mkdir(parents=True, exist_ok=True)
            write_parquet(table, final)
            return
        self.write_parquet(table, directory + name, "source.path")

    def _key(self, uri: str, field: str) -> str:
        if not uri.startswith(self._root_uri):
            raise InvalidArgument(field, f"{uri}: writes go to the artifact store ({self._root_uri}) only")
        return uri[len(self._root_uri):]


def _s3_fsspec(arrow_fs: Any) -> Any:
    """pyarrow's S3 filesystem as the fsspec filesystem for `s3://` (what DuckDB looks up by
    protocol). Unlike fsspec's defaults, a listing or an existence check that fails for any reason
    other than "not found" raises instead of answering "nothing there"."""
    from fsspec.implementations.arrow import ArrowFSWrapper

    def _raise_unless_missing(e: BaseException) -> None:
        if not isinstance(e, FileNotFoundError):
            raise e

    class S3(ArrowFSWrapper):
        protocol = "s3"

        def walk(self, path: str, maxdepth: int | None = None, topdown: bool = True, on_error: Any = "omit",
                 **kwargs: Any) -> Any:
            return super().walk(path, maxdepth, topdown, on_error=_raise_unless_missing, **kwargs)

        def isfile(self, path: str) -> bool:
            try:
                return self.info(path)["type"] == "file"
            except FileNotFoundError:
                return False

    return S3(arrow_fs)
