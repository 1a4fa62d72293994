"""State tuning: a trained initial WKV state per layer, the model's weights untouched.

An RWKV model normally starts every sequence from the zero state. State tuning
learns, for each layer, the WKV state [H, N, N] that the sequence starts from
instead, indexed [value, key] like the cache. The token shifts stay zero. The
weights stay frozen, so one base model serves any number of tuned states.
"""

from typing import List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import ArraysCache

from ..models import rwkv7


class LayerState(nn.Module):
    """One layer's trainable initial WKV state ``wkv``, [H, N, N] float32."""

    def __init__(self, num_heads: int, head_dim: int):
        super().__init__()
        self.wkv = mx.zeros((num_heads, head_dim, head_dim), dtype=mx.float32)


class InitialState(nn.Module):
    """The trainable initial WKV states of all layers, named ``layers.<i>.wkv``."""

    def __init__(self, num_layers: int, num_heads: int, head_dim: int):
        super().__init__()
        self.layers = [LayerState(num_heads, head_dim) for _ in range(num_layers)]


def _model_dtype(model: nn.Module) -> mx.Dtype:
    """Return the dtype of the model's activations (that of its final norm)."""
    return model.model.norm.weight.dtype


class StateTunedModel(rwkv7.Model):
    """An RWKV-7 model that starts every sequence from a trained initial state.

    It shares every module and weight with the base model it wraps and adds
    the parameters ``initial_state.layers.<i>.wkv``. An empty cache, or no cache
    at all, starts from the tuned state; ``make_cache`` returns caches seeded
    with it.
    """

    def __init__(self, base: rwkv7.Model, initial_state: Optional[InitialState] = None):
        nn.Module.__init__(self)
        if isinstance(base, StateTunedModel):
            raise ValueError("the model already has a tuned initial state")
        self.args = base.args
        self.model_type = base.model_type
        for name, child in base.items():
            self[name] = child

        heads = base.args.hidden_size // base.args.head_dim
        self.initial_state = initial_state or InitialState(len(base.layers), heads, base.args.head_dim)
        # The base model, kept outside the parameter tree so its weights are
        # not listed twice.
        object.__setattr__(self, "base_model", base)
        if not base.training:
            self.eval()

    def initial_cache(self, batch_size: int = 1) -> List[ArraysCache]:
        """Return one cache per layer holding the tuned state for ``batch_size`` sequences.

        The WKV entries depend on the ``initial_state`` parameters, so a loss
        computed from this cache has a gradient with respect to them.
        """
        dtype = _model_dtype(self)
        width, heads = self.args.hidden_size, self.args.hidden_size // self.args.head_dim
        caches = []
        for layer_state in self.initial_state.layers:
            wkv = layer_state.wkv
            cache = ArraysCache(size=3)
            cache[0] = mx.zeros((batch_size, 1, width), dtype=dtype)
            cache[1] = mx.broadcast_to(wkv[None], (batch_size, heads, *wkv.shape[1:]))
            cache[2] = mx.zeros((batch_size, 1, width), dtype=dtype)
            caches.append(cache)
        return caches

    def make_cache(self) -> List[ArraysCache]:
        """Return one cache per layer, seeded with the tuned state for one sequence."""
        return self.initial_cache(1)

    def __call__(self, inputs: mx.array, cache: Optional[Sequence] = None, mask: Optional[mx.array] = None):
        """Compute the logits, starting empty caches from the tuned state.

        Args and returns as ``rwkv7.Model.__call__``.
        """
        if cache is None:
            cache = self.initial_cache(inputs.shape[0])
        else:
            seeded = None
            for i, layer_cache in enumerate(cache):
                if layer_cache is not None and layer_cache[1] is None:
                    seeded = seeded or self.initial_cache(inputs.shape[0])
                    layer_cache[1] = seeded[i][1]
        return super().__call__(inputs, cache, mask)


def make_tuned_cache(model: nn.Module, batch_size: int = 1) -> List[ArraysCache]:
    """Return a cache that starts from the model's tuned initial state.

    Args:
        model (nn.Module): A ``StateTunedModel`` (from ``load_adapters`` with a
            state adapter), or any model, which gets its empty cache.
        batch_size (int): Sequences in the batch.

    Returns:
        list[ArraysCache]: One cache per layer.
    """
    if isinstance(model, StateTunedModel):
        return model.initial_cache(batch_size)
    return model.make_cache()


def zero_cache(model: nn.Module, batch_size: int) -> List[ArraysCache]:
    """Return one cache per layer holding the zero state for ``batch_size`` sequences."""
    dtype = _model_dtype(model)
    args = model.args
    heads = args.hidden_size // args.head_dim
    caches = []
    for _ in model.layers:
        cache = ArraysCache(size=3)
        cache[0] = mx.zeros((batch_size, 1, args.hidden_size), dtype=dtype)
        cache[1] = mx.zeros((batch_size, heads, args.head_dim, args.head_dim), dtype=mx.float32)
        cache[2] = mx.zeros((batch_size, 1, args.hidden_size), dtype=dtype)
        caches.append(cache)
    return caches
