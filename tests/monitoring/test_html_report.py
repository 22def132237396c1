"""The HTML drift report (services/monitoring/html_report.py): a page that parses, lists every column
with its verdict, escapes hostile names, fetches nothing, and draws histograms whose counts are
numpy.histogram's (numeric) or numpy's category counts (categorical)."""

from __future__ import annotations

from datetime import UTC, datetime
from html.parser import HTMLParser

import numpy as np

from services.monitoring import html_report
from services.monitoring.drift import ReferenceProfile, drift_report
from services.monitoring.types import DriftReport, VersionDrift, VersionDriftView, Window

HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>&amp;\''


class Page(HTMLParser):
    """Tags, attributes, the text of each column row and its verdict, and the charts' counts."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: set[str] = set()
        self.attrs: list[tuple[str, str | None]] = []
        self.rows: dict[tuple[str, str], dict] = {}
        self._row: dict | None = None
        self._cell: list[str] | None = None
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        self.attrs += attrs
        a = dict(attrs)
        if tag == "tr" and "data-column" in a:
            self._row = self.rows[(a["data-role"], a["data-column"])] = {"cells": []}
        elif tag == "td" and self._row is not None:
            self._cell = []
            self._row["cells"].append(self._cell)
        elif tag == "svg" and self._row is not None:
            self._row["reference"] = [int(n) for n in a["data-reference"].split(",")]
            self._row["current"] = [int(n) for n in a["data-current"].split(",")]

    def handle_endtag(self, tag: str) -> None:
        if tag == "tr":
            self._row = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)


def report(ref: dict, cur: dict, predictions: tuple[dict, dict] | None = None) -> tuple[str, list[VersionDriftView]]:
    features = ReferenceProfile.from_columns(ref)
    drift = drift_report(features, cur)
    outputs, histograms = (), {}
    if predictions:
        out_profile = ReferenceProfile.from_columns(predictions[0])
        outputs = drift_report(out_profile, predictions[1]).features
        histograms = {n: html_report.column_histogram(c, predictions[1][n]) for n, c in out_profile.columns.items()}
    v = VersionDrift("fraud <model>", 3, True, len(next(iter(cur.values()))), drift, outputs, ("gone & lost",))
    views = [VersionDriftView(v, {n: html_report.column_histogram(c, cur[n]) for n, c in features.columns.items()},
                              histograms)]
    window = Window(datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 1, 2, tzinfo=UTC))
    return html_report.render(DriftReport(window, (v,)), views), views


def test_the_page_parses_lists_each_column_with_its_verdict_and_escapes_hostile_names() -> None:
    rng = np.random.default_rng(1)
    ref = {HOSTILE: rng.normal(size=2000), "calm": rng.normal(size=2000),
           "segment": rng.choice(np.array(["a", "b", "c"]), 2000)}
    cur = {HOSTILE: rng.normal(loc=1.5, size=1500), "calm": rng.normal(size=1500),
           "segment": rng.choice(np.array(["a", "b", "<c>"]), 1500)}
    page, views = report(ref, cur, ({"label": rng.integers(0, 2, 2000)}, {"label": rng.integers(0, 2, 1500)}))
    parsed = Page()
    parsed.feed(page)
    parsed.close()
    # Nothing but markup of our own: no script, image or anything fetched.
    assert parsed.tags <= {"html", "head", "meta", "title", "style", "body", "h1", "h2", "h3", "p", "span", "section",
                           "table", "thead", "tbody", "tr", "th", "td", "svg", "g", "rect"}, parsed.tags
    assert not any(k in ("src", "href") for k, _ in parsed.attrs)
    assert "<script" not in page and "<img" not in page
    assert HOSTILE in "".join(parsed.text)  # the name reads back as it was, as text
    assert "models/fraud <model>/versions/3" in "".join(parsed.text) and "gone & lost" in "".join(parsed.text)
    drift = views[0].drift
    want = {("feature", f.name): f for f in drift.features.features} | {("prediction", f.name): f
                                                                         for f in drift.predictions}
    assert set(parsed.rows) == set(want)
    for key, f in want.items():
        cells = ["".join(c).strip() for c in parsed.rows[key]["cells"]]
        assert cells[0] == f.name and cells[2] == str(f.method)
        assert cells[5] == ("drift" if f.drifted else "no drift")
    assert want[("feature", HOSTILE)].drifted and not want[("feature", "calm")].drifted


def test_numeric_histograms_are_numpys_over_shared_bins_and_categories_are_counted_per_value() -> None:
    rng = np.random.default_rng(2)
    ref = rng.normal(size=1200)
    ref[:30] = np.nan
    cur = np.concatenate((rng.normal(loc=0.7, scale=1.4, size=900), [np.nan, np.inf, -np.inf]))
    letters = np.array(list("abcdefghijklmnop"))
    ref_cat = rng.choice(letters[:12], 1200)
    cur_cat = rng.choice(letters[3:], 903)
    page, views = report({"x": ref, "s": ref_cat}, {"x": cur, "s": cur_cat})
    parsed = Page()
    parsed.feed(page)

    h = views[0].feature_histograms["x"]
    finite_ref, finite_cur = ref[np.isfinite(ref)], cur[np.isfinite(cur)]
    edges = np.histogram_bin_edges(np.concatenate((finite_ref, finite_cur)), html_report.HISTOGRAM_BINS)
    np.testing.assert_array_equal(h.edges, edges)
    np.testing.assert_array_equal(h.reference, np.histogram(finite_ref, edges)[0])
    np.testing.assert_array_equal(h.current, np.histogram(finite_cur, edges)[0])
    assert parsed.rows[("feature", "x")]["reference"] == np.histogram(finite_ref, edges)[0].tolist()
    assert parsed.rows[("feature", "x")]["current"] == np.histogram(finite_cur, edges)[0].tolist()

    c = views[0].feature_histograms["s"]
    labels = np.union1d(ref_cat, cur_cat)
    r = np.array([(ref_cat == v).sum() for v in labels])
    k = np.array([(cur_cat == v).sum() for v in labels])
    order = np.lexsort((labels, -(r / r.sum() + k / k.sum())))[:html_report.TOP_CATEGORIES]
    rest = labels.size - order.size
    assert c.labels == (*labels[order], f"other ({rest} categories)")
    assert c.reference.tolist() == [*r[order], r.sum() - r[order].sum()]
    assert c.current.tolist() == [*k[order], k.sum() - k[order].sum()]
    assert parsed.rows[("feature", "s")]["reference"] == c.reference.tolist()


def test_a_constant_column_gets_numpys_widened_bins() -> None:
    page, views = report({"k": np.full(50, 4.0)}, {"k": np.full(20, 4.0)})
    h = views[0].feature_histograms["k"]
    edges = np.histogram_bin_edges(np.full(70, 4.0), html_report.HISTOGRAM_BINS)
    np.testing.assert_array_equal(h.edges, edges)
    assert (h.reference.sum(), h.current.sum()) == (50, 20)
    assert h.reference.tolist() == np.histogram(np.full(50, 4.0), edges)[0].tolist()
