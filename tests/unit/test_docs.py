"""Docs that repeat code are made from it: the model table in docs/models.md, and each model's
parameter count in the registry."""

from __future__ import annotations

import re

import pytest

from harness.servers import REPO
from sam_fast_serve.models.registry import MODEL_TYPES, sam_model_fast_registry
from sam_fast_serve.tools.docs import models_table


def test_models_page_holds_the_registrys_table():
    page = (REPO / "docs" / "models.md").read_text()
    table = re.search(r"<!-- models-table: start -->\n(.*?)<!-- models-table: end -->", page, re.S)
    assert table is not None and table.group(1) == models_table()
    assert all(f"`{name}`" in table.group(1) for name in MODEL_TYPES)


@pytest.mark.parametrize("name", ["test_vit", "test_sam2.1_hiera", "sam2.1_hiera_tiny"])
def test_parameter_counts_are_the_models(name):
    model = sam_model_fast_registry[name](None)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == MODEL_TYPES[name].parameters_m
