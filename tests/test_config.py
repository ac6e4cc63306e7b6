"""pipeline/config.py: every config is checked against its field annotations when it is made."""
from __future__ import annotations

import dataclasses
import json
import math
import typing
from typing import Any

import pytest

from weclip.cli import _config
from weclip.pipeline.config import (CLIPES_CRF, PRESETS, Config, CrfParams, DemoConfig, ManifestConfig, ParConfig,
                             RefineConfig, Rule, preset, set_field)
from weclip.pipeline.errors import ConfigError


def error(make: typing.Callable[[], Any]) -> str:
    """The one-line ConfigError message of `make()`."""
    with pytest.raises(ConfigError) as info:
        make()
    message = str(info.value)
    assert "\n" not in message
    return message


def override_error(dotted: str, value: Any) -> str:
    return error(lambda: set_field(Config(), dotted, value))


def sections(cls: type) -> list[type]:
    """`cls` and every config dataclass nested in it."""
    nested = [h for h in typing.get_type_hints(cls).values() if dataclasses.is_dataclass(h)]
    return [cls] + [c for h in nested for c in sections(h)]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_valid_and_round_trip_like_a_checkpoint(name):
    cfg = preset(name)
    assert Config.from_dict(cfg.to_dict()) == cfg
    assert Config.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg  # JSON: tuples come back as lists


def stored_type(value: Any) -> type:
    return tuple if isinstance(value, list) else type(value)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_store_their_values_as_written(name):
    """No preset value is coerced (an int where a float is declared would change a cache fingerprint's JSON)."""
    cfg = preset(name)
    for section, values in PRESETS[name].items():
        for key, raw in values.items():
            stored = getattr(getattr(cfg, section), key)
            assert stored == (tuple(raw) if isinstance(raw, list) else raw)
            assert type(stored) is stored_type(raw)


@pytest.mark.parametrize("cls", sorted({*sections(Config), DemoConfig, ManifestConfig}, key=lambda c: c.__name__))
def test_defaults_are_valid_and_stored_as_written(cls):
    made = cls()
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        assert getattr(made, f.name) == default and type(getattr(made, f.name)) is type(default)


def numeric_without_rule(hint: Any) -> bool:
    """True where a number (also inside `X | None` or a tuple) is declared without a Rule on it."""
    if typing.get_origin(hint) is typing.Annotated:
        base, *rules = typing.get_args(hint)
        return any(not isinstance(r, Rule) for r in rules) or (
            base not in (int, float) and numeric_without_rule(base))
    if hint in (int, float):
        return True
    return any(numeric_without_rule(a) for a in typing.get_args(hint) if a is not Ellipsis)


@pytest.mark.parametrize("cls", sorted({*sections(Config), DemoConfig}, key=lambda c: c.__name__))
def test_every_number_has_a_declared_range(cls):
    hints = typing.get_type_hints(cls, include_extras=True)
    assert [name for name, hint in hints.items() if numeric_without_rule(hint)] == []


def test_bad_literal_names_the_field_and_the_choices():
    assert override_error("refine.rfm_filter", "absx") == "refine.rfm_filter = 'absx' is not one of 'signed', 'abs'"
    assert override_error("model.precision", "FP32") == "model.precision = 'FP32' is not one of 'fp32', 'bf16', 'fp16'"


@pytest.mark.parametrize("dotted, value, message", [
    ("train.iterations", "abc", "train.iterations = 'abc' must be an int"),
    ("train.iterations", 2.0, "train.iterations = 2.0 must be an int"),
    ("train.iterations", True, "train.iterations = True must be an int"),
    ("train.train_flip", "true", "train.train_flip = 'true' must be true or false"),
    ("eval.flip", 1, "eval.flip = 1 must be true or false"),
    ("train.lr", "2e-3", "train.lr = '2e-3' must be a finite number"),
    ("train.lr", False, "train.lr = False must be a finite number"),
    ("text.template", 3, "text.template = 3 must be a string"),
    ("train.adam_betas", 0.9, "train.adam_betas = 0.9 must be a list"),
    ("eval.crf_params", 5, "eval.crf_params = 5 must be a CrfParams (give a dict of its fields)"),
])
def test_bad_type(dotted, value, message):
    assert override_error(dotted, value) == message


@pytest.mark.parametrize("dotted, value, message", [
    ("train.iterations", None, "train.iterations = None must be an int"),
    ("model.name", None, "model.name = None must be a string"),
    ("extract.feature_layers", None, "extract.feature_layers = None must be a list"),
])
def test_none_where_not_allowed(dotted, value, message):
    assert override_error(dotted, value) == message


def test_none_where_allowed_and_the_error_says_so():
    assert set_field(Config(), "train.views", None).train.views is None
    assert set_field(Config(), "model.pretrained", None).model.pretrained is None
    assert override_error("train.views", 0) == "train.views = 0 must be >= 1 (or null)"
    assert override_error("train.views", "2") == "train.views = '2' must be an int (or null)"


@pytest.mark.parametrize("dotted, value, message", [
    ("train.iterations", 0, "train.iterations = 0 must be >= 1"),
    ("train.lr", 0.0, "train.lr = 0.0 must be > 0"),
    ("train.lr", -1, "train.lr = -1 must be > 0"),
    ("train.lr", math.inf, "train.lr = inf must be a finite number"),
    ("train.weight_decay", math.nan, "train.weight_decay = nan must be a finite number"),
    ("train.warmup_iters", -1, "train.warmup_iters = -1 must be >= 0"),
    ("refine.box_threshold", 1.5, "refine.box_threshold = 1.5 must be in [0, 1]"),
    ("aug.flip_prob", -0.1, "aug.flip_prob = -0.1 must be in [0, 1]"),
    ("decoder.dropout", 2, "decoder.dropout = 2 must be in [0, 1]"),
    ("train.adam_betas", [0.9, 1.0], "train.adam_betas[1] = 1.0 must be in [0, 1)"),
    ("eval.crf_workers", -1, "eval.crf_workers = -1 must be >= 0"),
    ("eval.scales", [1.0, 0], "eval.scales[1] = 0 must be > 0"),
    ("par.dilations", [1, 0], "par.dilations[1] = 0 must be >= 1"),
    ("eval.crf_params.iterations", 0, "eval.crf_params.iterations = 0 must be >= 1"),
    ("eval.clipes_crf_params.bilateral_sxy", 0.0, "eval.clipes_crf_params.bilateral_sxy = 0.0 must be > 0"),
])
def test_out_of_range(dotted, value, message):
    assert override_error(dotted, value) == message


@pytest.mark.parametrize("dotted, value", [
    ("refine.box_threshold", 0.0), ("refine.box_threshold", 1.0), ("train.warmup_iters", 0), ("par.w2", 0.0),
    ("par.num_iter", 0), ("eval.crf_workers", 0), ("train.loader_workers", 0), ("extract.gpus_per_task", 0.0),
    ("eval.clipes_confidence", 1.01), ("train.adam_betas", (0.0, 0.5)), ("extract.feature_layers", (7,)),
])
def test_range_bounds_that_are_allowed(dotted, value):
    section, name = dotted.split(".")
    assert getattr(getattr(set_field(Config(), dotted, value), section), name) == value


@pytest.mark.parametrize("dotted, value, message", [
    ("extract.feature_layers", [2, 1], "extract.feature_layers = [2, 1] must be distinct and ascending"),
    ("extract.attn_layers", [5, 5, 6], "extract.attn_layers = [5, 5, 6] must be distinct and ascending"),
    ("extract.attn_layers", [0, 1], "extract.attn_layers[0] = 0 must be >= 1"),
    ("extract.feature_layers", [], "extract.feature_layers = [] must be non-empty"),
    ("aug.scale_range", [2.0, 1.0], "aug.scale_range = [2.0, 1.0] must be (low, high) with low <= high"),
    ("aug.scale_range", [0.5, 1.0, 2.0], "aug.scale_range = [0.5, 1.0, 2.0] must have 2 items"),
    ("eval.scales", [], "eval.scales = [] must be non-empty"),
    ("par.dilations", (), "par.dilations = () must be non-empty"),
])
def test_structural_rules(dotted, value, message):
    assert override_error(dotted, value) == message


@pytest.mark.parametrize("dotted, value, message", [
    ("extract.attn_layers", [1, "a"], "extract.attn_layers[1] = 'a' must be an int"),
    ("extract.attn_layers", [1, 2.5], "extract.attn_layers[1] = 2.5 must be an int"),
    ("eval.scales", [1.0, "x"], "eval.scales[1] = 'x' must be a finite number"),
    ("train.adam_betas", [0.9, None], "train.adam_betas[1] = None must be a finite number"),
])
def test_tuple_element_type(dotted, value, message):
    assert override_error(dotted, value) == message


def test_unknown_field_names_the_dotted_path_and_the_choices():
    crf_fields = ", ".join(sorted(f.name for f in dataclasses.fields(CrfParams)))
    assert override_error("eval.crf_params.foo", 1) == (
        f"'eval.crf_params.foo' is not a config field; eval.crf_params has {crf_fields}")
    sections_ = ", ".join(sorted(f.name for f in dataclasses.fields(Config)))
    assert error(lambda: Config().replace(trian={"iterations": 3})) == (
        f"'trian' is not a config field; the config has {sections_}")


def test_good_values_are_coerced_to_the_declared_types():
    cfg = Config().replace(extract={"feature_layers": [1, 2], "cpus_per_task": 2}, train={"lr": 1},
                           aug={"scale_range": [1, 2]}, eval={"crf_params": {"gauss_sxy": 2}})
    assert cfg.extract.feature_layers == (1, 2) and type(cfg.extract.feature_layers) is tuple
    assert type(cfg.extract.cpus_per_task) is float and cfg.extract.cpus_per_task == 2.0
    assert type(cfg.train.lr) is float and cfg.train.lr == 1.0
    assert cfg.aug.scale_range == (1.0, 2.0) and [type(v) for v in cfg.aug.scale_range] == [float, float]
    assert cfg.eval.crf_params == dataclasses.replace(CrfParams(), gauss_sxy=2.0)
    assert cfg.eval.clipes_crf_params == CLIPES_CRF  # the sibling section is untouched
    assert hash(ParConfig(dilations=[1, 2])) == hash(ParConfig(dilations=(1, 2)))  # stored as a tuple


def test_direct_construction_is_checked_and_names_the_class():
    assert error(lambda: RefineConfig(rfm_filter="absx")) == (
        "RefineConfig.rfm_filter = 'absx' is not one of 'signed', 'abs'")
    assert error(lambda: CrfParams(iterations=0)) == "CrfParams.iterations = 0 must be >= 1"
    assert error(lambda: ManifestConfig(decode="fast")) == "ManifestConfig.decode = 'fast' is not one of 'full', 'header'"
    assert error(lambda: ManifestConfig(decode_threads="2")) == "ManifestConfig.decode_threads = '2' must be an int"
    assert ManifestConfig(decode_threads=2).decode_threads == 2
    assert error(lambda: Config(train={"iterations": 3})) == (
        "Config.train = {'iterations': 3} must be a TrainConfig (give a dict of its fields)")


def test_checkpoint_config_with_a_bad_value_is_refused():
    data = Config().to_dict()
    data["refine"]["rfm_filter"] = "absx"
    assert error(lambda: Config.from_dict(data)) == "refine.rfm_filter = 'absx' is not one of 'signed', 'abs'"


def test_unknown_preset():
    assert error(lambda: preset("ade")) == "unknown preset 'ade'; choose one of coco, shapes, voc"


def test_set_field_reaches_nested_sections_and_needs_one():
    assert set_field(Config(), "eval.crf_params.iterations", 5).eval.crf_params.iterations == 5
    assert set_field(Config(), "train.iterations", 7).train == dataclasses.replace(Config().train, iterations=7)
    assert override_error("iterations", 7) == "'iterations' names no section; write section.field, e.g. train.iterations"


def test_cli_set_parses_json_and_applies_in_order():
    cfg = _config("voc", ["train.iterations=10", "model.pretrained=null", "extract.attn_layers=[11, 12]",
                          "eval.crf=true", "model.name=RN50", "eval.crf_params.iterations=4", "train.iterations=12"])
    expected = preset("voc").replace(train={"iterations": 12}, model={"pretrained": None, "name": "RN50"},
                                     extract={"attn_layers": (11, 12)}, eval={"crf": True, "crf_params": {"iterations": 4}})
    assert cfg == expected


@pytest.mark.parametrize("item, message", [
    ("refine.rfm_filter=absx", "refine.rfm_filter = 'absx' is not one of 'signed', 'abs'"),
    ("train.iterations=abc", "train.iterations = 'abc' must be an int"),
    ("train.iterations=1e4", "train.iterations = 10000.0 must be an int"),
    ("train.iterations", "--set 'train.iterations' has no '='; write section.field=value, e.g. --set train.iterations=1000"),
    ("iterations=3", "'iterations' names no section; write section.field, e.g. train.iterations"),
])
def test_cli_set_errors_are_config_errors(item, message):
    assert error(lambda: _config("voc", [item])) == message
