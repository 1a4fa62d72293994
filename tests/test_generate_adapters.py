"""Generation with unfused adapters: ``--adapter-path`` and ``load(adapter_path=...)``."""

import json

import pytest

import mlx.core as mx
from random_models import TINY_CONFIG, random_model
from rwkv_mlx import load, loading
from rwkv_mlx import lora as lora_cli
from rwkv_mlx.generate import main, stream_generate

GREEDY = ["--temp", "0", "--presence-penalty", "0", "--frequency-penalty", "0", "--verbose", "False"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("model")
    loading.save_model(directory, random_model(seed=5), TINY_CONFIG)
    return directory


def write_data(directory):
    directory.mkdir()
    texts = [{"text": "abcabcabc " * (4 + i % 3)} for i in range(8)]
    for split in ("train", "valid", "test"):
        (directory / f"{split}.jsonl").write_text("".join(json.dumps(t) + "\n" for t in texts))


@pytest.fixture(scope="module", params=["lora", "state"])
def adapters(request, model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    write_data(root / "data")
    status = lora_cli.main(
        [
            "--model", str(model_dir), "--tokenizer", "bytes", "--data", str(root / "data"),
            "--adapter-path", str(root / "adapters"), "--fine-tune-type", request.param,
            "--train", "--iters", "3", "--batch-size", "2", "--learning-rate", "5e-2",
        ]  # fmt: skip
    )
    assert status == 0
    return root / "adapters"


def test_load_with_adapters_changes_logits(model_dir, adapters):
    base, _ = load(str(model_dir), tokenizer="bytes")
    adapted, _ = load(str(model_dir), tokenizer="bytes", adapter_path=str(adapters))
    tokens = mx.array([[97, 98, 99, 32, 97]])

    gap = mx.abs(adapted(tokens) - base(tokens)).max().item()

    assert gap > 1e-4


def test_cli_adapter_path_equals_api(model_dir, adapters, capsys):
    adapted, tokenizer = load(str(model_dir), tokenizer="bytes", adapter_path=str(adapters))
    expected = "".join(r.text for r in stream_generate(adapted, tokenizer, "abc", 12))

    code = main(["--model", str(model_dir), "--adapter-path", str(adapters), "--prompt", "abc", "--max-tokens", "12", *GREEDY])
    out = capsys.readouterr().out

    assert code == 0
    assert out == expected + "\n"


def test_missing_adapter_path_is_an_error(model_dir, tmp_path, capsys):
    code = main(["--model", str(model_dir), "--adapter-path", str(tmp_path / "none"), "--prompt", "abc", *GREEDY])
    err = capsys.readouterr().err

    assert code != 0
    assert "none" in err
