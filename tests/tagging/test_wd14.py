"""WD14 tagger on a tiny ONNX model with the WD contract: preprocessing, thresholds, files, bad model folders."""

from __future__ import annotations

import weakref
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("onnxruntime")

from lib_lora.errors import BadInput, IncompatibleFile  # noqa: E402
from lib_lora.tagging.models import locate_wd14, repo_folder  # noqa: E402
from lib_lora.tagging.wd14 import Wd14Tagger, choose_providers, preprocess, read_tag_table  # noqa: E402
from tests.fixtures.tiny_wd14 import TAG_NAMES, build_tiny_wd14, expected_probabilities, tiny_wd14_bytes  # noqa: E402

RATINGS = {"general", "sensitive", "questionable", "explicit"}


@pytest.fixture(scope="module")
def wd14_dir(tmp_path_factory) -> Path:
    return build_tiny_wd14(tmp_path_factory.mktemp("wd14"))


@pytest.fixture(scope="module")
def tagger(wd14_dir):
    with Wd14Tagger(wd14_dir) as t:
        yield t


def _save(tmp_path: Path, name: str, color, size=(64, 48)) -> Path:
    path = tmp_path / name
    Image.new("RGB", size, color).save(path)
    return path


def test_tiny_model_is_valid_onnx(wd14_dir):
    onnx = pytest.importorskip("onnx")  # only the current stack has the onnx package; onnxruntime loads it in both
    model = onnx.load(str(wd14_dir / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == ["batch", 32, 32, 3]


def test_preprocess_is_bgr_padded_on_white():
    strip = Image.new("RGB", (16, 64), (255, 0, 0))  # a red strip, 4x taller than wide
    out = preprocess(strip, 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.float32
    assert out[16, 16].tolist() == [0.0, 0.0, 255.0]  # red in BGR order
    assert out[16, 0].tolist() == [255.0, 255.0, 255.0] and out[16, 31].tolist() == [255.0, 255.0, 255.0]  # white pad
    assert out[:, 12:20].min() >= 0 and out.max() <= 255  # 0..255, not normalised


def test_scores_follow_the_wd_contract(tagger, tmp_path):
    """The whole path (decode, pad, BGR, size from the model, batch) gives the scores the model defines."""
    images = [_save(tmp_path, "red.png", (255, 0, 0)), _save(tmp_path, "teal.png", (0, 128, 200), size=(48, 48))]
    probs = tagger.predict(np.stack([tagger.prepare(p) for p in images]))
    assert probs.shape == (2, len(TAG_NAMES))
    padded_red_mean = np.array([255 * 0.25, 255 * 0.25, 255.0])  # 64x48 -> 32x24 red on a 32x32 white square
    assert np.allclose(probs[0], list(expected_probabilities(padded_red_mean).values()), atol=1e-4)
    assert np.allclose(probs[1], list(expected_probabilities([200, 128, 0]).values()), atol=1e-4)


def test_red_image_gets_red_tags_without_ratings(tagger, tmp_path):
    tags = tagger.tag_batch([tagger.prepare(_save(tmp_path, "red.png", (255, 0, 0), size=(48, 48)))])[0]
    assert "red_theme" in tags and "blue_theme" not in tags  # BGR fed the way the model expects
    assert not RATINGS & set(tags)
    assert tags[0] == "hatsune_miku"  # characters first
    assert "long_hair" in tags and "looking_at_viewer" not in tags  # 0.40 / 0.30 against 0.35
    assert "kirisame_marisa" not in tags  # character 0.60 against 0.85
    general = [t for t in tags if t != "hatsune_miku"]
    assert general[:2] == ["red_theme", "1girl"]  # most confident first


def test_black_strip_is_padded_with_white(tagger, tmp_path):
    strip = tagger.tag_batch([tagger.prepare(_save(tmp_path, "strip.png", (0, 0, 0), size=(16, 64)))])[0]
    square = tagger.tag_batch([tagger.prepare(_save(tmp_path, "square.png", (0, 0, 0), size=(64, 64)))])[0]
    assert "white_background" in strip and "white_background" not in square


def test_thresholds_and_underscores(wd14_dir, tmp_path):
    image = _save(tmp_path, "x.png", (0, 0, 0))
    with Wd14Tagger(wd14_dir, general_threshold=0.45, character_threshold=0.5, replace_underscores=True) as t:
        tags = t.tag_batch([t.prepare(image)])[0]
    assert "long hair" not in tags and "long_hair" not in tags  # 0.40 < 0.45
    assert tags[:2] == ["hatsune miku", "kirisame marisa"]  # 0.90, 0.60 >= 0.5
    assert "^_^" in tags  # kaomoji keep their underscore


def test_input_size_and_fixed_batch_come_from_the_model(tmp_path):
    folder = build_tiny_wd14(tmp_path / "m24", size=24, batch=1)
    with Wd14Tagger(folder) as t:
        assert t.size == 24 and t.max_batch == 1
        assert t.prepare(_save(tmp_path, "a.png", (10, 20, 30))).shape == (24, 24, 3)


def test_tag_table_reads_categories(wd14_dir):
    table = read_tag_table(wd14_dir / "selected_tags.csv")
    assert table.names[:4] == ("general", "sensitive", "questionable", "explicit")
    assert table.categories[:5] == (9, 9, 9, 9, 0) and table.categories[TAG_NAMES.index("hatsune_miku")] == 4


def test_model_dir_missing_files_is_named(tmp_path):
    (tmp_path / "model.onnx").write_bytes(tiny_wd14_bytes())
    with pytest.raises(BadInput, match="missing selected_tags.csv"):
        locate_wd14(model_dir=tmp_path)
    with pytest.raises(BadInput, match="does not exist"):
        locate_wd14(model_dir=tmp_path / "nope")


def test_broken_model_files_are_reported(wd14_dir, tmp_path):
    bad = tmp_path / "lfs"
    bad.mkdir()
    (bad / "model.onnx").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\n")
    (bad / "selected_tags.csv").write_bytes((wd14_dir / "selected_tags.csv").read_bytes())
    with pytest.raises(IncompatibleFile, match="cannot load .*model.onnx"):
        Wd14Tagger(bad)

    short = tmp_path / "short"
    short.mkdir()
    (short / "model.onnx").write_bytes((wd14_dir / "model.onnx").read_bytes())
    lines = (wd14_dir / "selected_tags.csv").read_text().splitlines()
    (short / "selected_tags.csv").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(IncompatibleFile, match="scores 15 tags but selected_tags.csv lists 14"):
        Wd14Tagger(short)

    (short / "selected_tags.csv").write_text("id,label\n1,cat\n")
    with pytest.raises(IncompatibleFile, match="not a tagger tag list"):
        Wd14Tagger(short)


def test_thresholds_are_validated(wd14_dir):
    with pytest.raises(BadInput, match="general_threshold"):
        Wd14Tagger(wd14_dir, general_threshold=1.5)


def test_close_releases_the_session(wd14_dir, tmp_path):
    t = Wd14Tagger(wd14_dir)
    image = t.prepare(_save(tmp_path, "a.png", (1, 2, 3)))
    try:
        ref = weakref.ref(t.session)
    except TypeError:  # pragma: no cover - onnxruntime builds whose session has no weakref slot
        ref = None
    t.close()
    assert t.session is None and (ref is None or ref() is None)
    with pytest.raises(RuntimeError, match="closed"):
        t.predict(image[None])


def test_providers_prefer_gpu_and_explain_a_missing_one():
    import onnxruntime as ort

    assert choose_providers("cpu") == ["CPUExecutionProvider"]
    assert choose_providers("auto")[-1] == "CPUExecutionProvider"
    if "CUDAExecutionProvider" in ort.get_available_providers():
        assert choose_providers("auto")[0] == "CUDAExecutionProvider"
    else:
        with pytest.raises(BadInput, match="onnxruntime-gpu"):
            choose_providers("cuda")


def test_downloaded_model_is_found_without_network(wd14_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # were anything to try the network, it fails at once
    folder = repo_folder(tmp_path, "SmilingWolf/wd-swinv2-tagger-v3")
    assert folder == tmp_path / "SmilingWolf--wd-swinv2-tagger-v3"
    with pytest.raises(BadInput, match="cannot download SmilingWolf/wd-swinv2-tagger-v3 .*--model_dir"):
        locate_wd14("SmilingWolf/wd-swinv2-tagger-v3", models_folder=tmp_path)
    build_tiny_wd14(folder)
    assert locate_wd14("SmilingWolf/wd-swinv2-tagger-v3", models_folder=tmp_path) == folder
    with pytest.raises(BadInput, match="owner/name"):
        repo_folder(tmp_path, "../escape")
