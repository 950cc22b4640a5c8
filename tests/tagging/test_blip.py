"""BLIP captions with a tiny random BlipForConditionalGeneration built offline (BERT vocab written by the test)."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import pytest
from PIL import Image

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from lib_lora.captions import read_caption, undo_last  # noqa: E402
from lib_lora.cli import main  # noqa: E402
from lib_lora.errors import BadInput  # noqa: E402
from lib_lora.tagging.blip import BlipCaptioner  # noqa: E402
from lib_lora.tagging.models import locate_blip  # noqa: E402
from lib_lora.tagging.runner import tag_folder  # noqa: E402

WORDS = "a photo of the cat dog on red blue green sofa table man woman with and in sitting standing".split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]"]  # BLIP's tokenizer: BERT + [DEC] as bos


def build_tiny_blip(folder: Path) -> Path:
    """config.json + weights + BlipProcessor files for a 1-layer, 32 px BLIP captioner (same format as the hub's)."""
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(SPECIAL + WORDS) + "\n", encoding="utf-8")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"), bos_token="[DEC]", additional_special_tokens=["[ENC]"])
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer) \
        .save_pretrained(str(folder))
    ids = dict(bos_token_id=tokenizer.bos_token_id, sep_token_id=tokenizer.sep_token_id,
               pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.sep_token_id)
    # a large init range makes the random decoder actually look at the image, so different images get
    # different captions (a batching mix-up would show)
    config = BlipConfig(
        text_config=dict(vocab_size=len(SPECIAL) + len(WORDS), hidden_size=32, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=37, encoder_hidden_size=32,
                         max_position_embeddings=64, initializer_range=0.5, **ids),
        vision_config=dict(hidden_size=32, image_size=32, patch_size=8, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=37, initializer_range=0.5),
        projection_dim=32,
    )
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config).eval()
    with torch.no_grad():  # a trained BLIP never writes [UNK] / [MASK] / [PAD]; nor may ours (empty captions)
        never = [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL if t != "[SEP]"]
        model.text_decoder.cls.predictions.bias[never] = -1e4
    model.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny generate steps are all thread overhead: on a busy 2-core box one thread is 10x faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory) -> Path:
    return build_tiny_blip(tmp_path_factory.mktemp("blip"))


@pytest.fixture(scope="module")
def captioner(blip_dir):
    with BlipCaptioner(blip_dir, num_beams=2, min_length=3, max_length=8) as c:
        yield c


def make_images(folder: Path, n: int = 5) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"{i:02d}.png"
        Image.new("RGB", (40 + 3 * i, 36), ((i * 70) % 256, (i * 130) % 256, (255 - i * 50) % 256)).save(path)
        paths.append(path)
    return paths


def test_captions_are_sentences_from_the_vocab(captioner, tmp_path):
    paths = make_images(tmp_path / "d")
    result = tag_folder(tmp_path / "d", captioner, mode="overwrite", batch_size=2)
    assert len(result.written) == len(paths)
    captions = [read_caption(p.with_suffix(".txt")) for p in paths]
    for caption in captions:
        words = caption.split()
        assert 2 <= len(words) <= 7 and set(words) <= set(WORDS)  # min 3 / max 8 tokens, bos included
        assert "," not in caption
    assert len(set(captions)) > 1


def test_batched_equals_one_at_a_time(captioner, tmp_path):
    paths = make_images(tmp_path / "d", n=3)
    prepared = [captioner.prepare(p) for p in paths]
    assert prepared[0].shape == (3, 32, 32)
    one = [captioner.caption_batch([x])[0] for x in prepared]
    assert captioner.caption_batch(prepared) == one


def test_blip_caption_appends_to_tags_and_undoes(captioner, tmp_path):
    paths = make_images(tmp_path / "d", n=2)
    paths[0].with_suffix(".txt").write_text("my_trigger, 1girl", encoding="utf-8")
    tag_folder(tmp_path / "d", captioner, mode="append")
    caption = read_caption(paths[0].with_suffix(".txt"))
    assert caption.startswith("my_trigger, 1girl, ") and len(caption.split(", ")) == 3
    undo_last(tmp_path / "d")
    assert read_caption(paths[0].with_suffix(".txt")) == "my_trigger, 1girl"
    assert not paths[1].with_suffix(".txt").exists()


def test_generation_settings_apply(blip_dir, tmp_path):
    image = make_images(tmp_path / "d", n=1)[0]
    with BlipCaptioner(blip_dir, num_beams=1, min_length=2, max_length=4) as short:
        assert len(short.caption_batch([short.prepare(image)])[0].split()) <= 3
    with BlipCaptioner(blip_dir, do_sample=True, top_p=0.5, min_length=3, max_length=8) as sampler:
        assert sampler.generate_kwargs["do_sample"] and sampler.generate_kwargs["top_p"] == 0.5
        torch.manual_seed(1)
        assert sampler.caption_batch([sampler.prepare(image)])[0]


def test_bad_settings_and_folders(blip_dir, tmp_path):
    with pytest.raises(BadInput, match="num_beams"):
        BlipCaptioner(blip_dir, num_beams=0)
    with pytest.raises(BadInput, match="min_length"):
        BlipCaptioner(blip_dir, min_length=20, max_length=10)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "vocab.txt").write_text("[PAD]\n")
    with pytest.raises(BadInput, match=r"missing config\.json, .*model\.safetensors or pytorch_model\.bin"):
        locate_blip(model_dir=tmp_path / "m")


def test_close_frees_the_model(blip_dir):
    c = BlipCaptioner(blip_dir)
    ref = weakref.ref(c.model)
    c.close()
    gc.collect()
    assert ref() is None  # nothing of ours keeps the weights (or their VRAM) alive
    with pytest.raises(RuntimeError, match="closed"):
        c.caption_batch([])


def test_cli_blip(blip_dir, tmp_path, capsys):
    paths = make_images(tmp_path / "d", n=3)
    code = main(["tag", str(tmp_path / "d"), "--tagger", "blip", "--model_dir", str(blip_dir), "--num_beams", "1",
                 "--max_length", "8", "--batch_size", "2", "--mode", "skip"])
    out = capsys.readouterr().out
    assert code == 0 and "3 captions written" in out and "tag frequency" not in out
    assert all(read_caption(p.with_suffix(".txt")) for p in paths)
