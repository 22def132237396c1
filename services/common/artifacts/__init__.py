"""Artifact stores (model files, datasets) and a factory that opens one from a URL.

The S3 backend (and so `minio`) is imported only when used, so local-only processes do not
pay for it: `S3ArtifactStore` is resolved lazily by the module __getattr__ and the factory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

from .base import ArtifactNotFound, ArtifactStore, StagedUpload
from .local import LocalArtifactStore

if TYPE_CHECKING:
    from .s3 import S3ArtifactStore

__all__ = [
    "ArtifactNotFound",
    "ArtifactStore",
    "LocalArtifactStore",
    "S3ArtifactStore",
    "StagedUpload",
    "open_artifact_store",
]

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def __getattr__(name: str) -> Any:
    if name == "S3ArtifactStore":
        from .s3 import S3ArtifactStore

        return S3ArtifactStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def open_artifact_store(url: str) -> ArtifactStore:
    """Open the store `url` names:

    - a local path, or file:///abs/path -> LocalArtifactStore
    - s3://bucket[/prefix]?endpoint=host:port[&secure=true|false] -> S3ArtifactStore, with
      credentials from STRATA_S3_ACCESS_KEY / STRATA_S3_SECRET_KEY (and optional
      STRATA_S3_REGION) so secrets never sit in a URL that may be logged.
    """
    if not url:
        raise ValueError("artifact store url is empty")
    if "://" not in url:
        return LocalArtifactStore(Path(url))
    parts = urlsplit(url)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path or parts.query:
            raise ValueError(f"unsupported artifact store url {url!r}: expected file:///abs/path")
        return LocalArtifactStore(Path(unquote(parts.path)))
    if parts.scheme == "s3":
        return _open_s3(url, parts.netloc, parts.path, parts.query)
    raise ValueError(f"unsupported artifact store url {url!r}: expected a path, file:// or s3://")


def _open_s3(url: str, bucket: str, path: str, query: str) -> ArtifactStore:
    from .s3 import S3ArtifactStore

    try:
        params = parse_qs(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise ValueError(f"invalid artifact store url {url!r}: malformed query") from None
    unknown = set(params) - {"endpoint", "secure"}
    if not bucket or unknown or any(len(v) != 1 for v in params.values()):
        problem = f"unknown parameter(s) {sorted(unknown)}" if unknown else "expected s3://bucket/prefix"
        raise ValueError(f"invalid artifact store url {url!r}: {problem}")
    endpoint = params.get("endpoint", [""])[0]
    if not endpoint:
        raise ValueError(f"invalid artifact store url {url!r}: missing ?endpoint=host:port")
    secure_text = params.get("secure", ["false"])[0].lower()
    if secure_text not in _TRUE | _FALSE:
        raise ValueError(f"invalid artifact store url {url!r}: secure must be true or false")
    access_key = os.environ.get("STRATA_S3_ACCESS_KEY")
    secret_key = os.environ.get("STRATA_S3_SECRET_KEY")
    if not access_key or not secret_key:
        raise ValueError(
            f"artifact store url {url!r} needs STRATA_S3_ACCESS_KEY and STRATA_S3_SECRET_KEY set"
        )
    return S3ArtifactStore(
        endpoint=endpoint,
        access_key=access_key,
        secret_key=secret_key,
        bucket=bucket,
        secure=secure_text in _TRUE,
        region=os.environ.get("STRATA_S3_REGION") or None,
        prefix=unquote(path).strip("/"),
    )
