"""GGUF reader: llama.cpp's RWKV-7 names and shapes, data types, quantized weights, errors."""

import struct
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import ggml_writer
from rwkv_mlx.io.errors import CheckpointError
from rwkv_mlx.io.gguf import load_gguf, read_gguf, read_gguf_file
from rwkv_mlx.io.layout7 import official_to_canonical
from rwkv_mlx.models import rwkv7

FIXTURES = Path(__file__).parents[2].parent / "shared" / "fixtures" / "rwkv-cpp-tiny"

# Canonical suffix (after "model.layers.i.") -> llama.cpp's name (after "blk.i.").
LAYER_NAMES = {
    "attn_norm.weight": "attn_norm.weight",
    "attn_norm.bias": "attn_norm.bias",
    "ffn_norm.weight": "attn_norm_2.weight",
    "ffn_norm.bias": "attn_norm_2.bias",
    "attn.k_k": "time_mix_k_k.weight",
    "attn.k_a": "time_mix_k_a.weight",
    "attn.r_k": "time_mix_r_k.weight",
    "attn.r_proj.weight": "time_mix_receptance.weight",
    "attn.k_proj.weight": "time_mix_key.weight",
    "attn.v_proj.weight": "time_mix_value.weight",
    "attn.o_proj.weight": "time_mix_output.weight",
    "attn.g_norm.weight": "time_mix_ln.weight",
    "attn.g_norm.bias": "time_mix_ln.bias",
    "ffn.x_k": "channel_mix_lerp_k.weight",
    "ffn.key.weight": "channel_mix_key.weight",
    "ffn.value.weight": "channel_mix_value.weight",
}
for _lora in "wavg":
    LAYER_NAMES[f"attn.{_lora}_lora.lora.0.weight"] = f"time_mix_{_lora}1.weight"
    LAYER_NAMES[f"attn.{_lora}_lora.lora.2.weight"] = f"time_mix_{_lora}2.weight"
    if _lora != "g":
        LAYER_NAMES[f"attn.{_lora}_lora.lora.2.bias"] = f"time_mix_{_lora}0.weight"
TOP_NAMES = {
    "model.embeddings.weight": "token_embd.weight",
    "model.layers.0.pre_norm.weight": "token_embd_norm.weight",
    "model.layers.0.pre_norm.bias": "token_embd_norm.bias",
    "model.norm.weight": "output_norm.weight",
    "model.norm.bias": "output_norm.bias",
    "lm_head.weight": "output.weight",
}
MATRICES = ("_proj.weight", "ffn.key.weight", "ffn.value.weight", "model.embeddings.weight", "lm_head.weight")


def canonical_from_official(official):
    weights = official_to_canonical({k: mx.array(v) for k, v in official.items()}, "test")
    return {name: np.array(value) for name, value in weights.items()}


def gguf_tensors(canonical, matrix_type="F32"):
    """Lay out canonical RWKV-7 weights as llama.cpp's converter does (squeezed vectors,
    fused token-shift mixes, layer 0 given copies of the a-projection as its v-projection)."""
    tensors = []
    layers = sorted({int(name.split(".")[2]) for name in canonical if name.startswith("model.layers.")})
    for name, value in canonical.items():
        if name in TOP_NAMES:
            tensors.append((TOP_NAMES[name], value.shape, value, matrix_type if name.endswith(MATRICES) else "F32"))
    for i in layers:
        prefix = f"model.layers.{i}."
        mixes = np.stack([canonical[prefix + f"attn.x_{m}"] for m in "rwkvag"])
        tensors.append((f"blk.{i}.time_mix_lerp_fused.weight", mixes.shape, mixes, "F32"))
        for suffix, gguf_name in LAYER_NAMES.items():
            source = suffix
            if i == 0 and suffix.startswith("attn.v_lora"):
                source = suffix.replace("v_lora", "a_lora")
            value = canonical[prefix + source]
            if suffix.endswith(("attn.k_k", "attn.k_a", "attn.r_k")) or ".g_norm." in suffix:
                value = value.reshape(-1)
            type_name = matrix_type if suffix.endswith(MATRICES) else "F32"
            tensors.append((f"blk.{i}.{gguf_name}", value.shape, value, type_name))
    return tensors


def metadata_for(canonical, **overrides):
    C = canonical["model.norm.weight"].shape[0]
    metadata = {
        "general.architecture": "rwkv7",
        "rwkv7.context_length": 1048576,
        "rwkv7.embedding_length": C,
        "rwkv7.block_count": 1 + max(int(n.split(".")[2]) for n in canonical if n.startswith("model.layers.")),
        "rwkv7.attention.layer_norm_epsilon": 1e-5,
        "rwkv7.wkv.head_size": canonical["model.layers.0.attn.r_k"].shape[1],
        "rwkv7.attention.decay_lora_rank": canonical["model.layers.0.attn.w_lora.lora.0.weight"].shape[0],
        "rwkv7.attention.iclr_lora_rank": canonical["model.layers.0.attn.a_lora.lora.0.weight"].shape[0],
        "rwkv7.attention.value_residual_mix_lora_rank": canonical["model.layers.1.attn.v_lora.lora.0.weight"].shape[0],
        "rwkv7.attention.gate_lora_rank": canonical["model.layers.0.attn.g_lora.lora.0.weight"].shape[0],
        "rwkv7.feed_forward_length": canonical["model.layers.0.ffn.key.weight"].shape[0],
        "rwkv7.attention.head_count": 0,
        "tokenizer.ggml.model": "rwkv",
        "tokenizer.ggml.tokens": ["a", "b"],
    }
    metadata.update(overrides)
    return metadata


@pytest.fixture
def canonical():
    return canonical_from_official(ggml_writer.random_official_rwkv7())


def write(path, canonical, matrix_type="F32", **overrides):
    return ggml_writer.write_gguf(path, metadata_for(canonical, **overrides), gguf_tensors(canonical, matrix_type))


# --- layout -----------------------------------------------------------------


def test_round_trip_equals_source(tmp_path, canonical):
    write(tmp_path / "m.gguf", canonical)

    weights, config = read_gguf(tmp_path / "m.gguf")

    assert set(weights) == set(canonical)
    for name, value in canonical.items():
        assert weights[name].shape == value.shape, name
        assert np.array_equal(np.array(weights[name]), value), name
    assert config == {
        "model_type": "rwkv7",
        "vocab_size": 96,
        "hidden_size": 64,
        "intermediate_size": 128,
        "norm_eps": pytest.approx(1e-5),
        "head_dim": 32,
        "num_hidden_layers": 2,
        "a_low_rank_dim": 32,
        "v_low_rank_dim": 32,
        "gate_low_rank_dim": 32,
        "decay_low_rank_dim": 32,
        "tie_word_embeddings": False,
    }


def test_load_gguf_returns_weights(tmp_path, canonical):
    write(tmp_path / "m.gguf", canonical)

    weights = load_gguf(tmp_path / "m.gguf")

    assert "model.layers.1.attn.x_a" in weights
    assert "model.layers.0.attn.v_lora.lora.0.weight" not in weights


def test_metadata_and_tensor_table(tmp_path, canonical):
    write(tmp_path / "m.gguf", canonical, matrix_type="Q8_0")

    metadata, tensors = read_gguf_file(tmp_path / "m.gguf")

    assert metadata["general.architecture"] == "rwkv7"
    assert metadata["tokenizer.ggml.tokens"] == ["a", "b"]
    assert tensors["blk.1.time_mix_lerp_fused.weight"].shape == (6, 1, 1, 64)
    assert tensors["blk.1.time_mix_key.weight"].type_name == "Q8_0"


@pytest.mark.parametrize("matrix_type", ["F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
def test_data_types_decode_exactly(tmp_path, canonical, matrix_type):
    decoded = write(tmp_path / "m.gguf", canonical, matrix_type=matrix_type)

    weights, _ = read_gguf(tmp_path / "m.gguf")

    key = weights["model.layers.1.attn.k_proj.weight"]
    assert np.array_equal(np.array(key.astype(mx.float32)), decoded["blk.1.time_mix_key.weight"].reshape(64, 64))
    assert key.dtype == (mx.float16 if matrix_type == "F16" else mx.float32)
    assert np.array_equal(np.array(weights["model.layers.1.attn.x_v"]), canonical["model.layers.1.attn.x_v"])


@pytest.mark.parametrize("matrix_type", ["Q4_0", "Q4_1", "Q8_0"])
def test_decoding_agrees_with_mlx_gguf_loader(tmp_path, canonical, matrix_type):
    # mx.load implements these three block layouts independently of ggml_quants.
    write(tmp_path / "m.gguf", canonical, matrix_type=matrix_type)
    bits = 8 if matrix_type == "Q8_0" else 4
    loaded = mx.load(str(tmp_path / "m.gguf"))
    theirs = mx.dequantize(
        loaded["blk.0.channel_mix_value.weight"],
        loaded["blk.0.channel_mix_value.scales"].astype(mx.float32),
        loaded["blk.0.channel_mix_value.biases"].astype(mx.float32),
        group_size=32,
        bits=bits,
    )

    weights, _ = read_gguf(tmp_path / "m.gguf")

    assert np.array_equal(np.array(weights["model.layers.0.ffn.value.weight"]), np.array(theirs))


# --- quantized weights kept -------------------------------------------------


def test_keep_quantized_triplets(tmp_path, canonical):
    decoded = write(tmp_path / "m.gguf", canonical, matrix_type="Q4_0")

    weights, config = read_gguf(tmp_path / "m.gguf", keep_quantized=True)

    module = "model.layers.1.ffn.key"
    assert weights[module + ".weight"].dtype == mx.uint32
    assert weights[module + ".weight"].shape == (128, 8)
    assert weights[module + ".scales"].shape == (128, 2)
    values = mx.dequantize(
        weights[module + ".weight"],
        weights[module + ".scales"].astype(mx.float32),
        weights[module + ".biases"].astype(mx.float32),
        group_size=32,
        bits=4,
    )
    assert np.array_equal(np.array(values), decoded["blk.1.channel_mix_key.weight"].reshape(128, 64))
    assert config["quantization"] == {"group_size": 32, "bits": 4}
    assert weights["model.layers.1.attn.w_lora.lora.0.weight"].dtype == mx.float32


def test_keep_quantized_mixed_bits_config(tmp_path, canonical):
    tensors = gguf_tensors(canonical, "Q4_0")
    tensors = [(n, s, v, "Q8_0" if n == "output.weight" else t) for n, s, v, t in tensors]
    ggml_writer.write_gguf(tmp_path / "m.gguf", metadata_for(canonical), tensors)

    _, config = read_gguf(tmp_path / "m.gguf", keep_quantized=True)

    assert config["quantization"] == {"group_size": 32, "bits": 4, "lm_head": {"group_size": 32, "bits": 8}}


def test_keep_quantized_model_matches_dequantized(tmp_path, canonical):
    write(tmp_path / "m.gguf", canonical, matrix_type="Q8_0")
    ids = mx.array([[3, 17, 40, 95, 0]])

    float_weights, config = read_gguf(tmp_path / "m.gguf")
    float_model = rwkv7.Model(rwkv7.ModelArgs(**config))
    float_model.load_weights(list(float_weights.items()))

    weights, config = read_gguf(tmp_path / "m.gguf", keep_quantized=True)
    quantization = config.pop("quantization")
    model = rwkv7.Model(rwkv7.ModelArgs(**config))
    nn.quantize(
        model,
        group_size=quantization["group_size"],
        bits=quantization["bits"],
        class_predicate=lambda path, module: f"{path}.scales" in weights,
    )
    model.load_weights(list(weights.items()))

    assert np.abs(np.array(model(ids)) - np.array(float_model(ids))).max() <= 1e-5


# --- errors -----------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="none.gguf: file not found"):
        read_gguf(tmp_path / "none.gguf")


@pytest.mark.parametrize("architecture", ["llama", "rwkv6", "arwkv7"])
def test_rejects_other_architecture(tmp_path, canonical, architecture):
    write(tmp_path / "m.gguf", canonical, **{"general.architecture": architecture})

    with pytest.raises(CheckpointError, match=f"field 'general.architecture' is '{architecture}', expected 'rwkv7'"):
        read_gguf(tmp_path / "m.gguf")


def test_rejects_missing_architecture(tmp_path, canonical):
    metadata = metadata_for(canonical)
    del metadata["general.architecture"]
    ggml_writer.write_gguf(tmp_path / "m.gguf", metadata, gguf_tensors(canonical))

    with pytest.raises(CheckpointError, match="field 'general.architecture' is missing"):
        read_gguf(tmp_path / "m.gguf")


def test_wrong_magic(tmp_path, canonical):
    write(tmp_path / "m.gguf", canonical)
    raw = bytearray((tmp_path / "m.gguf").read_bytes())
    raw[:4] = b"GGJT"
    (tmp_path / "m.gguf").write_bytes(bytes(raw))

    with pytest.raises(CheckpointError, match=r"field 'magic' is b'GGJT', expected b'GGUF'"):
        read_gguf(tmp_path / "m.gguf")


def test_truncated_inside_tensor(tmp_path, canonical):
    write(tmp_path / "m.gguf", canonical)
    raw = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(raw[:-100])
    last = gguf_tensors(canonical)[-1][0]

    with pytest.raises(CheckpointError, match=rf"cut\.gguf: file is truncated inside tensor '{last}'"):
        read_gguf(tmp_path / "cut.gguf")


def test_truncated_inside_metadata(tmp_path, canonical):
    write(tmp_path / "m.gguf", canonical)
    raw = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(raw[: raw.index(b"rwkv7.block_count") + 5])

    with pytest.raises(CheckpointError, match=r"file is truncated inside the key of metadata entry 3"):
        read_gguf(tmp_path / "cut.gguf")


def test_unsupported_data_type_named(tmp_path, canonical):
    write(tmp_path / "m.gguf", canonical, matrix_type="Q8_0")
    raw = bytearray((tmp_path / "m.gguf").read_bytes())
    name = b"blk.0.time_mix_key.weight"
    type_at = raw.index(name) + len(name) + 4 + 2 * 8
    assert struct.unpack_from("<I", raw, type_at)[0] == ggml_writer.GGUF_TYPE_IDS["Q8_0"]
    struct.pack_into("<I", raw, type_at, 12)
    (tmp_path / "m.gguf").write_bytes(bytes(raw))

    with pytest.raises(CheckpointError, match=r"tensor 'blk\.0\.time_mix_key\.weight' has data type Q4_K, which this reader does not decode"):
        read_gguf(tmp_path / "m.gguf")


def test_metadata_contradicting_tensors(tmp_path, canonical):
    write(tmp_path / "m.gguf", canonical, **{"rwkv7.block_count": 3})

    with pytest.raises(CheckpointError, match=r"field 'rwkv7\.block_count' is 3, but the tensors have num_hidden_layers = 2"):
        read_gguf(tmp_path / "m.gguf")


def test_unexpected_tensor(tmp_path, canonical):
    tensors = gguf_tensors(canonical) + [("blk.0.time_mix_gate.weight", (64, 64), np.zeros((64, 64), np.float32), "F32")]
    ggml_writer.write_gguf(tmp_path / "m.gguf", metadata_for(canonical), tensors)

    with pytest.raises(CheckpointError, match=r"unexpected tensor 'blk\.0\.time_mix_gate\.weight' in an RWKV-7 GGUF file"):
        read_gguf(tmp_path / "m.gguf")


def test_fused_mixes_wrong_size(tmp_path, canonical):
    tensors = [
        (n, (5, 1, 1, 64), v[:5], t) if n == "blk.1.time_mix_lerp_fused.weight" else (n, s, v, t)
        for n, s, v, t in gguf_tensors(canonical)
    ]
    ggml_writer.write_gguf(tmp_path / "m.gguf", metadata_for(canonical), tensors)

    with pytest.raises(CheckpointError, match=r"tensor 'blk\.1\.time_mix_lerp_fused\.weight' has shape \[5, 1, 1, 64\], expected \[6, 1, 1, C\]"):
        read_gguf(tmp_path / "m.gguf")


# --- the tiny trained model -------------------------------------------------


@pytest.mark.skipif(not FIXTURES.is_dir(), reason="the tiny rwkv.cpp models are not in ../shared/fixtures/rwkv-cpp-tiny")
def test_tiny_model_through_gguf_matches_rwkv_cpp(tmp_path):
    from rwkv_mlx.io.rwkv_cpp import load_rwkv_cpp_canonical

    source, _ = load_rwkv_cpp_canonical(FIXTURES / "tiny-rwkv-7v0-834K-FP32.bin")
    write(tmp_path / "tiny.gguf", {name: np.array(value) for name, value in source.items()})
    expected = np.fromfile(FIXTURES / "expected-logits-7v0-834K.bin", dtype=np.float32)

    weights, config = read_gguf(tmp_path / "tiny.gguf")
    model = rwkv7.Model(rwkv7.ModelArgs(**config))
    model.load_weights(list(weights.items()))
    cache = model.make_cache()
    for token in (34, 105, 110):
        logits = model(mx.array([[token]]), cache=cache)

    assert np.abs(np.array(logits[0, -1]) - expected).max() <= 1e-4
