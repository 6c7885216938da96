"""Damaged files: each kind petune reads, cut short, garbled or emptied, ends in exit 2 and one line naming it.

Nothing the user had is deleted; a damaged newest checkpoint is skipped on resume (tests/train/test_resume_damaged.py).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFWriter
from transformers import AutoModelForCausalLM

from petune import PeftModel
from petune.cli import main
from petune.files import FileError
from tests.train.tiny import tiny_args, tiny_data, tiny_model_dir, tokenizer

__all__ = ["tiny_data", "tiny_model_dir", "tokenizer"]  # fixtures


def cut(at: float | int) -> Callable[[Path], None]:
    """Keep the first `at` bytes (an int) or that share of the file (a float)."""

    def damage(path: Path) -> None:
        data = path.read_bytes()
        path.write_bytes(data[: at if isinstance(at, int) else int(len(data) * at)])

    return damage


def flip(at: int) -> Callable[[Path], None]:
    """Invert the bits of byte `at`."""

    def damage(path: Path) -> None:
        data = bytearray(path.read_bytes())
        data[at] ^= 0xFF
        path.write_bytes(bytes(data))

    return damage


EMPTY = cut(0)
# Structural damage: what a full disk, a cut-short copy or a bad sector does to a file.
DAMAGES = {"empty": EMPTY, "cut-1": cut(1), "cut-9": cut(9), "cut-half": cut(0.5), "flip-0": flip(0), "flip-9": flip(9)}


def assert_one_line_naming(code: int, stderr: str, path: Path) -> None:
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert str(path) in lines[0] and lines[0].startswith("petune "), lines[0]


def assert_refused(argv: list[str], path: Path, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`petune argv` exits 2 with one line that names `path` and says `message`."""
    code = main(argv)
    error = capsys.readouterr().err
    assert_one_line_naming(code, error, path)
    assert message in error, error


@pytest.fixture(scope="module")
def trained_adapter(
    tiny_model_dir: Path, tiny_data: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    run = tmp_path_factory.mktemp("adapter-run") / "run"
    assert main(tiny_args(tiny_model_dir, tiny_data, run, "--max-steps", "1", "--eval-samples", "0")) == 0
    return run / "adapter"


def copy_of(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / folder.name))


# Every damage for the weights; JSON files, whose flipped byte may still be JSON, cut short or emptied.
MODEL_CASES = [("model.safetensors", d) for d in DAMAGES] + [
    ("config.json", "empty"),
    ("config.json", "cut-half"),
    ("tokenizer.json", "cut-half"),
]
ADAPTER_CASES = [("adapter_model.safetensors", d) for d in ("empty", "cut-9", "cut-half", "flip-0")] + [
    ("adapter_config.json", "empty"),
    ("adapter_config.json", "cut-half"),
]


@pytest.mark.parametrize(("name", "damage"), MODEL_CASES)
def test_damaged_model_folder(
    name: str,
    damage: str,
    tiny_model_dir: Path,
    tiny_data: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder = copy_of(tiny_model_dir, tmp_path)
    DAMAGES[damage](folder / name)
    assert_refused(tiny_args(folder, tiny_data, tmp_path / "run"), folder / name, "", capsys)
    assert not (tmp_path / "run" / "adapter").exists()


@pytest.mark.parametrize(("name", "damage"), ADAPTER_CASES)
def test_damaged_adapter_folder(
    name: str,
    damage: str,
    trained_adapter: Path,
    tiny_model_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder = copy_of(trained_adapter, tmp_path)
    DAMAGES[damage](folder / name)
    before = sorted(p.name for p in folder.iterdir())
    argv = ["generate", "--model", str(tiny_model_dir), "--adapter", str(folder), "--max-new-tokens", "2", "hi"]
    assert_refused(argv, folder / name, "", capsys)
    assert sorted(p.name for p in folder.iterdir()) == before


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "adapter_config.json"])
def test_library_users_get_an_exception_naming_the_file(
    name: str, trained_adapter: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    folder = copy_of(trained_adapter, tmp_path)
    cut(0.5)(folder / name)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(FileError, match=str(folder / name)) as caught:
        PeftModel.from_pretrained(base, folder)
    assert isinstance(caught.value, ValueError) and "\n" not in str(caught.value)


def test_adapter_config_that_is_not_json(trained_adapter: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    folder = copy_of(trained_adapter, tmp_path)
    (folder / "adapter_config.json").write_text("{'r': 8}")
    with pytest.raises(FileError, match=r"adapter_config.json is not valid JSON \(Expecting property name"):
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), folder)


def test_bad_data_and_config_files(
    tiny_model_dir: Path, tiny_data: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes('{"prompt": "caf\u00e9", "completion": "x"}\n'.encode("latin-1"))
    garbled = tmp_path / "garbled.jsonl"
    shutil.copy(tiny_data[0], garbled)
    flip(5)(garbled)
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("method: lora\nlora:\n  r: [1,\n")
    binary_yaml = tmp_path / "binary.yaml"
    binary_yaml.write_bytes(b"method: \xff\xfe\n")
    cases = [
        (["--data", str(tmp_path)], tmp_path, "is a folder"),
        (["--data", str(latin1)], latin1, "is not UTF-8 text (byte 15"),
        (["--data", str(garbled)], garbled, "is not UTF-8"),
        (["--config", str(yaml_file)], yaml_file, "is not valid YAML"),
        (["--config", str(binary_yaml)], binary_yaml, "is not UTF-8"),
        (["--config", str(tmp_path)], tmp_path, "is a folder"),
    ]
    for change, path, message in cases:
        assert_refused([*tiny_args(tiny_model_dir, tiny_data, tmp_path / "run"), *change], path, message, capsys)


def test_missing_model_folder_and_damaged_gguf(
    tiny_data: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    half = tmp_path / "half.gguf"
    writer = GGUFWriter(half, "llama")
    writer.add_block_count(1)
    for index in range(4):
        writer.add_tensor(f"blk.0.weight{index}", np.ones((64, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    cut(0.5)(half)
    empty, garbage = tmp_path / "empty.gguf", tmp_path / "garbage.gguf"
    empty.write_bytes(b"")
    garbage.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    cases = [
        (tmp_path / "no-such-model", "model folder", "does not exist"),
        (tmp_path / "a" / "b" / "c", "model folder", "does not exist"),
        (half, "GGUF file", "is cut short"),
        (empty, "GGUF file", "is not a GGUF file"),
        (garbage, "GGUF file", "is cut short or garbled"),
        (tiny_data[0], "model", "is a file, not a model folder"),
    ]
    for model, what, message in cases:
        assert_refused(tiny_args(model, tiny_data, tmp_path / "run"), model, f"{what} {model} {message}", capsys)
