"""Model cards: Markdown generated from what the registry knows about a version."""

from __future__ import annotations

from services.registry.domain import (
    STAGE_ARCHIVED, STAGE_PRODUCTION, STAGE_STAGING, Model, Promotion, Version,
)

_STAGES = {STAGE_STAGING: "Staging", STAGE_PRODUCTION: "Production", STAGE_ARCHIVED: "Archived"}


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_model_card(model: Model, v: Version, promotions: list[Promotion]) -> str:
    lines = [f"# {model.name} — version {v.version}", ""]
    if model.description:
        lines += [model.description, ""]
    if v.description:
        lines += [v.description, ""]
    lines += ["## Overview", "", "| | |", "|---|---|",
              f"| Framework | {v.framework} |",
              f"| Stage | {_STAGES.get(v.stage, 'None')} |",
              f"| Aliases | {', '.join(v.aliases) or '—'} |",
              f"| Owner | {_cell(model.owner) or '—'} |",
              f"| Created by | {_cell(v.created_by)} |",
              f"| Created | {v.create_time.isoformat() if v.create_time else '—'} |"]
    if v.sha256:
        lines += [f"| Artifact | `{v.filename}` ({v.size_bytes:,} bytes) |", f"| SHA-256 | `{v.sha256}` |"]
    lines.append("")
    if v.signature.inputs or v.signature.outputs:
        lines += ["## Signature", "", "| | Name | Type | Shape |", "|---|---|---|---|"]
        for kind, specs in (("input", v.signature.inputs), ("output", v.signature.outputs)):
            for t in specs:
                shape = "[" + ", ".join("?" if d < 0 else str(d) for d in t.shape) + "]"
                lines.append(f"| {kind} | `{_cell(t.name)}` | {t.dtype.lower()} | {shape} |")
        lines += ["", f"NaN and infinities in inputs: {'accepted' if v.signature.allow_nan else 'refused'} "
                  "(`allow_nan`).", ""]
    if v.metrics:
        lines += ["## Metrics", "", "| Metric | Value |", "|---|---|"]
        lines += [f"| {_cell(k)} | {val:.6g} |" for k, val in sorted(v.metrics.items())]
        lines.append("")
    lin = v.lineage
    facts = [("MLflow run", lin.mlflow_run_id), ("Training job", lin.training_job_id),
             ("Feature views", ", ".join(lin.feature_views)), ("Dataset hash", lin.dataset_hash),
             ("Dataset", lin.dataset_uri)]
    if any(val for _, val in facts):
        lines += ["## Lineage", ""] + [f"- **{k}**: `{val}`" for k, val in facts if val] + [""]
    if v.tags:
        lines += ["## Tags", ""] + [f"- `{k}` = `{val}`" for k, val in sorted(v.tags.items())] + [""]
    if promotions:
        lines += ["## Promotion history", "", "| Alias | State | Requested by | Decided by | Comment |",
                  "|---|---|---|---|---|"]
        states = {1: "pending", 2: "approved", 3: "rejected"}
        for p in promotions:
            lines.append(f"| {p.alias} | {states.get(p.state, '?')} | {_cell(p.requested_by)} | "
                         f"{_cell(p.decided_by) or '—'} | {_cell(p.decision_comment) or '—'} |")
        lines.append("")
    return "\n".join(lines)
