"""Hugging Face RWKV-4/5/6 directories and directories with official tensor names.

Each directory is built from a committed parity fixture (official ``.pth``
weights) by ``hf_layout``, which renames the tensors as the converters do,
and must load to the same canonical weights and logits as the ``.pth``.
"""

import json
import logging
import re
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import rwkv_mlx
from rwkv_mlx.io.errors import CheckpointError
from rwkv_mlx.io.hf_older import is_hf_older_directory, load_hf_older_directory
from rwkv_mlx.io.pth import load_pth
from rwkv_mlx.loading import read_weights, save_model
from test_pth import op_state_dict, op_tensor, write_checkpoint

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
PROMPT = mx.array([[34, 105, 110]])  # the bytes '"in'

# Fixture -> (config.json model_type, canonical model_type, RWKV version).
CASES = {
    "rwkv4/rwkv4.pth": ("rwkv", "rwkv4", "4"),
    "rwkv5/rwkv5_0.pth": ("rwkv5", "rwkv5", "5"),
    "rwkv5/rwkv5_1.pth": ("rwkv5", "rwkv5", "5.1"),
    "rwkv5/rwkv5_2.pth": ("rwkv5", "rwkv5", "5.2"),
    "rwkv6/rwkv6.pth": ("rwkv6", "rwkv6", "6"),
}
ARCHITECTURES = {"rwkv": "RwkvForCausalLM", "rwkv5": "Rwkv5ForCausalLM", "rwkv6": "Rwkv6ForCausalLM"}


def hf_layout(official):
    """Rename official tensors as transformers' ``convert_rwkv_checkpoint_to_hf.py`` and the RWKV
    organisation's RWKV-5/6 converters do: ``emb`` -> ``embeddings``, layer 0's ``ln0`` -> ``pre_ln``,
    ``att`` -> ``attention``, ``ffn`` -> ``feed_forward``, ``time_mix_{k,v,r,g}`` ->
    ``time_mix_{key,value,receptance,gate}``, and ``rwkv.`` in front of all but ``head.weight``.
    Values and shapes stay as they are."""
    out = {}
    for name, value in official.items():
        if name.startswith("emb."):
            name = name.replace("emb.", "embeddings.")
        name = name.replace("blocks.0.ln0", "blocks.0.pre_ln")
        name = re.sub(r"blocks\.(\d+)\.att\.", r"blocks.\1.attention.", name)
        name = re.sub(r"blocks\.(\d+)\.ffn\.", r"blocks.\1.feed_forward.", name)
        for short, long in (("k", "key"), ("v", "value"), ("r", "receptance"), ("g", "gate")):
            if name.endswith(f".time_mix_{short}"):
                name = name[: -len(short)] + long
        out[name if name == "head.weight" else "rwkv." + name] = value
    return out


def hf_config(model_type, **overrides):
    """A config.json as the converters write it for the 64-wide, 2-layer fixtures."""
    config = {
        "architectures": [ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": 256,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "attention_hidden_size": 64,
        "intermediate_size": None,
        "layer_norm_epsilon": 1e-5,
        "rescale_every": 6,
        "tie_word_embeddings": False,
        "context_length": 4096,
    }
    if model_type != "rwkv":
        config["head_size"] = 32
    if model_type == "rwkv6":
        config["head_size_divisor"] = 8
    config.update(overrides)
    return config


def write_directory(path: Path, tensors, config, shards: int = 1) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    if shards == 1:
        mx.save_safetensors(str(path / "model.safetensors"), tensors)
        return path

    names = list(tensors)
    weight_map = {}
    for i in range(shards):
        shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = names[i::shards]
        mx.save_safetensors(str(path / shard), {name: tensors[name] for name in part})
        weight_map.update({name: shard for name in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def write_pytorch_bin(file: Path, tensors) -> Path:
    """Write tensors as float32 into a zip checkpoint laid out as ``torch.save`` writes ``pytorch_model.bin``."""
    entries, storages = {}, {}
    for key, (name, value) in enumerate(tensors.items()):
        data = np.array(value.astype(mx.float32))
        strides = [int(np.prod(data.shape[i + 1 :])) for i in range(data.ndim)]
        entries[name] = op_tensor("FloatStorage", str(key), data.size, 0, data.shape, strides)
        storages[str(key)] = data.astype("<f4").tobytes()
    return write_checkpoint(file, op_state_dict(entries), storages)


def official(fixture):
    return load_pth(FIXTURES / fixture)


def hf_directory(tmp_path, fixture="rwkv5/rwkv5_2.pth", **overrides) -> Path:
    config = hf_config(CASES[fixture][0])
    config.update(overrides)
    return write_directory(tmp_path / "hf", hf_layout(official(fixture)), config)


def assert_same_weights(ours, theirs):
    assert set(ours) == set(theirs)
    for name, value in theirs.items():
        assert ours[name].shape == value.shape, name
        assert mx.array_equal(ours[name].astype(mx.float32), value.astype(mx.float32)), name


def logits(source):
    model, _ = rwkv_mlx.load(str(source), dtype=mx.float32)
    return np.array(model(PROMPT))


# --- layouts ----------------------------------------------------------------


@pytest.mark.parametrize("fixture", list(CASES))
def test_hf_directory_equals_pth(tmp_path, fixture):
    model_type, canonical_type, version = CASES[fixture]
    directory = write_directory(tmp_path / "hf", hf_layout(official(fixture)), hf_config(model_type))

    weights, config = read_weights(directory)
    expected_weights, expected_config = read_weights(FIXTURES / fixture)

    assert_same_weights(weights, expected_weights)
    assert config == {**expected_config, "rescale_every": 6}
    assert config["model_type"] == canonical_type
    assert config["version"] == version
    assert np.array_equal(logits(directory), logits(FIXTURES / fixture))


def test_hf_names_follow_converters():
    tensors = hf_layout(official("rwkv5/rwkv5_2.pth"))

    for name in (
        "rwkv.embeddings.weight",
        "rwkv.blocks.0.pre_ln.weight",
        "rwkv.blocks.1.attention.time_mix_key",
        "rwkv.blocks.1.attention.time_mix_gate",
        "rwkv.blocks.1.attention.ln_x.bias",
        "rwkv.blocks.1.feed_forward.time_mix_receptance",
        "rwkv.ln_out.weight",
        "head.weight",
    ):
        assert name in tensors, name


def test_sharded_safetensors(tmp_path):
    tensors = hf_layout(official("rwkv6/rwkv6.pth"))
    directory = write_directory(tmp_path / "hf", tensors, hf_config("rwkv6"), shards=3)

    weights, _ = read_weights(directory)

    assert_same_weights(weights, read_weights(FIXTURES / "rwkv6/rwkv6.pth")[0])


def test_index_lists_missing_tensor(tmp_path):
    directory = write_directory(tmp_path / "hf", hf_layout(official("rwkv6/rwkv6.pth")), hf_config("rwkv6"), shards=2)
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    index["weight_map"]["rwkv.blocks.9.attention.key.weight"] = "model-00001-of-00002.safetensors"
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))

    with pytest.raises(CheckpointError, match=r"model-00001-of-00002.safetensors: missing tensor 'rwkv.blocks.9"):
        read_weights(directory)


def test_pytorch_bin_weights(tmp_path):
    directory = tmp_path / "hf"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(hf_config("rwkv")))
    write_pytorch_bin(directory / "pytorch_model.bin", hf_layout(official("rwkv4/rwkv4.pth")))

    weights, config = read_weights(directory)

    assert config["model_type"] == "rwkv4"
    assert_same_weights(weights, read_weights(FIXTURES / "rwkv4/rwkv4.pth")[0])


def test_sharded_pytorch_bin_weights(tmp_path):
    tensors = hf_layout(official("rwkv5/rwkv5_1.pth"))
    directory = tmp_path / "hf"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(hf_config("rwkv5")))
    names = list(tensors)
    weight_map = {}
    for i in range(2):
        shard = f"pytorch_model-{i + 1:05d}-of-00002.bin"
        write_pytorch_bin(directory / shard, {name: tensors[name] for name in names[i::2]})
        weight_map.update({name: shard for name in names[i::2]})
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))

    weights, config = read_weights(directory)

    assert config["version"] == "5.1"
    assert_same_weights(weights, read_weights(FIXTURES / "rwkv5/rwkv5_1.pth")[0])


def test_official_names_in_pytorch_bin(tmp_path):
    directory = tmp_path / "official"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"model_type": "rwkv6"}))
    shutil.copy(FIXTURES / "rwkv6/rwkv6.pth", directory / "pytorch_model.bin")

    weights, config = read_weights(directory)
    expected_weights, expected_config = read_weights(FIXTURES / "rwkv6/rwkv6.pth")

    assert_same_weights(weights, expected_weights)
    assert config == expected_config


def test_rwkv7_with_official_names(tmp_path):
    # RWKV-7 remote code from the RWKV-block project stores BlinkDL's names in safetensors.
    directory = write_directory(
        tmp_path / "goose",
        official("rwkv7/tiny.pth"),
        {"model_type": "rwkv7", "architectures": ["RWKV7ForCausalLM"], "num_hidden_layers": 2},
    )

    weights, config = read_weights(directory)
    expected_weights, expected_config = read_weights(FIXTURES / "rwkv7/tiny.pth")

    assert_same_weights(weights, expected_weights)
    assert config == expected_config
    assert np.array_equal(logits(directory), logits(FIXTURES / "rwkv7/tiny.pth"))


def test_base_model_without_prefix(tmp_path):
    tensors = {name.removeprefix("rwkv."): value for name, value in hf_layout(official("rwkv4/rwkv4.pth")).items()}
    directory = write_directory(tmp_path / "hf", tensors, hf_config("rwkv"))

    weights, _ = read_weights(directory)

    assert_same_weights(weights, read_weights(FIXTURES / "rwkv4/rwkv4.pth")[0])


def test_tied_head_from_embeddings(tmp_path):
    tensors = hf_layout(official("rwkv4/rwkv4.pth"))
    del tensors["head.weight"]
    directory = write_directory(tmp_path / "hf", tensors, hf_config("rwkv", tie_word_embeddings=True))

    weights, _ = read_weights(directory)

    assert mx.array_equal(weights["lm_head.weight"], weights["model.embeddings.weight"])


def test_config_only_fields_kept(tmp_path):
    directory = hf_directory(tmp_path, layer_norm_epsilon=1e-6, rescale_every=0)

    _, config = read_weights(directory)

    assert config["norm_eps"] == pytest.approx(1e-6)
    assert config["rescale_every"] == 0


def test_head_size_divisor_warns(tmp_path, caplog):
    directory = hf_directory(tmp_path, fixture="rwkv6/rwkv6.pth", head_size_divisor=4)

    with caplog.at_level(logging.WARNING, logger="rwkv_mlx.io.hf_older"):
        read_weights(directory)

    assert "field 'head_size_divisor' is 4" in caplog.text


# --- which reader takes a directory -----------------------------------------


def test_detects_hf_and_official_layouts(tmp_path):
    assert is_hf_older_directory(hf_directory(tmp_path))
    assert is_hf_older_directory(write_directory(tmp_path / "o", official("rwkv4/rwkv4.pth"), {"model_type": "x"}))


def test_own_saved_directory_not_taken(tmp_path):
    model, _ = rwkv_mlx.load(str(FIXTURES / "rwkv5/rwkv5_2.pth"))
    _, config = read_weights(FIXTURES / "rwkv5/rwkv5_2.pth")
    save_model(tmp_path / "saved", model, config)

    assert not is_hf_older_directory(tmp_path / "saved")
    assert read_weights(tmp_path / "saved")[1]["version"] == "5.2"


def test_fla_directory_not_taken(tmp_path):
    tensors = {"model.embeddings.weight": mx.zeros((8, 4)), "model.layers.0.attn.r_k": mx.zeros((2, 2))}

    assert not is_hf_older_directory(write_directory(tmp_path / "fla", tensors, {"model_type": "rwkv7"}))


def test_directory_without_config_not_taken(tmp_path):
    directory = hf_directory(tmp_path)
    (directory / "config.json").unlink()

    assert not is_hf_older_directory(directory)


# --- versions ----------------------------------------------------------------


def test_rwkv5_never_read_as_rwkv7(tmp_path):
    directory = hf_directory(tmp_path, model_type="rwkv7")

    with pytest.raises(CheckpointError, match=r"config.json: field 'model_type' is 'rwkv7' \(RWKV-7\).*RWKV-5.2"):
        read_weights(directory)


def test_model_type_contradicting_tensors(tmp_path):
    directory = hf_directory(tmp_path, fixture="rwkv6/rwkv6.pth", model_type="rwkv")

    with pytest.raises(CheckpointError, match=r"field 'model_type' is 'rwkv' \(RWKV-4\), but the tensors are RWKV-6"):
        read_weights(directory)


# --- bad input ---------------------------------------------------------------


def test_missing_tensor_named_as_in_file(tmp_path):
    tensors = hf_layout(official("rwkv5/rwkv5_2.pth"))
    del tensors["rwkv.blocks.1.attention.key.weight"]
    directory = write_directory(tmp_path / "hf", tensors, hf_config("rwkv5"))

    with pytest.raises(CheckpointError, match=r"hf: missing tensor 'rwkv.blocks.1.attention.key.weight' \(1 missing"):
        read_weights(directory)


def test_missing_head_count_tensor(tmp_path):
    tensors = hf_layout(official("rwkv6/rwkv6.pth"))
    del tensors["rwkv.blocks.0.attention.time_faaaa"]
    directory = write_directory(tmp_path / "hf", tensors, hf_config("rwkv6"))

    with pytest.raises(CheckpointError, match=r"missing tensor 'rwkv.blocks.0.attention.time_faaaa'"):
        read_weights(directory)


def test_missing_head_without_tie(tmp_path):
    tensors = hf_layout(official("rwkv4/rwkv4.pth"))
    del tensors["head.weight"]
    directory = write_directory(tmp_path / "hf", tensors, hf_config("rwkv"))

    with pytest.raises(CheckpointError, match=r"missing tensor 'head.weight'.*tie_word_embeddings"):
        read_weights(directory)


def test_mis_shaped_matrix_named_with_its_file(tmp_path):
    tensors = hf_layout(official("rwkv5/rwkv5_2.pth"))
    tensors["rwkv.blocks.1.feed_forward.value.weight"] = mx.zeros((64, 200))
    directory = write_directory(tmp_path / "hf", tensors, hf_config("rwkv5"))

    with pytest.raises(
        CheckpointError,
        match=r"model.safetensors: tensor 'rwkv.blocks.1.feed_forward.value.weight' has shape \[64, 200\], "
        r"expected \[64, 224\]",
    ):
        read_weights(directory)


def test_mis_shaped_first_layer_tensor_named(tmp_path):
    # Layer 0's channel-mix key gives the intermediate size; config.json's size names it as the wrong one.
    tensors = hf_layout(official("rwkv4/rwkv4.pth"))
    tensors["rwkv.blocks.0.feed_forward.key.weight"] = mx.zeros((200, 64))
    directory = write_directory(tmp_path / "hf", tensors, hf_config("rwkv", intermediate_size=256))

    with pytest.raises(CheckpointError, match=r"tensor 'rwkv.blocks.0.feed_forward.key.weight' has shape \[200, 64\]"):
        read_weights(directory)


def test_mis_sized_vector_named(tmp_path):
    tensors = hf_layout(official("rwkv5/rwkv5_2.pth"))
    tensors["rwkv.blocks.1.attention.time_mix_key"] = mx.zeros((1, 1, 60))
    directory = write_directory(tmp_path / "hf", tensors, hf_config("rwkv5"))

    with pytest.raises(
        CheckpointError,
        match=r"tensor 'rwkv.blocks.1.attention.time_mix_key' has shape \[1, 1, 60\], expected 64 values",
    ):
        read_weights(directory)


def test_unexpected_tensor_named(tmp_path):
    tensors = hf_layout(official("rwkv6/rwkv6.pth"))
    tensors["rwkv.blocks.1.attention.mystery"] = mx.zeros((64,))
    directory = write_directory(tmp_path / "hf", tensors, hf_config("rwkv6"))

    with pytest.raises(CheckpointError, match=r"unexpected tensor 'rwkv.blocks.1.attention.mystery'"):
        read_weights(directory)


def test_unknown_first_layer_tensors_named(tmp_path):
    tensors = {"rwkv.embeddings.weight": mx.zeros((8, 4)), "rwkv.blocks.0.attention.mystery": mx.zeros((4,))}
    directory = write_directory(tmp_path / "hf", tensors, hf_config("rwkv"))

    with pytest.raises(CheckpointError, match=r"match no RWKV version.*found 'rwkv.blocks.0.attention.mystery'"):
        read_weights(directory)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("hidden_size", 128, "field 'hidden_size' is 128, but the weights have 64"),
        ("num_hidden_layers", 3, "field 'num_hidden_layers' is 3, but the weights have 2"),
        ("vocab_size", 65536, "field 'vocab_size' is 65536, but the weights have 256"),
        ("head_size", 64, "field 'head_size' is 64, but the weights have 32"),
        ("attention_hidden_size", 128, "field 'attention_hidden_size' is 128, but only an attention width equal"),
    ],
)
def test_config_contradicting_tensors(tmp_path, field, value, message):
    directory = hf_directory(tmp_path, **{field: value})

    with pytest.raises(CheckpointError, match=re.escape(message)):
        read_weights(directory)


def test_not_an_rwkv_layout(tmp_path):
    tensors = {"rwkv.embeddings.weight": mx.zeros((8, 4)), "rwkv.layers.0.q.weight": mx.zeros((4, 4))}
    directory = write_directory(tmp_path / "hf", tensors, hf_config("rwkv"))

    with pytest.raises(CheckpointError, match=r"hf: the tensors are not in the Hugging Face RWKV layout"):
        load_hf_older_directory(directory)


@pytest.mark.parametrize("model_type", ["rwkv", "rwkv5", "rwkv6"])
def test_no_weight_files(tmp_path, model_type):
    directory = tmp_path / "hf"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(hf_config(model_type)))

    with pytest.raises(CheckpointError, match=r"hf: no weight files in the model directory"):
        read_weights(directory)


def test_corrupt_safetensors_header(tmp_path):
    directory = hf_directory(tmp_path)
    (directory / "model.safetensors").write_bytes(b"\xff" * 16)

    with pytest.raises(CheckpointError, match=r"model.safetensors: cannot read the safetensors header"):
        read_weights(directory)
