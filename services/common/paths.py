"""Which paths a request may name: the one check every service runs on a path, glob or URI that
arrives in a request (a view's source, an entity table, a training set, a batch job's input and
output) before anything opens, lists, creates or replaces a file.

A `Confinement` knows the places one service may touch: its artifact store (where relative keys
live: a local directory or an `s3://bucket/prefix/`), further roots reads may name (local
directories or S3 prefixes), and the roots writes may name (the store, or a prefix of it). A path
passes when, and only when, every segment of it -- after a glob character too -- is a plain name
and the place it names lies under one of those roots with symbolic links resolved:

- refused anywhere: `..` and `.` segments, empty segments (`a//b`), segments whose Unicode
  compatibility form is `.`/`..` or holds a slash (`．．`, `‥`, `／`), backslashes, control
  characters and NUL, percent-encoded bytes (`%2e%2e`: some readers decode them, so none may
  pass), a leading `~` (DuckDB expands it), any scheme but `s3://` (`file://`, `http://`,
  `file:`), names the artifact store reserves (`.staging`, `.tmp-*`), paths over 4,096 characters;
- a write target never holds a glob character, and must lie under a write root (and `under`);
- local paths are checked after `os.path.realpath` of the longest existing part, so a symbolic
  link inside a root that points outside does not lead out; a read glob is expanded here
  (`expand`), each match checked the same way, so a link reached through `*` does not either;
- S3 has no links or relative segments: a key passes when the URI lies under an S3 root.

Errors are INVALID_ARGUMENT naming the field, and say the same whether or not the file exists:
the answer must not tell a caller what lies on the host.
"""

from __future__ import annotations

import glob
import os
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass

from services.common.errors import InvalidArgument, quote

S3 = "s3://"
MAX_PATH_CHARS = 4096
GLOB = re.compile(r"[*?\[]")
_PERCENT = re.compile(r"%[0-9A-Fa-f]{2}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_RESERVED = (".staging", ".tmp-")  # the artifact store's staged uploads and temp files


def _within(path: str, root: str) -> bool:
    """`path` is `root` or below it, compared on whole segments (`/a/bc` is not under `/a/b`)."""
    return path == root or path.startswith(root.rstrip("/") + "/")


def _segments(path: str, field: str, *, write: bool) -> list[str]:
    """The '/'-separated names of `path` (absolute or relative, without scheme), each checked."""
    if write and GLOB.search(path):
        raise InvalidArgument(field, f"{quote(path)}: a write target must not hold a glob character")
    parts = path.split("/")
    if parts[0] == "":
        parts = parts[1:]  # absolute
    if parts and parts[-1] == "" and not write:
        parts = parts[:-1]  # a directory prefix, for reads
    if not parts:
        raise InvalidArgument(field, f"{quote(path)}: names no file")
    for name in parts:
        compat = unicodedata.normalize("NFKC", name)
        if name in ("", ".", "..") or compat in (".", "..") or "/" in compat or "\\" in compat:
            raise InvalidArgument(
                field, f"{quote(path)}: every part must be a plain name (no '..', '.', empty part or look-alike)")
        if name.startswith(_RESERVED):
            raise InvalidArgument(field, f"{quote(path)}: names starting with .staging or .tmp- are reserved")
    return parts


@dataclass(frozen=True)
class Place:
    """Where a checked path points: an absolute local path or an s3:// URI (globs kept)."""

    path: str

    @property
    def remote(self) -> bool:
        return self.path.startswith(S3)

    @property
    def is_glob(self) -> bool:
        return GLOB.search(self.path) is not None


class Confinement:
    """The places one service may read and write (see the module docstring)."""

    def __init__(self, store: str | None, *, read_roots: Iterable[str] = (),
                 write_roots: Iterable[str] | None = None) -> None:
        """`store`: where relative keys live, a local directory or `s3://bucket/prefix` (None: no
        store, relative keys are refused). `read_roots`: other local directories or S3 prefixes
        reads may name (the store and the write roots are readable too). `write_roots`: where
        writes may go; default the store."""
        self.store = self._root(store) if store is not None else None
        own = (self.store,) if self.store is not None else ()
        self.write_roots = own if write_roots is None else tuple(self._root(r) for r in write_roots)
        self.read_roots = tuple(dict.fromkeys([*own, *self.write_roots, *(self._root(r) for r in read_roots)]))

    @staticmethod
    def _root(root: str) -> str:
        if root.startswith(S3):
            return root.rstrip("/") + "/"
        if not os.path.isabs(root):
            root = os.path.abspath(root)
        return os.path.realpath(root)

    # -- the checks ------------------------------------------------------------------------------
    def readable(self, path: str, field: str) -> Place:
        """`path` (a key in the store, an absolute path or an s3:// URI; globs allowed) when a
        read of it stays inside the read roots, else INVALID_ARGUMENT naming `field`."""
        return self._check(path, field, write=False, roots=self.read_roots)

    def writable(self, path: str, field: str, *, under: str = "") -> Place:
        """`path` when a write to it stays inside the write roots (and under the store's
        `under/` prefix when given), else INVALID_ARGUMENT naming `field`."""
        if under and self.store is None:
            raise InvalidArgument(field, "this service has no artifact store to write into")
        roots = (self._join(self.store, under.strip("/")),) if under and self.store else self.write_roots
        return self._check(path, field, write=True, roots=roots)

    def expand(self, place: Place, field: str) -> list[str]:
        """The local files a checked read glob matches, sorted, each one checked again with its
        symbolic links resolved (a link met through `*` must not lead out); INVALID_ARGUMENT when
        none match. A path without a glob comes back as the only element."""
        if place.remote:
            raise ValueError("expand() is for local paths; list S3 objects under the fixed prefix")
        if not place.is_glob:
            return [place.path]
        matches = sorted(m for m in glob.glob(place.path, recursive=True) if os.path.isfile(m))
        if not matches:
            raise InvalidArgument(field, f"{quote(place.path)} matches no file")
        for m in matches:
            if not any(_within(os.path.realpath(m), r) for r in self.read_roots if not r.startswith(S3)):
                raise InvalidArgument(field, f"{quote(place.path)}: a matching file lies outside the allowed places")
        return matches

    # -- internals ---------------------------------------------------------------------------------
    @staticmethod
    def _join(base: str, key: str) -> str:
        return base + key if base.startswith(S3) else os.path.join(base, key)

    def _check(self, path: str, field: str, *, write: bool, roots: tuple[str, ...]) -> Place:
        if not isinstance(path, str) or not path:
            raise InvalidArgument(field, "is required")
        if len(path) > MAX_PATH_CHARS:
            raise InvalidArgument(field, f"is {len(path)} characters long; at most {MAX_PATH_CHARS}")
        if _CONTROL.search(path):
            raise InvalidArgument(field, f"{quote(path)}: control characters are not allowed")
        if "\\" in path:
            raise InvalidArgument(field, f"{quote(path)}: backslashes are not allowed; separate parts with '/'")
        if _PERCENT.search(path):
            raise InvalidArgument(field, f"{quote(path)}: percent-encoded characters are not allowed")
        if path.startswith("~"):
            raise InvalidArgument(field, f"{quote(path)}: '~' is not expanded; give a key or an absolute path")
        if path.startswith(S3):
            _segments(path[len(S3):], field, write=write)
            full = path
        elif "://" in path or _SCHEME.match(path):
            raise InvalidArgument(field, f"{quote(path)}: give a key in the artifact store, an absolute path or s3://")
        else:
            _segments(path, field, write=write)
            if not os.path.isabs(path) and self.store is None:
                raise InvalidArgument(field, f"{quote(path)}: this service has no artifact store; give an absolute path")
            full = path if os.path.isabs(path) else self._join(self.store, path)  # type: ignore[arg-type]
        if full.startswith(S3):
            if not any(_within(full, r.rstrip("/")) and full != r.rstrip("/") for r in roots if r.startswith(S3)):
                raise self._outside(path, field, write, roots)
            return Place(full)
        fixed, glob_at = full, GLOB.search(full)
        if glob_at is not None:  # the directory before the first glob part, links resolved
            fixed = full[: full.rfind("/", 0, glob_at.start()) + 1] or "/"
        # Links resolved in the longest part that exists; the rest cannot hold a link yet, nor
        # a '..' (_segments refused them), so it cannot lead out.
        real = os.path.realpath(fixed)
        if not any(_within(real, r) for r in roots if not r.startswith(S3)):
            raise self._outside(path, field, write, roots)
        return Place(full)

    def _outside(self, path: str, field: str, write: bool, roots: tuple[str, ...]) -> InvalidArgument:
        where = ", ".join(roots)
        verb = "written" if write else "read"
        return InvalidArgument(field, f"{quote(path)}: may not be {verb}; allowed places: {where}")
