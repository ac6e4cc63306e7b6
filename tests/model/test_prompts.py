"""pipeline/model/prompts.py: CLIP-ES's sharpness (Eq. 5) against numbers worked by hand, the three softmax sets,
the built-in templates and the templates file."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

from weclip.pipeline.config import TextConfig
from weclip.pipeline.errors import DataError, WeclipError
from weclip.pipeline.model import prompts


def test_sharpness_is_the_sum_of_variances_over_the_sum_of_means():
    # image 1: mean 0.4, population variance ((0.2)² + (0.2)²) / 2 = 0.04
    # image 2: one class, mean 0.5, variance 0
    # image 3: mean 0.4, variance ((0.1)² + (0.1)² + (0.2)²) / 3 = 0.02
    # sharpness = (0.04 + 0 + 0.02) / (0.4 + 0.5 + 0.4) = 0.06 / 1.3
    scores = [np.array([0.6, 0.2]), np.array([0.5]), np.array([0.3, 0.3, 0.6])]
    assert prompts.sharpness(scores) == pytest.approx(0.06 / 1.3, rel=1e-12)


def test_equal_scores_have_zero_sharpness_and_no_image_is_an_error():
    assert prompts.sharpness([np.array([0.2, 0.2]), np.array([0.7])]) == 0.0
    with pytest.raises(DataError):
        prompts.sharpness([])
    with pytest.raises(DataError):
        prompts.sharpness([np.array([])])


# One image, 3 classes with exp(logit) = 1, 2, 3 and one background prompt with exp(logit) = 4; labels 0 and 2.
FG = torch.log(torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64))
BG = torch.log(torch.tensor([[4.0]], dtype=torch.float64))


@pytest.mark.parametrize("over, expected", [
    ("cam", [1 / 8, 3 / 8]),  # entries: class 0, class 2, background → 1 + 3 + 4 = 8
    ("all", [1 / 10, 3 / 10]),  # entries: classes 0, 1, 2, background → 10
    ("labels", [1 / 4, 3 / 4]),  # entries: classes 0, 2 → 4
])
def test_target_scores_softmax_over_each_set(over, expected):
    (scores,) = prompts.target_scores(FG, BG, [[0, 2]], over)
    np.testing.assert_allclose(scores, expected, rtol=1e-12)


def test_hand_sharpness_of_the_cam_softmax():
    # s = (1/8, 3/8): mean 1/4, variance (1/8)² = 1/64 → 1/16
    assert prompts.sharpness(prompts.target_scores(FG, BG, [[0, 2]], "cam")) == pytest.approx(1 / 16, rel=1e-12)


def test_the_default_softmax_is_the_cams_own():
    assert TextConfig().sharpness_softmax == "cam"
    assert prompts.SOFTMAX_OVER == ("cam", "all", "labels")


def test_builtin_templates_are_clips_imagenet_ones_plus_the_papers():
    openai = {template("{}") for template in OPENAI_IMAGENET_TEMPLATES}  # open_clip's copy of CLIP's notebook list
    assert len(prompts.IMAGENET_TEMPLATES) == 20 and len(set(prompts.BUILTIN_TEMPLATES)) == 21
    assert set(prompts.IMAGENET_TEMPLATES) <= openai
    assert prompts.BUILTIN_TEMPLATES[-1] == "a clean origami {}." == TextConfig().template
    for word in ("origami", "rendering", "clean", "large", "weird"):  # the words [PC] §3.2.1 names
        assert any(word in t for t in prompts.IMAGENET_TEMPLATES), word
    assert prompts.load_templates("builtin") == prompts.BUILTIN_TEMPLATES


def test_templates_file_skips_blank_and_comment_lines(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("\ufeff# candidates\n  a photo of a {}.  \n\nthe toy {}.\n", encoding="utf-8")
    assert prompts.load_templates(path) == ("a photo of a {}.", "the toy {}.")


@pytest.mark.parametrize("text, line", [
    ("a photo of a {}.\na photo of a dog.\n", 2),  # no {}
    ("a {} and a {}.\n", 1),  # two
    ("# c\n\na {0}.\n", 3),  # positional field
    ("a photo of a {}}.\n", 1),  # stray brace
])
def test_a_line_without_exactly_one_placeholder_names_file_and_line(tmp_path, text, line):
    path = tmp_path / "t.txt"
    path.write_text(text)
    with pytest.raises(DataError) as err:
        prompts.read_templates(path)
    assert f"templates file {path}, line {line}:" in str(err.value) and "{}" in str(err.value)


@pytest.mark.parametrize("text", ["", "\n  \n# only a comment\n"])
def test_a_file_without_templates_is_refused(tmp_path, text):
    path = tmp_path / "empty.txt"
    path.write_text(text)
    with pytest.raises(DataError, match=f"templates file {path} holds no template"):
        prompts.read_templates(path)


def test_a_repeated_template_and_a_missing_file_are_refused(tmp_path):
    path = tmp_path / "twice.txt"
    path.write_text("a {}.\nthe {}.\na {}.\n")
    with pytest.raises(DataError, match="twice"):
        prompts.read_templates(path)
    with pytest.raises(WeclipError, match="does not exist"):
        prompts.read_templates(tmp_path / "missing.txt")


def test_scores_are_probabilities_in_label_order():
    torch.manual_seed(0)
    fg, bg = torch.randn(3, 5) * 4, torch.randn(3, 2) * 4
    labels = [[4, 1], [0], [0, 2, 3]]  # label order is kept as given
    for over in prompts.SOFTMAX_OVER:
        for s, ids, f, b in zip(prompts.target_scores(fg, bg, labels, over), labels, fg, bg):
            assert len(s) == len(ids) and np.all((s > 0) & (s <= 1))
            if over == "all":
                denominator = math.fsum(math.exp(v) for v in [*f.tolist(), *b.tolist()])
                np.testing.assert_allclose(s, [math.exp(f[i].item()) / denominator for i in ids], rtol=1e-9)
