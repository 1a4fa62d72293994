"""LoRA and DoRA layers around a frozen linear layer, dense or quantized (QLoRA).

Both use mlx-lm's parameter names and shapes, so adapters move between the two
tools: ``lora_a`` [input_dims, rank], ``lora_b`` [rank, output_dims], the
frozen layer under ``linear``, and for DoRA the magnitude ``m`` [output_dims].

LoRA computes ``y = x W^T + scale * (x A) B``. DoRA rescales every output row
of the adapted weight ``W' = W + scale * (A B)^T`` to the learned magnitude:
``y = (m / ||W'||_row) * (x W'^T)``, plus the layer's bias.
"""

import math
from typing import Union

import mlx.core as mx
import mlx.nn as nn

Linear = Union[nn.Linear, nn.QuantizedLinear]


def _dimensions(linear: Linear):
    """Return (input_dims, output_dims) of a dense or quantized linear layer."""
    output_dims, packed_dims = linear.weight.shape
    if isinstance(linear, nn.QuantizedLinear):
        return packed_dims * 32 // linear.bits, output_dims
    return packed_dims, output_dims


def dense_weight(linear: Linear) -> mx.array:
    """Return the weight of a linear or embedding layer, de-quantized if it is quantized."""
    if isinstance(linear, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
        return mx.dequantize(
            linear.weight,
            linear.scales,
            linear.get("biases"),
            group_size=linear.group_size,
            bits=linear.bits,
            mode=getattr(linear, "mode", "affine"),
        )
    return linear.weight


def _rebuild_linear(linear: Linear, weight: mx.array, dequantize: bool) -> Linear:
    """Return a layer like ``linear`` with a new dense weight, re-quantized
    with the same settings unless ``dequantize``."""
    output_dims, input_dims = weight.shape
    bias = "bias" in linear
    fused = nn.Linear(input_dims, output_dims, bias=bias)
    fused.weight = weight
    if bias:
        fused.bias = linear.bias
    if isinstance(linear, nn.QuantizedLinear) and not dequantize:
        fused = nn.QuantizedLinear.from_linear(
            fused, linear.group_size, linear.bits, mode=getattr(linear, "mode", "affine")
        )
    return fused


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update ``scale * (x A) B``.

    ``lora_b`` starts at zero, so a new adapter leaves the output unchanged.
    """

    @classmethod
    def from_base(cls, linear: Linear, rank: int = 8, scale: float = 20.0, dropout: float = 0.0) -> "LoRALinear":
        """Wrap an existing linear layer, which stays as it is."""
        input_dims, output_dims = _dimensions(linear)
        layer = cls(input_dims, output_dims, rank=rank, scale=scale, dropout=dropout)
        layer.linear = linear
        return layer

    def __init__(
        self,
        input_dims: int,
        output_dims: int,
        rank: int = 8,
        scale: float = 20.0,
        dropout: float = 0.0,
        bias: bool = False,
    ):
        super().__init__()
        if rank < 1:
            raise ValueError(f"the LoRA rank must be at least 1, got {rank}")
        self.linear = nn.Linear(input_dims, output_dims, bias=bias)
        self.dropout = nn.Dropout(p=dropout)
        self.scale = scale

        bound = 1 / math.sqrt(input_dims)
        self.lora_a = mx.random.uniform(low=-bound, high=bound, shape=(input_dims, rank))
        self.lora_b = mx.zeros((rank, output_dims))

    def delta_weight(self) -> mx.array:
        """Return the update to the weight, ``scale * (A B)^T``, [output_dims, input_dims]."""
        return (self.scale * self.lora_b.T) @ self.lora_a.T

    def fuse(self, dequantize: bool = False) -> Linear:
        """Return a plain layer with the update merged into its weight.

        Args:
            dequantize (bool): Return a dense layer even when the base layer
                is quantized; otherwise the merged weight is quantized again
                with the base layer's settings.

        Returns:
            nn.Linear | nn.QuantizedLinear: The merged layer.
        """
        weight = dense_weight(self.linear)
        weight = weight + self.delta_weight().astype(weight.dtype)
        return _rebuild_linear(self.linear, weight, dequantize)

    def __call__(self, x: mx.array) -> mx.array:
        y = self.linear(x)
        update = (self.dropout(x) @ self.lora_a) @ self.lora_b
        return y + (self.scale * update).astype(x.dtype)


class DoRALinear(nn.Module):
    """A frozen linear layer with a low-rank update of its direction and a
    trainable magnitude per output row.

    ``m`` starts at the row norms of the frozen weight and ``lora_b`` at zero,
    so a new adapter leaves the output unchanged. Unlike mlx-lm's DoRA
    (0.32), the gradient flows through the row norms of the adapted weight, so
    it is the exact gradient of the loss. The outputs of the two agree.
    """

    @classmethod
    def from_base(cls, linear: Linear, rank: int = 8, scale: float = 20.0, dropout: float = 0.0) -> "DoRALinear":
        """Wrap an existing linear layer, which stays as it is."""
        input_dims, output_dims = _dimensions(linear)
        layer = cls(input_dims, output_dims, rank=rank, scale=scale, dropout=dropout)
        layer.set_linear(linear)
        return layer

    def __init__(
        self,
        input_dims: int,
        output_dims: int,
        rank: int = 8,
        scale: float = 20.0,
        dropout: float = 0.0,
        bias: bool = False,
    ):
        super().__init__()
        if rank < 1:
            raise ValueError(f"the DoRA rank must be at least 1, got {rank}")
        self.dropout = nn.Dropout(p=dropout)
        self.scale = scale

        bound = 1 / math.sqrt(input_dims)
        self.lora_a = mx.random.uniform(low=-bound, high=bound, shape=(input_dims, rank))
        self.lora_b = mx.zeros((rank, output_dims))
        self.set_linear(nn.Linear(input_dims, output_dims, bias=bias))

    def set_linear(self, linear: Linear) -> None:
        """Use ``linear`` as the frozen layer and reset ``m`` to its row norms."""
        self.linear = linear
        self.m = mx.linalg.norm(dense_weight(linear).astype(mx.float32), axis=1)

    def adapted_weight(self) -> mx.array:
        """Return ``W + scale * (A B)^T`` in float32, [output_dims, input_dims]."""
        weight = dense_weight(self.linear).astype(mx.float32)
        return weight + (self.scale * self.lora_b.T) @ self.lora_a.T

    def fuse(self, dequantize: bool = False) -> Linear:
        """Return a plain layer with the update and magnitude merged into its weight.

        Args:
            dequantize (bool): Return a dense layer even when the base layer
                is quantized.

        Returns:
            nn.Linear | nn.QuantizedLinear: The merged layer.
        """
        adapted = self.adapted_weight()
        weight = (self.m / mx.linalg.norm(adapted, axis=1))[:, None] * adapted
        return _rebuild_linear(self.linear, weight.astype(dense_weight(self.linear).dtype), dequantize)

    def __call__(self, x: mx.array) -> mx.array:
        weight = dense_weight(self.linear)
        y = x @ weight.T
        update = (self.dropout(x) @ self.lora_a) @ self.lora_b
        y = y + (self.scale * update).astype(x.dtype)

        row_scale = self.m / mx.linalg.norm(self.adapted_weight(), axis=1)
        y = row_scale.astype(x.dtype) * y
        if "bias" in self.linear:
            y = y + self.linear.bias
        return y
