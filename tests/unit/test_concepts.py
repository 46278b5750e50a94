"""The concept request's fields (common/concepts.py): what a SAM 3 request may say, checked the
same way by the client and the server."""

from __future__ import annotations

import numpy as np
import pytest

from sam_fast_serve.common.concepts import (
    EXEMPLAR_CONCEPT,
    MASK_THRESHOLD,
    THRESHOLD,
    has_concepts,
    parse_concepts,
    split_concept_fields,
)
from sam_fast_serve.common.errors import InvalidOption


def test_phrases_exemplars_and_the_defaults():
    one = parse_concepts({"text": "nucleus"})
    assert one.texts == ("nucleus",) and one.boxes is None and one.labels is None
    assert (one.threshold, one.mask_threshold, one.max_instances) == (THRESHOLD, MASK_THRESHOLD, None)
    both = parse_concepts(
        {"text": ["cell", "debris"], "exemplar_boxes": [[1, 2, 30, 40]], "max_instances": 5}, (50, 60)
    )
    assert both.texts == ("cell", "debris") and both.labels.tolist() == [1] and both.max_instances == 5
    assert np.array_equal(both.boxes, [[1, 2, 30, 40]])
    alone = parse_concepts({"exemplar_boxes": [[1, 2, 30, 40], [0, 0, 5, 5]], "exemplar_labels": [1, 0]})
    assert alone.texts == (EXEMPLAR_CONCEPT,) and alone.labels.tolist() == [1, 0]


def test_an_exemplar_is_checked_against_the_image_once_its_size_is_known():
    fields = {"text": "x", "exemplar_boxes": [[0, 0, 80, 10]]}
    assert parse_concepts(fields).boxes is not None  # a request by image_id: the size comes later
    with pytest.raises(InvalidOption, match="inside the 60x50 image"):
        parse_concepts(fields, (50, 60))


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"text": ["a", "a"]}, "names a phrase twice"),
        ({"text": []}, "non-empty list of phrases"),
        ({"text": ["a", 3]}, "non-empty list of phrases"),
        ({"text": "   "}, "empty phrase"),
        ({"text": "a" * 201}, "at most 200"),
        ({"threshold": 0.5}, "needs 'text' or 'exemplar_boxes'"),
        ({"text": "a", "mask_threshold": True}, "'mask_threshold' must be a number"),
        ({"text": "a", "max_instances": 2.5}, "'max_instances' must be a whole number"),
        ({"exemplar_boxes": [[0, 0, 1]]}, "non-empty list like"),
        ({"exemplar_boxes": [[0, 0, 1, 1]] * 17}, "at most 16"),
        ({"exemplar_boxes": [[0, 0, 1, 1]], "exemplar_labels": [True]}, "'exemplar_labels' must be a list of 1"),
        ({"text": "a", "exemplar_labels": [1]}, "'exemplar_labels' given without 'exemplar_boxes'"),
    ],
)
def test_each_bad_field_is_named(fields, words):
    with pytest.raises(InvalidOption, match=words):
        parse_concepts(fields)


def test_the_fields_split_from_a_requests_options():
    options = {"text": "a", "threshold": 0.1, "page": 2}
    fields = split_concept_fields(options)
    assert fields == {"text": "a", "threshold": 0.1} and options == {"page": 2}
    assert has_concepts(fields) and not has_concepts({"threshold": 0.1})
