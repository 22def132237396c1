"""Local-directory artifact store (the embedded default).

Layout under `root`:
    <key>                              final objects
    .staging/<upload_id>/<part:08d>    staged parts
    <any dir>/.tmp-<uuid>              files being written (never listed)

Every write goes to a temp file in the destination directory, is fsynced, and is moved into
place with os.replace (atomic on POSIX), so readers see either nothing or a whole file and a
crash leaves at worst temp files and staged parts. Writers use unique temp names, so no lock
is needed for thread safety.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import uuid
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path

from .base import ArtifactNotFound, ArtifactStore, StagedUpload

STAGING_DIR = ".staging"
TMP_PREFIX = ".tmp-"
_PART_NAME = re.compile(r"^\d{8}\Z")
_UPLOAD_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*\Z")


def check_key(key: str) -> str:
    """Return `key` if it is a valid artifact key, else raise ValueError naming it.
    Shared with the S3 backend so both accept exactly the same keys."""
    segments = key.split("/")
    if not key:
        problem = "must not be empty"
    elif key.startswith("/"):
        problem = "must be relative"
    elif ".." in segments:
        problem = "must not contain '..'"
    elif any(s in ("", ".") for s in segments):
        problem = "must not contain empty or '.' segments"
    elif key.startswith(STAGING_DIR):
        problem = f"must not start with {STAGING_DIR!r} (reserved for staged uploads)"
    elif any(s.startswith(TMP_PREFIX) for s in segments):
        problem = f"must not have a segment starting with {TMP_PREFIX!r} (reserved for temp files)"
    elif "\x00" in key:
        problem = "must not contain NUL"
    else:
        return key
    raise ValueError(f"invalid artifact key {key!r}: {problem}")


def check_upload_id(upload_id: str) -> str:
    """Upload ids become a path segment / object-name segment, so keep them plain."""
    if not _UPLOAD_ID.match(upload_id):
        raise ValueError(f"invalid upload id {upload_id!r}: use letters, digits, '.', '_', '-'")
    return upload_id


def check_part_number(part_number: int) -> int:
    if not 0 <= part_number <= 99_999_999:
        raise ValueError(f"invalid part number {part_number}: must be in 0..99999999")
    return part_number


def _fsync_dir(path: Path) -> None:
    """Make a rename/creation in `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, chunks: Iterable[bytes]) -> int:
    """Write chunks to a temp file beside `path`, fsync it, and os.replace it onto `path`.
    Returns the number of bytes written. On any error the temp file is removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{TMP_PREFIX}{uuid.uuid4().hex}"
    size = 0
    try:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
                size += len(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return size


def _read_file(path: Path, chunk_size: int) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            yield chunk


class LocalArtifactStore(ArtifactStore):
    scheme = "file"

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self._staging = self.root / STAGING_DIR

    def __repr__(self) -> str:
        return f"LocalArtifactStore({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def uri(self, key: str) -> str:
        return self._path(key).as_uri()

    # -- staged uploads --------------------------------------------------------------------
    def _upload_dir(self, upload_id: str) -> Path:
        return self._staging / check_upload_id(upload_id)

    def _parts(self, upload_id: str) -> list[Path]:
        """The staged part files of an upload, in part order (names are zero-padded)."""
        try:
            names = os.listdir(self._upload_dir(upload_id))
        except FileNotFoundError:
            return []
        return [self._upload_dir(upload_id) / n for n in sorted(names) if _PART_NAME.match(n)]

    def stage_part(self, upload_id: str, part_number: int, data: bytes) -> None:
        path = self._upload_dir(upload_id) / f"{check_part_number(part_number):08d}"
        _atomic_write(path, [data])

    def read_staged(self, upload_id: str, chunk_size: int = 4 << 20) -> Iterator[bytes]:
        parts = self._parts(upload_id)
        if not parts:
            raise ArtifactNotFound(f"no staged parts for upload {upload_id!r}")
        return (chunk for part in parts for chunk in _read_file(part, chunk_size))

    def publish(self, upload_id: str, key: str) -> int:
        dest = self._path(key)
        parts = self._parts(upload_id)
        if not parts:
            raise ArtifactNotFound(f"no staged parts for upload {upload_id!r}")
        size = _atomic_write(dest, (c for part in parts for c in _read_file(part, 4 << 20)))
        # Only once the final object is durable may the staged copy go.
        self.discard_staged(upload_id)
        return size

    def discard_staged(self, upload_id: str) -> None:
        shutil.rmtree(self._upload_dir(upload_id), ignore_errors=True)

    def list_staged(self) -> list[StagedUpload]:
        """Every upload dir, including ones left with only temp files by a crash mid-part
        (parts=0), so garbage collection can find those too."""
        uploads: list[StagedUpload] = []
        try:
            dirs = sorted(self._staging.iterdir())
        except FileNotFoundError:
            return []
        for d in dirs:
            size = parts = 0
            mtime = 0.0
            try:
                for entry in os.scandir(d):
                    st = entry.stat()
                    mtime = max(mtime, st.st_mtime)
                    if _PART_NAME.match(entry.name):
                        size += st.st_size
                        parts += 1
            except (FileNotFoundError, NotADirectoryError):
                continue  # published or discarded meanwhile
            if mtime:
                uploads.append(
                    StagedUpload(d.name, size, parts, datetime.fromtimestamp(mtime, tz=UTC))
                )
        return uploads

    # -- final objects ---------------------------------------------------------------------
    def put(self, key: str, data: bytes) -> None:
        _atomic_write(self._path(key), [data])

    def put_file(self, key: str, path: str) -> None:
        _atomic_write(self._path(key), _read_file(Path(path), 4 << 20))

    def open_read(self, key: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        # Open eagerly so a missing key raises here, before the caller starts streaming.
        path = self._path(key)
        try:
            f = open(path, "rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ArtifactNotFound(key) from None

        def chunks() -> Iterator[bytes]:
            with f:
                while chunk := f.read(chunk_size):
                    yield chunk

        return chunks()

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        try:
            st = self._path(key).stat()
        except (FileNotFoundError, NotADirectoryError):
            raise ArtifactNotFound(key) from None
        if not stat.S_ISREG(st.st_mode):
            raise ArtifactNotFound(key)
        return st.st_size

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink()
        except (FileNotFoundError, NotADirectoryError):
            pass
        # A process killed inside _atomic_write leaves its temp file beside the key; keys live
        # in a directory of their own upload, so any temp file there belongs to this key.
        if path.parent.is_dir():
            for tmp in path.parent.glob(f"{TMP_PREFIX}*"):
                tmp.unlink(missing_ok=True)

    def list_keys(self, prefix: str = "") -> list[str]:
        # Walk only the directory the prefix points into; the rest cannot match.
        # Prefixes no valid key can have (absolute, '..', the staging area) match nothing.
        if prefix.startswith(("/", STAGING_DIR)) or ".." in prefix.split("/"):
            return []
        start = self.root / (prefix.rsplit("/", 1)[0] if "/" in prefix else "")
        if not start.is_dir():
            return []
        keys: list[str] = []
        for dirpath, dirnames, filenames in os.walk(start):
            rel_dir = Path(dirpath).relative_to(self.root).as_posix()
            if rel_dir == ".":
                rel_dir = ""
                dirnames[:] = [d for d in dirnames if d != STAGING_DIR]
            for name in filenames:
                if name.startswith(TMP_PREFIX):
                    continue
                key = f"{rel_dir}/{name}" if rel_dir else name
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)
