"""The RWKV-7 model: caching, batching with padding, and low precision."""

import gc
import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models import rwkv7 as mlx_lm_rwkv7

from random_models import TINY_CONFIG, random_model, random_older_model, random_weights


def test_matches_mlx_lm_rwkv7():
    weights = random_weights(TINY_CONFIG, seed=1)
    ours = random_model(TINY_CONFIG, seed=1)
    theirs = mlx_lm_rwkv7.Model(mlx_lm_rwkv7.ModelArgs(**TINY_CONFIG))
    theirs.load_weights(list(weights.items()))
    ids = mx.array(np.random.default_rng(0).integers(0, 256, (2, 40)))

    assert mx.abs(ours(ids) - theirs(ids)).max().item() <= 1e-4


def test_token_by_token_equals_prefill():
    model = random_model()
    ids = mx.array(np.random.default_rng(1).integers(0, 256, (1, 50)))
    full = model(ids)

    cache = model.make_cache()
    steps = mx.concatenate([model(ids[:, t : t + 1], cache=cache) for t in range(50)], axis=1)

    assert mx.abs(full - steps).max().item() <= 1e-4
    assert cache[0][1].dtype == mx.float32
    assert cache[0][1].shape == (1, 2, 32, 32)


def test_prefill_in_pieces_equals_whole():
    model = random_model()
    ids = mx.array(np.random.default_rng(2).integers(0, 256, (2, 70)))
    full = model(ids)

    cache = model.make_cache()
    pieces = [model(ids[:, s:e], cache=cache) for s, e in [(0, 3), (3, 33), (33, 34), (34, 70)]]

    assert mx.abs(full - mx.concatenate(pieces, axis=1)).max().item() <= 1e-4


def test_left_padding_leaves_state_alone():
    model = random_model()
    rng = np.random.default_rng(3)
    short, long = rng.integers(1, 256, 9), rng.integers(1, 256, 20)
    alone_cache = model.make_cache()
    alone = model(mx.array(short)[None], cache=alone_cache)

    padded = np.zeros((2, 20), dtype=np.int64)
    padded[0, 11:] = short
    padded[1] = long
    caches = model.make_cache()
    for c in caches:
        c.left_padding = mx.array([11, 0])
    batched = model(mx.array(padded), cache=caches)

    assert mx.abs(batched[0, 11:] - alone[0]).max().item() <= 1e-5
    for layer_alone, layer_batched in zip(alone_cache, caches):
        for entry in range(3):
            assert mx.abs(layer_batched[entry][0] - layer_alone[entry][0]).max().item() <= 1e-5


def test_trailing_padding_keeps_token_shift():
    model = random_model()
    ids = np.random.default_rng(4).integers(1, 256, (1, 12))
    cache_real = model.make_cache()
    model(mx.array(ids[:, :8]), cache=cache_real)

    cache_padded = model.make_cache()
    model(mx.array(ids), cache=cache_padded, mask=mx.array(np.arange(12) < 8)[None])

    # Padding changes the shapes, and so the order of float32 sums. On an AMD
    # EPYC (Zen 1) with OpenBLAS 0.3.21 the states differed by 1.2e-6.
    for layer_real, layer_padded in zip(cache_real, cache_padded):
        for entry in range(3):
            assert mx.abs(layer_real[entry] - layer_padded[entry]).max().item() <= 1e-5


@pytest.mark.parametrize("head_dim", [16, 64])
def test_head_size_from_config(head_dim):
    config = dict(TINY_CONFIG, head_dim=head_dim)
    model = random_model(config)
    cache = model.make_cache()
    model(mx.array([[1, 2, 3]]), cache=cache)

    assert cache[0][1].shape == (1, 64 // head_dim, head_dim, head_dim)


def softmax_kl(p_logits, q_logits):
    p = mx.softmax(p_logits.astype(mx.float32), axis=-1)
    return (p * (mx.log(p + 1e-30) - mx.log(mx.softmax(q_logits.astype(mx.float32), axis=-1) + 1e-30))).sum(-1)


def test_bfloat16_weights_do_not_drift():
    reference = random_model(seed=5)
    low = random_model(seed=5, dtype=mx.bfloat16)
    ids = mx.array(np.random.default_rng(5).integers(0, 256, (1, 1000)))

    cache = low.make_cache()
    logits_low = mx.concatenate([low(ids[:, s : s + 250], cache=cache) for s in range(0, 1000, 250)], axis=1)
    kl = softmax_kl(reference(ids), logits_low)[0]

    # Measured on this tiny model: mean KL about 1e-4 in every quarter of the
    # run; 5e-3 leaves room for other seeds without hiding a real drift.
    first, last = kl[:250].mean().item(), kl[750:].mean().item()
    assert cache[0][1].dtype == mx.float32
    assert logits_low.dtype == mx.bfloat16
    assert last <= 5e-3
    assert last <= 2 * first + 1e-4


@pytest.mark.parametrize("version", ["7", "4"])
def test_prefill_cache_keeps_no_layer_inputs(version):
    # The carried token-shift vectors and WKV state must be computed as each
    # layer runs. A slice, or an array MLX schedules last, keeps every layer's
    # whole input alive until the prefill ends, and a slice in the cache keeps
    # it afterwards.
    width, layers = 256, 16
    if version == "7":
        model = random_model(dict(TINY_CONFIG, hidden_size=width, intermediate_size=width, num_hidden_layers=layers))
    else:
        config = dict(model_type="rwkv4", vocab_size=256, hidden_size=width, intermediate_size=width, num_hidden_layers=layers)
        model = random_older_model("4", config)
    tokens = mx.array(np.arange(1024) % 256)[None]
    layer_input = tokens.size * width * 4

    def prefill_peak(cache) -> tuple:
        # Arrays in garbage cycles of earlier tests, freed by a collection
        # during the prefill, would lower the active memory below the start.
        gc.collect()
        mx.reset_peak_memory()
        start = mx.get_active_memory()
        logits = model(tokens, cache=cache)[:, -1]
        mx.eval(logits, [c.cache for c in cache or []])
        return mx.get_peak_memory() - start, mx.get_active_memory() - start

    prefill_peak(model.make_cache())
    peak_without_cache, _ = prefill_peak(None)
    peak_with_cache, still_allocated = prefill_peak(model.make_cache())
    # What stays is the state and the carried vectors, far below one input per layer.
    assert still_allocated < 4 * layer_input, f"{still_allocated} bytes stay allocated after the prefill"
    assert peak_with_cache < peak_without_cache + 2 * layer_input, (peak_with_cache, peak_without_cache)
