"""RWKV-4 (Pile, Raven, World) in MLX.

Parameter names and shapes are listed in ``rwkv_mlx.io.layout_older``. Each
layer's cache contains three entries:

    cache[0]  time-mix token shift: the last input of the time mix, [B, 1, C]
    cache[1]  WKV state (a, b, p), [B, 3, C] float32 (see ``rwkv_mlx.ops.wkv4``)
    cache[2]  channel-mix token shift, [B, 1, C]

The official ``rwkv`` package keeps the same five vectors per layer as a flat
list ``[token shift, a, b, p, token shift]``.

The WKV state, keys, values and decay are float32 whatever the weights are.
In float16 the residual stream is halved after every ``rescale_every``
layers, and the inputs of each layer's output projections are scaled to
match, as the official package does in float16: its activations grow with
depth and leave float16's range (65504) in the larger models.
"""

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import BaseModelArgs
from mlx_lm.models.cache import ArraysCache

from ..ops import fast_math, wkv4
from ..ops.linear import linear
from ..ops.wkv4 import empty_state
from .rwkv7 import check_cache, check_inputs, token_shift

DEFAULT_RESCALE_EVERY = 6


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    norm_eps: float = 1e-5
    rescale_every: int = DEFAULT_RESCALE_EVERY


def residual_scale(layer_idx: int, dtype: mx.Dtype, rescale_every: int) -> float:
    """Return the factor the residual stream carries at a layer: 2^-(i // rescale_every)
    in float16 (with ``rescale_every`` > 0), else 1."""
    if dtype != mx.float16 or rescale_every <= 0:
        return 1.0
    return 2.0 ** -(layer_idx // rescale_every)


def mix(x: mx.array, shifted: mx.array, weight: mx.array) -> mx.array:
    """Interpolate between the previous input and the current one: ``weight`` 1 keeps ``x``."""
    return shifted + (x - shifted) * weight


class TimeMix(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        C = args.hidden_size
        self.time_mix_k = mx.zeros((C,))
        self.time_mix_v = mx.zeros((C,))
        self.time_mix_r = mx.zeros((C,))
        self.time_decay = mx.zeros((C,))
        self.time_first = mx.zeros((C,))

        self.r_proj = nn.Linear(C, C, bias=False)
        self.k_proj = nn.Linear(C, C, bias=False)
        self.v_proj = nn.Linear(C, C, bias=False)
        self.o_proj = nn.Linear(C, C, bias=False)

    def __call__(self, x, cache, mask, scale: float):
        B, T, C = x.shape

        previous = cache[0] if cache is not None else None
        shifted, shift_out = token_shift(x, previous, mask)
        receptance = fast_math.sigmoid(self.r_proj(mix(x, shifted, self.time_mix_r)))
        key = self.k_proj(mix(x, shifted, self.time_mix_k)).astype(mx.float32)
        value = self.v_proj(mix(x, shifted, self.time_mix_v)).astype(mx.float32)

        log_decay = -mx.exp(self.time_decay.astype(mx.float32))
        bonus = self.time_first.astype(mx.float32)
        state = cache[1] if cache is not None else None
        if state is None:
            state = empty_state(B, C)
        out, state = wkv4(key, value, log_decay, bonus, state, mask)

        if cache is not None:
            cache[0] = shift_out
            cache[1] = state
        return self.o_proj(receptance * out.astype(x.dtype) * scale)


class ChannelMix(nn.Module):
    """Squared-ReLU feed-forward gated by a receptance, shared by RWKV-4 and 5."""

    def __init__(self, args):
        super().__init__()
        C, F = args.hidden_size, args.intermediate_size
        self.time_mix_k = mx.zeros((C,))
        self.time_mix_r = mx.zeros((C,))
        self.key = nn.Linear(C, F, bias=False)
        self.value = nn.Linear(F, C, bias=False)
        self.receptance = nn.Linear(C, C, bias=False)

    def __call__(self, x, cache, mask, scale: float):
        previous = cache[2] if cache is not None else None
        shifted, shift_out = token_shift(x, previous, mask)
        if cache is not None:
            cache[2] = shift_out

        receptance = fast_math.sigmoid(self.receptance(mix(x, shifted, self.time_mix_r)))
        hidden = mx.square(nn.relu(self.key(mix(x, shifted, self.time_mix_k))))
        return receptance * linear(self.value, hidden * scale)


class Block(nn.Module):
    """One layer: a time mix and a channel mix, each on the layer-normed
    residual stream; shared by RWKV-4, 5 and 6."""

    def __init__(self, args, layer_idx: int, time_mix: nn.Module, channel_mix: nn.Module):
        super().__init__()
        self.layer_idx = layer_idx
        self.rescale_every = args.rescale_every
        if layer_idx == 0:
            self.pre_norm = nn.LayerNorm(args.hidden_size, eps=args.norm_eps)
        self.attn_norm = nn.LayerNorm(args.hidden_size, eps=args.norm_eps)
        self.attn = time_mix
        self.ffn_norm = nn.LayerNorm(args.hidden_size, eps=args.norm_eps)
        self.ffn = channel_mix

    def __call__(self, x, cache, mask):
        if self.layer_idx == 0:
            x = self.pre_norm(x)
        if x.dtype == mx.float16 and self.attn_norm.weight.dtype == mx.float32:
            # A float32 layer after float16 ones (a full fine-tune trains the
            # last layers of a float16 model in float32): undo the float16
            # halving, because a float32 stream is never scaled.
            x = x.astype(mx.float32) / residual_scale(self.layer_idx, mx.float16, self.rescale_every)
        scale = residual_scale(self.layer_idx, x.dtype, self.rescale_every)
        x = x + self.attn(self.attn_norm(x), cache, mask, scale)
        x = x + self.ffn(self.ffn_norm(x), cache, mask, scale)

        # Halve the stream where the next layer's scale drops. The final
        # layer norm undoes any such factor.
        if residual_scale(self.layer_idx + 1, x.dtype, self.rescale_every) != scale:
            x = x * 0.5
        return x


class RwkvModel(nn.Module):
    """Embedding, blocks and final norm, shared by RWKV-4, 5 and 6."""

    def __init__(self, args, blocks: List[nn.Module]):
        super().__init__()
        self.embeddings = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = blocks
        self.norm = nn.LayerNorm(args.hidden_size, eps=args.norm_eps)

    def __call__(self, inputs: mx.array, cache=None, mask=None):
        x = self.embeddings(inputs)
        if cache is None:
            cache = [None] * len(self.layers)
        if mask is None and cache[0] is not None:
            mask = cache[0].make_mask(inputs.shape[1])

        for layer, layer_cache in zip(self.layers, cache):
            x = layer(x, layer_cache, mask)

        # mlx-lm's batched caches count their padding from the start of the
        # next call, so a padded prompt fed in chunks needs them moved on.
        for layer_cache in cache:
            if hasattr(layer_cache, "advance"):
                layer_cache.advance(inputs.shape[1])
        return self.norm(x)


class LanguageModel(nn.Module):
    """An RWKV-4, 5 or 6 language model with mlx-lm's model protocol: the
    blocks of one version, built from its time mix and channel mix, and an
    output head.

    Args:
        args: The version's ``ModelArgs``.
        time_mix, channel_mix: The version's module classes, called with ``args``.
        version (str): The version, as ``rwkv_mlx.io.layout_older`` names
            it (``4``, ``5``, ``5.1``, ``5.2``, ``6``), for ``sanitize``.
    """

    def __init__(self, args, time_mix: type, channel_mix: type, version: str):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.version = version
        blocks = [Block(args, i, time_mix(args), channel_mix(args)) for i in range(args.num_hidden_layers)]
        self.model = RwkvModel(args, blocks)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, inputs: mx.array, cache: Optional[List[Any]] = None, mask: Optional[mx.array] = None):
        """Compute the logits for every position.

        Args:
            inputs (mx.array): Token ids, [B, T].
            cache (list, optional): One cache per layer from ``make_cache``,
                updated in place. Without it every sequence starts from the
                empty state.
            mask (mx.array, optional): Valid positions, [B, T] bool; padded
                positions leave the cache unchanged. Taken from the cache's
                padding when not given.

        Returns:
            mx.array: Logits, [B, T, vocab_size].
        """
        check_inputs(inputs)
        if cache is not None:
            C = self.args.hidden_size
            if self.version == "4":
                state = (3, C)
            else:
                N = self.args.head_dim
                state = (C // N, N, N)
            check_cache(cache, len(self.layers), inputs.shape[0], ((1, C), state, (1, C)))
        return linear(self.lm_head, self.model(inputs, cache, mask))

    @property
    def layers(self):
        return self.model.layers

    def make_cache(self) -> List[ArraysCache]:
        """Return one empty cache per layer: token shifts and WKV state."""
        return [ArraysCache(size=3) for _ in self.layers]

    def sanitize(self, weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
        """Bring weights of this version in the official or the canonical layout into this model's."""
        from ..io.layout_older import official_to_canonical, reshape_canonical

        if any(name.startswith("blocks.") for name in weights):
            return official_to_canonical(weights, self.version, "weights")
        return reshape_canonical(dict(weights), self.version, "weights")

    @property
    def quant_predicate(self):
        """Keep the embedding and head at 8 bits."""

        def predicate(path: str, module: nn.Module):
            if "embeddings" in path or "lm_head" in path:
                return {"bits": 8, "group_size": 64}
            return True

        return predicate


class Model(LanguageModel):
    """RWKV-4 language model with mlx-lm's model protocol."""

    def __init__(self, args: ModelArgs):
        super().__init__(args, TimeMix, ChannelMix, "4")
