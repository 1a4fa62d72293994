"""``python -m rwkv_mlx.convert``: round trips, quantization and bad arguments."""

import json
import logging
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import rwkv_mlx
from rwkv_mlx.convert import convert

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "rwkv7"
PTH = FIXTURES / "tiny.pth"


def logits_of(model, tokens):
    return np.array(model(mx.array(tokens)[None]).astype(mx.float32))


def mean_kl(p_logits, q_logits):
    """Mean KL divergence of the softmax of q from that of p, over positions."""
    p = np.exp(p_logits - p_logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    log_q = q_logits - q_logits.max(-1, keepdims=True)
    log_q -= np.log(np.exp(log_q).sum(-1, keepdims=True))
    return float((p * (np.log(p + 1e-30) - log_q)).sum(-1).mean())


@pytest.fixture(scope="module")
def tokens():
    return np.load(FIXTURES / "tiny.npz")["tokens"][:64]


@pytest.fixture(scope="module")
def direct(tokens):
    model, _ = rwkv_mlx.load(str(PTH), dtype=mx.float32)
    return logits_of(model, tokens)


def test_pth_round_trip_equals_direct_load(tmp_path, tokens, direct):
    target = convert(str(PTH), str(tmp_path / "converted"), dtype="float32")

    model, tokenizer = rwkv_mlx.load(str(target))

    assert sorted(p.name for p in target.iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert json.loads((target / "config.json").read_text())["model_type"] == "rwkv7"
    assert tokenizer.vocab_size == 256
    assert np.abs(logits_of(model, tokens) - direct).max() <= 1e-5


def test_source_dtype_is_kept(tmp_path):
    target = convert(str(PTH), str(tmp_path / "bf16"))

    weights = mx.load(str(target / "model.safetensors"))

    assert weights["model.layers.0.attn.r_proj.weight"].dtype == mx.bfloat16


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_directory_loads_and_runs(tmp_path, tokens, direct, bits):
    target = convert(str(PTH), str(tmp_path / f"q{bits}"), quantize=True, q_bits=bits, dtype="float32")

    config = json.loads((target / "config.json").read_text())
    model, _ = rwkv_mlx.load(str(target))
    weights = mx.load(str(target / "model.safetensors"))
    kl = mean_kl(direct, logits_of(model, tokens))

    assert config["quantization"]["bits"] == bits
    assert "model.layers.0.attn.r_proj.scales" in weights
    # The low-rank matrices stay at full precision.
    assert "model.layers.0.attn.w_lora.lora.0.scales" not in weights
    # Measured on this random-weight fixture: mean KL 2.2e-2 at 4 bits and
    # 2.1e-4 at 8 bits.
    assert kl <= (5e-2 if bits == 4 else 5e-4)
    assert kl > 0


def test_dequantize_restores_full_precision(tmp_path, tokens):
    quantized = convert(str(PTH), str(tmp_path / "q4"), quantize=True, dtype="float32")
    restored = convert(str(quantized), str(tmp_path / "restored"), dequantize=True)

    config = json.loads((restored / "config.json").read_text())
    weights = mx.load(str(restored / "model.safetensors"))
    model_q, _ = rwkv_mlx.load(str(quantized))
    model_r, _ = rwkv_mlx.load(str(restored))

    assert "quantization" not in config
    assert not any(name.endswith(".scales") for name in weights)
    assert np.abs(logits_of(model_q, tokens) - logits_of(model_r, tokens)).max() <= 1e-4


def test_existing_target_is_left_alone(tmp_path):
    target = tmp_path / "taken"
    target.mkdir()
    (target / "keep.txt").write_text("mine")

    with pytest.raises(FileExistsError, match="already exists"):
        convert(str(PTH), str(target))
    assert (target / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in target.iterdir()) == ["keep.txt"]


def test_existing_file_as_target_rejected(tmp_path):
    target = tmp_path / "model.txt"
    target.write_text("mine")

    result = subprocess.run(
        [sys.executable, "-m", "rwkv_mlx.convert", "--model", str(PTH), "--mlx-path", str(target)],
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 1
    assert f"--mlx-path {target} is a file, not a directory" in result.stderr
    assert "Traceback" not in result.stderr
    assert target.read_text() == "mine"


def test_invalid_bits_rejected(tmp_path):
    with pytest.raises(ValueError, match="--q-bits must be 4 or 8, got 3"):
        convert(str(PTH), str(tmp_path / "out"), quantize=True, q_bits=3)


@pytest.mark.parametrize("group_size", [7, 16, 256])
def test_invalid_group_size_rejected(tmp_path, group_size):
    with pytest.raises(ValueError, match=f"--q-group-size must be one of 32, 64, 128, got {group_size}"):
        convert(str(PTH), str(tmp_path / "out"), quantize=True, q_group_size=group_size)
    assert not (tmp_path / "out").exists()


def test_layers_left_unquantized_logged(tmp_path, caplog):
    from random_models import TINY_CONFIG, random_model
    from rwkv_mlx.loading import save_model

    save_model(tmp_path / "narrow", random_model(), TINY_CONFIG)  # 64 wide
    with caplog.at_level(logging.WARNING, logger="rwkv_mlx.convert"):
        convert(str(tmp_path / "narrow"), str(tmp_path / "out"), quantize=True, q_group_size=128)

    assert "stay at full precision because their input width is not a multiple of --q-group-size 128" in caplog.text


@pytest.mark.parametrize("flag", ["--q-bits", "--q-group-size"])
def test_quantization_flag_without_quantize_rejected(tmp_path, flag, capsys):
    from rwkv_mlx.convert import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(PTH), "--mlx-path", str(tmp_path / "out"), flag, "8"])

    assert exit_info.value.code == 2
    assert f"{flag} applies only when quantizing; add -q" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_larger_tokenizer_rejected(tmp_path):
    with pytest.raises(ValueError, match="tokenizer 'world' has 65536 tokens but the model's vocabulary has only 256"):
        convert(str(PTH), str(tmp_path / "out"), tokenizer="world")
    assert not (tmp_path / "out").exists()


def test_cli_reports_missing_model(tmp_path):
    missing = tmp_path / "missing.pth"

    result = subprocess.run(
        [sys.executable, "-m", "rwkv_mlx.convert", "--model", str(missing), "--mlx-path", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 1
    assert "missing.pth" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_load_takes_dtype_by_name():
    model, _ = rwkv_mlx.load(str(PTH), dtype="bfloat16")

    assert model.layers[0].attn.r_proj.weight.dtype == mx.bfloat16


@pytest.mark.parametrize("dtype", [mx.int32, "float64", "half"])
def test_load_rejects_other_dtypes(dtype):
    with pytest.raises(ValueError, match="dtype must be one of float16, bfloat16, float32"):
        rwkv_mlx.load(str(PTH), dtype=dtype)


def test_load_rejects_larger_tokenizer():
    with pytest.raises(ValueError, match="tokenizer 'world' has 65536 tokens but the model's vocabulary has only 256"):
        rwkv_mlx.load(str(PTH), tokenizer="world")


def test_load_rejects_source_of_another_type():
    with pytest.raises(TypeError, match="the model source must be a path or a Hugging Face repo id, got None"):
        rwkv_mlx.load(None)


def test_save_model_onto_file_rejected(tmp_path):
    from rwkv_mlx.loading import load_model, save_model

    target = tmp_path / "model.txt"
    target.write_text("mine")
    model, config, _ = load_model(str(PTH))

    with pytest.raises(FileExistsError, match="model.txt is a file, not a directory; name a folder for the model"):
        save_model(target, model, config)
    assert target.read_text() == "mine"
