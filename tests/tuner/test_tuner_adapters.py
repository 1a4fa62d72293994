"""Adapters: what each mode trains, saving and loading, fusing, QLoRA, state
tuning, and compatibility with mlx-lm's adapter folders."""

import json
import re

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import rwkv7 as mlx_lm_rwkv7
from mlx_lm.tuner.utils import linear_to_lora_layers as mlx_lm_linear_to_lora_layers
from mlx_lm.tuner.utils import load_adapters as mlx_lm_load_adapters

from random_models import TINY_CONFIG, random_weights
from rwkv_mlx.io.state import load_state
from rwkv_mlx.tuner import (
    DEFAULT_LORA_KEYS,
    AdapterError,
    DoRALinear,
    LoRALinear,
    StateTunedModel,
    base_fingerprint,
    fuse_adapters,
    load_adapters,
    load_tuned_cache,
    make_example,
    make_tuned_cache,
    prepare_for_training,
    save_tuned_state,
)
from tuner_helpers import (
    LORA_PARAMETERS,
    all_weights,
    assert_only_adapters_changed,
    base_name,
    quantize_for_test,
    randomize_trainable,
    tiny_model,
    train_steps,
)

IDS = mx.array(np.random.default_rng(0).integers(1, 256, (2, 24)))


def pattern_examples(count=8):
    return [make_example(np.tile(np.arange(40, 52), 5)[: 30 + i]) for i in range(count)]


@pytest.mark.parametrize(
    "fine_tune_type, options",
    [("lora", {}), ("dora", {}), ("state", {}), ("full", {"num_layers": 1})],
)
def test_only_named_weights_change(tmp_path, fine_tune_type, options):
    model = tiny_model()
    before = all_weights(model)
    model = prepare_for_training(model, fine_tune_type, lora_parameters=LORA_PARAMETERS, **options)
    trainable = {name for name, _ in tree_flatten(model.trainable_parameters())}
    initial = all_weights(model)

    train_steps(model, tmp_path, examples=pattern_examples(), iters=1, fine_tune_type=fine_tune_type)
    after = all_weights(model)

    changed = [name for name in trainable if not np.array_equal(after[name], initial[name])]
    assert changed
    for name, value in after.items():
        if name in trainable:
            continue
        assert np.array_equal(value, before[base_name(name)]), name

    saved, metadata = mx.load(str(tmp_path / "adapters.safetensors"), return_metadata=True)
    assert set(saved) == trainable
    assert metadata["fine_tune_type"] == fine_tune_type
    assert metadata["iteration"] == "1"
    assert set(mx.load(str(tmp_path / "0000001_adapters.safetensors"))) == trainable


def test_lora_defaults_adapt_rwkv_projections():
    model = prepare_for_training(tiny_model(), "lora")

    adapted = {name for name, m in model.named_modules() if isinstance(m, LoRALinear)}

    expected = {f"model.layers.{i}.{key}" for i in range(2) for key in DEFAULT_LORA_KEYS}
    assert adapted == expected


def test_num_layers_adapts_last_layers():
    model = prepare_for_training(tiny_model(), "lora", num_layers=1)

    names = [name for name, _ in tree_flatten(model.trainable_parameters())]

    assert names
    assert all(name.startswith("model.layers.1.") for name in names)


def test_too_many_layers_rejected():
    with pytest.raises(ValueError, match="num_layers is 3, but the model has 2 layers"):
        prepare_for_training(tiny_model(), "lora", num_layers=3)


def test_unknown_lora_key_rejected():
    with pytest.raises(ValueError, match=r"no module \['attn.q_proj'\]"):
        prepare_for_training(tiny_model(), "lora", lora_parameters={"keys": ["attn.q_proj"]})


@pytest.mark.parametrize("fine_tune_type", ["lora", "dora"])
def test_fused_equals_unfused(fine_tune_type):
    model = prepare_for_training(tiny_model(), fine_tune_type, lora_parameters=LORA_PARAMETERS)
    randomize_trainable(model, scale=0.05, seed=1)
    unfused = model(IDS)

    fuse_adapters(model)

    assert not any(isinstance(m, (LoRALinear, DoRALinear)) for _, m in model.named_modules())
    assert set(all_weights(model)) == set(all_weights(tiny_model()))
    # Fusing adds scale * B A to W before the product instead of after it. On
    # an AMD EPYC (Zen 1) that moved the logits by 1.1e-5 at a scale of about 1.
    assert mx.abs(model(IDS) - unfused).max().item() <= 1e-5 * (1 + mx.abs(unfused).max().item())


def quantized_tiny_model(bits):
    return quantize_for_test(tiny_model(), bits)


def test_qlora_trains_on_4_bit_base(tmp_path):
    model = quantized_tiny_model(bits=4)
    assert isinstance(model.layers[0].attn.r_proj, nn.QuantizedLinear)
    before = all_weights(model)
    model = prepare_for_training(model, "lora", lora_parameters=LORA_PARAMETERS)

    history = train_steps(model, tmp_path, examples=pattern_examples(), iters=12, fine_tune_type="lora", learning_rate=2e-2)

    assert history.train[-1][1] < history.train[0][1] - 1.0
    assert_only_adapters_changed(before, all_weights(model))
    saved = mx.load(str(tmp_path / "adapters.safetensors"))
    assert all(name.endswith(("lora_a", "lora_b")) for name in saved)


def test_qlora_fuse_keeps_or_drops_quantization():
    model = prepare_for_training(quantized_tiny_model(bits=4), "lora", lora_parameters=LORA_PARAMETERS)
    randomize_trainable(model, scale=0.05, seed=2)
    unfused = model(IDS)

    fuse_adapters(model, dequantize=True)

    assert not any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules())
    assert mx.abs(model(IDS) - unfused).max().item() <= 1e-4

    requantized = prepare_for_training(quantized_tiny_model(bits=4), "lora", lora_parameters=LORA_PARAMETERS)
    randomize_trainable(requantized, scale=0.05, seed=2)
    fuse_adapters(requantized)
    assert isinstance(requantized.layers[0].attn.r_proj, nn.QuantizedLinear)
    assert requantized.layers[0].attn.r_proj.bits == 4


@pytest.mark.parametrize("fine_tune_type", ["lora", "state"])
def test_load_adapters_twice_rejected(tmp_path, fine_tune_type):
    base = tiny_model().eval()
    fingerprint = base_fingerprint(base)
    trained = prepare_for_training(base, fine_tune_type, lora_parameters=LORA_PARAMETERS)
    train_steps(trained, tmp_path, examples=pattern_examples(), iters=1, fine_tune_type=fine_tune_type, fingerprint=fingerprint)
    loaded = load_adapters(tiny_model().eval(), tmp_path)

    with pytest.raises(AdapterError, match="the model already has adapters; load them onto a freshly loaded base model"):
        load_adapters(loaded, tmp_path)


@pytest.mark.parametrize("fine_tune_type", ["lora", "dora", "full", "state"])
def test_load_adapters_reproduces_trained_model(tmp_path, fine_tune_type):
    base = tiny_model().eval()
    fingerprint = base_fingerprint(base)
    trained = prepare_for_training(base, fine_tune_type, lora_parameters=LORA_PARAMETERS)
    train_steps(trained, tmp_path, examples=pattern_examples(), iters=3, fine_tune_type=fine_tune_type, fingerprint=fingerprint)
    trained.eval()

    loaded = load_adapters(tiny_model().eval(), tmp_path)

    assert not any(module.training for _, module in loaded.named_modules())
    assert mx.abs(loaded(IDS) - trained(IDS)).max().item() <= 1e-6
    if fine_tune_type == "state":
        assert isinstance(loaded, StateTunedModel)


def test_our_adapters_load_in_mlx_lm(tmp_path):
    ours = prepare_for_training(tiny_model(), "lora", lora_parameters=LORA_PARAMETERS)
    train_steps(ours, tmp_path, examples=pattern_examples(), iters=2, fine_tune_type="lora")
    ours.eval()

    theirs = mlx_lm_rwkv7.Model(mlx_lm_rwkv7.ModelArgs(**TINY_CONFIG))
    theirs.load_weights(list(random_weights(TINY_CONFIG, seed=0).items()))
    mlx_lm_load_adapters(theirs, str(tmp_path))

    assert mx.abs(theirs(IDS) - ours(IDS)).max().item() <= 1e-4


def test_mlx_lm_adapters_load_here(tmp_path):
    theirs = mlx_lm_rwkv7.Model(mlx_lm_rwkv7.ModelArgs(**TINY_CONFIG))
    theirs.load_weights(list(random_weights(TINY_CONFIG, seed=0).items()))
    theirs.freeze()
    mlx_lm_linear_to_lora_layers(theirs, 2, dict(LORA_PARAMETERS))
    randomize_trainable(theirs, scale=0.05, seed=3)
    mx.save_safetensors(str(tmp_path / "adapters.safetensors"), dict(tree_flatten(theirs.trainable_parameters())))
    config = {"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": LORA_PARAMETERS}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))

    ours = load_adapters(tiny_model(), tmp_path)

    assert mx.abs(ours(IDS) - theirs(IDS)).max().item() <= 1e-4


def state_tuned_model(seed=5):
    model = StateTunedModel(tiny_model().freeze())
    randomize_trainable(model, scale=0.3, seed=seed)
    return model


def test_state_tuned_model_starts_from_tuned_state():
    model = state_tuned_model()
    base = tiny_model()

    tuned = model(IDS)
    expected = base(IDS, cache=make_tuned_cache(model, batch_size=2))

    assert mx.abs(tuned - expected).max().item() <= 1e-5
    assert mx.abs(tuned - base(IDS)).max().item() > 1e-2


def test_state_tuned_model_make_cache_continues():
    model = state_tuned_model()
    whole = model(IDS[:1])

    cache = model.make_cache()
    pieces = mx.concatenate([model(IDS[:1, :10], cache=cache), model(IDS[:1, 10:], cache=cache)], axis=1)

    assert mx.abs(whole - pieces).max().item() <= 1e-4


def test_tuned_state_file_loads_with_generate(tmp_path):
    model = state_tuned_model()
    save_tuned_state(tmp_path / "state.safetensors", model)

    cache, _ = load_state(tmp_path / "state.safetensors", tiny_model())

    assert mx.abs(tiny_model()(IDS[:1], cache=cache) - model(IDS[:1])).max().item() <= 1e-5


def test_state_from_other_model_rejected(tmp_path):
    model = prepare_for_training(tiny_model(seed=0), "state")
    train_steps(model, tmp_path, examples=pattern_examples(), iters=1, fine_tune_type="state", fingerprint=base_fingerprint(tiny_model(seed=0)))

    with pytest.raises(AdapterError, match="trained on a base model with fingerprint"):
        load_adapters(tiny_model(seed=1), tmp_path)
    with pytest.raises(AdapterError, match="trained on a base model with fingerprint"):
        load_tuned_cache(tiny_model(seed=1), tmp_path)
    cache = load_tuned_cache(tiny_model(seed=0), tmp_path, batch_size=2)
    assert cache[0][1].shape == (2, 2, 32, 32)


def test_state_cannot_be_fused():
    with pytest.raises(ValueError, match="cannot be fused"):
        fuse_adapters(state_tuned_model())


def test_missing_adapter_folder(tmp_path):
    with pytest.raises(AdapterError, match="adapter folder not found"):
        load_adapters(tiny_model(), tmp_path / "nowhere")


def test_adapter_path_that_is_a_file(tmp_path):
    (tmp_path / "adapters.safetensors").write_bytes(b"")

    with pytest.raises(AdapterError, match="a file, not an adapter folder; pass the folder that contains adapter_config.json"):
        load_adapters(tiny_model(), tmp_path / "adapters.safetensors")


def test_adapter_weights_path_that_is_a_folder(tmp_path):
    from rwkv_mlx.tuner.adapters import read_adapter_weights

    with pytest.raises(AdapterError, match="a folder; name the adapter weights file in it, such as .*adapters.safetensors"):
        read_adapter_weights(tmp_path)


def test_invalid_adapter_config(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{not json")

    with pytest.raises(AdapterError, match=r"adapter_config\.json: invalid JSON"):
        load_adapters(tiny_model(), tmp_path)


def test_adapter_shape_mismatch(tmp_path):
    model = prepare_for_training(tiny_model(), "lora", lora_parameters=LORA_PARAMETERS)
    train_steps(model, tmp_path, examples=pattern_examples(), iters=1, fine_tune_type="lora")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["lora_parameters"]["rank"] = 8
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))

    with pytest.raises(AdapterError) as error:
        load_adapters(tiny_model(), tmp_path)

    message = str(error.value)
    assert re.search(r"lora_[ab]' has shape \((4, 64|64, 4)\), but the model's is \((8, 64|64, 8)\)", message)
    assert "the adapters and the model are both RWKV-7, so the adapters were trained on a model of another size" in message


def test_truncated_adapter_file(tmp_path):
    model = prepare_for_training(tiny_model(), "lora", lora_parameters=LORA_PARAMETERS)
    train_steps(model, tmp_path, examples=pattern_examples(), iters=1, fine_tune_type="lora")
    data = (tmp_path / "adapters.safetensors").read_bytes()
    (tmp_path / "adapters.safetensors").write_bytes(data[: len(data) // 2])

    with pytest.raises(AdapterError, match="not a readable safetensors file"):
        load_adapters(tiny_model(), tmp_path)
