"""Config validation and checkpoint checks: each failure names the key or the file."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest
import yaml

from harness.servers import REPO
from sam_fast_serve.common.errors import ConfigError, InvalidOption
from sam_fast_serve.common.options import AMG_RULES, AMG_SETTINGS, AmgSettings, Sam2AmgSettings, apply_request_options
from sam_fast_serve.models.checkpoints import resolve_checkpoint
from sam_fast_serve.models.registry import FAMILIES, SAM1, SAM2, SAM3, model_type, official_checkpoints
from sam_fast_serve.server.config import ServiceConfig, load_service_config


def test_repo_model_config_is_valid():
    with open(REPO / "model-config.yaml") as f:
        document = yaml.safe_load(f)
    config = load_service_config(document["handler"])
    assert config.model_type == "vit_b" and config.sam_checkpoint == "sam_vit_b_01ec64.pth"
    assert config.amg == AmgSettings()  # the file spells out the defaults
    assert document["minWorkers"] == document["maxWorkers"] == 1


def test_empty_section_gives_defaults():
    assert load_service_config(None) == ServiceConfig()


@pytest.mark.parametrize(
    "key, value",
    [
        ("points_per_side", 0),
        ("points_per_side", "32"),
        ("points_per_side", True),
        ("points_per_batch", 1.5),
        ("pred_iou_thresh", 1.5),
        ("stability_score_thresh", -0.1),
        ("box_nms_thresh", 0.0),
        ("crop_n_layers", 9),
        ("min_mask_region_area", -1),
        ("dtype", "fp8"),
        ("dtype", "int4"),
        ("dtype", "torch.int8"),
        ("model_type", "vit_x"),
        ("compile", "yes"),
        ("process_batch_size", 0),
        ("sam_checkpoint", "../etc/passwd"),
        ("max_image_pixels", 0),
    ],
)
def test_bad_value_names_the_key(key, value):
    with pytest.raises(ConfigError, match=repr(key)):
        load_service_config({key: value})


@pytest.mark.parametrize("dtype", ["auto", "float32", "bfloat16", "int8"])
def test_dtypes_and_int8_are_accepted(dtype):
    assert load_service_config({"dtype": dtype}).dtype == dtype


def test_float16_is_refused_with_the_dtypes_there_are():
    # The fast decoder computes in float32 or bfloat16; auto never picks float16 (on CUDA without bf16: fp32).
    with pytest.raises(ConfigError, match="'dtype' must be one of auto, float32, bfloat16, int8"):
        load_service_config({"dtype": "float16"})


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match="'points_per_sid'"):
        load_service_config({"points_per_sid": 16})


def test_request_options_apply_and_are_checked():
    amg = apply_request_options(AmgSettings(), {"points_per_side": 8, "pred_iou_thresh": 0.5}, SAM1.amg_keys, "vit_b")
    assert (amg.points_per_side, amg.pred_iou_thresh) == (8, 0.5)
    with pytest.raises(InvalidOption, match="'colour'") as unknown:
        apply_request_options(AmgSettings(), {"colour": 1}, SAM1.amg_keys, "vit_b")
    assert unknown.value.status == 422
    with pytest.raises(InvalidOption, match="'box_nms_thresh'"):
        apply_request_options(AmgSettings(), {"box_nms_thresh": 2}, SAM1.amg_keys, "vit_b")


def test_missing_official_checkpoint_gives_url_and_hash(tmp_path):
    official = official_checkpoints()["sam_vit_b_01ec64.pth"]
    with pytest.raises(ConfigError) as error:
        resolve_checkpoint(tmp_path, official.file_name, "vit_b")
    assert official.url in str(error.value) and official.sha256 in str(error.value)


def test_missing_custom_checkpoint_is_named(tmp_path):
    with pytest.raises(ConfigError, match="'mine.pth' not found"):
        resolve_checkpoint(tmp_path, "mine.pth", "vit_b")


def test_official_name_with_wrong_bytes_fails_hash_check(tmp_path):
    (tmp_path / "sam_vit_l_0b3195.pth").write_bytes(b"truncated download")
    with pytest.raises(ConfigError, match="sha256 " + hashlib.sha256(b"truncated download").hexdigest()):
        resolve_checkpoint(tmp_path, "sam_vit_l_0b3195.pth", "vit_l")


def test_official_checkpoint_of_another_model_type_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="official vit_h checkpoint"):
        resolve_checkpoint(tmp_path, "sam_vit_h_4b8939.pth", "vit_b")


def test_custom_checkpoint_is_found(tmp_path):
    (tmp_path / "mine.pth").write_bytes(b"x")
    assert resolve_checkpoint(tmp_path, "mine.pth", "vit_b") == tmp_path / "mine.pth"


@pytest.mark.parametrize(
    "keys, mentions",
    [
        ({"dtype": "int8"}, "'dtype' int8"),
        ({"compile": True}, "'compile'"),
        ({"use_m2m": "no"}, "'use_m2m'"),
    ],
)
def test_sam2_refuses_sam1_only_keys_at_load(keys, mentions):
    with pytest.raises(ConfigError, match=mentions):
        load_service_config({"model_type": "sam2.1_hiera_tiny", **keys})


def test_each_family_gets_its_generators_defaults():
    assert load_service_config({"model_type": "sam2.1_hiera_tiny"}).amg.pred_iou_thresh == 0.8
    assert load_service_config({"model_type": "vit_b"}).amg.pred_iou_thresh == 0.88
    assert load_service_config({"model_type": "sam2.1_hiera_tiny", "pred_iou_thresh": 0.5}).amg.pred_iou_thresh == 0.5
    with pytest.raises(ConfigError, match="'use_m2m'.*vit_b"):
        load_service_config({"model_type": "vit_b", "use_m2m": True})


SAM2_OWN = {"use_m2m": True, "multimask_output": False}
SAM1_KEYS = (
    "box_nms_thresh, crop_n_layers, min_mask_region_area, points_per_batch, points_per_side, "
    "pred_iou_thresh, stability_score_thresh"
)


def test_sam2s_own_keys_are_its_familys_settings_not_the_shared_ones():
    assert not set(SAM2_OWN) & {f.name for f in dataclasses.fields(AmgSettings)}
    assert SAM2.amg_settings is Sam2AmgSettings and SAM2.amg_keys == (*SAM1.amg_keys, *SAM2_OWN)
    assert SAM3.amg_keys == () and set(SAM2_OWN) <= set(AMG_RULES)
    # A request or config may name every family's keys, so each family's type is one of AMG_SETTINGS.
    assert {family.amg_settings for family in FAMILIES if family.automatic} == set(AMG_SETTINGS)


@pytest.mark.parametrize(
    ("model", "refusal"),
    [
        ("vit_b", f"do(es) not apply to vit_b; its automatic options: {SAM1_KEYS}"),
        ("sam3", "do(es) not apply to sam3, which has no automatic mask generation"),
    ],
)
@pytest.mark.parametrize("key", sorted(SAM2_OWN))
def test_sam2s_own_keys_are_refused_by_the_other_families(model, refusal, key):
    option = {key: SAM2_OWN[key]}
    with pytest.raises(ConfigError) as at_load:
        load_service_config({"model_type": model, **option})
    assert str(at_load.value) == f"handler key(s) {key!r} {refusal}"
    amg = load_service_config({"model_type": model}).amg
    with pytest.raises(InvalidOption) as in_request:
        apply_request_options(amg, option, model_type(model).family.amg_keys, model)
    assert in_request.value.status == 422 and str(in_request.value) == f"request option(s) {key!r} {refusal}"


def test_sam2_models_take_their_own_keys():
    config = load_service_config({"model_type": "sam2.1_hiera_tiny", **SAM2_OWN})
    assert config.amg == Sam2AmgSettings(pred_iou_thresh=0.8, **SAM2_OWN)
    default = load_service_config({"model_type": "sam2.1_hiera_tiny"}).amg
    asked = apply_request_options(default, SAM2_OWN, SAM2.amg_keys, "sam2.1_hiera_tiny")
    # The service groups requests by their settings: equal settings, one group.
    assert asked == config.amg and hash(asked) == hash(config.amg)
    shared = dataclasses.asdict(AmgSettings(pred_iou_thresh=0.8))
    assert default.generator_arguments(SAM2.amg_keys) == {**shared, "use_m2m": False, "multimask_output": True}


@pytest.mark.parametrize(("key", "value"), [("dtype", "int8"), ("compile", True)])
def test_sam1_only_keys_name_the_families_that_take_them(key, value):
    with pytest.raises(ConfigError) as refused:
        load_service_config({"model_type": "sam2.1_hiera_tiny", key: value})
    assert str(refused.value) == (
        f"handler key '{key}'{' int8' if key == 'dtype' else ''} applies to Segment Anything (SAM 1) models only, "
        "and sam2.1_hiera_tiny is SAM 2 and SAM 2.1's"
    )
    assert load_service_config({"model_type": "vit_b", key: value})


def test_every_family_keeps_the_contract():
    """Each family's package has every function of models/family.py's FamilyCode (the type checker
    holds their signatures to it; this holds the package's names at run time too)."""
    from sam_fast_serve.models.family import FamilyCode
    from sam_fast_serve.models.registry import FAMILIES

    contract = [name for name in vars(FamilyCode) if not name.startswith("_")]
    assert contract == ["build", "save_checkpoint", "prepare", "embedding_layout", "engine"]
    for family in FAMILIES:
        code = family.code()
        assert code.__name__ == f"sam_fast_serve.models.{family.name}"
        assert all(callable(getattr(code, name)) for name in contract), family.name
