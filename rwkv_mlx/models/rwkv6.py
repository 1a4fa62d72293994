"""RWKV-6 "Finch" (x060) in MLX.

Parameter names and shapes are listed in ``rwkv_mlx.io.layout_older``. RWKV-6
makes RWKV-5.2's token shift and decay depend on the input: a low-rank
projection of the shifted input adds to each of the five token-shift mixes
(w, k, v, r, g), and another adds to the decay of every channel.

Each layer's cache contains three entries, as for RWKV-7:

    cache[0]  time-mix token shift: the last input of the time mix, [B, 1, C]
    cache[1]  WKV state, [B, H, N, N] float32, indexed [value, key]
    cache[2]  channel-mix token shift, [B, 1, C]

The official ``rwkv`` package keeps the WKV state as [key, value], the
transpose. The state, keys, values, receptances and decay are float32
whatever the weights are; float16 models halve their residual stream as
``rwkv_mlx.models.rwkv4`` describes.
"""

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import BaseModelArgs

from ..ops import fast_math, wkv6
from ..ops.linear import linear
from .rwkv4 import DEFAULT_RESCALE_EVERY, LanguageModel
from .rwkv5 import GROUP_NORM_EPS
from .rwkv7 import GroupNormPerHead, token_shift

# The token-shift mixes that the low-rank projection adjusts, in its order.
MIXES = ("w", "k", "v", "r", "g")


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    head_dim: int
    mix_low_rank_dim: int
    decay_low_rank_dim: int
    norm_eps: float = 1e-5
    rescale_every: int = DEFAULT_RESCALE_EVERY


class TimeMix(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        C = args.hidden_size
        self.num_heads = C // args.head_dim
        self.head_dim = args.head_dim

        for name in ("x",) + MIXES:
            setattr(self, f"time_maa_{name}", mx.zeros((C,)))
        self.time_maa_w1 = mx.zeros((C, len(MIXES) * args.mix_low_rank_dim))
        self.time_maa_w2 = mx.zeros((len(MIXES), args.mix_low_rank_dim, C))
        self.time_decay = mx.zeros((C,))
        self.time_decay_w1 = mx.zeros((C, args.decay_low_rank_dim))
        self.time_decay_w2 = mx.zeros((args.decay_low_rank_dim, C))
        self.time_faaaa = mx.zeros((self.num_heads, self.head_dim))

        self.r_proj = nn.Linear(C, C, bias=False)
        self.k_proj = nn.Linear(C, C, bias=False)
        self.v_proj = nn.Linear(C, C, bias=False)
        self.g_proj = nn.Linear(C, C, bias=False)
        self.o_proj = nn.Linear(C, C, bias=False)
        self.g_norm = GroupNormPerHead(self.num_heads, self.head_dim, eps=GROUP_NORM_EPS)

    def __call__(self, x, cache, mask, scale: float):
        B, T, C = x.shape
        H, N = self.num_heads, self.head_dim

        # Data-dependent token shift: a low-rank projection of the shifted
        # input adds to each of the five mixes.
        previous = cache[0] if cache is not None else None
        shifted, shift_out = token_shift(x, previous, mask)
        delta = shifted - x
        hidden = mx.tanh((x + delta * self.time_maa_x) @ self.time_maa_w1)
        hidden = hidden.reshape(B * T, len(MIXES), -1).transpose(1, 0, 2)
        adjust = (hidden @ self.time_maa_w2).reshape(len(MIXES), B, T, C)
        xw, xk, xv, xr, xg = (
            x + delta * (getattr(self, f"time_maa_{name}") + adjust[i]) for i, name in enumerate(MIXES)
        )

        receptance = self.r_proj(xr).astype(mx.float32).reshape(B, T, H, N)
        key = self.k_proj(xk).astype(mx.float32).reshape(B, T, H, N)
        value = self.v_proj(xv).astype(mx.float32).reshape(B, T, H, N)
        gate = nn.silu(self.g_proj(xg))

        # Data-dependent decay, exp(-exp(time_decay + low-rank(xw))), kept as its log in float32.
        decay_input = mx.tanh(xw @ self.time_decay_w1) @ self.time_decay_w2
        log_decay = -mx.exp(self.time_decay.astype(mx.float32) + decay_input.astype(mx.float32))
        log_decay = log_decay.reshape(B, T, H, N)
        if mask is not None:
            valid = mask[:, :, None, None]
            log_decay = mx.where(valid, log_decay, 0.0)
            key = mx.where(valid, key, 0.0)
            value = mx.where(valid, value, 0.0)

        state = cache[1] if cache is not None else None
        if state is None:
            state = mx.zeros((B, H, N, N), dtype=mx.float32)
        y, state = wkv6(receptance, log_decay, key, value, self.time_faaaa.astype(mx.float32), state)

        out = self.g_norm(y).reshape(B, T, C).astype(x.dtype) * gate
        if cache is not None:
            cache[0] = shift_out
            cache[1] = state
        return self.o_proj(out * scale)


class ChannelMix(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        C, F = args.hidden_size, args.intermediate_size
        self.time_maa_k = mx.zeros((C,))
        self.time_maa_r = mx.zeros((C,))
        self.key = nn.Linear(C, F, bias=False)
        self.value = nn.Linear(F, C, bias=False)
        self.receptance = nn.Linear(C, C, bias=False)

    def __call__(self, x, cache, mask, scale: float):
        previous = cache[2] if cache is not None else None
        shifted, shift_out = token_shift(x, previous, mask)
        if cache is not None:
            cache[2] = shift_out

        delta = shifted - x
        receptance = fast_math.sigmoid(self.receptance(x + delta * self.time_maa_r))
        hidden = mx.square(nn.relu(self.key(x + delta * self.time_maa_k)))
        return receptance * linear(self.value, hidden * scale)


class Model(LanguageModel):
    """RWKV-6 language model with mlx-lm's model protocol."""

    def __init__(self, args: ModelArgs):
        super().__init__(args, TimeMix, ChannelMix, "6")
