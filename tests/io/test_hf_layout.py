"""Hugging Face directories in fla's and mlx-lm's RWKV-7 layouts, and config inference."""

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import ggml_writer
from rwkv_mlx.io.errors import CheckpointError
from rwkv_mlx.io.hf import infer_rwkv7_config, load_hf_directory
from rwkv_mlx.io.layout7 import official_to_canonical
from rwkv_mlx.models import rwkv7

FIXTURES = Path(__file__).parents[2].parent / "shared" / "fixtures" / "rwkv-cpp-tiny"
MIXES = ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g")


@pytest.fixture
def canonical():
    official = ggml_writer.random_official_rwkv7()
    weights = official_to_canonical({k: mx.array(v) for k, v in official.items()}, "test")
    return {name: np.array(value) for name, value in weights.items()}


def fla_weights(canonical, legacy_mixes=False):
    """The tensors of fla's RWKV7ForCausalLM: per-channel vectors flat, optionally the mixes fused in x_x."""
    out = {}
    for name, value in canonical.items():
        if name.endswith(("attn.k_k", "attn.k_a", "ffn.x_k")) or ".g_norm." in name:
            value = value.reshape(-1)
        if legacy_mixes and ".attn.x_" in name:
            continue
        out[name] = value
    if legacy_mixes:
        layers = {name.split(".")[2] for name in canonical if name.startswith("model.layers.")}
        for i in layers:
            prefix = f"model.layers.{i}.attn."
            out[prefix + "x_x"] = np.concatenate([canonical[prefix + m].reshape(1, -1) for m in MIXES])
    return out


def fla_config(**overrides):
    config = {
        "architectures": ["RWKV7ForCausalLM"],
        "model_type": "rwkv7",
        "attn_mode": "chunk",
        "hidden_size": 64,
        "hidden_ratio": 2,
        "intermediate_size": None,
        "num_hidden_layers": 2,
        "head_dim": 32,
        "num_heads": None,
        "decay_low_rank_dim": 32,
        "gate_low_rank_dim": 32,
        "a_low_rank_dim": 32,
        "v_low_rank_dim": 32,
        "hidden_act": "sqrelu",
        "norm_first": True,
        "norm_bias": True,
        "norm_eps": 1e-5,
        "attn": None,
        "tie_word_embeddings": False,
        "fuse_norm": True,
        "vocab_size": 96,
        "value_dim": [64, 64],
    }
    config.update(overrides)
    return config


def write_directory(path: Path, weights, config) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(path / "model.safetensors"), {k: mx.array(v) for k, v in weights.items()})
    (path / "config.json").write_text(json.dumps(config))
    return path


def assert_same_weights(loaded, expected):
    assert set(loaded) == set(expected)
    for name, value in expected.items():
        assert loaded[name].shape == value.shape, name
        assert np.array_equal(np.array(loaded[name]), value), name


# --- fla layout -------------------------------------------------------------


def test_fla_directory_gives_canonical(tmp_path, canonical):
    write_directory(tmp_path / "m", fla_weights(canonical), fla_config())

    weights, config = load_hf_directory(tmp_path / "m")

    assert_same_weights(weights, canonical)
    assert config == {
        "model_type": "rwkv7",
        "vocab_size": 96,
        "hidden_size": 64,
        "intermediate_size": 128,
        "norm_eps": 1e-5,
        "head_dim": 32,
        "num_hidden_layers": 2,
        "a_low_rank_dim": 32,
        "v_low_rank_dim": 32,
        "gate_low_rank_dim": 32,
        "decay_low_rank_dim": 32,
        "tie_word_embeddings": False,
    }


def test_legacy_fused_mixes_match_split(tmp_path, canonical):
    write_directory(tmp_path / "split", fla_weights(canonical), fla_config())
    write_directory(tmp_path / "legacy", fla_weights(canonical, legacy_mixes=True), fla_config())

    split, split_config = load_hf_directory(tmp_path / "split")
    legacy, legacy_config = load_hf_directory(tmp_path / "legacy")

    assert set(legacy) == set(split)
    for name in split:
        assert np.array_equal(np.array(legacy[name]), np.array(split[name])), name
    assert legacy_config == split_config
    assert np.array_equal(np.array(legacy["model.layers.1.attn.x_a"]), canonical["model.layers.1.attn.x_a"])


def test_sharded_directory_with_index(tmp_path, canonical):
    weights = fla_weights(canonical)
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    (tmp_path / "m").mkdir()
    for file, shard_names in shards.items():
        mx.save_safetensors(str(tmp_path / "m" / file), {n: mx.array(weights[n]) for n in shard_names})
    weight_map = {n: file for file, shard_names in shards.items() for n in shard_names}
    (tmp_path / "m" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "m" / "config.json").write_text(json.dumps(fla_config()))

    loaded, _ = load_hf_directory(tmp_path / "m")

    assert_same_weights(loaded, canonical)


def test_index_lists_missing_tensor(tmp_path, canonical):
    write_directory(tmp_path / "m", fla_weights(canonical), fla_config())
    weight_map = {n: "model.safetensors" for n in fla_weights(canonical)}
    weight_map["model.layers.5.attn.r_k"] = "model.safetensors"
    (tmp_path / "m" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))

    with pytest.raises(CheckpointError, match=r"model\.safetensors: missing tensor 'model\.layers\.5\.attn\.r_k', which model\.safetensors\.index\.json lists"):
        load_hf_directory(tmp_path / "m")


def test_index_names_missing_shard(tmp_path, canonical):
    write_directory(tmp_path / "m", fla_weights(canonical), fla_config())
    weight_map = {n: "model-00002-of-00002.safetensors" for n in fla_weights(canonical)}
    (tmp_path / "m" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))

    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors: file not found"):
        load_hf_directory(tmp_path / "m")


def test_first_layer_value_projection_dropped(tmp_path, canonical):
    weights = fla_weights(canonical)
    for part in ("lora.0.weight", "lora.2.weight", "lora.2.bias"):
        weights[f"model.layers.0.attn.v_lora.{part}"] = weights[f"model.layers.0.attn.a_lora.{part}"]
    write_directory(tmp_path / "m", weights, fla_config())

    loaded, _ = load_hf_directory(tmp_path / "m")

    assert_same_weights(loaded, canonical)


def test_norms_without_bias_get_zero_bias(tmp_path, canonical):
    weights = {n: v for n, v in fla_weights(canonical).items() if not (n.endswith("norm.bias") and ".g_norm." not in n)}
    write_directory(tmp_path / "m", weights, fla_config(norm_bias=False))

    loaded, _ = load_hf_directory(tmp_path / "m")

    assert np.array_equal(np.array(loaded["model.layers.1.ffn_norm.bias"]), np.zeros(64, np.float32))
    assert np.array_equal(np.array(loaded["model.layers.0.pre_norm.bias"]), np.zeros(64, np.float32))
    assert np.array_equal(np.array(loaded["model.layers.1.attn.g_norm.bias"]), canonical["model.layers.1.attn.g_norm.bias"])
    assert set(loaded) == set(canonical)


def test_tied_embeddings_from_missing_head(tmp_path, canonical):
    weights = fla_weights(canonical)
    del weights["lm_head.weight"]
    write_directory(tmp_path / "m", weights, fla_config(tie_word_embeddings=True))

    _, config = load_hf_directory(tmp_path / "m")

    assert config["tie_word_embeddings"] is True


# --- mlx-lm layout ----------------------------------------------------------


def test_mlx_lm_quantized_directory(tmp_path):
    from mlx_lm.models import rwkv7 as mlx_lm_rwkv7
    from mlx_lm.utils import quantize_model, save_config, save_model

    # Low-rank size 64, so mlx-lm's 8-bit quantization of lora.2 (group size 64) applies.
    official = ggml_writer.random_official_rwkv7(rank=64)
    canonical = official_to_canonical({k: mx.array(v) for k, v in official.items()}, "test")
    config = infer_rwkv7_config(canonical)
    reference = mlx_lm_rwkv7.Model(mlx_lm_rwkv7.ModelArgs(**config))
    reference.load_weights(list(canonical.items()))
    reference, saved_config = quantize_model(reference, dict(config), group_size=64, bits=4)
    save_model(tmp_path / "m", reference)
    save_config(saved_config, tmp_path / "m" / "config.json")
    saved = mx.load(str(tmp_path / "m" / "model.safetensors"))

    weights, config = load_hf_directory(tmp_path / "m")

    assert set(weights) == set(saved)
    for name in ("model.layers.1.attn.k_proj.weight", "model.layers.1.attn.k_proj.scales", "model.layers.0.attn.k_k"):
        assert weights[name].dtype == saved[name].dtype
        assert np.array_equal(np.array(weights[name]), np.array(saved[name])), name
    assert config["quantization"] == saved_config["quantization"]
    assert config["quantization"]["model.layers.1.attn.w_lora.lora.2"]["bits"] == 8

    quantization = config.pop("quantization")
    model = rwkv7.Model(rwkv7.ModelArgs(**config))

    def predicate(path, module):
        return f"{path}.scales" in weights and quantization.get(path, True)

    nn.quantize(model, quantization["group_size"], quantization["bits"], class_predicate=predicate)
    model.load_weights(list(weights.items()))
    ids = mx.array([[5, 60, 7, 90]])
    assert np.abs(np.array(model(ids)) - np.array(reference(ids))).max() <= 1e-4


def test_quantized_weights_need_quantization_config(tmp_path, canonical):
    weights = fla_weights(canonical)
    w, scales, biases = mx.quantize(mx.array(weights["model.layers.1.attn.k_proj.weight"]), group_size=32, bits=4)
    weights["model.layers.1.attn.k_proj.weight"] = np.array(w)
    weights["model.layers.1.attn.k_proj.scales"] = np.array(scales)
    weights["model.layers.1.attn.k_proj.biases"] = np.array(biases)
    write_directory(tmp_path / "m", weights, fla_config())

    with pytest.raises(CheckpointError, match=r"config\.json: missing field 'quantization'"):
        load_hf_directory(tmp_path / "m")


# --- errors -----------------------------------------------------------------


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="nothere: directory not found"):
        load_hf_directory(tmp_path / "nothere")


def test_missing_config(tmp_path, canonical):
    write_directory(tmp_path / "m", fla_weights(canonical), fla_config())
    (tmp_path / "m" / "config.json").unlink()

    with pytest.raises(CheckpointError, match=r"config\.json: file not found"):
        load_hf_directory(tmp_path / "m")


def test_invalid_config_json(tmp_path, canonical):
    write_directory(tmp_path / "m", fla_weights(canonical), fla_config())
    (tmp_path / "m" / "config.json").write_text("{hidden_size: 64")

    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        load_hf_directory(tmp_path / "m")


def test_no_weight_files(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(fla_config()))

    with pytest.raises(CheckpointError, match=r"m: no \*\.safetensors weight files"):
        load_hf_directory(tmp_path / "m")


def test_other_model_type(tmp_path, canonical):
    write_directory(tmp_path / "m", fla_weights(canonical), fla_config(model_type="rwkv6"))

    with pytest.raises(CheckpointError, match=r"field 'model_type' is 'rwkv6', expected one of rwkv7"):
        load_hf_directory(tmp_path / "m")


def test_hybrid_attention_rejected(tmp_path, canonical):
    write_directory(tmp_path / "m", fla_weights(canonical), fla_config(attn={"layers": [1], "num_heads": 2}))

    with pytest.raises(CheckpointError, match=r"field 'attn' configures softmax-attention layers"):
        load_hf_directory(tmp_path / "m")


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("hidden_size", 128, "field 'hidden_size' is 128, but the weights have hidden_size = 64"),
        ("hidden_ratio", 4, "field 'intermediate_size' is 256, but the weights have intermediate_size = 128"),
        ("num_heads", 4, "field 'num_heads' is 4, but the weights have num_heads = 2"),
        ("v_low_rank_dim", 16, "field 'v_low_rank_dim' is 16, but the weights have v_low_rank_dim = 32"),
        ("value_dim", [64, 128], r"field 'value_dim' is \[64, 128\]; only a value size equal to hidden_size"),
    ],
)
def test_config_contradicting_weights(tmp_path, canonical, field, value, message):
    write_directory(tmp_path / "m", fla_weights(canonical), fla_config(**{field: value}))

    with pytest.raises(CheckpointError, match=message):
        load_hf_directory(tmp_path / "m")


# --- config inference -------------------------------------------------------


def test_infer_config_from_shapes(canonical):
    weights = {k: mx.array(v) for k, v in canonical.items()}

    config = infer_rwkv7_config(weights)

    assert config["vocab_size"] == 96
    assert config["head_dim"] == 32
    assert config["num_hidden_layers"] == 2
    assert config["tie_word_embeddings"] is False
    del weights["lm_head.weight"]
    assert infer_rwkv7_config(weights)["tie_word_embeddings"] is True


def test_infer_config_single_layer():
    official = ggml_writer.random_official_rwkv7(layers=1, rank=64)
    weights = official_to_canonical({k: mx.array(v) for k, v in official.items()}, "test")

    config = infer_rwkv7_config(weights)

    assert config["num_hidden_layers"] == 1
    assert config["v_low_rank_dim"] == 0
    assert config["a_low_rank_dim"] == 64


def test_infer_config_missing_tensor(canonical):
    weights = {k: mx.array(v) for k, v in canonical.items() if not k.endswith("attn.r_k")}

    with pytest.raises(CheckpointError, match=r"source\.bin: missing tensor 'model\.layers\.0\.attn\.r_k'"):
        infer_rwkv7_config(weights, "source.bin")


def test_infer_config_missing_layer(canonical):
    weights = {k: mx.array(v) for k, v in canonical.items()}
    weights["model.layers.3.attn.r_k"] = weights["model.layers.1.attn.r_k"]

    with pytest.raises(CheckpointError, match=r"missing every tensor of layer 2"):
        infer_rwkv7_config(weights)


# --- the tiny trained model -------------------------------------------------


@pytest.mark.skipif(not FIXTURES.is_dir(), reason="the tiny rwkv.cpp models are not in ../shared/fixtures/rwkv-cpp-tiny")
def test_tiny_model_through_fla_directory(tmp_path):
    from rwkv_mlx.io.rwkv_cpp import load_rwkv_cpp_canonical

    source, source_config = load_rwkv_cpp_canonical(FIXTURES / "tiny-rwkv-7v0-834K-FP32.bin")
    source = {k: np.array(v) for k, v in source.items()}
    hf_config = fla_config(**{k: v for k, v in source_config.items() if k != "model_type"}, hidden_ratio=4, value_dim=None)
    write_directory(tmp_path / "tiny", fla_weights(source, legacy_mixes=True), hf_config)
    expected = np.fromfile(FIXTURES / "expected-logits-7v0-834K.bin", dtype=np.float32)

    weights, config = load_hf_directory(tmp_path / "tiny")
    model = rwkv7.Model(rwkv7.ModelArgs(**config))
    model.load_weights(list(weights.items()))
    cache = model.make_cache()
    for token in (34, 105, 110):
        logits = model(mx.array([[token]]), cache=cache)

    assert np.abs(np.array(logits[0, -1]) - expected).max() <= 1e-4
