"""RWKV-4, RWKV-5 (5.0, 5.1, 5.2) and RWKV-6: parity with the reference, real tiny models,
padding, caches, float16, loading, version detection and the shared tools.

``tests/fixtures/make_reference_older.py`` wrote each ``rwkv*/<name>.pth``
(random weights in the official layout) and ``<name>.npz`` (what BlinkDL's
``rwkv`` package 0.8.32 computed for it in float32). The reference keeps
RWKV-4's WKV state as the vectors (aa, bb, pp), which map onto cache entry 1
[B, 3, C] unchanged, and RWKV-5/6's WKV state as [H, key, value], the
transpose of cache entry 1 [B, H, value, key].
"""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

import rwkv_mlx
from rwkv_mlx.io import pth, rwkv_cpp
from rwkv_mlx.io.errors import CheckpointError
from rwkv_mlx.io.layout_older import infer_config, official_to_canonical
from rwkv_mlx.loading import build_model, load_model, save_model
from rwkv_mlx.models import rwkv4, rwkv5, rwkv6
from random_models import OLDER_MODULES, random_older_model, two_layer_older_config

FIXTURES = Path(__file__).resolve().parent / "fixtures"
PARITY_CASES = {
    "rwkv4": ("rwkv4", "4", rwkv4),
    "rwkv5_0": ("rwkv5", "5", rwkv5),
    "rwkv5_1": ("rwkv5", "5.1", rwkv5),
    "rwkv5_2": ("rwkv5", "5.2", rwkv5),
    "rwkv6": ("rwkv6", "6", rwkv6),
}
PROMPT = (34, 105, 110)  # the bytes '"in'

# The reference's own whole-sequence and token-by-token paths differ by
# about 5e-6 in the logits on these fixtures (each .npz stores the gaps).
LOGITS_TOLERANCE = 1e-4
# WKV states reach about 30 (RWKV-4's exponent pp about 115), so they are
# compared relative to max(1, |value|).
STATE_TOLERANCE = 5e-5


def fixture_path(name: str, suffix: str) -> Path:
    return FIXTURES / PARITY_CASES[name][0] / f"{name}{suffix}"


@pytest.fixture(scope="module", params=list(PARITY_CASES))
def case(request):
    """Load one fixture's model in float32 with its reference outputs."""
    # The reference ran in float32 on the stored bfloat16 or float16 values
    # widened exactly, so both sides use the same weights.
    model, _ = rwkv_mlx.load(str(fixture_path(request.param, ".pth")), dtype=mx.float32)
    reference = np.load(fixture_path(request.param, ".npz"))
    return request.param, model, reference


def relative_gap(ours: mx.array, theirs: np.ndarray) -> float:
    ours = np.array(ours.astype(mx.float32), dtype=np.float64)
    return float((np.abs(ours - theirs) / np.maximum(1.0, np.abs(theirs))).max())


def max_gap(ours, theirs) -> float:
    return float(np.abs(np.array(mx.array(ours).astype(mx.float32), dtype=np.float64) - np.asarray(theirs)).max())


def assert_state_matches(cache, reference, version: str) -> None:
    for i, layer in enumerate(cache):
        wkv = layer[1]
        expected = reference["state_wkv"][i]
        if version != "4":
            expected = expected.swapaxes(-1, -2)  # [H, key, value] -> [H, value, key]
        assert wkv.dtype == mx.float32, f"layer {i} WKV state dtype"
        assert wkv.shape == (1,) + expected.shape, f"layer {i} WKV state shape"
        assert relative_gap(wkv[0], expected) <= STATE_TOLERANCE, f"layer {i} WKV state"
        assert max_gap(layer[0][0, 0], reference["state_att_x"][i]) <= 1e-5, f"layer {i} time-mix token shift"
        assert max_gap(layer[2][0, 0], reference["state_ffn_x"][i]) <= 1e-5, f"layer {i} channel-mix token shift"


# ---------------------------------------------------------------- parity with the reference


def test_fixture_config_and_class(case):
    name, model, reference = case
    _, version, module = PARITY_CASES[name]
    config = json.loads(str(reference["config"]))

    assert isinstance(model, module.Model)
    assert model.model_type == f"rwkv{version[0]}"
    assert model.args.num_hidden_layers == config["n_layer"]
    assert model.args.hidden_size == config["n_embd"]
    assert model.args.vocab_size == config["vocab_size"]
    assert model.args.intermediate_size == config["dim_ffn"]
    if version != "4":
        assert model.args.head_dim == config["head_size"]
    if version.startswith("5"):
        assert model.args.version == version
    if version == "6":
        assert model.args.mix_low_rank_dim == config["mix_rank"]
        assert model.args.decay_low_rank_dim == config["decay_rank"]


def test_prefill_matches_reference(case):
    name, model, reference = case
    tokens = mx.array(reference["tokens"])[None]

    cache = model.make_cache()
    logits = model(tokens, cache=cache)
    mx.eval(logits, cache)

    assert logits.shape == (1,) + reference["logits_all"].shape
    assert max_gap(logits[0], reference["logits_all"]) <= LOGITS_TOLERANCE
    assert_state_matches(cache, reference, PARITY_CASES[name][1])


def test_token_by_token_matches_reference(case):
    name, model, reference = case
    tokens = mx.array(reference["tokens"])[None]

    cache = model.make_cache()
    steps = []
    for t in range(tokens.shape[1]):
        logits = model(tokens[:, t : t + 1], cache=cache)
        mx.eval(logits, cache)
        steps.append(logits[0, 0])

    assert max_gap(mx.stack(steps), reference["logits_step"]) <= LOGITS_TOLERANCE
    assert_state_matches(cache, reference, PARITY_CASES[name][1])


# ---------------------------------------------------------------- real tiny models


@pytest.mark.parametrize(
    "file, expected_file, module",
    [
        ("tiny-rwkv-4v0-660K-FP32.bin", "expected-logits-4v0-660K.bin", rwkv4),
        ("tiny-rwkv-5v2-730K-FP32.bin", "expected-logits-5v2-730K.bin", rwkv5),
    ],
)
def test_rwkv_cpp_tiny_logits(rwkv_cpp_tiny, file, expected_file, module):
    expected = np.fromfile(rwkv_cpp_tiny / expected_file, dtype=np.float32)
    model, config, _ = load_model(str(rwkv_cpp_tiny / file))
    assert isinstance(model, module.Model)

    cache = model.make_cache()
    for token in PROMPT:
        logits = model(mx.array([[token]]), cache=cache)
    whole = model(mx.array([PROMPT]))

    assert max_gap(logits[0, -1], expected) <= 1e-4
    assert max_gap(whole[0, -1], expected) <= 1e-4


def test_rwkv_cpp_v5_keeps_its_group_norm_epsilon(rwkv_cpp_tiny):
    _, config, _ = load_model(str(rwkv_cpp_tiny / "tiny-rwkv-5v2-730K-FP32.bin"))

    assert config["version"] == "5.2"
    assert config["group_norm_eps"] == 1e-5


# ---------------------------------------------------------------- random models of every version


def tiny_config(version: str) -> dict:
    return two_layer_older_config(version, vocab_size=64, hidden_size=32, intermediate_size=96, head_dim=16)


MODULES = OLDER_MODULES
VERSIONS = list(MODULES)


def random_model(version: str, config: dict = None, seed: int = 0, output_growth: float = 1.0):
    """Build a model of one version with random weights (``random_older_model``), in eval mode."""
    model = random_older_model(version, config or tiny_config(version), seed, output_growth)
    model.eval()
    return model


@pytest.mark.parametrize("version", VERSIONS)
def test_cache_entries_have_documented_shapes(version):
    model = random_model(version)
    cache = model.make_cache()
    model(mx.array([[1, 2, 3], [4, 5, 6]]), cache=cache)

    C = 32
    wkv_shape = (2, 3, C) if version == "4" else (2, 2, 16, 16)
    for layer in cache:
        assert layer[0].shape == (2, 1, C)
        assert layer[1].shape == wkv_shape
        assert layer[1].dtype == mx.float32
        assert layer[2].shape == (2, 1, C)


@pytest.mark.parametrize("version", VERSIONS)
def test_cache_of_another_model_or_batch_rejected(version):
    model = random_model(version)
    ids = mx.array([[1, 2, 3]])
    expected = model(ids)
    batch_of_two = model.make_cache()
    model(mx.array([[1, 2, 3], [4, 5, 6]]), cache=batch_of_two)
    other_version = "6" if version == "4" else "4"
    foreign = random_model(other_version).make_cache()
    random_model(other_version)(ids, cache=foreign)

    with pytest.raises(ValueError, match="the cache has 3 layers but the model has 2"):
        model(ids, cache=model.make_cache() + model.make_cache()[:1])
    with pytest.raises(ValueError, match=r"the cache contains a batch of 2 sequences \(layer 0's time-mix token shift\), but the input has 1"):
        model(ids, cache=batch_of_two)
    with pytest.raises(ValueError, match="layer 0's WKV state in the cache has shape"):
        model(ids, cache=foreign)
    with pytest.raises(ValueError, match="expected token ids as an integer array"):
        model(ids.astype(mx.float32))

    assert mx.array_equal(model(ids), expected).item()


@pytest.mark.parametrize("version", VERSIONS)
def test_prefill_in_pieces_equals_whole(version):
    model = random_model(version)
    tokens = mx.array(np.random.default_rng(1).integers(0, 64, (1, 41)))

    whole = model(tokens)
    cache = model.make_cache()
    first = model(tokens[:, :17], cache=cache)
    second = model(tokens[:, 17:], cache=cache)

    assert max_gap(mx.concatenate([first, second], axis=1), whole) <= 1e-4


@pytest.mark.parametrize("version", VERSIONS)
def test_left_padding_leaves_state_alone(version):
    model = random_model(version)
    rng = np.random.default_rng(2)
    short = rng.integers(0, 64, 20)
    full = rng.integers(0, 64, 23)
    batch = mx.array(np.stack([np.concatenate([[0, 0, 0], short]), full]))
    mask = mx.array(np.stack([np.arange(23) >= 3, np.ones(23, dtype=bool)]))

    cache = model.make_cache()
    logits = model(batch, cache=cache, mask=mask)
    alone_cache = model.make_cache()
    alone = model(mx.array(short)[None], cache=alone_cache)

    assert max_gap(logits[0, 3:], alone[0]) <= 1e-4
    for layer, alone_layer in zip(cache, alone_cache):
        for index in range(3):
            assert max_gap(layer[index][0], alone_layer[index][0]) <= 1e-4 * max(
                1.0, float(mx.abs(alone_layer[index]).max())
            ), f"cache entry {index}"


@pytest.mark.parametrize("version", VERSIONS)
def test_trailing_padding_keeps_state(version):
    model = random_model(version)
    tokens = mx.array(np.random.default_rng(3).integers(0, 64, (1, 10)))
    padded = mx.concatenate([tokens, mx.zeros((1, 6), dtype=tokens.dtype)], axis=1)
    mask = mx.array(np.arange(16) < 10)[None]

    cache = model.make_cache()
    model(padded, cache=cache, mask=mask)
    alone_cache = model.make_cache()
    model(tokens, cache=alone_cache)

    for layer, alone_layer in zip(cache, alone_cache):
        for index in range(3):
            assert max_gap(layer[index], alone_layer[index]) <= 1e-4 * max(
                1.0, float(mx.abs(alone_layer[index]).max())
            ), f"cache entry {index}"


@pytest.mark.parametrize("version", ["4", "5.2", "6"])
def test_float16_rescaling_keeps_deep_activations_finite(version):
    # 24 layers whose output projections grow 1.6x per layer: the residual
    # stream ends near 1e5 in float32, past float16's maximum of 65504.
    config = dict(tiny_config(version), num_hidden_layers=24)
    reference = random_model(version, config, output_growth=1.6)
    tokens = mx.array(np.random.default_rng(4).integers(0, 64, (1, 24)))

    residual = reference.model.embeddings(tokens)
    for layer in reference.layers:
        residual = layer(residual, None, None)
    assert float(mx.abs(residual).max()) > 65504

    half = random_model(version, config, output_growth=1.6)
    half.set_dtype(mx.float16)
    assert bool(mx.all(mx.isfinite(half(tokens))))

    unscaled = random_model(version, dict(config, rescale_every=0), output_growth=1.6)
    unscaled.set_dtype(mx.float16)
    assert not bool(mx.all(mx.isfinite(unscaled(tokens))))


@pytest.mark.parametrize("version", ["4", "5.2", "6"])
def test_float16_tracks_float32_through_rescaling(version):
    # The growing model above is too ill-conditioned to compare: bfloat16,
    # which never rescales, misses its float32 logits by as much as float16.
    # This one has 24 layers, so float16 halves the residual stream 3 times.
    config = dict(tiny_config(version), num_hidden_layers=24)
    tokens = mx.array(np.random.default_rng(4).integers(0, 64, (1, 24)))
    expected = random_model(version, config)(tokens)

    half = random_model(version, config)
    half.set_dtype(mx.float16)
    logits = half(tokens)

    # Measured: float16 0.013 (RWKV-4) to 0.13 (5.2), bfloat16 0.11 to 0.72,
    # against logits up to about 3.6.
    assert max_gap(logits, expected) <= 0.05 * float(mx.abs(expected).max())


@pytest.mark.parametrize("version", VERSIONS)
def test_bfloat16_tracks_float32(version):
    model = random_model(version)
    tokens = mx.array(np.random.default_rng(5).integers(0, 64, (1, 30)))
    expected = model(tokens)

    model.set_dtype(mx.bfloat16)
    logits = model(tokens).astype(mx.float32)

    for layer in model.layers:
        assert layer.attn.r_proj.weight.dtype == mx.bfloat16
    assert max_gap(logits, expected) <= 0.1 * float(mx.abs(expected).max())


# ---------------------------------------------------------------- loading and saving


def test_convert_rejects_mlx_lm_model_file(tmp_path):
    from rwkv_mlx.convert import convert

    with pytest.raises(ValueError, match="--mlx-lm-model-file is for RWKV-7 models only, and .* is rwkv4"):
        convert(str(fixture_path("rwkv4", ".pth")), str(tmp_path / "out"), mlx_lm_model_file=True)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", list(PARITY_CASES))
def test_saved_directory_loads_back(tmp_path, name):
    model, config, _ = load_model(str(fixture_path(name, ".pth")), dtype=mx.float32)
    save_model(tmp_path / "model", model, config)

    saved = json.loads((tmp_path / "model" / "config.json").read_text())
    loaded, loaded_config, _ = load_model(str(tmp_path / "model"))
    tokens = mx.array([[5, 6, 7, 8, 9]])

    assert saved["model_type"] == config["model_type"]
    assert saved["version"] == config["version"]
    assert type(loaded) is type(model)
    assert loaded_config["version"] == config["version"]
    assert max_gap(loaded(tokens), model(tokens)) == 0.0


def test_build_model_rejects_unknown_model_type():
    with pytest.raises(CheckpointError, match="model_type 'rwkv3'"):
        build_model({}, dict(tiny_config("4"), model_type="rwkv3"), "test.pth")


def test_build_model_names_missing_tensor():
    model = random_model("6")
    weights = dict(tree_flatten(model.parameters()))
    del weights["model.layers.1.attn.time_decay_w2"]

    with pytest.raises(CheckpointError, match="missing tensor 'model.layers.1.attn.time_decay_w2'"):
        build_model(weights, tiny_config("6"), "test.pth")


def official_names(version: str, n_layer: int = 1, C: int = 8, H: int = 2) -> dict:
    """Return a synthetic official key set, name -> shape, of one version."""
    N = C // H
    names = {"emb.weight": (16, C), "blocks.0.ln0.weight": (C,), "blocks.0.ln0.bias": (C,)}
    names.update({"ln_out.weight": (C,), "ln_out.bias": (C,), "head.weight": (16, C)})
    for i in range(n_layer):
        p = f"blocks.{i}."
        for norm in ("ln1", "ln2"):
            names[p + f"{norm}.weight"] = (C,)
            names[p + f"{norm}.bias"] = (C,)
        for proj in ("receptance", "key", "value", "output"):
            names[p + f"att.{proj}.weight"] = (C, C)
        names[p + "ffn.key.weight"] = (4 * C, C)
        names[p + "ffn.value.weight"] = (C, 4 * C)
        if version == "7":
            for x in "rwkvag":
                names[p + f"att.x_{x}"] = (1, 1, C)
            for x, rank in zip("wavg", (4, 4, 4, 4)):
                names[p + f"att.{x}1"] = (C, rank)
                names[p + f"att.{x}2"] = (rank, C)
                if x != "g":
                    names[p + f"att.{x}0"] = (1, 1, C)
            names[p + "att.k_k"] = (1, 1, C)
            names[p + "att.k_a"] = (1, 1, C)
            names[p + "att.r_k"] = (H, N)
            names[p + "att.ln_x.weight"] = (C,)
            names[p + "att.ln_x.bias"] = (C,)
            names[p + "ffn.x_k"] = (1, 1, C)
            continue
        names[p + "ffn.receptance.weight"] = (C, C)
        if version == "6":
            for x in "xwkvrg":
                names[p + f"att.time_maa_{x}"] = (1, 1, C)
            names[p + "att.time_maa_w1"] = (C, 5 * 4)
            names[p + "att.time_maa_w2"] = (5, 4, C)
            names[p + "att.time_decay"] = (1, 1, C)
            names[p + "att.time_decay_w1"] = (C, 4)
            names[p + "att.time_decay_w2"] = (4, C)
            names[p + "att.time_faaaa"] = (H, N)
            names[p + "ffn.time_maa_k"] = (1, 1, C)
            names[p + "ffn.time_maa_r"] = (1, 1, C)
        else:
            for x in "kvr":
                names[p + f"att.time_mix_{x}"] = (1, 1, C)
            names[p + "ffn.time_mix_k"] = (1, 1, C)
            names[p + "ffn.time_mix_r"] = (1, 1, C)
        if version == "4":
            names[p + "att.time_decay"] = (C,)
            names[p + "att.time_first"] = (C,)
        elif version in ("5", "5.1"):
            names[p + "att.time_decay"] = (H,)
            names[p + "att.time_first"] = (H,)
        elif version == "5.2":
            names[p + "att.time_decay"] = (H, N)
            names[p + "att.time_faaaa"] = (H, N)
        if version in ("5.1", "5.2"):
            names[p + "att.time_mix_g"] = (1, 1, C)
        if version in ("5.1", "5.2", "6"):
            names[p + "att.gate.weight"] = (C, C)
        if version != "4":
            names[p + "att.ln_x.weight"] = (C,)
            names[p + "att.ln_x.bias"] = (C,)
    return names


class Shaped:
    """A stand-in tensor with only a shape, as the version detectors need."""

    def __init__(self, shape):
        self.shape = shape


def synthetic(version: str, **changes) -> dict:
    names = official_names(version)
    for name, shape in changes.items():
        name = name.replace("__", ".")
        if shape is None:
            names.pop(name, None)
        else:
            names[name] = shape
    return {name: Shaped(shape) for name, shape in names.items()}


# ---------------------------------------------------------------- version detection


@pytest.mark.parametrize("version", ["4", "5", "5.1", "5.2", "6", "7"])
def test_detect_version_of_official_key_set(version):
    assert pth.detect_version(synthetic(version)) == version


@pytest.mark.parametrize("version", ["5", "5.1", "5.2", "6"])
def test_gated_group_norm_versions_never_read_as_v7(version):
    # RWKV-5/6 share att.ln_x, att.gate-like projections and ffn tensors with
    # RWKV-7; only the x070 tensors (k_k, w0, a0, r_k) mean 7.
    detected = pth.detect_version(synthetic(version))

    assert detected != "7"
    assert rwkv_cpp.detect_version(synthetic(version)) != "7"


def test_v52_with_per_head_decay_reads_as_v51():
    # 5.1 and 5.2 have the same names, so only the decay shape distinguishes them.
    keys = synthetic("5.2", **{"blocks.0.att.time_decay": (2, 1)})

    assert pth.detect_version(keys) == "5.1"


def test_v6_with_v5_mixes_still_reads_as_v6():
    keys = synthetic("6", **{"blocks.0.att.time_mix_k": (1, 1, 8)})

    assert pth.detect_version(keys) == "6"


def test_ungated_v5_version_names():
    keys = synthetic("5")

    assert pth.detect_version(keys) == "5"
    # rwkv.cpp calls the same tensors 5.1; the loader uses the official name.
    assert rwkv_cpp.detect_version(keys) == "5.1"


def test_v4_time_first_of_wrong_width_is_rejected():
    keys = synthetic("4", **{"blocks.0.att.time_first": (3,)})

    with pytest.raises(CheckpointError, match="match no RWKV version"):
        pth.detect_version(keys)


def test_rwkv_cpp_detects_every_version():
    for version, expected in [("4", "4"), ("5.1", "5.2"), ("5.2", "5.2"), ("6", "6"), ("7", "7")]:
        assert rwkv_cpp.detect_version(synthetic(version)) == expected, version


@pytest.mark.parametrize("version", ["4", "5", "5.1", "5.2", "6"])
def test_sizes_from_shapes(version):
    # A vocabulary of 50277 (RWKV-4 Pile) and a head size of 4.
    names = official_names(version, n_layer=2)
    names["emb.weight"] = (50277, 8)
    names["head.weight"] = (50277, 8)
    official = {name: mx.zeros(shape) for name, shape in names.items()}

    weights = official_to_canonical(official, version, "synthetic.pth")
    config = infer_config(weights, version, "synthetic.pth")

    assert config["model_type"] == f"rwkv{version[0]}"
    assert config["version"] == version
    assert config["vocab_size"] == 50277
    assert config["hidden_size"] == 8
    assert config["intermediate_size"] == 32
    assert config["num_hidden_layers"] == 2
    if version != "4":
        assert config["head_dim"] == 4
    model = build_model(weights, config, "synthetic.pth")
    assert model(mx.array([[1, 50276]])).shape == (1, 2, 50277)


def test_time_first_of_v5_becomes_bonus():
    names = official_names("5.1")
    official = {name: mx.zeros(shape) for name, shape in names.items()}
    official["blocks.0.att.time_first"] = mx.array([0.0, np.log(0.5)])

    weights = official_to_canonical(official, "5.1", "synthetic.pth")

    bonus = weights["model.layers.0.attn.time_faaaa"]
    assert bonus.shape == (2, 1)
    assert max_gap(bonus[:, 0], [1.0, 0.5]) <= 1e-7
    assert weights["model.layers.0.attn.time_decay"].shape == (2, 1)


def test_tensor_of_other_version_is_rejected():
    names = official_names("5.2")
    names["blocks.0.att.time_maa_x"] = (1, 1, 8)
    official = {name: mx.zeros(shape) for name, shape in names.items()}

    with pytest.raises(CheckpointError, match="unexpected tensor 'blocks.0.att.time_maa_x' in an RWKV-5.2"):
        official_to_canonical(official, "5.2", "synthetic.pth")


def test_state_tuned_checkpoint_is_rejected_clearly():
    names = official_names("6")
    names["blocks.0.att.time_state"] = (2, 4, 4)
    official = {name: mx.zeros(shape) for name, shape in names.items()}

    with pytest.raises(CheckpointError, match="time_state.*state-tuned"):
        official_to_canonical(official, "6", "synthetic.pth")


# ---------------------------------------------------------------- the shared tools


@pytest.mark.parametrize("version", ["5.2", "6"])
def test_state_file_round_trip(tmp_path, version):
    from rwkv_mlx.io.state import load_state, rwkv_version, save_state

    model = random_model(version)
    cache = model.make_cache()
    model(mx.array([[1, 2, 3, 4]]), cache=cache)
    save_state(tmp_path / "state.safetensors", cache, model)

    loaded, metadata = load_state(tmp_path / "state.safetensors", model)
    next_logits = model(mx.array([[5]]), cache=loaded)
    expected = model(mx.array([[5]]), cache=cache)

    assert metadata["rwkv_version"] == rwkv_version(model)
    assert metadata["rwkv_version"].startswith(version[0])
    assert max_gap(next_logits, expected) == 0.0


@pytest.mark.parametrize("version", VERSIONS)
def test_lora_default_keys_fit_every_version(version):
    from rwkv_mlx.tuner.adapters import DEFAULT_LORA_KEYS, apply_lora_layers
    from rwkv_mlx.tuner.lora import LoRALinear

    model = random_model(version)
    tokens = mx.array([[1, 2, 3, 4]])
    before = model(tokens)

    apply_lora_layers(model, -1, {"rank": 4, "scale": 10.0, "keys": list(DEFAULT_LORA_KEYS)})

    adapted = [path for path, module in model.named_modules() if isinstance(module, LoRALinear)]
    assert len(adapted) == len(DEFAULT_LORA_KEYS) * len(model.layers)
    # A fresh LoRA layer adds zero.
    assert max_gap(model(tokens), before) <= 1e-6


def test_generate_with_rwkv_cpp_tiny_v4(rwkv_cpp_tiny):
    from rwkv_mlx.generate import generate_step

    model, _, _ = load_model(str(rwkv_cpp_tiny / "tiny-rwkv-4v0-660K-FP32.bin"))
    prompt = mx.array(PROMPT)

    generated = [int(token) for (token, _), _ in zip(generate_step(prompt, model, max_tokens=8), range(8))]

    # Greedy decoding by hand: feed the prompt, then each argmax.
    cache = model.make_cache()
    logits = model(prompt[None], cache=cache)
    expected = []
    for _ in range(8):
        token = int(mx.argmax(logits[0, -1]))
        expected.append(token)
        logits = model(mx.array([[token]]), cache=cache)
    assert generated == expected


# ---------------------------------------------------------------- the GPT-NeoX tokenizer


def test_vocab_50277_selects_gpt_neox_tokenizer(tmp_path):
    names = official_names("4")
    names["emb.weight"] = (50277, 8)
    names["head.weight"] = (50277, 8)
    official = {name: mx.zeros(shape) for name, shape in names.items()}
    weights = official_to_canonical(official, "4", "synthetic.pth")
    config = infer_config(weights, "4", "synthetic.pth")
    save_model(tmp_path / "pile", build_model(weights, config), config)

    model, tokenizer = rwkv_mlx.load(str(tmp_path / "pile"))

    assert isinstance(model, rwkv4.Model)
    assert tokenizer.vocab_size == 50277
    assert tokenizer.eos_token_id == 0  # <|endoftext|>
    assert tokenizer.encode("Hello world, RWKV-4!") == [12092, 1533, 13, 416, 27767, 55, 14, 21, 2]
    assert tokenizer.decode([12092, 1533]) == "Hello world"


def test_tokenizer_argument_overrides_vocab_choice(tmp_path):
    names = official_names("4")
    names["emb.weight"] = (50277, 8)
    names["head.weight"] = (50277, 8)
    official = {name: mx.zeros(shape) for name, shape in names.items()}
    weights = official_to_canonical(official, "4", "synthetic.pth")
    config = infer_config(weights, "4", "synthetic.pth")
    save_model(tmp_path / "pile", build_model(weights, config), config)

    _, tokenizer = rwkv_mlx.load(str(tmp_path / "pile"), tokenizer="bytes")

    assert tokenizer.vocab_size == 256
