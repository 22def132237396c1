"""The drift report as one self-contained HTML page: inline CSS and inline SVG, no script and
nothing fetched, so it can be mailed, archived or opened offline. Per model version and shadow
flag: rows, share of drifted features and the dataset verdict; per feature and output: method,
score, threshold, verdict and a small histogram of the reference against the window.

The histograms are computed here from the reference profile and the window's values:
- numeric: the same `HISTOGRAM_BINS` equal-width bins for both sides over the range of both
  (`numpy.histogram_bin_edges` of their joint minimum and maximum, so the counts are what
  `numpy.histogram(values, edges)` gives); missing values (null, NaN, +-inf) left out;
- categorical: the `TOP_CATEGORIES` categories with the largest joint share (reference share +
  window share; ties by name), the rest as one bin.
Each bar's height is its side's share, so a window of another size than the reference compares.

Every text is HTML-escaped (column, model and category names come from users); the counts are also
on each chart (`data-reference`, `data-current`) for tools and tests.
"""

from __future__ import annotations

import html
from collections.abc import Mapping

import numpy as np

from services.monitoring.drift import (
    CategoricalReference, ColumnReference, FeatureDrift, NumericReference, histogram,
)
from services.monitoring.types import DriftReport, Histogram, VersionDriftView

HISTOGRAM_BINS = 20
TOP_CATEGORIES = 10
CHART_WIDTH, CHART_HEIGHT = 240, 48

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;color:#1f2933;margin:2rem auto;max-width:72rem;
padding:0 1rem}
h1{font-size:1.5rem;margin:0 0 .25rem}h2{font-size:1.2rem;margin:2rem 0 .5rem;border-bottom:1px solid #cbd2d9}
h3{font-size:1rem;margin:1.2rem 0 .4rem}.muted{color:#616e7c}
table{border-collapse:collapse}th,td{padding:.25rem .6rem;text-align:left;vertical-align:middle}
table.columns th{border-bottom:2px solid #cbd2d9}table.columns td{border-bottom:1px solid #e4e7eb}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.verdict{font-weight:600;border-radius:.25rem;padding:.1rem .45rem}.drift{background:#fde2e1;color:#a61b1b}
.ok{background:#e3f9e5;color:#1f7a33}.tag{font-size:.8rem;background:#e4e7eb;border-radius:.25rem;padding:.1rem .4rem}
.legend span{display:inline-block;width:.8rem;height:.8rem;margin:0 .3rem 0 .8rem;vertical-align:-.1rem}
.ref{fill:#9aa5b1;background:#9aa5b1}.cur{fill:#2b6cb0;background:#2b6cb0}
"""


# -- histograms ----------------------------------------------------------------------------------

def column_histogram(ref: ColumnReference, values: np.ndarray) -> Histogram:
    """Reference against window (`values`: the window's column as `rows.column_values` gives it)."""
    if isinstance(ref, NumericReference):
        return numeric_histogram(ref, values)
    return categorical_histogram(ref, values)


def numeric_histogram(ref: NumericReference, values: np.ndarray) -> Histogram:
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    lo, hi = float(ref.values[0]), float(ref.values[-1])
    if x.size:
        lo, hi = min(lo, float(x.min())), max(hi, float(x.max()))
    # The edges numpy.histogram_bin_edges(both sides, HISTOGRAM_BINS) would give, from the extremes only.
    edges = np.histogram_bin_edges(np.array([lo, hi]), HISTOGRAM_BINS)
    return Histogram(histogram(ref.values, edges), np.histogram(x, edges)[0].astype(np.int64), edges=edges)


def categorical_histogram(ref: CategoricalReference, values: np.ndarray) -> Histogram:
    x = np.asarray(values)
    if x.dtype.kind == "O":
        x = x[~(np.equal(x, None) | (x != x))].astype(str)  # (x != x: NaN)
    elif x.dtype.kind in "biuf":
        x = x.astype(np.float64)
        x = x[np.isfinite(x)]
    seen, seen_counts = np.unique(x, return_counts=True)
    labels = np.union1d(ref.categories, seen)
    r = np.zeros(labels.size, np.int64)
    c = np.zeros(labels.size, np.int64)
    r[labels.searchsorted(ref.categories)] = ref.counts
    c[labels.searchsorted(seen)] = seen_counts
    joint = r / max(int(r.sum()), 1) + c / max(int(c.sum()), 1)
    order = np.lexsort((labels, -joint))
    top, rest = order[:TOP_CATEGORIES], order[TOP_CATEGORIES:]
    names = tuple(_label(v) for v in labels[top])
    ref_counts, cur_counts = r[top], c[top]
    if rest.size:
        names += (f"other ({rest.size} categories)",)
        ref_counts = np.append(ref_counts, r[rest].sum())
        cur_counts = np.append(cur_counts, c[rest].sum())
    return Histogram(ref_counts, cur_counts, labels=names)


def _label(v: object) -> str:
    return np.format_float_positional(v, trim="-") if isinstance(v, np.floating) else str(v)


# -- the page ------------------------------------------------------------------------------------

def render(report: DriftReport, views: list[VersionDriftView]) -> str:
    e = html.escape
    w = report.window
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width,initial-scale=1">',
             "<title>Strata drift report</title>", f"<style>{CSS}</style></head><body>",
             "<h1>Drift report</h1>",
             f'<p class="muted">Window {e(w.start.isoformat())} to {e(w.end.isoformat())} (UTC, end excluded); '
             f"{len(views)} model version(s).</p>",
             '<p class="legend muted">Histograms: <span class="ref"></span>reference '
             '<span class="cur"></span>window (bar height: share of each side)</p>']
    for i, view in enumerate(views):
        parts.append(_version(i, view))
    parts.append("</body></html>")
    return "\n".join(parts)


def _version(i: int, view: VersionDriftView) -> str:
    e = html.escape
    v, d = view.drift, view.drift.features
    title = f"models/{v.model}/versions/{v.version}"
    tag = ' <span class="tag">shadow</span>' if v.shadow else ""
    verdict = _verdict(d.dataset_drifted, "dataset drift", "no dataset drift")
    out = [f'<section class="version" id="version-{i}">',
           f"<h2>{e(title)}{tag}</h2>",
           '<table class="summary">',
           f'<tr><th>rows</th><td class="num">{v.rows:,}</td></tr>',
           f'<tr><th>drifted features</th><td class="num">{d.n_drifted} of {len(d.features)} '
           f"({d.share_drifted:.0%})</td></tr>",
           f"<tr><th>dataset verdict</th><td>{verdict} "
           f'<span class="muted">(drifts at a share of {d.drift_share:g})</span></td></tr>',
           "</table>",
           "<h3>Features</h3>", _columns(d.features, view.feature_histograms, "feature")]
    if v.predictions:
        out += ["<h3>Outputs</h3>", _columns(v.predictions, view.prediction_histograms, "prediction")]
    if v.missing_columns:
        out.append(f'<p class="muted">Reference columns the window lacks (not compared): '
                   f"{e(', '.join(v.missing_columns))}</p>")
    out.append("</section>")
    return "\n".join(out)


def _columns(columns: tuple[FeatureDrift, ...], histograms: Mapping[str, Histogram], role: str) -> str:
    e = html.escape
    rows = ['<table class="columns"><thead><tr><th>column</th><th>kind</th><th>method</th><th>score</th>'
            "<th>threshold</th><th>verdict</th><th>rows (reference / window)</th><th>reference vs window</th>"
            "</tr></thead><tbody>"]
    for f in columns:
        chart = _chart(histograms[f.name]) if f.name in histograms else ""
        rows.append(
            f'<tr data-role="{role}" data-column="{e(f.name)}"><td class="column">{e(f.name)}</td>'
            f"<td>{e(str(f.kind))}</td><td>{e(str(f.method))}</td><td class=\"num\">{f.score:.4g}</td>"
            f'<td class="num">{f.threshold:g}</td><td>{_verdict(f.drifted, "drift", "no drift")}</td>'
            f'<td class="num">{f.n_reference:,} / {f.n_current:,}</td><td>{chart}</td></tr>')
    rows.append("</tbody></table>")
    return "\n".join(rows)


def _verdict(drifted: bool, yes: str, no: str) -> str:
    return f'<span class="verdict drift">{yes}</span>' if drifted else f'<span class="verdict ok">{no}</span>'


def _chart(h: Histogram) -> str:
    """Paired bars per bin, each side scaled by its own total; a title per bin for the exact counts."""
    e = html.escape
    n = h.reference.size
    ref_total, cur_total = max(int(h.reference.sum()), 1), max(int(h.current.sum()), 1)
    ref_share, cur_share = h.reference / ref_total, h.current / cur_total
    top = max(float(ref_share.max(initial=0)), float(cur_share.max(initial=0)), 1e-12)
    step = CHART_WIDTH / n
    bar = step * 0.42
    names = h.labels if h.labels else tuple(f"[{h.edges[j]:.4g}, {h.edges[j + 1]:.4g}{']' if j == n - 1 else ')'}"
                                            for j in range(n))
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{CHART_WIDTH}" height="{CHART_HEIGHT}" '
           f'viewBox="0 0 {CHART_WIDTH} {CHART_HEIGHT}" role="img" '
           f'data-reference="{",".join(map(str, h.reference.tolist()))}" '
           f'data-current="{",".join(map(str, h.current.tolist()))}">']
    for j in range(n):
        x = j * step
        hr, hc = CHART_HEIGHT * ref_share[j] / top, CHART_HEIGHT * cur_share[j] / top
        tip = (f"{names[j]}: reference {int(h.reference[j]):,} ({ref_share[j]:.1%}), "
               f"window {int(h.current[j]):,} ({cur_share[j]:.1%})")
        out.append(f"<g><title>{e(tip)}</title>"
                   f'<rect class="ref" x="{x + step * 0.08:.2f}" y="{CHART_HEIGHT - hr:.2f}" width="{bar:.2f}" '
                   f'height="{hr:.2f}"/>'
                   f'<rect class="cur" x="{x + step * 0.5:.2f}" y="{CHART_HEIGHT - hc:.2f}" width="{bar:.2f}" '
                   f'height="{hc:.2f}"/></g>')
    out.append("</svg>")
    return "".join(out)
