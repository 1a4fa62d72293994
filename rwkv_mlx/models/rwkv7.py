"""RWKV-7 "Goose" (x070) in MLX.

Parameter names and shapes match mlx-lm's ``rwkv7`` model (see
``rwkv_mlx.io.layout7`` for the table and the official names), so weights
move between the two unchanged. Each layer's cache contains three entries:

    cache[0]  time-mix token shift: the last input of the layer, [B, 1, C]
    cache[1]  WKV state, [B, H, N, N] float32, indexed [value, key]
    cache[2]  channel-mix token shift, [B, 1, C]

The state and the decay are float32 whatever the weights are.
"""

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import BaseModelArgs
from mlx_lm.models.cache import ArraysCache

from ..ops import fast_math, metal, wkv7
from ..ops.linear import linear

# The decay is exp(-exp(-0.5) * sigmoid(z)): the official form
# exp(-exp(-softplus(-z) - 0.5)) rewritten, so it lies in (exp(-0.6065), 1).
DECAY_SCALE = math.exp(-0.5)


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    norm_eps: float
    head_dim: int
    num_hidden_layers: int
    a_low_rank_dim: int
    v_low_rank_dim: int
    gate_low_rank_dim: int
    decay_low_rank_dim: int
    tie_word_embeddings: bool = False


class LowRank(nn.Module):
    """Low-rank projection ``lora[2](activation(lora[0](x)))``, named ``lora``
    as in the published checkpoints."""

    def __init__(self, dims: int, rank: int, activation: Optional[str], bias: bool = True):
        super().__init__()
        self.activation = activation
        self.lora = [
            nn.Linear(dims, rank, bias=False),
            nn.Identity(),
            nn.Linear(rank, dims, bias=bias),
        ]

    def __call__(self, x: mx.array) -> mx.array:
        h = self.lora[0](x)
        if self.activation == "tanh":
            h = mx.tanh(h)
        elif self.activation == "sigmoid":
            h = fast_math.sigmoid(h)
        return self.lora[2](h)


class GroupNormPerHead(nn.Module):
    """Layer norm over each head's N channels, with per-channel affine [H, N]."""

    def __init__(self, heads: int, head_dim: int, eps: float):
        super().__init__()
        self.weight = mx.ones((heads, head_dim))
        self.bias = mx.zeros((heads, head_dim))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.layer_norm(x, None, None, self.eps) * self.weight + self.bias


def token_shift(x: mx.array, previous: Optional[mx.array], mask: Optional[mx.array]):
    """Return the input of the previous position for every position, and the
    token-shift vector to carry forward.

    Args:
        x (mx.array): Layer input, [B, T, C].
        previous (mx.array, optional): The last input before this call, [B, 1, C].
        mask (mx.array, optional): Valid positions, [B, T] bool. Padding must
            form a prefix or a suffix (as mlx-lm's batched caches produce).

    Returns:
        tuple[mx.array, mx.array]: The shifted input [B, T, C] and the new
        token-shift vector [B, 1, C].
    """
    B, T, C = x.shape
    if previous is None:
        previous = mx.zeros((B, 1, C), dtype=x.dtype)
    previous = previous.astype(x.dtype)

    if mask is not None:
        # Padding takes the carried vector, so the first real position reads it
        # and a trailing pad does not overwrite it.
        x = mx.where(mask[..., None], x, previous)
        last = mx.max(mx.where(mask, mx.arange(T), 0), axis=1)
        shift_out = mx.take_along_axis(x, last[:, None, None], axis=1)
    elif T == 1:
        shift_out = x
    else:
        shift_out = mx.contiguous(x[:, -1:, :])
    if T == 1:
        return previous, shift_out

    # The carried vector is a copy, made before the layer goes on (mx.depends).
    # A slice, or a copy that MLX schedules after the whole model as it does
    # for outputs such as the cache, keeps every layer's [B, T, C] input alive
    # until the end. For a 512-token prefill of the 0.1B shape in float32 that
    # raised the peak from 36 to 91 MB above the weights (timed by hand).
    shifted = mx.concatenate([previous, x[:, :-1, :]], axis=1)
    return mx.depends(shifted, shift_out), shift_out


def _lerp(x: mx.array, delta: mx.array, mix: mx.array) -> mx.array:
    return x + delta * mix


class TimeMix(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        C = args.hidden_size
        self.layer_idx = layer_idx
        self.head_dim = args.head_dim
        self.num_heads = C // args.head_dim

        for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"):
            setattr(self, name, mx.zeros((1, 1, C)))
        self.k_k = mx.zeros((self.num_heads, self.head_dim))
        self.k_a = mx.zeros((self.num_heads, self.head_dim))
        self.r_k = mx.zeros((self.num_heads, self.head_dim))

        self.r_proj = nn.Linear(C, C, bias=False)
        self.k_proj = nn.Linear(C, C, bias=False)
        self.v_proj = nn.Linear(C, C, bias=False)
        self.o_proj = nn.Linear(C, C, bias=False)

        self.w_lora = LowRank(C, args.decay_low_rank_dim, "tanh")
        self.a_lora = LowRank(C, args.a_low_rank_dim, None)
        if layer_idx > 0:
            self.v_lora = LowRank(C, args.v_low_rank_dim, None)
        self.g_lora = LowRank(C, args.gate_low_rank_dim, "sigmoid", bias=False)
        self.g_norm = GroupNormPerHead(self.num_heads, self.head_dim, eps=64e-5)

    def __call__(self, x, v_first, cache, mask):
        B, T, C = x.shape
        H, N = self.num_heads, self.head_dim

        # Token shift: mix each input with the one before it.
        previous = cache[0] if cache is not None else None
        shifted, shift_out = token_shift(x, previous, mask)
        delta = shifted - x
        xr, xw, xk = _lerp(x, delta, self.x_r), _lerp(x, delta, self.x_w), _lerp(x, delta, self.x_k)
        xv, xa, xg = _lerp(x, delta, self.x_v), _lerp(x, delta, self.x_a), _lerp(x, delta, self.x_g)

        # Receptance, key, value, in-context learning rate and gate.
        receptance = self.r_proj(xr).reshape(B, T, H, N)
        key = self.k_proj(xk).reshape(B, T, H, N)
        value = self.v_proj(xv).reshape(B, T, H, N)
        learning_rate = fast_math.sigmoid(self.a_lora(xa)).reshape(B, T, H, N)
        gate = self.g_lora(xg)

        # Value residual: later layers mix in the first layer's value.
        if self.layer_idx == 0:
            v_first = value
        else:
            value_mix = fast_math.sigmoid(self.v_lora(xv)).reshape(B, T, H, N)
            value = value + (v_first - value) * value_mix

        # Log decay in float32, so decays near 1 keep their distance from 1.
        log_decay = -DECAY_SCALE * fast_math.sigmoid(self.w_lora(xw).astype(mx.float32))
        log_decay = log_decay.reshape(B, T, H, N)

        # The state's removal key is the normalised key; its replacement is
        # scaled by the learning rate.
        removal_key = key * self.k_k
        removal_key = removal_key / mx.maximum(mx.linalg.norm(removal_key, axis=-1, keepdims=True), 1e-12)
        key = key * (1 + (learning_rate - 1) * self.k_a)
        a = -removal_key
        b = removal_key * learning_rate

        if mask is not None:
            valid = mask[:, :, None, None]
            log_decay = mx.where(valid, log_decay, 0.0)
            key, value, a, b = (mx.where(valid, t, 0) for t in (key, value, a, b))

        state = cache[1] if cache is not None else None
        if state is None:
            state = mx.zeros((B, H, N, N), dtype=mx.float32)
        y, state = wkv7(receptance, log_decay, key, value, a, b, state)

        # Per-head normalisation plus the receptance-key bonus, then the gate.
        bonus = (receptance * key * self.r_k).sum(axis=-1, keepdims=True) * value
        out = self.g_norm(y) + bonus
        out = out.reshape(B, T, C).astype(x.dtype)

        if cache is not None:
            cache[0] = shift_out
            cache[1] = state
        return self.o_proj(out * gate), v_first


class ChannelMix(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.x_k = mx.zeros((args.hidden_size,))
        self.key = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.value = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    def __call__(self, x, cache, mask):
        previous = cache[2] if cache is not None else None
        shifted, shift_out = token_shift(x, previous, mask)
        if cache is not None:
            cache[2] = shift_out

        xk = x + (shifted - x) * self.x_k
        return linear(self.value, mx.square(nn.relu(self.key(xk))))


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        if layer_idx == 0:
            self.pre_norm = nn.LayerNorm(args.hidden_size, eps=args.norm_eps)
        self.attn_norm = nn.LayerNorm(args.hidden_size, eps=args.norm_eps)
        self.attn = TimeMix(args, layer_idx)
        self.ffn_norm = nn.LayerNorm(args.hidden_size, eps=args.norm_eps)
        self.ffn = ChannelMix(args)

    def __call__(self, x, v_first, cache, mask):
        if self.layer_idx == 0:
            x = self.pre_norm(x)
        h, v_first = self.attn(self.attn_norm(x), v_first, cache, mask)
        x = x + h
        x = x + self.ffn(self.ffn_norm(x), cache, mask)
        return x, v_first


class Rwkv7Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embeddings = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [Block(args, i) for i in range(args.num_hidden_layers)]
        self.norm = nn.LayerNorm(args.hidden_size, eps=args.norm_eps)

    def __call__(self, inputs: mx.array, cache=None, mask=None):
        x = self.embeddings(inputs)
        if cache is None:
            cache = [None] * len(self.layers)
        if mask is None and cache[0] is not None:
            mask = cache[0].make_mask(inputs.shape[1])

        v_first = None
        for layer, layer_cache in zip(self.layers, cache):
            x, v_first = layer(x, v_first, layer_cache, mask)

        # mlx-lm's batched caches count their padding from the start of the
        # next call, so a padded prompt fed in chunks needs them moved on.
        for layer_cache in cache:
            if hasattr(layer_cache, "advance"):
                layer_cache.advance(inputs.shape[1])
        return self.norm(x)


def _is_decode_step(inputs: mx.array, cache: Optional[List[Any]]) -> bool:
    """Return whether a call decodes one token from filled, unpadded caches on
    the CPU, which ``Model._decode_step`` runs compiled.

    NOTE: on a Mac GPU the step stays uncompiled: the Metal decode kernel has
    not run inside ``mx.compile`` on a real GPU yet.
    """
    if inputs.shape[1] != 1 or cache is None or mx.default_device() != mx.cpu or metal.metal_available():
        return False
    for layer_cache in cache:
        if type(layer_cache) is not ArraysCache or any(entry is None for entry in layer_cache.cache):
            return False
        if layer_cache.left_padding is not None or layer_cache.lengths is not None:
            return False
    return True


CACHE_ENTRY_NAMES = ("time-mix token shift", "WKV state", "channel-mix token shift")


def check_inputs(inputs: mx.array) -> None:
    """Raise ValueError unless ``inputs`` is a [B, T] integer array of token ids."""
    if inputs.ndim != 2 or not mx.issubdtype(inputs.dtype, mx.integer):
        raise ValueError(f"expected token ids as an integer array [B, T], got {inputs.dtype} of shape {list(inputs.shape)}")


def check_cache(cache: List[Any], layers: int, batch: int, entry_shapes: Sequence[Tuple[int, ...]]) -> None:
    """Raise ValueError unless ``cache`` fits a model and a batch of ``batch``.

    A cache of another model or version would otherwise fail deep inside the
    model with a shape error, give wrong output, or, in RWKV-7's compiled
    decode step, leave the model's parameters unusable. Empty entries pass,
    and a batch of 1 in the cache broadcasts to any batch.

    Args:
        cache (list): One cache per layer, each with the entries of
            ``CACHE_ENTRY_NAMES``.
        layers (int): The model's layer count.
        batch (int): The batch size of the call.
        entry_shapes (Sequence[tuple[int, ...]]): Each entry's shape without
            the batch dimension.
    """
    if len(cache) != layers:
        raise ValueError(
            f"the cache has {len(cache)} layers but the model has {layers}; "
            "make the cache with this model's make_cache()"
        )

    for index, layer_cache in enumerate(cache):
        for name, entry, shape in zip(CACHE_ENTRY_NAMES, getattr(layer_cache, "cache", ()), entry_shapes):
            if entry is None:
                continue
            if tuple(entry.shape[1:]) != tuple(shape):
                raise ValueError(
                    f"layer {index}'s {name} in the cache has shape {list(entry.shape)}, but this model needs "
                    f"{[batch, *shape]} for a batch of {batch}; make the cache with this model's make_cache(), "
                    "or load a state saved from this model"
                )
            if entry.shape[0] not in (1, batch):
                raise ValueError(
                    f"the cache contains a batch of {entry.shape[0]} sequences (layer {index}'s {name}), but the "
                    f"input has {batch}; pass that many sequences, or take one sequence's rows from the cache"
                )


def sanitize(weights: Dict[str, mx.array], source: str = "weights") -> Dict[str, mx.array]:
    """Bring RWKV-7 weights in the official or an mlx-lm/fla layout into this model's."""
    from ..io.layout7 import official_to_canonical, reshape_canonical

    if any(name.startswith("blocks.") for name in weights):
        return official_to_canonical(weights, source)
    return reshape_canonical(dict(weights), source)


class Model(nn.Module):
    """RWKV-7 language model with mlx-lm's model protocol."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = Rwkv7Model(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, inputs: mx.array, cache: Optional[List[Any]] = None, mask: Optional[mx.array] = None):
        """Compute the logits for every position.

        Args:
            inputs (mx.array): Token ids, [B, T].
            cache (list, optional): One cache per layer from ``make_cache``,
                updated in place. Without it every sequence starts from the
                zero state.
            mask (mx.array, optional): Valid positions, [B, T] bool; padded
                positions leave the cache unchanged. Taken from the cache's
                padding when not given.

        Returns:
            mx.array: Logits, [B, T, vocab_size].
        """
        check_inputs(inputs)
        if cache is not None:
            C, N = self.args.hidden_size, self.args.head_dim
            check_cache(cache, len(self.layers), inputs.shape[0], ((1, C), (C // N, N, N), (1, C)))
        if mask is None and _is_decode_step(inputs, cache):
            return self._decode_step(inputs, cache)
        return self._logits(inputs, cache, mask)

    def _logits(self, inputs: mx.array, cache: Optional[List[Any]], mask: Optional[mx.array]) -> mx.array:
        x = self.model(inputs, cache, mask)
        if self.args.tie_word_embeddings:
            return self.model.embeddings.as_linear(x)
        return linear(self.lm_head, x)

    def _decode_step(self, inputs: mx.array, cache: List[ArraysCache]) -> mx.array:
        """Compute one token's logits through a compiled graph of the whole model.

        Compiling took the 0.1B shape's decode on the CPU of
        docs/benchmarks.md from 48.1 to 41.9-44.3 ms per token. The model's
        parameters are inputs of the compiled function, so new weights or
        adapters are used as they are.
        """
        step = getattr(self, "_compiled_decode", None)
        if step is None:

            def decode(inputs, states):
                caches = []
                for layer in range(len(self.layers)):
                    layer_cache = ArraysCache(size=3)
                    layer_cache.cache = list(states[3 * layer : 3 * layer + 3])
                    caches.append(layer_cache)
                logits = self._logits(inputs, caches, None)
                return logits, [entry for layer_cache in caches for entry in layer_cache.cache]

            step = mx.compile(decode, inputs=[self])
            self._compiled_decode = step
            self._decode_signature = None

        states = [entry for layer_cache in cache for entry in layer_cache.cache]
        signature = (inputs.shape, inputs.dtype, *((entry.shape, entry.dtype) for entry in states))
        if signature == getattr(self, "_decode_signature", None):
            logits, states = step(inputs, states)
        else:
            # New shapes make MLX trace the step. Tracing swaps the parameters
            # for placeholders and puts them back only when it succeeds, so the
            # parameters are kept here to put back after an error. Keeping them
            # walks the whole parameter tree, so only calls that trace pay it.
            # NOTE: a trace that new weight shapes alone cause (adapters added
            # after the first decode step) is not covered.
            parameters = self.parameters()
            try:
                logits, states = step(inputs, states)
            except Exception:
                self.update(parameters)
                self._compiled_decode = None
                raise
            # Set as a plain attribute, because nn.Module stores a tuple set
            # the usual way in its parameter tree.
            object.__setattr__(self, "_decode_signature", signature)
        for layer, layer_cache in enumerate(cache):
            layer_cache.cache = list(states[3 * layer : 3 * layer + 3])
        return logits

    @property
    def layers(self):
        return self.model.layers

    def make_cache(self) -> List[ArraysCache]:
        """Return one empty cache per layer: token shifts and WKV state."""
        return [ArraysCache(size=3) for _ in self.layers]

    def sanitize(self, weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
        """Bring weights from any supported RWKV-7 layout into this model's."""
        return sanitize(weights)

    @property
    def quant_predicate(self):
        """Keep the embedding and head at 8 bits and leave the low-rank
        matrices, too small to gain from it, unquantized."""

        def predicate(path: str, module: nn.Module):
            if ".lora." in path:
                return False
            if "embeddings" in path or "lm_head" in path:
                return {"bits": 8, "group_size": 64}
            return True

        return predicate
