"""The client's command line: a flag for every server option with the server's check, help and
default from common/options.py; the combinations it refuses before sending anything; the tables
of docs/client.md made from the parser; the run's summary line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from harness.servers import REPO
from sam_fast_serve.client import SamClient
from sam_fast_serve.client.cli import build_parser, exit_codes_table, main, options_table, server_options, summary
from sam_fast_serve.common.options import AMG_RULES, AMG_SETTINGS, IMAGE_RULES, ImageSettings, fields_of

SERVER_FIELDS = fields_of(*AMG_SETTINGS, ImageSettings)
NOWHERE = "http://127.0.0.1:9"  # the discard port: nothing listens there


def test_every_server_option_is_a_flag_with_the_fields_help_and_default():
    actions = {action.dest: action for action in build_parser()._actions}
    for field in SERVER_FIELDS:
        action = actions[field.name]
        assert f"--{field.name.replace('_', '-')}" in action.option_strings
        assert field.metadata["help"] and action.help.startswith(field.metadata["help"])
        default = "none" if field.default is None else field.default
        assert action.help.endswith(f"(default: the server's setting, {default} unless its config says otherwise)")
        assert action.default is None  # not sent unless given


def test_every_option_has_a_help_line_ending_with_its_default():
    for action in build_parser()._actions:
        if action.option_strings and action.dest not in ("help", "version"):
            assert re.search(r"\S \(default: .+\)$", action.help or ""), action.option_strings


@pytest.mark.parametrize(
    ("flag", "text", "key", "value"),
    [
        ("--points-per-side", "200", "points_per_side", 200),
        ("--pred-iou-thresh", "1.5", "pred_iou_thresh", 1.5),
        ("--box-nms-thresh", "0", "box_nms_thresh", 0.0),
        ("--intensity", "loud", "intensity", "loud"),
        ("--channels", "0,1", "channels", [0, 1]),
        ("--page", "-1", "page", -1),
    ],
)
def test_a_value_out_of_range_is_refused_with_the_servers_message(capsys, flag, text, key, value):
    with pytest.raises(SystemExit) as exited:
        main(["x.png", "--url", NOWHERE, flag, text])
    assert exited.value.code == 2
    rules = {**AMG_RULES, **IMAGE_RULES}
    assert f"argument {flag}: {rules[key](value)}" in capsys.readouterr().err


def test_values_within_range_become_the_request_options():
    args = build_parser().parse_args(
        ["x.png", "--points-per-side", "8", "--pred-iou-thresh", "0", "--no-multimask-output", "--channels", "2"]
    )
    assert server_options(args) == {
        "points_per_side": 8,
        "pred_iou_thresh": 0.0,
        "multimask_output": False,
        "channels": [2],
    }
    assert server_options(build_parser().parse_args(["x.png"])) == {}


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (
            ["--percentile-low", "99.9", "--percentile-high", "50"],
            ImageSettings(percentile_low=99.9, percentile_high=50.0).problem(),
        ),
        (["--point", "10,10", "--points-per-side", "8"], "points_per_side apply to automatic mask generation"),
        (["--prompts", "p.jsonl", "--point", "1,1"], "give no INPUT, --point or --box with it"),
        ([], "give INPUTs (image files, folders, globs) or --prompts FILE.jsonl"),
    ],
)
def test_combinations_refused_before_anything_is_sent(capsys, tmp_path, arguments, message):
    inputs = [] if not arguments or "--prompts" in arguments else [str(tmp_path / "x.png")]
    with pytest.raises(SystemExit) as exited:
        main([*inputs, "--url", NOWHERE, "--out", str(tmp_path / "out"), *arguments])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_format_is_an_alias_of_wire():
    assert build_parser().parse_args(["x.png", "--format", "json"]).wire == "json"
    assert build_parser().parse_args(["x.png"]).wire == "pickle"


def test_the_summary_says_what_this_run_did():
    report = Path("out/failures.jsonl")
    assert (
        summary(6, 0, 3, 3, report)
        == "6 images: 0 segmented, 3 already done (skipped), 3 failed (see out/failures.jsonl)"
    )
    assert summary(1, 1, 0, 0, report) == "1 image: 1 segmented"
    assert summary(22, 3, 0, 0, report) == "22 images: 3 segmented"  # interrupted: the rest not done
    assert summary(5, 2, 0, 1, report) == "5 images: 2 segmented, 1 failed (see out/failures.jsonl)"


def test_docs_hold_the_parsers_tables():
    page = (REPO / "docs" / "client.md").read_text()
    for name, table in (("client-options", options_table()), ("client-exit-codes", exit_codes_table())):
        found = re.search(rf"<!-- {name}: start -->\n(.*?)<!-- {name}: end -->", page, re.S)
        assert found is not None and found.group(1) == table, f"docs/client.md's {name} table is not the parser's"


def test_the_api_refuses_what_the_server_would_before_sending(tmp_path):
    # The client points nowhere: a ValueError (not a TransportError) shows nothing was sent.
    sam = SamClient(NOWHERE, token="", retries=0)
    with pytest.raises(ValueError, match=re.escape(f"option key 'points_per_side' {AMG_RULES['points_per_side'](0)}")):
        sam.segment(b"image", points_per_side=0)
    with pytest.raises(ValueError, match="unknown option key"):
        sam.segment(b"image", points_per_sid=8)
    with pytest.raises(ValueError, match="'labels' must be a list of 1 values"):
        sam.prompt(b"image", points=[[1, 2]], labels=[2])
    with pytest.raises(ValueError, match="each box must be"):
        sam.prompt(b"image", boxes=[[5, 5, 1, 1]])
    with pytest.raises(ValueError, match="apply to automatic mask generation"):
        sam.prompt(b"image", points=[[1, 2]], points_per_side=8)
