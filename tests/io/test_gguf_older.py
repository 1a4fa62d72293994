"""RWKV-6 GGUF files in llama.cpp's layout.

Each file is built from the committed RWKV-6 parity fixture (official ``.pth``
weights) by ``gguf_tensors``, which lays the tensors out as llama.cpp's
``convert_hf_to_gguf.py`` does, and must load to the same canonical weights
and logits as the ``.pth``.
"""

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import ggml_writer
import rwkv_mlx
from rwkv_mlx.io.errors import CheckpointError
from rwkv_mlx.io.gguf_older import read_gguf_older
from rwkv_mlx.io.pth import load_pth
from rwkv_mlx.loading import build_model, read_weights
from test_gguf import canonical_from_official, metadata_for
from test_gguf import gguf_tensors as rwkv7_gguf_tensors

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "rwkv6" / "rwkv6.pth"
PROMPT = mx.array([[34, 105, 110]])  # the bytes '"in'
LAYERS = 2

# Official suffix within "blocks.i." -> llama.cpp's name within "blk.i.", for tensors that only
# change name (the vectors are also squeezed to [C]).
RENAMED = {
    "ln1.weight": "attn_norm.weight",
    "ln1.bias": "attn_norm.bias",
    "ln2.weight": "attn_norm_2.weight",
    "ln2.bias": "attn_norm_2.bias",
    "att.time_maa_x": "time_mix_lerp_x.weight",
    "att.time_faaaa": "time_mix_first.weight",
    "att.time_decay": "time_mix_decay.weight",
    "att.receptance.weight": "time_mix_receptance.weight",
    "att.key.weight": "time_mix_key.weight",
    "att.value.weight": "time_mix_value.weight",
    "att.gate.weight": "time_mix_gate.weight",
    "att.output.weight": "time_mix_output.weight",
    "att.ln_x.weight": "time_mix_ln.weight",
    "att.ln_x.bias": "time_mix_ln.bias",
    "ffn.time_maa_k": "channel_mix_lerp_k.weight",
    "ffn.time_maa_r": "channel_mix_lerp_r.weight",
    "ffn.key.weight": "channel_mix_key.weight",
    "ffn.value.weight": "channel_mix_value.weight",
    "ffn.receptance.weight": "channel_mix_receptance.weight",
}
TOP_LEVEL = {
    "emb.weight": "token_embd.weight",
    "blocks.0.ln0.weight": "token_embd_norm.weight",
    "blocks.0.ln0.bias": "token_embd_norm.bias",
    "ln_out.weight": "output_norm.weight",
    "ln_out.bias": "output_norm.bias",
    "head.weight": "output.weight",
}
# The names of matrices, which may be stored in another type than F32.
MATRICES = (
    "time_mix_receptance", "time_mix_key", "time_mix_value", "time_mix_gate", "time_mix_output",
    "channel_mix_key", "channel_mix_value", "channel_mix_receptance", "token_embd", "output.weight",
)  # fmt: skip


@pytest.fixture(scope="module")
def official():
    return {name: np.array(value.astype(mx.float32)) for name, value in load_pth(FIXTURE).items()}


def gguf_tensors(official, rescale_every=1, matrix_type="F32", fused=True):
    """Lay out official RWKV-6 weights as llama.cpp's converter does.

    It renames the tensors and squeezes the vectors. It transposes ``time_maa_w1`` and
    ``time_decay_w{1,2}`` and swaps the last two axes of ``time_maa_w2``. It stacks the five
    token-shift mixes (w, k, v, r, g) into [5, 1, 1, C], unless ``fused`` is false. It divides
    layer i's output and channel-mix value matrices by 2^(i // rescale_every).
    """
    tensors = []

    def add(name, values):
        type_name = matrix_type if any(part in name for part in MATRICES) else "F32"
        tensors.append((name, values.shape, values, type_name))

    for name, gguf_name in TOP_LEVEL.items():
        add(gguf_name, official[name])
    for i in range(LAYERS):
        block = lambda suffix: official[f"blocks.{i}.{suffix}"]  # noqa: E731
        scale = 2.0 ** (i // rescale_every) if rescale_every > 0 else 1.0
        for suffix, gguf_name in RENAMED.items():
            values = block(suffix)
            if values.ndim == 3:
                values = values.reshape(-1)
            if suffix in ("att.output.weight", "ffn.value.weight"):
                values = values / np.float32(scale)
            add(f"blk.{i}.{gguf_name}", values)
        add(f"blk.{i}.time_mix_w1.weight", block("att.time_maa_w1").T)
        add(f"blk.{i}.time_mix_w2.weight", block("att.time_maa_w2").transpose(0, 2, 1))
        add(f"blk.{i}.time_mix_decay_w1.weight", block("att.time_decay_w1").T)
        add(f"blk.{i}.time_mix_decay_w2.weight", block("att.time_decay_w2").T)
        mixes = [block(f"att.time_maa_{mix}").reshape(1, -1) for mix in "wkvrg"]
        if fused:
            add(f"blk.{i}.time_mix_lerp_fused.weight", np.stack(mixes)[:, None])
        else:
            for mix, values in zip("wkvrg", mixes):
                add(f"blk.{i}.time_mix_lerp_{mix}.weight", values.reshape(-1))
    return tensors


def metadata(official, rescale_every=1, **overrides):
    C = official["ln_out.weight"].shape[0]
    fields = {
        "general.architecture": "rwkv6",
        "rwkv6.context_length": 1048576,
        "rwkv6.embedding_length": C,
        "rwkv6.block_count": LAYERS,
        "rwkv6.attention.layer_norm_epsilon": 1e-5,
        "rwkv6.rescale_every_n_layers": rescale_every,
        "rwkv6.wkv.head_size": official["blocks.0.att.time_faaaa"].shape[1],
        "rwkv6.time_mix_extra_dim": official["blocks.0.att.time_maa_w2"].shape[1],
        "rwkv6.time_decay_extra_dim": official["blocks.0.att.time_decay_w1"].shape[1],
        "rwkv6.feed_forward_length": official["blocks.0.ffn.key.weight"].shape[0],
        "rwkv6.attention.head_count": 0,
        "tokenizer.ggml.model": "rwkv",
    }
    fields.update(overrides)
    return {key: value for key, value in fields.items() if value is not None}


def write(path, official, tensors=None, rescale_every=1, **overrides):
    tensors = tensors if tensors is not None else gguf_tensors(official, rescale_every)
    return ggml_writer.write_gguf(path, metadata(official, rescale_every, **overrides), tensors)


def assert_same_weights(ours, theirs):
    assert set(ours) == set(theirs)
    for name, value in theirs.items():
        assert ours[name].shape == value.shape, name
        assert mx.array_equal(ours[name].astype(mx.float32), value.astype(mx.float32)), name


def logits(source):
    model, _ = rwkv_mlx.load(str(source), dtype=mx.float32)
    return np.array(model(PROMPT))


# --- layout -----------------------------------------------------------------


@pytest.mark.parametrize("rescale_every", [0, 1, 6])
def test_gguf_equals_pth(tmp_path, official, rescale_every):
    write(tmp_path / "m.gguf", official, rescale_every=rescale_every)

    weights, config = read_weights(tmp_path / "m.gguf")
    expected_weights, expected_config = read_weights(FIXTURE)

    assert_same_weights(weights, expected_weights)
    assert config == {**expected_config, "rescale_every": rescale_every}
    assert np.array_equal(logits(tmp_path / "m.gguf"), logits(FIXTURE))


def test_unfused_token_shift_mixes(tmp_path, official):
    write(tmp_path / "m.gguf", official, gguf_tensors(official, fused=False))

    weights, _ = read_weights(tmp_path / "m.gguf")

    assert_same_weights(weights, read_weights(FIXTURE)[0])


def test_bf16_matrices_exact(tmp_path, official):
    # The fixture is stored in bfloat16, so BF16 keeps every value.
    write(tmp_path / "m.gguf", official, gguf_tensors(official, matrix_type="BF16"))

    weights, _ = read_weights(tmp_path / "m.gguf")

    assert_same_weights(weights, read_weights(FIXTURE)[0])


def test_f16_matrices_keep_dtype(tmp_path, official):
    write(tmp_path / "m.gguf", official, gguf_tensors(official, matrix_type="F16"))

    weights, _ = read_weights(tmp_path / "m.gguf")

    assert weights["model.layers.1.attn.k_proj.weight"].dtype == mx.float16
    assert weights["model.layers.1.attn.o_proj.weight"].dtype == mx.float32
    expected = read_weights(FIXTURE)[0]["model.layers.1.attn.o_proj.weight"].astype(mx.float32)
    assert mx.allclose(weights["model.layers.1.attn.o_proj.weight"], expected, rtol=1e-3, atol=1e-6)


def test_q8_0_logits_close(tmp_path, official):
    decoded = write(tmp_path / "m.gguf", official, gguf_tensors(official, matrix_type="Q8_0"))

    weights, _ = read_gguf_older(tmp_path / "m.gguf")

    # Layer 1's value matrix was divided by 2 before quantizing and is multiplied back.
    stored = decoded["blk.1.channel_mix_value.weight"].reshape(64, 224)
    assert np.array_equal(np.array(weights["model.layers.1.ffn.value.weight"]), stored * 2)
    # Q8_0 moves this model's logits by 0.067 at most, and leaving layer 1's
    # matrices divided by 2 would move them by 1.26.
    assert np.abs(logits(tmp_path / "m.gguf") - logits(FIXTURE)).max() < 0.2


def test_keep_quantized_matches_dequantized(tmp_path, official):
    write(tmp_path / "m.gguf", official, gguf_tensors(official, matrix_type="Q8_0"))

    quantized, config = read_gguf_older(tmp_path / "m.gguf", keep_quantized=True)
    dequantized, _ = read_gguf_older(tmp_path / "m.gguf")

    assert config["quantization"] == {"group_size": 32, "bits": 8}
    for module in ("model.layers.1.attn.o_proj", "model.layers.1.ffn.value", "lm_head"):
        restored = mx.dequantize(
            quantized[f"{module}.weight"], quantized[f"{module}.scales"], quantized[f"{module}.biases"], 32, 8
        )
        assert mx.allclose(restored, dequantized[f"{module}.weight"], rtol=1e-5, atol=1e-6), module
    model = build_model(quantized, config, "m.gguf")
    assert isinstance(model.layers[1].attn.o_proj, nn.QuantizedLinear)


def test_rwkv7_file_left_to_its_reader(tmp_path, official):
    write(tmp_path / "m.gguf", official, **{"general.architecture": "rwkv7"})

    assert read_gguf_older(tmp_path / "m.gguf") is None


def test_rwkv7_file_still_loads(tmp_path):
    canonical = canonical_from_official(ggml_writer.random_official_rwkv7())
    ggml_writer.write_gguf(tmp_path / "m.gguf", metadata_for(canonical), rwkv7_gguf_tensors(canonical))

    weights, config = read_weights(tmp_path / "m.gguf")

    assert config["model_type"] == "rwkv7"
    assert set(weights) == set(canonical)


# --- bad input ---------------------------------------------------------------


def test_other_architecture(tmp_path, official):
    write(tmp_path / "llama.gguf", official, **{"general.architecture": "llama"})

    with pytest.raises(
        CheckpointError,
        match=r"llama.gguf: field 'general.architecture' is 'llama', expected 'rwkv6' \(an RWKV-6 model\) "
        r"or 'rwkv7'",
    ):
        read_weights(tmp_path / "llama.gguf")


def test_missing_architecture(tmp_path, official):
    write(tmp_path / "m.gguf", official, **{"general.architecture": None})

    with pytest.raises(CheckpointError, match=r"m.gguf: field 'general.architecture' is missing"):
        read_weights(tmp_path / "m.gguf")


def test_missing_size_field(tmp_path, official):
    write(tmp_path / "m.gguf", official, **{"rwkv6.time_mix_extra_dim": None})

    with pytest.raises(CheckpointError, match=r"m.gguf: missing field 'rwkv6.time_mix_extra_dim'"):
        read_weights(tmp_path / "m.gguf")


def test_head_size_not_dividing_width(tmp_path, official):
    write(tmp_path / "m.gguf", official, **{"rwkv6.wkv.head_size": 48})

    with pytest.raises(CheckpointError, match=r"field 'rwkv6.wkv.head_size' is 48, which does not divide"):
        read_weights(tmp_path / "m.gguf")


def test_missing_tensor(tmp_path, official):
    tensors = [spec for spec in gguf_tensors(official) if spec[0] != "blk.1.time_mix_gate.weight"]
    write(tmp_path / "m.gguf", official, tensors)

    with pytest.raises(CheckpointError, match=r"m.gguf: missing tensor 'blk.1.time_mix_gate.weight' \(1 missing"):
        read_weights(tmp_path / "m.gguf")


def test_missing_fused_mixes(tmp_path, official):
    tensors = [spec for spec in gguf_tensors(official) if spec[0] != "blk.0.time_mix_lerp_fused.weight"]
    write(tmp_path / "m.gguf", official, tensors)

    with pytest.raises(CheckpointError, match=r"missing tensor 'blk.0.time_mix_lerp_w.weight' \(5 missing"):
        read_weights(tmp_path / "m.gguf")


def test_missing_embedding(tmp_path, official):
    tensors = [spec for spec in gguf_tensors(official) if spec[0] != "token_embd.weight"]
    write(tmp_path / "m.gguf", official, tensors)

    with pytest.raises(CheckpointError, match=r"m.gguf: missing tensor 'token_embd.weight'"):
        read_weights(tmp_path / "m.gguf")


def test_mis_shaped_matrix(tmp_path, official):
    tensors = gguf_tensors(official)
    index = next(i for i, spec in enumerate(tensors) if spec[0] == "blk.0.time_mix_w1.weight")
    values = official["blocks.0.att.time_maa_w1"]  # [C, 5 D], not transposed
    tensors[index] = ("blk.0.time_mix_w1.weight", values.shape, values, "F32")
    write(tmp_path / "m.gguf", official, tensors)

    with pytest.raises(
        CheckpointError, match=r"m.gguf: tensor 'blk.0.time_mix_w1.weight' has shape \[64, 80\], expected \[80, 64\]"
    ):
        read_weights(tmp_path / "m.gguf")


def test_mis_sized_vector(tmp_path, official):
    tensors = gguf_tensors(official)
    index = next(i for i, spec in enumerate(tensors) if spec[0] == "blk.1.time_mix_decay.weight")
    tensors[index] = ("blk.1.time_mix_decay.weight", (32,), np.zeros(32, np.float32), "F32")
    write(tmp_path / "m.gguf", official, tensors)

    with pytest.raises(CheckpointError, match=r"tensor 'blk.1.time_mix_decay.weight' has shape \[32\], expected 64"):
        read_weights(tmp_path / "m.gguf")


def test_tensor_past_last_layer(tmp_path, official):
    tensors = gguf_tensors(official) + [("blk.2.attn_norm.weight", (64,), np.ones(64, np.float32), "F32")]
    write(tmp_path / "m.gguf", official, tensors)

    with pytest.raises(CheckpointError, match=r"unexpected tensor 'blk.2.attn_norm.weight' in an RWKV-6 GGUF file"):
        read_weights(tmp_path / "m.gguf")


def test_unknown_tensor(tmp_path, official):
    tensors = gguf_tensors(official) + [("blk.0.time_mix_k_k.weight", (64,), np.ones(64, np.float32), "F32")]
    write(tmp_path / "m.gguf", official, tensors)

    with pytest.raises(CheckpointError, match=r"unexpected tensor 'blk.0.time_mix_k_k.weight'"):
        read_weights(tmp_path / "m.gguf")


def test_block_count_contradicting_tensors(tmp_path, official):
    write(tmp_path / "m.gguf", official, **{"rwkv6.block_count": 3})

    with pytest.raises(CheckpointError, match=r"missing tensor 'blk.2.attn_norm.weight' \(\d+ missing in all\)"):
        read_weights(tmp_path / "m.gguf")


def test_truncated_file(tmp_path, official):
    write(tmp_path / "m.gguf", official)
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "m.gguf").write_bytes(data[: len(data) - 1000])

    with pytest.raises(CheckpointError, match=r"m.gguf: file is truncated inside tensor"):
        read_weights(tmp_path / "m.gguf")
