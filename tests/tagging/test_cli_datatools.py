"""`python -m lib_lora check | dedupe | tags`: what a user types and reads, exit codes, and one-line errors."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lib_lora import fsutil
from lib_lora.cli import main
from tests.fixtures.images import make_dataset, pattern_image

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def offline_tokenizer_cache(tmp_path_factory, tokenizer_dir, monkeypatch):
    """The CLI loads CLIP's tokenizer from the user cache: point it at a prepared temp copy, never at $HOME."""
    cache = tmp_path_factory.getbasetemp() / "lib_lora-cache"
    if not (cache / "clip-tokenizer" / "vocab.json").is_file():
        shutil.copytree(tokenizer_dir, cache / "clip-tokenizer", dirs_exist_ok=True)
    monkeypatch.setenv("LORA_TRAIN_CACHE", str(cache))
    return cache


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def texts(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.txt"))}


@pytest.fixture
def dataset(tmp_path):
    root = make_dataset(tmp_path / "ds", {"mychar": 10, "style": 2}, per_concept=3)
    (root / "10_mychar" / "001.txt").write_bytes("1girl, Long_Hair, (smile:1.2), café".encode("cp1252"))
    (root / "2_style" / "002.txt").write_text("a painting of a lighthouse at night", encoding="utf-8")
    return root


# ---- check ------------------------------------------------------------------------------------------------


def test_check_report_exit_codes_and_json(dataset, capsys):
    code, out, _ = run_cli(capsys, "check", dataset, "--min-side", "32")
    assert code == 0
    assert "10_mychar" in out and "3 images x  10 repeats =     30 steps" in out
    assert "steps per epoch: 36 (batch size 1)" in out
    assert out.rstrip().endswith("0 error(s), 2 warning(s): ok")  # 001 and 002 lack the guessed activation tag
    assert "fix: python -m lib_lora tags DIR --activation TAG puts it first" in out  # the CLI's own words

    (dataset / "10_mychar" / "002.png").write_bytes(b"broken")
    pattern_image(3).save(dataset / "10_mychar" / "001.jpg")
    code, out, _ = run_cli(capsys, "check", dataset, "--min-side", "32", "--activation", "mychar")
    assert code == 1
    assert "ERROR: unreadable or truncated images (1)\n  10_mychar/002.png: " in out
    assert "ERROR: images that share one caption file (1)\n  10_mychar/001.jpg: 001.jpg + 001.png -> 001.txt" in out
    assert out.count("\n  fix: ") == out.count("ERROR: ") + out.count("WARNING: ") + out.count("INFO: ")
    assert "2 error(s)" in out and "not ready to train" in out
    # the broken file is not trained, so it is not in the steps either (3 readable images x 10)
    assert "3 images x  10 repeats =     30 steps   (3 captioned; 1 unreadable not counted)" in out

    code, out, _ = run_cli(capsys, "check", dataset, "--min-side", "32", "--json")
    data = json.loads(out)
    assert code == 1 and data["errors"] == 2 and data["steps_per_epoch"] == 36
    assert data["checks"]["interrupted_move"]["fix"].startswith("run python -m lib_lora dedupe DIR --move")
    assert {"code": "unreadable", "severity": "error", "path": "10_mychar/002.png"}.items() <= data["findings"][0].items()


def test_check_bad_input_is_one_line(tmp_path, capsys):
    code, out, err = run_cli(capsys, "check", tmp_path / "nope")
    assert code == 1 and err.strip() == f"error: folder does not exist: {tmp_path / 'nope'}" and "Traceback" not in err
    (tmp_path / "empty").mkdir()
    code, out, err = run_cli(capsys, "check", tmp_path / "empty")
    assert code == 1 and "ERROR: no images to train on (1)" in out


# ---- dedupe -------------------------------------------------------------------------------------------------


def test_dedupe_lists_then_moves(dataset, capsys):
    original = dataset / "10_mychar" / "000.png"
    pattern_image(0).resize((48, 48)).save(dataset / "2_style" / "small_copy.png")
    (dataset / "2_style" / "small_copy.txt").write_text("copy caption")
    (dataset / "2_style" / "bad.png").write_bytes(b"\x89PNG nope")
    code, out, _ = run_cli(capsys, "dedupe", dataset)
    assert code == 0
    assert "skipped (unreadable): 2_style/bad.png" in out
    assert "8 images, 1 duplicate group(s), 1 extra copies (threshold 32)" in out
    assert "  keep  10_mychar/000.png\n  copy  2_style/small_copy.png  (distance " in out
    assert "nothing moved" in out and original.exists() and (dataset / "2_style" / "small_copy.png").exists()

    code, out, _ = run_cli(capsys, "dedupe", dataset, "--move")
    assert code == 0 and "moved 1 image(s) and 1 caption(s) into _duplicates/" in out
    assert (dataset / "_duplicates" / "2_style" / "small_copy.txt").read_text() == "copy caption"
    code, out, _ = run_cli(capsys, "dedupe", dataset, "--threshold", "10")
    assert "7 images, 0 duplicate group(s)" in out


def test_dedupe_finishes_an_interrupted_move(dataset, capsys):
    image, caption = dataset / "2_style" / "000.png", dataset / "2_style" / "000.txt"
    target = dataset / "_duplicates" / "2_style"
    target.mkdir(parents=True)
    os.replace(image, target / "000.png")  # the image went, then the process died before the caption followed
    journal = [[str(image), str(target / "000.png"), False], [str(caption), str(target / "000.txt"), False]]
    (dataset / "_duplicates" / ".moves.json").write_text(json.dumps(journal))
    code, out, _ = run_cli(capsys, "dedupe", dataset, "--move")
    assert code == 0 and out.startswith("finished an interrupted move: 1 file(s) moved into _duplicates/")
    assert (target / "000.txt").read_text() == "style, tag0, shared tag" and not caption.exists()


def test_dedupe_move_in_read_only_folder(dataset, capsys, monkeypatch):
    pattern_image(0).resize((48, 48)).save(dataset / "2_style" / "small_copy.png")
    before = sorted(p.relative_to(dataset) for p in dataset.rglob("*") if p.is_file())

    def refuse(src, dst):
        raise PermissionError(13, "Permission denied", str(dst))

    monkeypatch.setattr(os, "replace", refuse)
    code, out, err = run_cli(capsys, "dedupe", dataset, "--move")
    assert code == 1 and "1 duplicate group(s)" in out
    assert err == f"error: cannot write into {dataset}: Permission denied; nothing was moved\n"
    assert sorted(p.relative_to(dataset) for p in dataset.rglob("*") if p.is_file()) == before


def test_dedupe_bad_input(tmp_path, capsys):
    assert run_cli(capsys, "dedupe", tmp_path / "nope")[2].startswith("error: folder does not exist")
    (tmp_path / "file.png").write_bytes(b"x")
    assert run_cli(capsys, "dedupe", tmp_path / "file.png")[2] == f"error: not a folder: {tmp_path / 'file.png'}\n"
    (tmp_path / "e").mkdir()
    code, _, err = run_cli(capsys, "dedupe", tmp_path / "e")
    assert code == 1 and err.startswith("error: no images in") and err.count("\n") == 1


# ---- tags ---------------------------------------------------------------------------------------------------


def test_tags_activation_dry_run_apply_undo(dataset, capsys):
    before = texts(dataset)
    code, out, _ = run_cli(capsys, "tags", dataset / "10_mychar", "--activation", "mychar", "--dry-run")
    assert code == 0 and texts(dataset) == before
    assert "001.txt\n  - 1girl, Long_Hair, (smile:1.2), café\n  + mychar, 1girl, Long_Hair, (smile:1.2), café\n" in out
    assert out.rstrip().endswith("activation mychar: would change 1 of 3 captions (dry run: nothing written)")

    code, out, _ = run_cli(capsys, "tags", dataset / "10_mychar", "--activation", "mychar")
    assert code == 0 and out.startswith("activation mychar: changed 1 of 3 captions\nundo with: ")
    assert (dataset / "10_mychar" / "001.txt").read_bytes() == "mychar, 1girl, Long_Hair, (smile:1.2), café\n".encode()

    code, out, _ = run_cli(capsys, "tags", dataset / "10_mychar", "--undo")
    assert out == "undid 'activation mychar': 1 caption(s) restored\n" and texts(dataset) == before
    code, out, _ = run_cli(capsys, "tags", dataset / "10_mychar", "--undo")
    assert code == 0 and out.startswith("nothing to undo")


def test_tags_prune_replace_dedupe_sort(dataset, capsys):
    (dataset / "2_style" / "000.txt").write_text("style, zebra, long hair, apple, long_hair")
    code, out, _ = run_cli(capsys, "tags", dataset, "--prune", "shared tag,zebra")
    assert out.startswith("prune shared tag,zebra: changed 4 of 6 captions")
    run_cli(capsys, "tags", dataset, "--replace", "long hair,apple=hair")
    assert (dataset / "2_style" / "000.txt").read_text() == "style, hair\n"
    assert (dataset / "10_mychar" / "001.txt").read_text(encoding="utf-8") == "1girl, hair, (smile:1.2), café\n"
    code, out, _ = run_cli(capsys, "tags", dataset, "--sort", "--keep-first", "1")
    assert (dataset / "10_mychar" / "001.txt").read_text(encoding="utf-8") == "1girl, café, hair, (smile:1.2)\n"
    (dataset / "2_style" / "001.txt").write_text("b, a, b")
    code, out, _ = run_cli(capsys, "tags", dataset, "--dedupe")
    assert out.startswith("dedupe: changed 1 of 6 captions") and (dataset / "2_style" / "001.txt").read_text() == "b, a\n"
    _, out, _ = run_cli(capsys, "tags", dataset, "--history")
    assert out.splitlines() == ["1. dedupe (1 captions)", "2. sort (keep first 1) (1 captions)",
                                "3. replace long hair,apple=hair (2 captions)", "4. prune shared tag,zebra (4 captions)"]


def test_tags_freq_and_search(dataset, capsys):
    code, out, _ = run_cli(capsys, "tags", dataset, "--freq")
    rows = [line.rsplit(None, 1) for line in out.splitlines()]  # tag (may hold spaces), then its count
    assert code == 0 and rows[:4] == [["shared tag", "4"], ["mychar", "2"], ["style", "2"], ["tag0", "2"]]
    assert [count for _, count in rows] == ["4", "2", "2", "2"] + ["1"] * (len(rows) - 4)
    ones = [tag.rstrip() for tag, count in rows[4:]]
    assert ones == sorted(ones, key=str.lower) and "a painting of a lighthouse at night" in ones
    assert out.splitlines()[0] == "shared tag".ljust(len("a painting of a lighthouse at night")) + "  4"  # counts line up after the longest tag
    assert run_cli(capsys, "tags", dataset, "--freq", "--top", "1")[1] == "shared tag  4\n"
    code, out, err = run_cli(capsys, "tags", dataset, "--search", "long hair")
    assert out == "10_mychar/001.png\n" and err == "1 of 6 images have 'long hair'\n"
    assert run_cli(capsys, "tags", dataset, "--search", "tag*")[1].count("\n") == 4


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "nothing to do"),
        (["--freq", "--undo"], "one action at a time"),
        (["--freq", "--sort"], "one action at a time"),
        (["--replace", "a"], "--replace takes"),
        (["--prune", " , "], "--prune needs"),
        (["--freq", "--force"], "--force goes with --undo only"),
        (["--sort", "--force"], "--force goes with --undo only"),
    ],
)
def test_tags_usage_errors(dataset, capsys, argv, message):
    code, out, err = run_cli(capsys, "tags", dataset, *argv)
    assert code == 1 and message in err and err.count("\n") == 1 and out == ""


def test_tags_read_only_folder(dataset, capsys, monkeypatch):
    before = texts(dataset)
    real = fsutil.tempfile.mkstemp
    dataset.chmod(0o555)
    for d in dataset.iterdir():
        d.chmod(0o555)

    def refuse(*args, dir=None, **kwargs):  # root ignores chmod: refuse where every write starts
        raise PermissionError(13, "Permission denied", str(dir))

    if os.geteuid() == 0:
        monkeypatch.setattr(fsutil.tempfile, "mkstemp", refuse)
    try:
        code, out, err = run_cli(capsys, "tags", dataset, "--activation", "mychar")
    finally:
        monkeypatch.setattr(fsutil.tempfile, "mkstemp", real)
        for d in [dataset, *dataset.iterdir()]:
            d.chmod(0o755)
    assert code == 1 and out == "" and "Traceback" not in err
    assert err.startswith(f"error: cannot write captions in {dataset}: Permission denied; no caption was changed")
    assert texts(dataset) == before


def test_tags_missing_folder_and_no_images(tmp_path, capsys):
    assert run_cli(capsys, "tags", tmp_path / "x", "--freq")[2] == f"error: folder does not exist: {tmp_path / 'x'}\n"
    (tmp_path / "e").mkdir()
    assert "no images in" in run_cli(capsys, "tags", tmp_path / "e", "--sort")[2]


# ---- as a user runs them -------------------------------------------------------------------------------------


def test_python_dash_m_entry_points(dataset, offline_tokenizer_cache):
    env = dict(os.environ, PYTHONPATH=str(ROOT), LORA_TRAIN_CACHE=str(offline_tokenizer_cache))

    def run(*argv):
        return subprocess.run([sys.executable, "-m", "lib_lora", *map(str, argv)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)

    tags = run("tags", dataset, "--freq", "--top", "2")
    assert tags.returncode == 0 and tags.stdout == "shared tag  4\nmychar      2\n"
    check = run("check", dataset, "--json", "--min-side", "32", "--activation", "mychar")
    assert check.returncode == 0 and json.loads(check.stdout)["steps_per_epoch"] == 36
    assert check.stderr == ""  # no tokenizer warnings about long sequences either


def test_tags_undo_refuses_to_revert_a_hand_edit_until_forced(dataset, capsys):
    before = texts(dataset)
    assert run_cli(capsys, "tags", dataset, "--prune", "shared tag")[0] == 0
    (dataset / "2_style" / "000.txt").write_text("style, fixed by hand", encoding="utf-8")
    code, out, err = run_cli(capsys, "tags", dataset, "--undo")
    assert code == 1 and "2_style/000.txt" in err and "--force" in err and err.count("\n") == 1
    assert texts(dataset)["2_style/000.txt"] == b"style, fixed by hand"
    code, out, _ = run_cli(capsys, "tags", dataset, "--undo", "--force")
    assert code == 0 and out.startswith("undid 'prune shared tag'") and texts(dataset) == before


@pytest.mark.parametrize("command", ["check", "dedupe", "tags"])
def test_caption_extension_in_both_spellings(dataset, capsys, command):
    """`tag` takes sd-scripts' `--caption_extension`; users type it for the other commands too."""
    for name in dataset.rglob("*.txt"):
        name.rename(name.with_suffix(".caption"))
    extra = ["--freq"] if command == "tags" else []
    for flag in ("--caption_extension", "--caption-extension"):
        code, out, err = run_cli(capsys, command, dataset, flag, ".caption", "--min-side", "32", *extra) \
            if command == "check" else run_cli(capsys, command, dataset, flag, ".caption", *extra)
        assert code == 0 and "unrecognized" not in err
        if command == "check":
            assert "images without a caption" not in out
        if command == "tags":
            assert out.startswith("shared tag ")  # read from the .caption files
