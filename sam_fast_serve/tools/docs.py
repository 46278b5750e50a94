"""Docs made from the code: the tables of docs/ that repeat a fact of the code are generated here and
kept in their page between markers (<!-- NAME: start --> ... <!-- NAME: end -->); a test keeps each
page equal to what this module generates, and `sam-fast-serve docs DIR` rewrites them.

- models.md, `models-table`: every model type (models/registry.py);
- configuration.md, `config-keys`: every `handler:` key and request option, its default and its valid
  values (server/config.py, common/options.py, the families' defaults in models/registry.py);
- metrics.md, `metrics-table`: every exported metric (server/metrics.py).

The model table needs only the registry (torch free, as in a client install); the other two import
the server's modules.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from sam_fast_serve.models.registry import MODEL_TYPES, Family

# What each server key means (the AMG and image keys carry theirs as help in common/options.py). Its
# default and valid values come from the code; a key with no meaning fails config_tables (and its test).
KEY_MEANINGS = {
    "model_type": "the model, and with it the family whose code serves it ([models.md](models.md))",
    "sam_checkpoint": "the checkpoint's name inside the archive (SAM 3's is a folder); none: the official "
    "name of `model_type`. An official file is sha256-checked at load; a checkpoint file is read by "
    "`torch.load` with `weights_only=True`, a SAM 3 folder's weights from safetensors (tensors only, no code)",
    "process_batch_size": "images (or crops) per image-encoder call when TorchServe hands the worker a "
    "batch of requests",
    "dtype": "`auto`: bf16 where the device computes it natively (GPUs of compute capability 8.0 or "
    "newer, not T4 or V100; CPUs with AVX512-BF16 or AMX), else fp32. `bfloat16` on a CPU without "
    "native bf16 is emulated, about 9x slower than fp32 (the load logs it). `int8` (x86 CPUs with "
    "AVX512-VNNI or AMX, not with `compile`, not on CUDA): the image encoder's linear layers in int8, "
    "the rest in bf16 or fp32; pays on CPUs without AMX, loses some accuracy "
    "([performance.md](performance.md)). Scores, NMS and stability are always fp32",
    "compile": "`torch.compile` the image encoder, warmed up at load (slow first load; "
    "[performance.md](performance.md))",
    "max_image_pixels": "larger images are refused with a 413, from their header, before any pixel is decoded",
    "max_video_frames": "a video request with more frames (a TIFF: pages) is refused with a 413, from the "
    "file's header ([video.md](video.md))",
    "max_frame_pixels": "a video request with larger frames is refused with a 413, from the file's header",
    "max_video_objects": "objects a video request follows at most (each costs about one frame's tracking): "
    "more prompted ones are a 422; automatic mask generation keeps the best by predicted IoU",
    "max_video_pixels": "a video request with more pixels in all its frames is refused with a 413, from the "
    "file's header: a video file's frames are decoded once to a temporary file, 3 bytes a pixel",
    "max_masks": "masks returned per image at most: the best by predicted IoU (by score for concepts, chosen "
    "before any mask is made), in their original order",
    "max_chunk_bytes": "bytes the largest intermediate of a step may take: masks are upsampled, prompts "
    "decoded and (on a GPU) the image encoder's attention bias made as many at a time as fit. On a GPU also "
    "at most a quarter of its free memory; on a CPU each step's own smaller size where one measured faster. "
    "Lower it for several workers on one GPU ([deployment.md](deployment.md))",
    "max_response_bytes": "longest answer body; a longer one is a 422 `response_too_large` giving its size. "
    "Keep it at most `max_response_size` of config.properties: over that TorchServe's frontend drops "
    "the worker's connection and the worker's whole batch is lost",
    "embedding_cache_bytes": "image embeddings kept in the worker across requests (per image: vit_b 2 MiB "
    "in bf16, 4 MiB in fp32; SAM 2 8 MiB in bf16; SAM 3 117 MB in fp32, 58 MB in bf16); 0 turns the cache off",
    "embedding_store": "`memory` (each worker its own cache) or a Redis URL shared by every worker and "
    "replica; its password in the URL or in `$SAM_FAST_REDIS_PASSWORD` ([serving.md](serving.md#the-embedding-store))",
    "embedding_ttl_s": "seconds a Redis entry lives",
}

# A value outside every key's valid values: each check's message for it says what is valid.
_OUT_OF_RANGE = 10**18


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


def _families() -> list[Family]:
    return list({model.family.name: model.family for model in MODEL_TYPES.values()}.values())


def _valid_values(key: str, check: Callable[[Any], str | None]) -> str:
    """What `check` accepts, in the words of its own error message."""
    message = check(_OUT_OF_RANGE)
    if message is None or not message.startswith("must be "):
        raise ValueError(f"the check of {key!r} accepts {_OUT_OF_RANGE} or does not say what it accepts")
    return re.sub(r"[,;] got .*$", "", message.removeprefix("must be "))


def _value(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value}`"


def _meaning(f: dataclasses.Field[Any]) -> str:
    """A key's meaning: its help line where the option carries one (common/options.py, which the
    client's --help shows too), else KEY_MEANINGS; exactly one of the two."""
    help_line = f.metadata.get("help")
    if bool(help_line) == (f.name in KEY_MEANINGS):
        raise KeyError(f"the key {f.name!r} needs a meaning in exactly one place: its help or KEY_MEANINGS")
    return help_line or KEY_MEANINGS[f.name]


def _rows(
    fields: Iterable[dataclasses.Field[Any]], rules: Mapping[str, Callable[[Any], str | None]], families: bool
) -> list[str]:
    columns = ["key", "default", "valid values", *(["models"] if families else []), "meaning"]
    rows = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for f in fields:
        if f.name not in rules:
            continue
        default = _value(f.default)
        cells = [f"`{f.name}`", default, _valid_values(f.name, rules[f.name])]
        if families:
            changed = [
                f"{family.title}: {_value(family.amg_defaults[f.name])}"
                for family in _families()
                if f.name in family.amg_defaults
            ]
            if changed:
                cells[1] = f"{default} ({'; '.join(changed)})"
            generating = [family for family in _families() if family.automatic]
            taking = [family.title for family in generating if f.name in family.amg_keys]
            cells.append("all" if len(taking) == len(generating) else ", ".join(taking) + " only")
        cells.append(_meaning(f))
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def config_tables() -> str:
    """Markdown: the server's keys, then the automatic mask generation and image keys (which a request
    may also send), each with its default, valid values and meaning."""
    from sam_fast_serve.common.options import AMG_RULES, AMG_SETTINGS, IMAGE_RULES, ImageSettings, fields_of
    from sam_fast_serve.server.config import SERVICE_RULES, ServiceConfig

    only = {"`compile: true`": "compile", "`dtype: int8`": "int8"}
    notes = [
        f"{setting} applies to {', '.join(f.title for f in _families() if getattr(f, flag))} only; other models refuse "
        "it at load."
        for setting, flag in only.items()
    ]
    sections = [
        "### Server keys (model-config.yaml only)",
        "",
        *_rows(fields_of(ServiceConfig), SERVICE_RULES, families=False),
        "",
        *notes,
        "",
        "### Automatic mask generation (a config default; a request may send each)",
        "",
        '"all": every family with automatic mask generation ('
        + ", ".join(f.title for f in _families() if f.automatic)
        + "); "
        + ", ".join(f.title for f in _families() if not f.automatic)
        + " has none and refuses these keys.",
        "",
        *_rows(fields_of(*AMG_SETTINGS), AMG_RULES, families=True),
        "",
        "### Image decoding (a config default; a request may send each)",
        "",
        *_rows(fields_of(ImageSettings), IMAGE_RULES, families=False),
    ]
    unknown = set(KEY_MEANINGS) - {*SERVICE_RULES, *AMG_RULES, *IMAGE_RULES}
    if unknown:
        raise KeyError(f"KEY_MEANINGS names keys the code does not have: {sorted(unknown)}")
    return "\n".join(sections) + "\n"


def metrics_table() -> str:
    """Markdown: every metric the server exports (ours, then TorchServe's that the dashboard reads)."""
    from sam_fast_serve.server.metrics import METRICS, TORCHSERVE_METRICS

    rows = ["| name | type | labels | meaning |", "|---|---|---|---|"]
    for metric in (*METRICS, *TORCHSERVE_METRICS):
        labels = ", ".join(f"`{label}`" for label in metric.labels) or "-"
        rows.append(f"| `{metric.name}` | {metric.kind} | {labels} | {metric.meaning} |")
    return "\n".join(rows) + "\n"


def _client(table: str) -> Callable[[], str]:
    def make() -> str:
        from sam_fast_serve.client import cli

        return str(getattr(cli, table)())

    return make


# Page (in docs/) -> its generated blocks, by marker name.
GENERATED: dict[str, dict[str, Callable[[], str]]] = {
    "models.md": {"models-table": models_table},
    "configuration.md": {"config-keys": config_tables},
    "metrics.md": {"metrics-table": metrics_table},
    "client.md": {"client-options": _client("options_table"), "client-exit-codes": _client("exit_codes_table")},
}


def _marked(name: str) -> re.Pattern[str]:
    return re.compile(rf"(<!-- {re.escape(name)}: start -->\n)(.*?)(<!-- {re.escape(name)}: end -->)", re.S)


def generated_block(page: str, name: str) -> str | None:
    """The text between the markers called `name` in `page`, or None when the page has no such markers."""
    found = _marked(name).search(page)
    return found.group(2) if found else None


def update_pages(directory: Path) -> list[Path]:
    """Rewrite every generated block of the pages in `directory` (a docs folder); returns the pages
    that changed. Raises ValueError for a page without the markers of one of its blocks."""
    changed = []
    for page_name, blocks in GENERATED.items():
        path = directory / page_name
        text = original = path.read_text()
        for name, make in blocks.items():
            if generated_block(text, name) is None:
                raise ValueError(f"{path} has no <!-- {name}: start --> ... <!-- {name}: end --> markers")
            found = _marked(name).search(text)
            assert found is not None
            text = text[: found.start(2)] + make() + text[found.end(2) :]
        if text != original:
            path.write_text(text)
            changed.append(path)
    return changed
