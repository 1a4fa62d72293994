"""RWKV-5 "Eagle" (5.0, 5.1 and 5.2) in MLX.

Parameter names and shapes are listed in ``rwkv_mlx.io.layout_older``. The
three versions differ only in the time mix, chosen by ``ModelArgs.version``:

- 5.0: one decay and one bonus per head, no gate;
- 5.1: as 5.0, plus a SiLU gate on the output (``g_proj``, ``time_mix_g``);
- 5.2: as 5.1, with one decay and one bonus per channel.

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

from ..ops import wkv5
from .rwkv4 import DEFAULT_RESCALE_EVERY, ChannelMix, LanguageModel, mix
from .rwkv7 import GroupNormPerHead, token_shift

VERSIONS = ("5", "5.1", "5.2")

# Epsilon of the per-head group norm in the official ``rwkv`` package
# (0.8.32). rwkv.cpp uses 1e-5 for RWKV-5, so its files set ``group_norm_eps``.
GROUP_NORM_EPS = 64e-5


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    head_dim: int
    version: str = "5.2"
    norm_eps: float = 1e-5
    group_norm_eps: float = GROUP_NORM_EPS
    rescale_every: int = DEFAULT_RESCALE_EVERY

    def __post_init__(self):
        self.version = str(self.version)
        if self.version not in VERSIONS:
            raise ValueError(f"invalid RWKV-5 version '{self.version}': expected one of {', '.join(VERSIONS)}")
        if self.hidden_size % self.head_dim:
            raise ValueError(f"invalid head_dim {self.head_dim}: it must divide hidden_size {self.hidden_size}")


class TimeMix(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        C = args.hidden_size
        self.num_heads = C // args.head_dim
        self.head_dim = args.head_dim
        self.gated = args.version != "5"
        # 5.0 and 5.1 share one decay and one bonus among a head's channels.
        per_head = args.head_dim if args.version == "5.2" else 1

        self.time_mix_k = mx.zeros((C,))
        self.time_mix_v = mx.zeros((C,))
        self.time_mix_r = mx.zeros((C,))
        if self.gated:
            self.time_mix_g = mx.zeros((C,))
        self.time_decay = mx.zeros((self.num_heads, per_head))
        self.time_faaaa = mx.zeros((self.num_heads, per_head))

        self.r_proj = nn.Linear(C, C, bias=False)
        self.k_proj = nn.Linear(C, C, bias=False)
        self.v_proj = nn.Linear(C, C, bias=False)
        if self.gated:
            self.g_proj = nn.Linear(C, C, bias=False)
        self.o_proj = nn.Linear(C, C, bias=False)
        self.g_norm = GroupNormPerHead(self.num_heads, self.head_dim, eps=args.group_norm_eps)

    def __call__(self, x, cache, mask, scale: float):
        B, T, C = x.shape
        H, N = self.num_heads, self.head_dim

        previous = cache[0] if cache is not None else None
        shifted, shift_out = token_shift(x, previous, mask)
        receptance = self.r_proj(mix(x, shifted, self.time_mix_r)).astype(mx.float32).reshape(B, T, H, N)
        key = self.k_proj(mix(x, shifted, self.time_mix_k)).astype(mx.float32).reshape(B, T, H, N)
        value = self.v_proj(mix(x, shifted, self.time_mix_v)).astype(mx.float32).reshape(B, T, H, N)

        log_decay = mx.broadcast_to(-mx.exp(self.time_decay.astype(mx.float32)), (H, N))
        bonus = mx.broadcast_to(self.time_faaaa.astype(mx.float32), (H, N))
        if mask is not None:
            valid = mask[:, :, None, None]
            log_decay = mx.where(valid, log_decay, 0.0)
            key = mx.where(valid, key, 0.0)
            value = mx.where(valid, value, 0.0)

        state = cache[1] if cache is not None else None
        if state is None:
            state = mx.zeros((B, H, N, N), dtype=mx.float32)
        y, state = wkv5(receptance, log_decay, key, value, bonus, state)

        out = self.g_norm(y).reshape(B, T, C).astype(x.dtype)
        if self.gated:
            out = out * nn.silu(self.g_proj(mix(x, shifted, self.time_mix_g)))

        if cache is not None:
            cache[0] = shift_out
            cache[1] = state
        return self.o_proj(out * scale)


class Model(LanguageModel):
    """RWKV-5 language model with mlx-lm's model protocol."""

    def __init__(self, args: ModelArgs):
        super().__init__(args, TimeMix, ChannelMix, args.version)
