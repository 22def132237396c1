"""S3 artifact store: any S3 API server (MinIO, AWS, ...) through the `minio` client.

Layout in the bucket, under an optional `prefix`:
    <prefix><key>                              final objects
    <prefix>.staging/<upload_id>/<part:08d>    staged parts

`publish` streams the parts, in order, into a single put_object call. For more than one
16 MiB part minio runs a multipart upload, and S3 shows the object only when that upload
completes (minio aborts it on error), so readers see nothing or the whole object. We avoid
compose_object: it needs every source but the last to be >= 5 MiB, which staged parts are not.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

from minio import Minio
from minio.deleteobjects import DeleteObject
from minio.error import S3Error

from .base import ArtifactNotFound, ArtifactStore, StagedUpload
from .local import STAGING_DIR, check_key, check_part_number, check_upload_id

PUBLISH_PART_SIZE = 16 << 20


class _PartsReader:
    """File-like `read()` over the concatenation of several objects, fetched one at a
    time, so publish never holds more than minio's upload buffers in memory."""

    def __init__(self, client: Minio, bucket: str, names: list[str]) -> None:
        self._client = client
        self._bucket = bucket
        self._names = iter(names)
        self._response = None
        self.bytes_read = 0

    def read(self, size: int = -1) -> bytes:
        while True:
            if self._response is None:
                name = next(self._names, None)
                if name is None:
                    return b""
                self._response = self._client.get_object(self._bucket, name)
            data = self._response.read(size if size >= 0 else None)
            if data:
                self.bytes_read += len(data)
                return data
            self._close_current()  # this part is exhausted: move to the next one

    def _close_current(self) -> None:
        if self._response is not None:
            self._response.close()
            self._response.release_conn()
            self._response = None

    def close(self) -> None:
        self._close_current()


class S3ArtifactStore(ArtifactStore):
    scheme = "s3"

    def __init__(
        self,
        endpoint: str,
        access_key: str,
        secret_key: str,
        bucket: str,
        secure: bool = False,
        region: str | None = None,
        prefix: str = "",
    ) -> None:
        self.bucket = bucket
        self.endpoint = endpoint
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self._staging = f"{self.prefix}{STAGING_DIR}/"
        # The Minio client is thread-safe (a shared urllib3 pool), so one per store.
        self._client = Minio(
            endpoint, access_key=access_key, secret_key=secret_key, secure=secure, region=region
        )
        self._arrow_options = {"access_key": access_key, "secret_key": secret_key, "endpoint_override": endpoint,
                               "scheme": "https" if secure else "http", "region": region or "us-east-1"}
        if not self._client.bucket_exists(bucket):
            try:
                self._client.make_bucket(bucket, location=region)
            except S3Error as e:
                # Another process created it between our check and our create.
                if e.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

    def __repr__(self) -> str:
        return f"S3ArtifactStore(endpoint={self.endpoint!r}, bucket={self.bucket!r}, prefix={self.prefix!r})"

    def _name(self, key: str) -> str:
        return self.prefix + check_key(key)

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._name(key)}"

    # -- staged uploads --------------------------------------------------------------------
    def _upload_prefix(self, upload_id: str) -> str:
        return f"{self._staging}{check_upload_id(upload_id)}/"

    def _part_names(self, upload_id: str) -> list[str]:
        """Object names of an upload's parts, in part order (names are zero-padded)."""
        objs = self._client.list_objects(self.bucket, prefix=self._upload_prefix(upload_id), recursive=True)
        return sorted(o.object_name for o in objs if o.object_name)

    def stage_part(self, upload_id: str, part_number: int, data: bytes) -> None:
        name = f"{self._upload_prefix(upload_id)}{check_part_number(part_number):08d}"
        self._client.put_object(self.bucket, name, io.BytesIO(data), len(data))

    def read_staged(self, upload_id: str, chunk_size: int = 4 << 20) -> Iterator[bytes]:
        names = self._part_names(upload_id)
        if not names:
            raise ArtifactNotFound(f"no staged parts for upload {upload_id!r}")
        return (chunk for name in names for chunk in self._stream(name, chunk_size))

    def publish(self, upload_id: str, key: str) -> int:
        final = self._name(key)
        names = self._part_names(upload_id)
        if not names:
            raise ArtifactNotFound(f"no staged parts for upload {upload_id!r}")
        reader = _PartsReader(self._client, self.bucket, names)
        try:
            self._client.put_object(
                self.bucket, final, reader, length=-1, part_size=PUBLISH_PART_SIZE  # type: ignore[arg-type]
            )
        finally:
            reader.close()
        # Only once the final object exists may the staged copy go.
        self._delete_many(names)
        return reader.bytes_read

    def discard_staged(self, upload_id: str) -> None:
        self._delete_many(self._part_names(upload_id))

    def _delete_many(self, names: list[str]) -> None:
        if not names:
            return
        # remove_objects is lazy: the errors iterator must be consumed for it to run.
        errors = list(self._client.remove_objects(self.bucket, (DeleteObject(n) for n in names)))
        if errors:
            raise RuntimeError(f"could not delete {len(errors)} staged part(s): {errors[0]}")

    def list_staged(self) -> list[StagedUpload]:
        groups: dict[str, tuple[int, int, datetime]] = {}
        for o in self._client.list_objects(self.bucket, prefix=self._staging, recursive=True):
            upload_id = (o.object_name or "")[len(self._staging) :].split("/", 1)[0]
            size, parts, modified = groups.get(upload_id, (0, 0, datetime.min.replace(tzinfo=UTC)))
            last = o.last_modified or modified
            groups[upload_id] = (size + (o.size or 0), parts + 1, max(modified, last))
        return [StagedUpload(uid, s, p, m) for uid, (s, p, m) in sorted(groups.items())]

    # -- final objects ---------------------------------------------------------------------
    def put(self, key: str, data: bytes) -> None:
        self._client.put_object(self.bucket, self._name(key), io.BytesIO(data), len(data))

    def put_file(self, key: str, path: str) -> None:
        # minio uploads big files in parts and aborts the multipart upload when a part fails,
        # so the object appears whole or not at all.
        self._client.fput_object(self.bucket, self._name(key), path)

    def list_objects(self, bucket: str, prefix: str) -> list[tuple[str, str, int]]:
        """(key, etag, size) of every object under `prefix` of `bucket`, any bucket on this
        endpoint (readers of data lakes); sorted by key."""
        found = self._client.list_objects(bucket, prefix=prefix, recursive=True)
        return sorted((o.object_name or "", o.etag or "", o.size or 0) for o in found if not o.is_dir)

    def download(self, bucket: str, key: str, path: str) -> None:
        """Object `key` of `bucket` to the local file `path`, written to a part file of its own and
        renamed: a failed download leaves no file at `path`, and concurrent downloads of the same
        object (minio's default part name is per object) cannot write into one file."""
        self._client.fget_object(bucket, key, path, tmp_file_path=f"{path}.{uuid.uuid4().hex}.part")

    def arrow_filesystem(self):  # -> pyarrow.fs.S3FileSystem (imported only when asked for)
        """The same endpoint and credentials as a pyarrow filesystem, for readers that open
        Parquet files with pyarrow (footers, whole tables) instead of streaming bytes."""
        from pyarrow import fs

        return fs.S3FileSystem(**self._arrow_options)

    def _stream(self, name: str, chunk_size: int) -> Iterator[bytes]:
        """Open `name` eagerly (so a missing object raises now) and stream it lazily."""
        try:
            response = self._client.get_object(self.bucket, name)
        except S3Error as e:
            if e.code == "NoSuchKey":
                raise ArtifactNotFound(name) from None
            raise

        def chunks() -> Iterator[bytes]:
            try:
                yield from response.stream(chunk_size)
            finally:
                response.close()
                response.release_conn()

        return chunks()

    def open_read(self, key: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        name = self._name(key)
        try:
            return self._stream(name, chunk_size)
        except ArtifactNotFound:
            raise ArtifactNotFound(key) from None

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
        except ArtifactNotFound:
            return False
        return True

    def size(self, key: str) -> int:
        try:
            return self._client.stat_object(self.bucket, self._name(key)).size or 0
        except S3Error as e:
            if e.code == "NoSuchKey":
                raise ArtifactNotFound(key) from None
            raise

    def delete(self, key: str) -> None:
        # S3 DELETE succeeds on a missing object, so this is idempotent as required.
        self._client.remove_object(self.bucket, self._name(key))

    def list_keys(self, prefix: str = "") -> list[str]:
        keys = []
        for o in self._client.list_objects(self.bucket, prefix=self.prefix + prefix, recursive=True):
            key = (o.object_name or "")[len(self.prefix) :]
            # Skip the staging area and any "folder" marker objects other tools may create.
            if key and not key.startswith(f"{STAGING_DIR}/") and not key.endswith("/"):
                keys.append(key)
        return sorted(keys)
