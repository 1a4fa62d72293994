"""rwkv.cpp .bin reader: layout, versions, data types, errors, and the tiny trained models."""

import struct
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import ggml_writer
from rwkv_mlx.io import ggml_quants
from rwkv_mlx.io.errors import CheckpointError
from rwkv_mlx.io.rwkv_cpp import load_rwkv_cpp, load_rwkv_cpp_canonical, read_rwkv_cpp_tensors

FIXTURES = Path(__file__).parents[2].parent / "shared" / "fixtures" / "rwkv-cpp-tiny"
needs_fixtures = pytest.mark.skipif(
    not FIXTURES.is_dir(), reason="the tiny rwkv.cpp models are not in ../shared/fixtures/rwkv-cpp-tiny"
)
PROMPT = (34, 105, 110)  # the bytes '"in'


def model_classes():
    """The RWKV-7 implementations to run checkpoints with: this package's and mlx-lm's."""
    from mlx_lm.models import rwkv7 as mlx_lm_rwkv7

    from rwkv_mlx.models import rwkv7

    return [pytest.param(rwkv7, id="rwkv_mlx"), pytest.param(mlx_lm_rwkv7, id="mlx_lm")]


def last_logits(module, weights, config, tokens=PROMPT) -> np.ndarray:
    """Feed ``tokens`` one at a time from the zero state and return the last logits."""
    model = module.Model(module.ModelArgs(**config))
    model.load_weights(list(weights.items()))
    cache = model.make_cache()
    for token in tokens:
        logits = model(mx.array([[token]]), cache=cache)
    return np.array(logits[0, -1].astype(mx.float32))


def write_v7(path, official, matrix_type="FP32", **header):
    """Write official RWKV-7 weights as an rwkv.cpp file; return the decoded stored tensors."""
    C = official["emb.weight"].shape[1]
    layers = 1 + max(int(name.split(".")[1]) for name in official if name.startswith("blocks."))
    fields = dict(n_vocab=official["emb.weight"].shape[0], n_embed=C, n_layer=layers, data_type=matrix_type)
    fields.update(header)
    tensors = ggml_writer.rwkv_cpp_tensors_from_official_rwkv7(official, matrix_type)
    return ggml_writer.write_rwkv_cpp(path, tensors, **fields)


@pytest.fixture
def official():
    return ggml_writer.random_official_rwkv7()


# --- layout -----------------------------------------------------------------


def test_v7_round_trip_official_layout(tmp_path, official):
    write_v7(tmp_path / "m.bin", official)

    weights, info = load_rwkv_cpp(tmp_path / "m.bin")

    assert set(weights) == set(official)
    for name, value in official.items():
        assert weights[name].shape == value.shape, name
        assert np.array_equal(np.array(weights[name]), value), name
    assert info["version"] == "7"
    assert info["file_version"] == 101
    assert info["data_type"] == "FP32"
    assert (info["vocab_size"], info["hidden_size"], info["num_layers"]) == (96, 64, 2)


def test_v7_canonical_and_config(tmp_path, official):
    write_v7(tmp_path / "m.bin", official)

    weights, config = load_rwkv_cpp_canonical(tmp_path / "m.bin")

    assert weights["model.layers.1.attn.x_g"].shape == (1, 1, 64)
    assert weights["model.layers.1.attn.k_k"].shape == (2, 32)
    assert np.array_equal(np.array(weights["model.layers.1.attn.w_lora.lora.0.weight"]), official["blocks.1.att.w1"].T)
    assert config["head_dim"] == 32
    assert config["intermediate_size"] == 128
    assert config["decay_low_rank_dim"] == 32
    assert config["tie_word_embeddings"] is False


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_dtype_argument_casts(tmp_path, official, dtype):
    write_v7(tmp_path / "m.bin", official)

    weights, _ = load_rwkv_cpp(tmp_path / "m.bin", dtype=dtype)

    assert {w.dtype for w in weights.values()} == {dtype}


def test_fp16_matrices_stay_float16(tmp_path, official):
    decoded = write_v7(tmp_path / "m.bin", official, matrix_type="FP16")

    weights, info = load_rwkv_cpp(tmp_path / "m.bin")

    key = weights["blocks.0.att.key.weight"]
    assert key.dtype == mx.float16
    assert np.array_equal(np.array(key), decoded["blocks.0.att.key.weight"].reshape(64, 64))
    assert weights["blocks.0.att.k_k"].dtype == mx.float32
    assert info["tensor_types"] == {"FP32": len(decoded) - 12, "FP16": 12}


# --- quantized data ---------------------------------------------------------


def half(value: float) -> bytes:
    return struct.pack("<e", value)


# One block per type, built byte by byte from ggml's documented layout, and
# the values it holds: (type, block bytes, {element: value}, value of all others).
HAND_BLOCKS = [
    # d = 0.5, and qs[0] = 0x21 contains element 0 (low nibble 1) and element 16 (high nibble 2).
    ("Q4_0", half(0.5) + bytes([0x21]) + bytes([0x88] * 15), {0: -3.5, 16: -3.0}, 0.0),
    # d = 0.25, m = -1, and qs[1] = 0xF3 contains element 1 (3) and element 17 (15).
    ("Q4_1", half(0.25) + half(-1.0) + bytes([0, 0xF3]) + bytes(14), {1: -0.25, 17: 2.75}, -1.0),
    # d = 1, qh bits 0 and 31 set the fifth bit of elements 0 and 31, and qs[15] = 0xF0.
    ("Q5_0", half(1.0) + struct.pack("<I", 1 | 1 << 31) + bytes(15) + bytes([0xF0]), {0: 0.0, 15: -16.0, 31: 15.0}, -16.0),
    # d = 0.5, m = 2, qh bit 16 sets the fifth bit of element 16, and qs[0] = 0x12.
    ("Q5_1", half(0.5) + half(2.0) + struct.pack("<I", 1 << 16) + bytes([0x12]) + bytes(15), {0: 3.0, 16: 10.5}, 2.0),
    # d = 0.125, and elements 0, 1 and 31 are the int8 values -128, 127 and 5.
    ("Q8_0", half(0.125) + struct.pack("<3b", -128, 127, 0) + bytes(28) + struct.pack("<b", 5), {0: -16.0, 1: 15.875, 31: 0.625}, 0.0),
]


@pytest.mark.parametrize("type_name, block, special, rest", HAND_BLOCKS, ids=[b[0] for b in HAND_BLOCKS])
def test_dequantize_hand_built_block(type_name, block, special, rest):
    expected = np.full(32, rest, dtype=np.float32)
    for index, value in special.items():
        expected[index] = value

    values = ggml_quants.dequantize(np.frombuffer(block, dtype=np.uint8), type_name, 32)

    assert values.dtype == np.float32
    assert np.array_equal(values, expected)


@pytest.mark.parametrize("type_name", ggml_quants.QUANTIZED_TYPES)
def test_dequantize_returns_encoded_values(type_name):
    values = np.random.default_rng(3).standard_normal(32 * 20).astype(np.float32) * 3
    values[:32] = 0  # an all-zero block has scale 0
    data, encoded = ggml_writer.encode(values, type_name)

    decoded = ggml_quants.dequantize(np.frombuffer(data, dtype=np.uint8), type_name, values.size)

    assert np.array_equal(decoded, encoded)
    assert np.abs(decoded - values).max() < 3 * np.abs(values).max() / 7


def test_dequantize_rejects_wrong_size():
    with pytest.raises(ValueError, match="Q8_0 data for 64 values must be 68 bytes, got 34"):
        ggml_quants.dequantize(np.zeros(34, dtype=np.uint8), "Q8_0", 64)



@pytest.mark.parametrize("type_name", ggml_quants.QUANTIZED_TYPES)
def test_quantized_matrices_decode_exactly(tmp_path, official, type_name):
    decoded = write_v7(tmp_path / "m.bin", official, matrix_type=type_name)

    weights, info = load_rwkv_cpp(tmp_path / "m.bin")

    for name in ("blocks.0.att.receptance.weight", "blocks.1.ffn.key.weight", "blocks.1.ffn.value.weight"):
        expected = decoded[name].reshape(official[name].shape)
        assert np.array_equal(np.array(weights[name]), expected), name
    assert np.array_equal(np.array(weights["blocks.1.att.w1"]), official["blocks.1.att.w1"])
    assert info["tensor_types"][type_name] == 12
    assert weights["blocks.0.att.key.weight"].dtype == mx.float32


def test_version_100_reads_float_data(tmp_path, official):
    write_v7(tmp_path / "m.bin", official, file_version=100)

    weights, info = load_rwkv_cpp(tmp_path / "m.bin")

    assert info["file_version"] == 100
    assert np.array_equal(np.array(weights["blocks.1.att.key.weight"]), official["blocks.1.att.key.weight"])


# --- errors -----------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="nothere.bin: file not found"):
        load_rwkv_cpp(tmp_path / "nothere.bin")


def test_truncated_inside_tensor(tmp_path, official):
    write_v7(tmp_path / "m.bin", official)
    raw = (tmp_path / "m.bin").read_bytes()
    cut = raw.index(b"blocks.1.att.key.weight") + len("blocks.1.att.key.weight") + 100
    (tmp_path / "cut.bin").write_bytes(raw[:cut])

    with pytest.raises(CheckpointError, match=r"cut\.bin: file is truncated inside tensor 'blocks\.1\.att\.key\.weight'"):
        load_rwkv_cpp(tmp_path / "cut.bin")


def test_truncated_inside_tensor_header(tmp_path, official):
    write_v7(tmp_path / "m.bin", official)
    raw = (tmp_path / "m.bin").read_bytes()
    cut = raw.index(b"blocks.0.ln2.weight") - 5
    (tmp_path / "cut.bin").write_bytes(raw[:cut])

    with pytest.raises(CheckpointError, match=r"truncated inside the header of the tensor after 'blocks\.0\.ln1\.bias'"):
        load_rwkv_cpp(tmp_path / "cut.bin")


def test_file_shorter_than_header(tmp_path):
    (tmp_path / "short.bin").write_bytes(b"fmgg\x65\x00")

    with pytest.raises(CheckpointError, match="short.bin: file is 6 bytes, too short"):
        load_rwkv_cpp(tmp_path / "short.bin")


def test_wrong_magic(tmp_path, official):
    write_v7(tmp_path / "m.bin", official, magic=0x67676A74)

    with pytest.raises(CheckpointError, match=r"m\.bin: field 'magic' is 0x67676a74, expected 0x67676d66"):
        load_rwkv_cpp(tmp_path / "m.bin")


def test_unsupported_file_version(tmp_path, official):
    write_v7(tmp_path / "m.bin", official, file_version=102)

    with pytest.raises(CheckpointError, match=r"m\.bin: field 'version' is 102, an unsupported rwkv.cpp file version"):
        load_rwkv_cpp(tmp_path / "m.bin")


def test_unknown_data_type_id(tmp_path, official):
    tensors = ggml_writer.rwkv_cpp_tensors_from_official_rwkv7(official, "Q8_0")
    ggml_writer.write_rwkv_cpp(tmp_path / "m.bin", tensors, 96, 64, 2, type_ids={"Q8_0": 42}, data_type="FP32")

    with pytest.raises(CheckpointError, match=r"tensor 'blocks\.0\.att\.receptance\.weight' has unknown data type id 42"):
        load_rwkv_cpp(tmp_path / "m.bin")


@pytest.mark.parametrize(
    "type_id, message",
    [(4, "is Q4_1_O, a format rwkv.cpp removed"), (13, "is Q4_K, which this reader does not decode")],
)
def test_unsupported_data_types_named(tmp_path, official, type_id, message):
    tensors = ggml_writer.rwkv_cpp_tensors_from_official_rwkv7(official, "Q8_0")
    ggml_writer.write_rwkv_cpp(tmp_path / "m.bin", tensors, 96, 64, 2, type_ids={"Q8_0": type_id}, data_type="FP32")

    with pytest.raises(CheckpointError, match=r"tensor 'blocks\.0\.att\.receptance\.weight' " + message):
        load_rwkv_cpp(tmp_path / "m.bin")


def test_quantized_version_100_rejected(tmp_path, official):
    write_v7(tmp_path / "m.bin", official, matrix_type="Q5_1", data_type="FP32", file_version=100)

    with pytest.raises(CheckpointError, match=r"tensor 'blocks\.0\.att\.receptance\.weight' is Q5_1 in file version 100"):
        load_rwkv_cpp(tmp_path / "m.bin")


def test_wrong_tensor_shape(tmp_path, official):
    official["blocks.1.att.key.weight"] = official["blocks.1.att.key.weight"][:, :32].copy()
    write_v7(tmp_path / "m.bin", official)

    with pytest.raises(CheckpointError, match=r"tensor 'blocks\.1\.att\.key\.weight' has shape \[64, 32\], expected \[C=64, C=64\]"):
        load_rwkv_cpp(tmp_path / "m.bin")


def test_inconsistent_low_rank_size(tmp_path, official):
    official["blocks.1.att.a2"] = official["blocks.1.att.a2"][:16].copy()
    write_v7(tmp_path / "m.bin", official)

    with pytest.raises(CheckpointError, match=r"tensor 'blocks\.1\.att\.a2' has shape \[16, 64\], expected \[Da=32, C=64\]"):
        load_rwkv_cpp(tmp_path / "m.bin")


def test_missing_tensor(tmp_path, official):
    del official["blocks.1.att.g2"]
    write_v7(tmp_path / "m.bin", official)

    with pytest.raises(CheckpointError, match=r"missing tensor 'blocks\.1\.att\.g2' of an RWKV-7 model"):
        load_rwkv_cpp(tmp_path / "m.bin")


def test_layer_count_disagrees_with_header(tmp_path, official):
    write_v7(tmp_path / "m.bin", official, n_layer=1)

    with pytest.raises(CheckpointError, match=r"unexpected tensor 'blocks\.1\.ln1\.weight' .* field 'n_layer' of the file header gives 1 layer"):
        load_rwkv_cpp(tmp_path / "m.bin")


def test_quantized_row_not_whole_blocks(tmp_path):
    tensors = [("emb.weight", (4, 48), np.zeros((4, 48), np.float32), "FP32")]
    ggml_writer.write_rwkv_cpp(tmp_path / "m.bin", tensors, 4, 48, 1)
    raw = bytearray((tmp_path / "m.bin").read_bytes())
    struct.pack_into("<I", raw, 24 + 8, ggml_writer.RWKV_CPP_TYPE_IDS["Q8_0"])
    (tmp_path / "m.bin").write_bytes(bytes(raw))

    with pytest.raises(CheckpointError, match=r"tensor 'emb\.weight' is Q8_0 with rows of 48 values"):
        load_rwkv_cpp(tmp_path / "m.bin")


def test_canonical_rejects_older_versions():
    path = FIXTURES / "tiny-rwkv-5v2-730K-FP32.bin"
    if not path.exists():
        pytest.skip("the tiny rwkv.cpp models are not in ../shared/fixtures/rwkv-cpp-tiny")

    with pytest.raises(CheckpointError, match="this is an RWKV-5.2 model; only RWKV-7 converts"):
        load_rwkv_cpp_canonical(path)


# --- the tiny trained models ------------------------------------------------


@needs_fixtures
def test_v7_fixture_stored_layout_undone():
    path = FIXTURES / "tiny-rwkv-7v0-834K-FP32.bin"
    _, stored = read_rwkv_cpp_tensors(path)
    stored = {name: values for name, _, _, values in stored}

    weights, info = load_rwkv_cpp(path)

    assert info["version"] == "7"
    assert "blocks.3.att.x_rwkvag" not in weights
    mixes = stored["blocks.3.att.x_rwkvag"]
    assert mixes.shape == (6, 1, 64)
    for i, letter in enumerate("rwkvag"):
        assert np.array_equal(np.array(weights[f"blocks.3.att.x_{letter}"]).reshape(-1), mixes[i, 0])
    assert np.array_equal(np.array(weights["blocks.3.att.g1"]), stored["blocks.3.att.g1"].T)
    assert weights["blocks.3.att.g1"].shape == (64, 32)
    assert weights["blocks.3.att.r_k"].shape == (1, 64)
    assert weights["blocks.3.att.k_k"].shape == (1, 1, 64)


@needs_fixtures
@pytest.mark.parametrize(
    "file, version, file_version, time_decay_shape",
    [("tiny-rwkv-5v2-730K-FP32.bin", "5.2", 101, (8, 8)), ("tiny-rwkv-4v0-660K-FP32.bin", "4", 100, (128,))],
)
def test_older_fixtures_official_layout(file, version, file_version, time_decay_shape):
    _, stored = read_rwkv_cpp_tensors(FIXTURES / file)
    stored = {name: values for name, _, _, values in stored}

    weights, info = load_rwkv_cpp(FIXTURES / file)

    assert info["version"] == version
    assert info["file_version"] == file_version
    decay = np.array(weights["blocks.2.att.time_decay"]).astype(np.float64)
    assert decay.shape == time_decay_shape
    assert weights["blocks.2.att.time_mix_k"].shape == (1, 1, info["hidden_size"])
    # The converter stored exp(-exp(decay)) for 5.2 and -exp(decay) for 4.
    stored_decay = stored["blocks.2.att.time_decay"].reshape(time_decay_shape)
    recomputed = np.exp(-np.exp(decay)) if version == "5.2" else -np.exp(decay)
    assert np.allclose(recomputed, stored_decay, rtol=1e-6, atol=0)


@needs_fixtures
@pytest.mark.parametrize("module", model_classes())
def test_v7_fixture_logits_match_rwkv_cpp(module):
    expected = np.fromfile(FIXTURES / "expected-logits-7v0-834K.bin", dtype=np.float32)
    weights, config = load_rwkv_cpp_canonical(FIXTURES / "tiny-rwkv-7v0-834K-FP32.bin")

    logits = last_logits(module, weights, config)

    assert np.abs(logits - expected).max() <= 1e-4


# Max absolute logit error allowed after re-quantizing the tiny model's
# matrices: about 3x the measured error (0.011 Q4_0, 0.012 Q4_1, 0.0037
# Q5_0, 0.0042 Q5_1, 0.0008 Q8_0).
QUANTIZED_TOLERANCE = {"Q4_0": 0.04, "Q4_1": 0.04, "Q5_0": 0.012, "Q5_1": 0.012, "Q8_0": 0.0025}


@needs_fixtures
@pytest.mark.parametrize("type_name", ggml_quants.QUANTIZED_TYPES)
def test_quantized_v7_fixture_logits(tmp_path, type_name):
    official, _ = load_rwkv_cpp(FIXTURES / "tiny-rwkv-7v0-834K-FP32.bin")
    official = {name: np.array(value) for name, value in official.items()}
    write_v7(tmp_path / "q.bin", official, matrix_type=type_name)
    expected = np.fromfile(FIXTURES / "expected-logits-7v0-834K.bin", dtype=np.float32)

    weights, config = load_rwkv_cpp_canonical(tmp_path / "q.bin")
    from rwkv_mlx.models import rwkv7

    logits = last_logits(rwkv7, weights, config)

    error = np.abs(logits - expected).max()
    assert 0 < error <= QUANTIZED_TOLERANCE[type_name]
