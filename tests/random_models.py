"""Random-weight RWKV models (RWKV-7, and RWKV-4, 5.x and 6) with value ranges like trained ones, for tests."""

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from rwkv_mlx.models import rwkv4, rwkv5, rwkv6, rwkv7

TINY_CONFIG = dict(
    model_type="rwkv7",
    vocab_size=256,
    hidden_size=64,
    intermediate_size=224,
    norm_eps=1e-5,
    head_dim=32,
    num_hidden_layers=2,
    a_low_rank_dim=8,
    v_low_rank_dim=8,
    gate_low_rank_dim=16,
    decay_low_rank_dim=8,
)


def random_weights(config: dict, seed: int = 0) -> dict:
    """Return canonical weights whose ranges resemble a trained RWKV-7.

    Decay biases spread from about -7 to 1, so some decays sit within 1e-3
    of 1, where bfloat16 rounding would make them exactly 1.
    """
    rng = np.random.default_rng(seed)
    model = rwkv7.Model(rwkv7.ModelArgs(**config))
    C = config["hidden_size"]
    weights = {}
    for name, value in tree_flatten(model.parameters()):
        shape = value.shape
        if name.endswith(("norm.weight", "g_norm.weight")):
            w = 1 + 0.1 * rng.standard_normal(shape)
        elif name.endswith("norm.bias"):
            w = 0.05 * rng.standard_normal(shape)
        elif ".x_" in name:
            w = rng.uniform(0, 1, shape)
        elif name.endswith("attn.k_k"):
            w = 0.85 + 0.05 * rng.standard_normal(shape)
        elif name.endswith("attn.k_a"):
            w = 1 + 0.05 * rng.standard_normal(shape)
        elif name.endswith("attn.r_k"):
            w = 0.3 * rng.standard_normal(shape)
        elif name.endswith("w_lora.lora.2.bias"):
            w = np.linspace(-7, 1, C) + 0.1 * rng.standard_normal(shape)
        elif name.endswith("lora.2.bias"):
            w = 0.3 * rng.standard_normal(shape)
        elif name.endswith("embeddings.weight"):
            w = 0.5 * rng.standard_normal(shape)
        else:
            w = rng.standard_normal(shape) / np.sqrt(shape[-1])
        weights[name] = mx.array(w.astype(np.float32))
    return weights


def random_model(config: dict = None, seed: int = 0, dtype=mx.float32) -> rwkv7.Model:
    """Build a model with `random_weights`, cast to ``dtype``."""
    config = config or TINY_CONFIG
    model = rwkv7.Model(rwkv7.ModelArgs(**config))
    weights = random_weights(config, seed)
    model.load_weights([(k, v.astype(dtype)) for k, v in weights.items()])
    mx.eval(model.parameters())
    return model


# The model module of each older version.
OLDER_MODULES = {"4": rwkv4, "5": rwkv5, "5.1": rwkv5, "5.2": rwkv5, "6": rwkv6}


def two_layer_older_config(version: str, vocab_size: int, hidden_size: int, intermediate_size: int, head_dim: int) -> dict:
    """Return the config of a two-layer RWKV-4, 5.x or 6 model of these sizes.

    RWKV-4 has no heads, so ``head_dim`` applies from 5.0 on. Only 5.x configs
    name their version, which distinguishes 5.0, 5.1 and 5.2.
    """
    config = dict(
        model_type=f"rwkv{version[0]}",
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
    )
    if version != "4":
        config["head_dim"] = head_dim
    if version.startswith("5"):
        config["version"] = version
    if version == "6":
        config.update(mix_low_rank_dim=8, decay_low_rank_dim=8)
    return config


def _older_value(name: str, shape, rng) -> np.ndarray:
    """Return a random value for one RWKV-4, 5.x or 6 parameter, in a trained-like range."""
    if name.endswith("norm.weight"):
        return 1 + 0.1 * rng.standard_normal(shape)
    if name.endswith("norm.bias"):
        return 0.05 * rng.standard_normal(shape)
    if ".time_mix_" in name or (".time_maa_" in name and not name.endswith(("_w1", "_w2"))):
        return rng.uniform(0, 1, shape)
    if name.endswith("time_decay"):
        return rng.uniform(-5, 1.5, shape)
    if name.endswith("time_first"):
        return -1.2 + 0.3 * rng.standard_normal(shape)
    if name.endswith("time_faaaa"):
        return rng.uniform(0, 1, shape)
    if name.endswith(("_w1", "_w2")):
        return 0.1 * rng.standard_normal(shape)
    if name.endswith("embeddings.weight"):
        return 0.5 * rng.standard_normal(shape)
    return rng.standard_normal(shape) / np.sqrt(shape[-1])


def random_older_model(version: str, config: dict, seed: int = 0, output_growth: float = 1.0, dtype=mx.float32):
    """Build an RWKV-4, 5.x or 6 model with random weights in trained-like
    ranges (keys of about unit size, decays from fast to slow).

    ``output_growth`` multiplies the output projections of layer i by
    ``output_growth ** i``, so the residual stream grows with depth. The
    weights are drawn in float32 and cast to ``dtype``.
    """
    module = OLDER_MODULES[version]
    model = module.Model(module.ModelArgs.from_dict(config))
    rng = np.random.default_rng(seed)
    weights = []
    for name, value in tree_flatten(model.parameters()):
        w = _older_value(name, value.shape, rng)
        if name.endswith(("o_proj.weight", "ffn.value.weight")):
            w = w * output_growth ** int(name.split(".")[2])
        weights.append((name, mx.array(w.astype(np.float32)).astype(dtype)))
    model.load_weights(weights)
    mx.eval(model.parameters())
    return model
