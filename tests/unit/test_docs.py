"""Docs that repeat code are made from it, and their claims are checked: the generated tables of
docs/ (models, configuration keys, metrics) equal what the code generates, README stays the short
front door with the current headline speed, and every `sam-fast-serve` option says what it does and
its default."""

from __future__ import annotations

import argparse
import re
import shutil

import pytest

from harness.servers import REPO
from sam_fast_serve.common.options import AMG_RULES, IMAGE_RULES
from sam_fast_serve.models.registry import MODEL_TYPES, sam_model_fast_registry
from sam_fast_serve.server.config import SERVICE_RULES
from sam_fast_serve.tools import cli
from sam_fast_serve.tools.docs import GENERATED, KEY_MEANINGS, config_tables, generated_block, update_pages

DOCS = REPO / "docs"
BLOCKS = [(page, name) for page, blocks in GENERATED.items() for name in blocks]


@pytest.mark.parametrize(("page", "name"), BLOCKS, ids=[f"{page}:{name}" for page, name in BLOCKS])
def test_generated_block_equals_the_code(page, name):
    found = generated_block((DOCS / page).read_text(), name)
    assert found is not None, f"docs/{page} has no {name} markers"
    assert found == GENERATED[page][name](), f"docs/{page} is out of date: run sam-fast-serve docs docs"


def test_models_table_names_every_model_type():
    table = generated_block((DOCS / "models.md").read_text(), "models-table")
    assert table is not None and all(f"`{name}`" in table for name in MODEL_TYPES)


def test_config_tables_cover_every_key_once():
    keys = re.findall(r"^\| `(\w+)` \|", config_tables(), re.M)
    assert sorted(keys) == sorted({*SERVICE_RULES, *AMG_RULES, *IMAGE_RULES})
    # A server key's meaning is in KEY_MEANINGS; an AMG or image key's is its help (the client's --help).
    assert sorted(KEY_MEANINGS) == sorted(SERVICE_RULES)


def test_config_tables_give_defaults_and_the_checks_words():
    rows = {
        row.split(" | ")[0].strip("| `"): row.split(" | ")
        for row in config_tables().splitlines()
        if row.startswith("| `")
    }
    assert rows["points_per_side"][1:3] == ["`32`", "between 1 and 128"]
    assert rows["box_nms_thresh"][2] == "in (0.0, 1.0]"
    assert rows["pred_iou_thresh"][1] == "`0.88` (SAM 2 and SAM 2.1: `0.8`)"
    assert rows["use_m2m"][3] == "SAM 2 and SAM 2.1 only" and rows["crop_n_layers"][3] == "all"
    assert rows["dtype"][2] == "one of auto, float32, bfloat16, int8"


def test_update_pages_rewrites_a_stale_block_and_only_that(tmp_path):
    copy = tmp_path / "docs"
    shutil.copytree(DOCS, copy)
    page = copy / "metrics.md"
    page.write_text(
        re.sub(
            r"(<!-- metrics-table: start -->\n).*?(<!-- metrics-table: end -->)",
            r"\1stale\n\2",
            page.read_text(),
            flags=re.S,
        )
    )
    assert update_pages(copy) == [page]
    assert page.read_text() == (DOCS / "metrics.md").read_text()
    assert update_pages(copy) == []


def test_readme_is_the_front_door():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    for link in re.findall(r"\]\((docs/[\w.-]+\.md)", readme):
        assert (REPO / link).is_file(), link
    linked = set(re.findall(r"\]\(docs/([\w.-]+\.md)", readme))
    assert linked == {p.name for p in DOCS.glob("*.md")}, "README's table of docs lists every page"


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_between_pages_resolve():
    pages = [REPO / "README.md", *DOCS.glob("*.md")]
    anchors = {p.resolve(): {_anchor(h) for h in re.findall(r"^#+ (.+)$", p.read_text(), re.M)} for p in pages}
    broken = []
    for page in pages:
        for target, anchor in re.findall(r"\]\(([\w./-]*\.md)?(?:#([\w-]+))?\)", page.read_text()):
            path = (page.parent / target).resolve() if target else page.resolve()
            if not path.is_file() or (anchor and anchor not in anchors.get(path, set())):
                broken.append(f"{page.name}: {target}#{anchor}")
    assert broken == []


def _column(table: str, header: str) -> list[str]:
    lines = [line for line in table.splitlines() if line.startswith("|")]
    index = [cell.strip() for cell in lines[0].strip("|").split("|")].index(header)
    return [[cell.strip() for cell in line.strip("|").split("|")][index] for line in lines[2:]]


def test_readme_headline_is_the_current_table():
    page = (DOCS / "performance.md").read_text()
    section = page.split("\n## vit_b against segment_anything")[1].split("\n## ")[0]
    table = "\n".join(line for line in section.split("\n\n") if line.startswith("| kept |"))
    ratios = [float(v.rstrip("x")) for v in _column(table, "(b) vs (a)") if v != "-"]
    seconds = dict(zip(_column(table, "kept"), _column(table, "(b) engine defaults (bf16)")))
    readme = " ".join((REPO / "README.md").read_text().split())
    claim = re.search(
        r"takes ([\d.]+) s when no mask passes.*? to ([\d.]+) s when every mask is kept, ([\d.]+)-([\d.]+)x faster",
        readme,
    )
    assert claim is not None
    assert (float(claim.group(3)), float(claim.group(4))) == (min(ratios), max(ratios))
    assert (claim.group(1), claim.group(2)) == (f"{float(seconds['0%']):.1f}", f"{float(seconds['100%']):.1f}")


def _options() -> list[tuple[str, argparse.Action]]:
    parser = cli._parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return [
        (f"{command} {action.option_strings or action.dest}", action)
        for command, subparser in sub.choices.items()
        for action in subparser._actions
        if not isinstance(action, argparse._HelpAction)
    ]


def test_every_sam_fast_serve_option_has_help_and_its_default():
    for where, action in _options():
        assert action.help, f"{where} has no help"
        if action.option_strings and not action.required and not isinstance(action, argparse._StoreTrueAction):
            assert "default" in action.help, f"{where} does not say its default"
        if action.option_strings and action.required:
            assert "required" in action.help, f"{where} does not say it is required"


@pytest.mark.parametrize("name", ["test_vit", "test_sam2.1_hiera", "sam2.1_hiera_tiny"])
def test_parameter_counts_are_the_models(name):
    model = sam_model_fast_registry[name](None)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == MODEL_TYPES[name].parameters_m
