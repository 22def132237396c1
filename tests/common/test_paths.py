"""The one path check (services/common/paths.py): hostile paths thrown at it never lead a read
or a write outside the places it was given, on the real file system with real symbolic links."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.common.errors import InvalidArgument
from services.common.paths import Confinement

# Pieces a hostile caller strings together: traversal, globs, look-alikes of '.', '..' and '/',
# percent-encoding, home and scheme prefixes, links that lead out, and plain names.
PIECES = ["..", ".", "", "*", "**", "?", "[a-z]*", "sub", "a.parquet", "x.parquet", "link", "leaf.parquet",
          "training-sets", "%2e%2e", "%2f", "..%2F..", "．．", "\u2025", "\uff0e", "／etc", "..\\..",
          "~", "~root", "file:", "file:", "etc", "passwd", "outside", ".staging", ".tmp-x", "é", "\x00",
          "a\nb", "...", " ..", ".. "]
PREFIXES = ["", "/", "file://", "file:", "~/", "s3://bucket/prefix/", "s3://bucket/", "s3://other/",
            "http://host/", "{root}/", "{extra}/", "{outside}/", "{root}/sub/../../", "{root}/*/../../"]


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("confine")
    root, extra, outside = base / "root", base / "extra", base / "outside"
    for d in (root / "sub", root / "training-sets", extra, outside / "dir"):
        d.mkdir(parents=True)
    for f in (root / "a.parquet", root / "sub" / "a.parquet", extra / "x.parquet", outside / "secret.parquet",
              outside / "dir" / "a.parquet"):
        f.write_bytes(b"PAR1")
    (root / "link").symlink_to(outside)  # a directory link inside the store leading out
    (root / "sub" / "leaf.parquet").symlink_to(outside / "secret.parquet")  # a file link leading out
    return {"base": base, "root": root, "extra": extra, "outside": outside}


def _inside(path: str, roots: list[Path]) -> bool:
    real = os.path.realpath(path)
    return any(real == str(r.resolve()) or real.startswith(str(r.resolve()) + "/") for r in roots)


def _snapshot(d: Path) -> set[str]:
    return {str(p) for p in d.rglob("*")}


hostile = st.tuples(st.sampled_from(PREFIXES), st.lists(st.sampled_from(PIECES), min_size=0, max_size=7))


def _render(tree: dict[str, Path], prefix: str, pieces: list[str]) -> str:
    prefix = prefix.format(root=tree["root"], extra=tree["extra"], outside=tree["outside"])
    return prefix + "/".join(pieces)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(hostile)
def test_no_generated_read_escapes(tree: dict[str, Path], case: tuple[str, list[str]]) -> None:
    path = _render(tree, *case)
    c = Confinement(str(tree["root"]), read_roots=[str(tree["extra"]), "s3://bucket/prefix/"])
    try:
        place = c.readable(path, "path")
    except InvalidArgument as e:
        assert e.field == "path"
        return
    if place.remote:
        assert place.path.startswith("s3://bucket/prefix/") and ".." not in place.path.split("/")
        return
    try:
        files = c.expand(place, "path")
    except InvalidArgument:
        return  # a glob that matches nothing, or a match that leads out: refused
    for f in files:
        assert _inside(f, [tree["root"], tree["extra"]]), (path, f)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(hostile)
def test_no_generated_write_escapes(tree: dict[str, Path], case: tuple[str, list[str]]) -> None:
    path = _render(tree, *case)
    c = Confinement(str(tree["root"]), read_roots=[str(tree["extra"])])
    before = _snapshot(tree["outside"]), _snapshot(tree["extra"])
    try:
        place = c.writable(path, "path", under="training-sets")
    except InvalidArgument as e:
        assert e.field == "path"
        return
    assert not place.remote
    assert _inside(place.path, [tree["root"] / "training-sets"]), path
    # Really write it: nothing appears outside the write root.
    target = Path(place.path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"PAR1")
    except (FileExistsError, NotADirectoryError, IsADirectoryError):
        pass  # an earlier example made a file where this one wants a directory, or the reverse
    assert (_snapshot(tree["outside"]), _snapshot(tree["extra"])) == before


@pytest.mark.parametrize("path", [
    "{root}/*/../../../../x.parquet",   # the probe's path: '..' after a glob
    "*/../../x.parquet", "sub/../../x.parquet", "link/secret.parquet", "link/*.parquet", "{root}/link/*",
    "sub/leaf.parquet", "{outside}/secret.parquet", "/etc/passwd", "file:///etc/passwd", "~/x.parquet",
    "%2e%2e/%2e%2e/etc/passwd", "．．/．．/x.parquet", "\u2025/x.parquet", "s3://other/x.parquet",
    "s3://bucket/prefix/../../x.parquet", "s3://bucket/prefixed/x.parquet",
])
def test_known_escapes_are_refused_for_reads_and_writes(tree: dict[str, Path], path: str) -> None:
    path = path.format(root=tree["root"], outside=tree["outside"])
    c = Confinement(str(tree["root"]), read_roots=["s3://bucket/prefix/"])
    for check in (lambda: c.expand(c.readable(path, "entity_uri"), "entity_uri")
                  if not path.startswith("s3://") else c.readable(path, "entity_uri"),
                  lambda: c.writable(path, "entity_uri")):
        with pytest.raises(InvalidArgument) as e:
            check()
        assert e.value.field == "entity_uri"


def test_plain_paths_pass(tree: dict[str, Path]) -> None:
    c = Confinement(str(tree["root"]), read_roots=[str(tree["extra"])])
    assert c.readable("a.parquet", "f").path == str(tree["root"] / "a.parquet")
    assert c.expand(c.readable("*.parquet", "f"), "f") == [str(tree["root"] / "a.parquet")]
    with pytest.raises(InvalidArgument, match="outside"):  # sub/ holds a link that leads out
        c.expand(c.readable("sub/*.parquet", "f"), "f")
    assert c.readable(str(tree["extra"] / "x.parquet"), "f").path == str(tree["extra"] / "x.parquet")
    assert c.writable("training-sets/t.parquet", "f", under="training-sets").path == \
        str(tree["root"] / "training-sets" / "t.parquet")


def test_writes_take_no_glob_and_stay_under_their_prefix(tree: dict[str, Path]) -> None:
    c = Confinement(str(tree["root"]))
    with pytest.raises(InvalidArgument, match="glob"):
        c.writable("training-sets/*.parquet", "output_uri", under="training-sets")
    with pytest.raises(InvalidArgument, match="may not be written"):
        c.writable("a.parquet", "output_uri", under="training-sets")


def test_the_answer_does_not_tell_whether_a_host_file_exists(tree: dict[str, Path]) -> None:
    c = Confinement(str(tree["root"]))
    errors = []
    for p in (tree["outside"] / "secret.parquet", tree["outside"] / "missing.parquet"):
        with pytest.raises(InvalidArgument) as e:
            c.readable(str(p), "input_uri")
        errors.append(e.value.message.replace(p.name, "NAME"))
    assert errors[0] == errors[1]


def test_an_error_quotes_at_most_a_bounded_part_of_the_path(tree: dict[str, Path]) -> None:
    c = Confinement(str(tree["root"]))
    with pytest.raises(InvalidArgument) as e:
        c.readable("/" + "x" * 1_000_000, "path")
    assert len(e.value.message) < 300
