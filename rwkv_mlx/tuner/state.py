"""State tuning: a trained initial WKV state per layer, the model's weights untouched.

An RWKV model normally starts every sequence from the empty state. State
tuning learns, for each layer, the WKV state that the sequence starts from
instead. The token shifts stay zero. The weights stay frozen, so one base
model serves any number of tuned states. The trained parameters are:

``initial_state.layers.<i>.wkv``, [H, N, N] float32 (RWKV-5, 6 and 7)
    The WKV state of layer i, indexed [value, key] like cache entry 1.

``initial_state.layers.<i>.wkv_sums``, [2, C] float32 (RWKV-4)
    The sums ``a`` and ``b`` of RWKV-4's WKV state ``(a, b, p)`` (see
    ``rwkv_mlx.ops.wkv4``), used with the exponent ``p = 0``. Zero sums with
    ``p = 0`` give the same outputs as the empty state, whose ``p = -1e30``
    would multiply every gradient of ``a`` and ``b`` by ``e^p = 0``.
"""

from typing import List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import ArraysCache

from ..models import rwkv4
from ..ops.wkv4 import empty_state


class LayerState(nn.Module):
    """One layer's trainable initial WKV state ``wkv``, [H, N, N] float32
    (RWKV-5, 6 and 7)."""

    def __init__(self, num_heads: int, head_dim: int):
        super().__init__()
        self.wkv = mx.zeros((num_heads, head_dim, head_dim), dtype=mx.float32)

    def wkv_state(self, batch_size: int) -> mx.array:
        """Return cache entry 1 for ``batch_size`` sequences, [B, H, N, N] float32."""
        return mx.broadcast_to(self.wkv[None], (batch_size, *self.wkv.shape))


class Rwkv4LayerState(nn.Module):
    """One RWKV-4 layer's trainable initial WKV sums ``wkv_sums``, [2, C]
    float32: ``a`` and ``b`` of the state ``(a, b, p)`` with ``p = 0``.

    ``b`` is a sum of weights e^k. After every optimizer step the trainer
    calls ``constrain``, which sets any ``b`` below zero back to zero. A
    ``b`` below zero could make the WKV denominator ``b + e^(u + k)`` cross
    zero, and without the projection training drove ``b`` negative and
    lowered a tiny model's validation loss by 0.13 in 40 steps, against 0.79
    with it. NOTE: with ``b = 0`` a first token whose ``u + k`` is below
    about -100 gives 0/0, because ``e^(u + k)`` underflows to 0.
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.wkv_sums = mx.zeros((2, hidden_size), dtype=mx.float32)

    def constrain(self) -> None:
        """Set the sums ``b`` that lie below zero to zero."""
        self.wkv_sums = mx.concatenate([self.wkv_sums[:1], mx.maximum(self.wkv_sums[1:], 0.0)])

    def wkv_state(self, batch_size: int) -> mx.array:
        """Return cache entry 1 for ``batch_size`` sequences, [B, 3, C] float32."""
        sums = mx.broadcast_to(self.wkv_sums[None], (batch_size, *self.wkv_sums.shape))
        exponent = mx.zeros((batch_size, 1, self.wkv_sums.shape[-1]), dtype=mx.float32)
        return mx.concatenate([sums, exponent], axis=1)


class InitialState(nn.Module):
    """The trainable initial WKV states of all layers, named ``layers.<i>.wkv``
    (RWKV-5, 6 and 7)."""

    def __init__(self, num_layers: int, num_heads: int, head_dim: int):
        super().__init__()
        self.layers = [LayerState(num_heads, head_dim) for _ in range(num_layers)]

    def constrain(self) -> None:
        """Do nothing: any [H, N, N] state is valid."""


class Rwkv4InitialState(nn.Module):
    """The trainable initial WKV sums of all RWKV-4 layers, named ``layers.<i>.wkv_sums``."""

    def __init__(self, num_layers: int, hidden_size: int):
        super().__init__()
        self.layers = [Rwkv4LayerState(hidden_size) for _ in range(num_layers)]

    def constrain(self) -> None:
        """Keep every layer's sums ``b`` at zero or above (see ``Rwkv4LayerState``)."""
        for layer_state in self.layers:
            layer_state.constrain()


def _is_rwkv4(model: nn.Module) -> bool:
    """Return whether the model, or the base model under a tuned state, is an RWKV-4 model."""
    return isinstance(getattr(model, "base_model", model), rwkv4.Model)


def initial_state_for(model: nn.Module) -> nn.Module:
    """Return a zero initial state of the layout that the model's version uses.

    Args:
        model (nn.Module): An RWKV-4, 5, 6 or 7 model.

    Returns:
        nn.Module: ``Rwkv4InitialState`` for RWKV-4, else ``InitialState``.
    """
    args = model.args
    if _is_rwkv4(model):
        return Rwkv4InitialState(len(model.layers), args.hidden_size)
    return InitialState(len(model.layers), args.hidden_size // args.head_dim, args.head_dim)


def _model_dtype(model: nn.Module) -> mx.Dtype:
    """Return the dtype of the model's activations (that of its final norm)."""
    return model.model.norm.weight.dtype


def _cache(token_shift: mx.array, wkv_state: mx.array) -> ArraysCache:
    """Return a layer cache with ``token_shift`` as both token shifts and the given WKV state."""
    cache = ArraysCache(size=3)
    cache[0] = token_shift
    cache[1] = wkv_state
    cache[2] = token_shift
    return cache


class StateTunedModel(nn.Module):
    """An RWKV-4, 5, 6 or 7 model that starts every sequence from a trained initial state.

    It shares every module and weight with the base model it wraps and adds
    the parameters ``initial_state.layers.<i>.wkv`` (``wkv_sums`` for
    RWKV-4, described in the module docstring). An empty cache, or no cache
    at all, starts from the tuned state, and ``make_cache`` returns caches
    seeded with it. The logits come from the base model's own ``__call__``.
    """

    def __init__(self, base: nn.Module, initial_state: Optional[nn.Module] = None):
        super().__init__()
        if isinstance(base, StateTunedModel):
            raise ValueError("the model already has a tuned initial state")
        self.args = base.args
        self.model_type = base.model_type
        for name, child in base.items():
            self[name] = child

        self.initial_state = initial_state or initial_state_for(base)
        # The base model, kept outside the parameter tree so its weights are
        # not listed twice.
        object.__setattr__(self, "base_model", base)
        if not base.training:
            self.eval()

    @property
    def layers(self):
        return self.base_model.layers

    def initial_cache(self, batch_size: int = 1) -> List[ArraysCache]:
        """Return one cache per layer holding the tuned state for ``batch_size`` sequences.

        The WKV entries depend on the ``initial_state`` parameters, so a loss
        computed from this cache has a gradient with respect to them.
        """
        token_shift = mx.zeros((batch_size, 1, self.args.hidden_size), dtype=_model_dtype(self))
        return [_cache(token_shift, layer_state.wkv_state(batch_size)) for layer_state in self.initial_state.layers]

    def make_cache(self) -> List[ArraysCache]:
        """Return one cache per layer, seeded with the tuned state for one sequence."""
        return self.initial_cache(1)

    def __call__(self, inputs: mx.array, cache: Optional[Sequence] = None, mask: Optional[mx.array] = None):
        """Compute the logits, starting empty caches from the tuned state.

        Args and returns as the base model's ``__call__``.
        """
        if cache is None:
            cache = self.initial_cache(inputs.shape[0])
        else:
            seeded = None
            for i, layer_cache in enumerate(cache):
                if layer_cache is not None and layer_cache[1] is None:
                    seeded = seeded or self.initial_cache(inputs.shape[0])
                    layer_cache[1] = seeded[i][1]
        return self.base_model(inputs, cache, mask)


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
    """Return one cache per layer holding the empty state for ``batch_size`` sequences.

    The WKV entry is RWKV-4's ``empty_state`` for RWKV-4 and zeros
    [B, H, N, N] float32 for the other versions, as the models use when a
    cache entry is empty.
    """
    args = model.args
    token_shift = mx.zeros((batch_size, 1, args.hidden_size), dtype=_model_dtype(model))
    if _is_rwkv4(model):
        wkv_state = empty_state(batch_size, args.hidden_size)
    else:
        heads = args.hidden_size // args.head_dim
        wkv_state = mx.zeros((batch_size, heads, args.head_dim, args.head_dim), dtype=mx.float32)
    return [_cache(token_shift, wkv_state) for _ in model.layers]
