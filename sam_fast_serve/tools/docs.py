"""Docs made from the code: the table of model types (docs/models.md holds it; a test keeps the two
equal). `sam-fast-serve models` prints it."""

from __future__ import annotations

from sam_fast_serve.models.registry import MODEL_TYPES


def models_table() -> str:
    """Markdown: every model type with its family, parameters, official checkpoint and download."""
    rows = [
        "| model_type | family | parameters | checkpoint file | download |",
        "|---|---|---|---|---|",
    ]
    for model in MODEL_TYPES.values():
        download = f"[{model.file_name}]({model.url})" if model.url else "none: random weights for tests only"
        checked = ", sha256 checked" if model.sha256 else ""
        rows.append(
            f"| `{model.name}` | {model.family.title} | {model.parameters_m:.1f} M | `{model.file_name}` "
            f"| {download}{checked} |"
        )
    return "\n".join(rows) + "\n"
