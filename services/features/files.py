"""Where the feature service's offline data lives: view sources, entity tables, training sets
and pushed rows, on the artifact store (a local directory by default, or S3 / MinIO).

A path in a request or a definition is either relative (a key in the artifact store), an
absolute local path under the store or an allowed directory, or, with an S3 artifact store, an
`s3://bucket/prefix/key` URI inside the store; services/common/paths.py decides, and a local glob
is expanded there (each match checked) before DuckDB sees it. DuckDB reads S3 sources from local copies kept in a
bounded cache (one download per object version: key, ETag and size), so the query plans are the
same as for local files.
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow.fs import FileType

from services.common.artifacts import ArtifactStore, LocalArtifactStore, open_artifact_store
from services.common.errors import InvalidArgument, NotFound, Unavailable, quote
from services.common.paths import GLOB, Confinement, Place
from services.features.offline import write_parquet

S3 = "s3://"


class OfflineFiles:
    def __init__(self, artifact_store_url: str, local_paths: Sequence[str] = (), *,
                 cache_dir: Path | None = None, cache_bytes: int = 20 << 30) -> None:
        """`local_paths`: directories outside the artifact store that absolute paths may name
        (STRATA_FEATURES_OFFLINE_PATHS); anything else on the service's disk is refused.
        `cache_dir`, `cache_bytes`: local copies of S3 sources, least recently used evicted."""
        self.cache_dir = cache_dir or Path(tempfile.gettempdir()) / "strata-offline-cache"
        self.cache_bytes = cache_bytes
        self.store: ArtifactStore = open_artifact_store(artifact_store_url)
        self.local_root: Path | None = self.store.root if isinstance(self.store, LocalArtifactStore) else None
        self.fs: Any = None  # pyarrow's S3 filesystem, for entity tables read in one go
        self._reachable_until = 0.0
        if self.local_root is None:
            self.fs = self.store.arrow_filesystem()  # type: ignore[attr-defined]
            self._root_uri = self.store.uri("x")[:-1]  # s3://bucket/prefix/
        # Sources, entity tables and pushed rows: the store and the allowed directories;
        # training sets only under the store's TRAINING_SETS prefix (see write_parquet's `under`).
        store = str(self.local_root) if self.local_root is not None else self._root_uri
        self.confinement = Confinement(store, read_roots=local_paths, write_roots=[store, *local_paths])

    def resolve(self, path: str, field: str = "path") -> str:
        """A local path or an s3:// URI for `path` (relative = a key in the artifact store);
        UNAVAILABLE when it is on S3 and S3 does not answer."""
        where = self.locate(path, field)
        if where.startswith(S3):
            self._ensure_reachable()
        return where

    def locate(self, path: str, field: str = "path") -> str:
        """`resolve` without touching the store: INVALID_ARGUMENT for a path the service may not
        read (services/common/paths.py decides)."""
        if path.startswith(S3) and self.fs is None:
            raise InvalidArgument(field, f"{quote(path)}: s3:// paths need an S3 artifact store "
                                  "(STRATA_ARTIFACT_STORE=s3://bucket/prefix?endpoint=host:port)")
        return self.confinement.readable(path, field).path

    def writable(self, path: str, field: str, *, under: str = "") -> str:
        """Where a write of `path` goes (a local path or an s3:// URI), when the service may write
        there: inside the artifact store or an allowed directory, under `under/` when given, never
        a glob; else INVALID_ARGUMENT."""
        place = self.confinement.writable(path, field, under=under)
        if place.remote:
            self._ensure_reachable()
        return place.path

    def _ensure_reachable(self) -> None:
        """UNAVAILABLE when the S3 endpoint does not answer, before anything reads a listing or
        a file: a listing that failed must not pass for "no such file". One request, at most
        once a second."""
        if time.monotonic() < self._reachable_until:
            return
        try:
            self.fs.get_file_info(self._root_uri[len(S3):].rstrip("/"))
        except OSError as e:
            raise Unavailable(f"offline store {self._root_uri} unreachable: {str(e).splitlines()[0]}") from None
        self._reachable_until = time.monotonic() + 1.0

    def source(self, path: str, field: str) -> str | list[str]:
        """What DuckDB reads for a view's source: a local path or glob as it is, or, for S3, the
        matching objects in key order as local copies (see `_cached`)."""
        where = self.resolve(path, field)
        if not where.startswith(S3):  # a glob is expanded here, every match checked (links too)
            place = Place(where)
            return self.confinement.expand(place, field) if place.is_glob else where
        bucket, _, key = where.removeprefix(S3).partition("/")
        fixed = GLOB.split(key, 1)[0]
        match = _glob_regex(key)
        try:
            objects = [o for o in self.store.list_objects(bucket, fixed[:fixed.rfind("/") + 1])  # type: ignore[attr-defined]
                       if match.match(o[0])]
        except Exception as e:  # noqa: BLE001 - minio raises S3Error, urllib3 errors, OSError
            if getattr(e, "code", "") == "NoSuchBucket":
                objects = []
            else:
                raise Unavailable(f"offline store: listing {where} failed: {str(e).splitlines()[0]}") from None
        if not objects:
            raise InvalidArgument(field, f"{quote(path)} matches no file")
        with ThreadPoolExecutor(max_workers=min(8, len(objects))) as pool:
            local = list(pool.map(lambda o: self._cached(bucket, *o), objects))
        self._evict(keep=set(local))
        return local

    def _cached(self, bucket: str, key: str, etag: str, size: int) -> str:
        """A local copy of an S3 object, downloaded once per version (bucket, key, ETag, size).
        DuckDB then reads it at disk speed: reading in place through a Python filesystem costs a
        request per small range (a 192 MB, 20-column file: 20 s in place against 0.5 s to copy)."""
        stamp = f"{bucket}\0{key}\0{etag}\0{size}"
        path = self.cache_dir / f"{hashlib.sha256(stamp.encode()).hexdigest()[:40]}.parquet"
        if path.exists():
            os.utime(path)  # recently used: evicted last
            return str(path)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.store.download(bucket, key, str(path))  # type: ignore[attr-defined]
        except Exception as e:  # noqa: BLE001 - as in source()
            raise Unavailable(f"offline store: copying s3://{bucket}/{key} failed: {str(e).splitlines()[0]}") from None
        return str(path)

    def _evict(self, keep: set[str], in_use_seconds: float = 600.0) -> None:
        """Least recently used copies go once the cache holds more than `cache_bytes`; a copy
        used in the last `in_use_seconds` stays (another call, or the other serving process,
        may be about to read it), and so do those of this call. Part files of downloads that
        died go after an hour."""
        now = time.time()
        files = []
        for p in self.cache_dir.iterdir():
            try:
                st = p.stat()
            except FileNotFoundError:  # evicted or renamed by another process meanwhile
                continue
            if p.suffix == ".part":
                if now - st.st_mtime > 3600:
                    p.unlink(missing_ok=True)
                continue
            files.append((st.st_mtime, st.st_size, p))
        files.sort(key=lambda f: f[0])
        total = sum(size for _, size, _ in files)
        for used, size, p in files:
            if total <= self.cache_bytes:
                break
            if str(p) not in keep and now - used > in_use_seconds:
                p.unlink(missing_ok=True)
                total -= size

    def read_table(self, uri: str, field: str) -> pa.Table:
        path = self.resolve(uri, field)
        if GLOB.search(path):
            raise InvalidArgument(field, f"{quote(uri)}: name one file, not a glob")
        if path.startswith(S3):
            try:
                found = self.fs.get_file_info(path.removeprefix(S3)).type == FileType.File
            except OSError as e:
                raise Unavailable(f"offline store: reading {path} failed: {str(e).splitlines()[0]}") from None
        else:
            found = os.path.isfile(path)
        if not found:
            raise NotFound(f"{field} {quote(uri)} not found")
        try:
            return self.read_file(path)
        except (OSError, pa.ArrowException) as e:
            raise InvalidArgument(field, f"{quote(uri)} is not readable Parquet: {quote(str(e))}") from None

    def write_parquet(self, table: pa.Table, uri: str, field: str, *, under: str = "") -> str:
        """Writes `table` to `uri` whole or not at all; returns the file's sha256. `uri` is checked
        as a write target (see `writable`)."""
        path = self.writable(uri, field, under=under)
        if not path.endswith(".parquet"):
            raise InvalidArgument(field, "must end with .parquet")
        if not path.startswith(S3):
            return write_parquet(table, Path(path))
        key = self._key(path, field)
        with tempfile.TemporaryDirectory(prefix="strata-upload-") as tmp:
            local = Path(tmp) / "table.parquet"
            digest = write_parquet(table, local)
            self.store.put_file(key, str(local))
        return digest

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
        self.write_parquet(table, directory + name, "source.path")

    def listing(self, directory: str, prefix: str) -> list[str]:
        """The Parquet files directly in `directory` (from append_dir) whose names start with
        `prefix`, by name."""
        if not directory.startswith(S3):
            return sorted(str(p) for p in Path(directory).glob(f"{prefix}*.parquet"))
        key = self._key(directory, "source.path")
        return [self._root_uri + k for k in self.store.list_keys(key + prefix)
                if "/" not in k[len(key):] and k.endswith(".parquet")]

    def read_file(self, path: str) -> pa.Table:
        """One whole Parquet file, local or on S3."""
        if path.startswith(S3):
            return pq.read_table(path.removeprefix(S3), filesystem=self.fs)
        return pq.read_table(path)

    def read_schema(self, path: str) -> pa.Schema:
        if path.startswith(S3):
            return pq.read_schema(path.removeprefix(S3), filesystem=self.fs)
        return pq.read_schema(path)

    def exists(self, path: str) -> bool:
        """Whether something is at `path` (a place `locate` or `writable` answered)."""
        if path.startswith(S3):
            return self.store.exists(self._key(path, "path"))
        return os.path.lexists(path)

    def delete(self, path: str) -> None:
        if path.startswith(S3):
            self.store.delete(self._key(path, "source.path"))
        else:
            Path(path).unlink(missing_ok=True)

    def _key(self, uri: str, field: str) -> str:
        if not uri.startswith(self._root_uri):
            raise InvalidArgument(field, f"{uri}: writes go to the artifact store ({self._root_uri}) only")
        return uri[len(self._root_uri):]


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """A glob over object keys as DuckDB reads one over paths: `*` and `?` stay within one
    `/`-separated part, `**` crosses them, `[...]` is a character class."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):  # zero or more directories
            out.append("(?:.*/)?")
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        c = pattern[i]
        end = pattern.find("]", i + 1) if c == "[" else -1
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif end > i:
            out.append("[^" + pattern[i + 2:end] + "]" if pattern[i + 1] == "!" else pattern[i:end + 1])
            i = end + 1
            continue
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z")
