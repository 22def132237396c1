"""The artifact store interface: where model files and datasets live.

Two backends implement it: `local` (a directory, the embedded default) and `s3` (any S3 API
server through the `minio` client). Keys are '/'-separated relative paths such as
"models/fraud/3/model.onnx"; they never start with '/' and never contain '..'.

Staging contract (what makes uploads crash-safe): bytes of an upload in progress go to
staged parts under an upload id, never under a final key. `publish` assembles the parts into
the final key in one step that is atomic for readers: until it returns, `exists(key)` is
False and readers see nothing; after it returns, the whole object is there. A crash at any
point leaves, at worst, staged parts (garbage that `discard_staged`/`list_staged` can
collect) and never a partial final object.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime


class ArtifactNotFound(KeyError):
    """The key (or staged upload) does not exist."""


@dataclass(frozen=True)
class StagedUpload:
    upload_id: str
    size_bytes: int
    parts: int
    modified: datetime  # UTC, time of the last part written


class ArtifactStore(ABC):
    """Abstract artifact store. Implementations are thread-safe."""

    #: URI scheme of keys in this store, e.g. "file" or "s3".
    scheme: str

    @abstractmethod
    def uri(self, key: str) -> str:
        """Human-readable location of `key`, e.g. file:///abs/path or s3://bucket/key."""

    # -- staged uploads --------------------------------------------------------------------
    @abstractmethod
    def stage_part(self, upload_id: str, part_number: int, data: bytes) -> None:
        """Durably store part `part_number` (0, 1, 2, ...) of an upload. Rewriting a part
        with the same number replaces it (so a retried chunk is harmless)."""

    @abstractmethod
    def read_staged(self, upload_id: str, chunk_size: int = 4 << 20) -> Iterator[bytes]:
        """Yield the staged bytes of an upload, parts in order."""

    @abstractmethod
    def publish(self, upload_id: str, key: str) -> int:
        """Assemble the staged parts of `upload_id` into `key`, atomically for readers,
        then remove the staged parts. Returns the size in bytes. Raises ArtifactNotFound
        when the upload has no parts."""

    @abstractmethod
    def discard_staged(self, upload_id: str) -> None:
        """Remove every staged part of an upload; no error when there is none."""

    @abstractmethod
    def list_staged(self) -> list[StagedUpload]:
        """Every upload that has staged parts (for garbage collection)."""

    # -- final objects ---------------------------------------------------------------------
    @abstractmethod
    def put(self, key: str, data: bytes) -> None:
        """Write a small object in one step (atomic for readers)."""

    @abstractmethod
    def put_file(self, key: str, path: str) -> None:
        """Copy a local file to `key` (any size, streamed; atomic for readers: a failed copy
        leaves no object)."""

    @abstractmethod
    def open_read(self, key: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        """Yield the object's bytes in chunks of at most chunk_size. ArtifactNotFound if absent."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def size(self, key: str) -> int:
        """Size in bytes; ArtifactNotFound if absent."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Delete an object; no error when it is absent."""

    @abstractmethod
    def list_keys(self, prefix: str = "") -> list[str]:
        """Keys of final objects under prefix, sorted."""
