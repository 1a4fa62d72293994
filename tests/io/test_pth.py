"""The torch-free ``.pth`` reader and RWKV version detection.

``storage_views.pth`` was written by ``torch.save`` (see
``tests/fixtures/make_reference.py``). The other checkpoints here are built
by hand: a zip archive and a pickle assembled opcode by opcode, so that the
tests need no torch and a malicious pickle is never produced by pickling a
live object.
"""

import json
import struct
import zipfile
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from rwkv_mlx.io.errors import CheckpointError
from rwkv_mlx.io.pth import detect_version, load_pth

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "rwkv7"


# Protocol-2 pickle opcodes, enough to spell a state dict of tensors.
def op_global(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def op_text(text: str) -> bytes:
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def op_int(value: int) -> bytes:
    return b"J" + struct.pack("<i", value)


def op_tuple(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


def op_tensor(storage_type: str, key: str, numel: int, offset: int, size, stride) -> bytes:
    """Spell ``_rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())`` as torch does."""
    storage = op_tuple(
        op_text("storage"), op_global("torch", storage_type), op_text(key), op_text("cpu"), op_int(numel)
    )
    hooks = op_global("collections", "OrderedDict") + b")R"
    arguments = op_tuple(
        storage + b"Q",
        op_int(offset),
        op_tuple(*(op_int(n) for n in size)),
        op_tuple(*(op_int(s) for s in stride)),
        b"\x89",
        hooks,
    )
    return op_global("torch._utils", "_rebuild_tensor_v2") + arguments + b"R"


def op_state_dict(entries: dict) -> bytes:
    body = b"".join(op_text(name) + value for name, value in entries.items())
    return b"\x80\x02}(" + body + b"u."


def write_checkpoint(path: Path, pickled: bytes, storages: dict = None, byteorder: bytes = b"little") -> Path:
    """Write a zip checkpoint laid out as torch.save lays it out."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickled)
        if byteorder is not None:
            archive.writestr("archive/byteorder", byteorder)
        for key, data in (storages or {}).items():
            archive.writestr(f"archive/data/{key}", data)
        archive.writestr("archive/version", b"3\n")
    return path


def as_float32(array: mx.array) -> np.ndarray:
    return np.array(array.astype(mx.float32))


# Files written by torch.


def test_torch_written_views_match_values():
    tensors = load_pth(FIXTURES / "storage_views.pth")
    expected = np.load(FIXTURES / "storage_views.npz")
    dtypes = json.loads(str(expected["dtypes"]))

    assert list(tensors) == list(dtypes)
    for name, array in tensors.items():
        assert str(array.dtype) == f"mlx.core.{dtypes[name]}", name
        assert array.shape == expected[name].shape, name
        np.testing.assert_array_equal(as_float32(array), expected[name].astype(np.float32), err_msg=name)


def test_torch_written_model_keeps_dtype():
    tensors = load_pth(FIXTURES / "tiny.pth")

    assert tensors["emb.weight"].dtype == mx.bfloat16
    assert tensors["blocks.0.att.r_k"].shape == (2, 64)
    assert tensors["blocks.1.att.x_r"].shape == (1, 1, 128)
    assert detect_version(tensors) == "7"


# Layouts built by hand.


def test_shared_storage_offsets_and_strides(tmp_path):
    storage = np.arange(12, dtype="<f4")
    pickled = op_state_dict(
        {
            "matrix": op_tensor("FloatStorage", "0", 12, 0, (3, 4), (4, 1)),
            "transposed": op_tensor("FloatStorage", "0", 12, 0, (4, 3), (1, 4)),
            "corner": op_tensor("FloatStorage", "0", 12, 5, (2, 2), (4, 1)),
            "scalar": op_tensor("FloatStorage", "0", 12, 11, (), ()),
        }
    )
    path = write_checkpoint(tmp_path / "views.pth", pickled, {"0": storage.tobytes()})

    tensors = load_pth(path)

    matrix = storage.reshape(3, 4)
    np.testing.assert_array_equal(np.array(tensors["matrix"]), matrix)
    np.testing.assert_array_equal(np.array(tensors["transposed"]), matrix.T)
    np.testing.assert_array_equal(np.array(tensors["corner"]), matrix[1:3, 1:3])
    assert tensors["scalar"].shape == ()
    assert tensors["scalar"].item() == 11.0


@pytest.mark.parametrize("byteorder", [b"big", b"little", None])
def test_byteorder_marker(tmp_path, byteorder):
    order = ">" if byteorder == b"big" else "<"
    floats = np.array([1.5, -2.25, 3.0], dtype=order + "f4")
    halves = np.array([0.5, -7.0], dtype=order + "f2")
    brain = (np.array([1.0, -0.375], dtype=np.float32).view(np.uint32) >> 16).astype(order + "u2")
    pickled = op_state_dict(
        {
            "f": op_tensor("FloatStorage", "0", 3, 0, (3,), (1,)),
            "h": op_tensor("HalfStorage", "1", 2, 0, (2,), (1,)),
            "b": op_tensor("BFloat16Storage", "2", 2, 0, (2,), (1,)),
        }
    )
    storages = {"0": floats.tobytes(), "1": halves.tobytes(), "2": brain.tobytes()}
    path = write_checkpoint(tmp_path / "order.pth", pickled, storages, byteorder=byteorder)

    tensors = load_pth(path)

    assert tensors["f"].tolist() == [1.5, -2.25, 3.0]
    assert tensors["h"].dtype == mx.float16
    assert tensors["h"].tolist() == [0.5, -7.0]
    assert tensors["b"].dtype == mx.bfloat16
    assert as_float32(tensors["b"]).tolist() == [1.0, -0.375]


# Files that are not a readable checkpoint.


def test_missing_file(tmp_path):
    path = tmp_path / "absent.pth"

    with pytest.raises(CheckpointError, match="absent.pth: file not found"):
        load_pth(path)


def test_truncated_zip(tmp_path):
    data = (FIXTURES / "storage_views.pth").read_bytes()
    path = tmp_path / "cut.pth"
    path.write_bytes(data[: len(data) // 2])

    with pytest.raises(CheckpointError, match="cut.pth: the zip archive is truncated or corrupt"):
        load_pth(path)


def test_corrupt_storage_bytes(tmp_path):
    storage = np.arange(64, dtype="<f4").tobytes()
    pickled = op_state_dict({"x": op_tensor("FloatStorage", "0", 64, 0, (64,), (1,))})
    path = write_checkpoint(tmp_path / "flipped.pth", pickled, {"0": storage})
    data = bytearray(path.read_bytes())
    data[data.index(storage) + 100] ^= 0xFF
    path.write_bytes(bytes(data))

    with pytest.raises(CheckpointError, match=r"storage entry 'data/0' is truncated or corrupt"):
        load_pth(path)


def test_not_a_zip(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("these are not weights")

    with pytest.raises(CheckpointError, match="notes.pth: not a PyTorch checkpoint: expected a zip archive"):
        load_pth(path)


def test_legacy_torch_format(tmp_path):
    path = tmp_path / "old.pth"
    path.write_bytes(b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19.")

    with pytest.raises(CheckpointError, match="legacy format"):
        load_pth(path)


def test_zip_without_data_pkl(tmp_path):
    path = tmp_path / "other.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "hello")

    with pytest.raises(CheckpointError, match="expected one '<archive>/data.pkl' entry, found 0"):
        load_pth(path)


@pytest.mark.parametrize(
    "module, name", [("os", "system"), ("builtins", "eval"), ("subprocess", "call"), ("torch", "load")]
)
def test_forbidden_global_never_runs(tmp_path, module, name):
    marker = tmp_path / "ran"
    command = f"open({str(marker)!r}, 'w')" if name == "eval" else f"touch {marker}"
    pickled = b"\x80\x02" + op_global(module, name) + op_tuple(op_text(command)) + b"R."
    path = write_checkpoint(tmp_path / "evil.pth", pickled)

    with pytest.raises(CheckpointError, match=f"references the global '{module}.{name}'"):
        load_pth(path)
    assert not marker.exists()


def test_forbidden_global_by_stack_global(tmp_path):
    marker = tmp_path / "ran"
    # Protocol 4 names the global with two strings and STACK_GLOBAL.
    pickled = (
        b"\x80\x04\x8c\x02os\x94\x8c\x06system\x94\x93"
        + op_tuple(op_text(f"touch {marker}"))
        + b"R."
    )
    path = write_checkpoint(tmp_path / "evil4.pth", pickled)

    with pytest.raises(CheckpointError, match="references the global 'os.system'"):
        load_pth(path)
    assert not marker.exists()


def test_forbidden_global_inside_tensor(tmp_path):
    tensor = op_tensor("FloatStorage", "0", 1, 0, (1,), (1,))
    hidden = tensor.replace(op_global("collections", "OrderedDict"), op_global("builtins", "exec"))
    path = write_checkpoint(tmp_path / "hooks.pth", op_state_dict({"w": hidden}), {"0": b"\0" * 4})

    with pytest.raises(CheckpointError, match="references the global 'builtins.exec'"):
        load_pth(path)


def test_build_on_storage_type_rejected(tmp_path):
    # BUILD with a dict would rewrite the shared FloatStorage stand-in.
    pickled = b"\x80\x02" + op_global("torch", "FloatStorage") + b"}" + op_text("dtype") + op_text("int64") + b"sb."
    path = write_checkpoint(tmp_path / "build.pth", pickled)

    with pytest.raises(CheckpointError, match="not a valid tensor pickle"):
        load_pth(path)
    assert load_pth(FIXTURES / "storage_views.pth")["fp32.matrix"].dtype == mx.float32


@pytest.mark.parametrize(
    "storage_type, dtype, itemsize",
    [("LongStorage", "int64", 8), ("DoubleStorage", "float64", 8), ("UntypedStorage", "uint8", 1)],
)
def test_unsupported_storage_dtype(tmp_path, storage_type, dtype, itemsize):
    pickled = op_state_dict(
        {
            "weight": op_tensor("FloatStorage", "0", 2, 0, (2,), (1,)),
            "step": op_tensor(storage_type, "1", 1, 0, (1,), (1,)),
        }
    )
    path = write_checkpoint(tmp_path / "ints.pth", pickled, {"0": b"\0" * 8, "1": b"\0" * itemsize})

    with pytest.raises(CheckpointError, match=f"tensor 'step' is stored as {dtype}"):
        load_pth(path)


def test_view_past_storage_end(tmp_path):
    pickled = op_state_dict({"wide": op_tensor("FloatStorage", "0", 4, 1, (2, 2), (2, 1))})
    path = write_checkpoint(tmp_path / "overrun.pth", pickled, {"0": b"\0" * 16})

    with pytest.raises(CheckpointError, match="tensor 'wide' .* past the end of its storage '0' of 4 elements"):
        load_pth(path)


def test_storage_entry_shorter_than_numel(tmp_path):
    pickled = op_state_dict({"w": op_tensor("FloatStorage", "0", 4, 0, (4,), (1,))})
    path = write_checkpoint(tmp_path / "short.pth", pickled, {"0": b"\0" * 12})

    with pytest.raises(CheckpointError, match="'data/0' has 12 bytes, expected 16"):
        load_pth(path)


def test_missing_storage_entry(tmp_path):
    pickled = op_state_dict({"w": op_tensor("FloatStorage", "7", 1, 0, (1,), (1,))})
    path = write_checkpoint(tmp_path / "lost.pth", pickled)

    with pytest.raises(CheckpointError, match="storage entry 'data/7' is missing"):
        load_pth(path)


def test_unknown_byteorder(tmp_path):
    pickled = op_state_dict({})
    path = write_checkpoint(tmp_path / "middle.pth", pickled, byteorder=b"middle")

    with pytest.raises(CheckpointError, match="entry 'byteorder' is b'middle'"):
        load_pth(path)


def test_non_tensor_entry(tmp_path):
    pickled = op_state_dict({"_strategy": op_text("cuda fp16")})
    path = write_checkpoint(tmp_path / "converted.pth", pickled)

    with pytest.raises(CheckpointError, match="entry '_strategy' is a str, not a tensor"):
        load_pth(path)


def test_top_level_not_a_dict(tmp_path):
    path = write_checkpoint(tmp_path / "list.pth", b"\x80\x02]q\x00.")

    with pytest.raises(CheckpointError, match="data.pkl contains a list"):
        load_pth(path)


def test_truncated_pickle(tmp_path):
    pickled = op_state_dict({"w": op_tensor("FloatStorage", "0", 1, 0, (1,), (1,))})
    path = write_checkpoint(tmp_path / "half.pth", pickled[:40], {"0": b"\0" * 4})

    with pytest.raises(CheckpointError, match="entry 'data.pkl'"):
        load_pth(path)


# Version detection.


def shapes_to_weights(shapes: dict) -> dict:
    return {name: mx.zeros(shape) for name, shape in shapes.items()}


C, H, N, V = 64, 2, 32, 256
VERSION_CASES = {
    "7": {"blocks.0.att.k_k": (1, 1, C), "blocks.0.att.w0": (1, 1, C), "blocks.0.att.ln_x.weight": (C,)},
    "6": {
        "blocks.0.att.time_maa_x": (1, 1, C),
        "blocks.0.att.time_decay_w1": (C, 64),
        "blocks.0.att.time_faaaa": (H, N),
        "blocks.0.att.ln_x.weight": (C,),
        "blocks.0.att.gate.weight": (C, C),
    },
    "5.2": {
        "blocks.0.att.time_decay": (H, N),
        "blocks.0.att.time_faaaa": (H, N),
        "blocks.0.att.ln_x.weight": (C,),
        "blocks.0.att.gate.weight": (C, C),
    },
    "5.1": {
        "blocks.0.att.time_decay": (H,),
        "blocks.0.att.time_first": (H,),
        "blocks.0.att.ln_x.weight": (C,),
        "blocks.0.att.gate.weight": (C, C),
    },
    "5": {"blocks.0.att.time_decay": (H,), "blocks.0.att.time_first": (H,), "blocks.0.att.ln_x.weight": (C,)},
    "4": {"blocks.0.att.time_decay": (C,), "blocks.0.att.time_first": (C,), "blocks.0.att.key.weight": (C, C)},
}


@pytest.mark.parametrize("version", list(VERSION_CASES))
def test_detect_version(version):
    weights = shapes_to_weights({"emb.weight": (V, C), **VERSION_CASES[version]})

    assert detect_version(weights) == version


def test_detect_version_per_head_decay_column():
    shapes = dict(VERSION_CASES["5.1"], **{"blocks.0.att.time_decay": (H, 1)})
    weights = shapes_to_weights({"emb.weight": (V, C), **shapes})

    assert detect_version(weights) == "5.1"


def test_detect_version_not_rwkv():
    weights = shapes_to_weights({"model.embed_tokens.weight": (V, C), "model.layers.0.self_attn.q_proj.weight": (C, C)})

    with pytest.raises(CheckpointError, match="llama.pth: not an RWKV checkpoint.*'model.embed_tokens.weight'"):
        detect_version(weights, "llama.pth")


def test_detect_version_unknown_layer(tmp_path):
    weights = shapes_to_weights({"emb.weight": (V, C), "blocks.0.att.mystery": (C,)})

    with pytest.raises(CheckpointError, match="match no RWKV version.*'blocks.0.att.mystery'"):
        detect_version(weights, "odd.pth")


def test_detect_version_of_loaded_non_rwkv_file(tmp_path):
    pickled = op_state_dict({"fc.weight": op_tensor("FloatStorage", "0", 4, 0, (2, 2), (2, 1))})
    path = write_checkpoint(tmp_path / "mlp.pth", pickled, {"0": b"\0" * 16})

    with pytest.raises(CheckpointError, match="mlp.pth: not an RWKV checkpoint.*found 'fc.weight'"):
        detect_version(load_pth(path), str(path))
