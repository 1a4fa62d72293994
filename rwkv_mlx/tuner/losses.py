"""Cross-entropy over a large vocabulary without the full logits in memory.

``chunked_cross_entropy`` computes the loss of a linear output head inside an
``mx.custom_function`` whose backward pass recomputes logits instead of
keeping them. For n tokens with hidden states h [n, C], head weight W [V, C],
targets t and per-token weights s (the loss mask), the loss is
``sum_i s_i * (logsumexp(h_i W^T) - (h_i W^T)[t_i])`` and its gradients are

    g = s * (softmax(h W^T) - onehot(t))      [n, V]
    dL/dh = g W,    dL/dW = g^T h

The forward pass goes through the tokens a chunk at a time. With a frozen
head the backward pass does too, so one chunk of [chunk, V] logits is alive
at a time. When the head is trained, the backward pass goes through blocks of
vocabulary rows of the same number of elements instead, each giving its rows
of dW, so no [V, C] accumulator is needed besides the gradient itself.

A loss that is always differentiated (a training step) can take dL/dh in the
forward pass instead, from each chunk's logits while they are at hand
(``gradient_in_forward``). Then the backward pass only scales it, and the
head's [n, C] x [C, V] product runs once instead of twice.
"""

import logging
from dataclasses import dataclass
from typing import List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn

from ..ops import fast_math

logger = logging.getLogger(__name__)

# Tokens per chunk of logits: 32 MiB of float32 logits for a 65536-token
# vocabulary. bench/bench_cross_entropy_memory.py measured the loss and
# gradient of 512 tokens through the frozen head of the 0.1B shape (width 768)
# on a 2-core x86_64 CPU with MLX 0.32. The peak above the inputs was 196 MiB,
# against 514 MiB for the dense loss. Chunks of 64 tokens needed 100 MiB but
# 1.4 times the time.
DEFAULT_LOSS_CHUNK_SIZE = 128


@dataclass
class OutputHead:
    """The output projection of a language model, as arrays.

    Attributes:
        weight: [V, C] for a dense head, or the packed quantized weight.
        scales, biases: Quantization scales and biases, None for a dense head.
        group_size, bits, mode: The quantization parameters, None for a dense head.
    """

    weight: mx.array
    scales: Optional[mx.array] = None
    biases: Optional[mx.array] = None
    group_size: Optional[int] = None
    bits: Optional[int] = None
    mode: str = "affine"

    @property
    def quantized(self) -> bool:
        return self.scales is not None

    def arrays(self) -> Tuple[mx.array, ...]:
        if not self.quantized:
            return (self.weight,)
        if self.biases is None:
            return (self.weight, self.scales)
        return (self.weight, self.scales, self.biases)


def output_head(module: nn.Module) -> Optional[OutputHead]:
    """Describe a head module as an ``OutputHead``.

    Args:
        module (nn.Module): An ``nn.Linear`` without bias, an
            ``nn.QuantizedLinear``, an ``nn.Embedding`` or an
            ``nn.QuantizedEmbedding`` (a tied head).

    Returns:
        OutputHead, optional: The head, or None for any other module (for
        example a LoRA-wrapped head), which the caller must apply itself.
    """
    if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
        if "bias" in module:
            return None
        return OutputHead(
            module.weight,
            module.scales,
            module.get("biases"),
            module.group_size,
            module.bits,
            getattr(module, "mode", "affine"),
        )
    if isinstance(module, (nn.Linear, nn.Embedding)) and "bias" not in module:
        return OutputHead(module.weight)
    return None


def _project(hidden: mx.array, head: OutputHead, arrays) -> mx.array:
    if head.quantized:
        weight, scales, biases = (*arrays, None)[:3]
        return mx.quantized_matmul(
            hidden, weight, scales, biases, transpose=True, group_size=head.group_size, bits=head.bits, mode=head.mode
        )
    return hidden @ arrays[0].T


def _project_back(grad_logits: mx.array, head: OutputHead, arrays) -> mx.array:
    if head.quantized:
        weight, scales, biases = (*arrays, None)[:3]
        return mx.quantized_matmul(
            grad_logits,
            weight,
            scales,
            biases,
            transpose=False,
            group_size=head.group_size,
            bits=head.bits,
            mode=head.mode,
        )
    return grad_logits @ arrays[0]


def _accumulation_dtype(dtype: mx.Dtype) -> mx.Dtype:
    """Return float32, or float64 for float64 inputs."""
    return mx.float64 if dtype == mx.float64 else mx.float32


def _token_losses(logits: mx.array, targets: mx.array, fused: bool) -> mx.array:
    """Per-token cross-entropy in float32 (float64 for float64 logits)."""
    if fused and logits.dtype != mx.float64:
        return mx.fast.cross_entropy(logits, targets)
    logits = logits.astype(_accumulation_dtype(logits.dtype))
    target_logits = mx.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    return fast_math.logsumexp(logits) - target_logits


def _losses_and_softmax(logits: mx.array, targets: mx.array) -> Tuple[mx.array, mx.array]:
    """Per-token cross-entropy and the softmax of ``logits``, from one exponential.

    Exponentials dominate the loss's elementwise work (bench/bench_cpu_ops.py),
    so the loss and the gradient share one.
    """
    top = mx.max(logits, axis=-1, keepdims=True)
    shifted = fast_math.exp(logits - top)
    sums = shifted.sum(axis=-1, keepdims=True)
    target_logits = mx.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    losses = (top + mx.log(sums))[:, 0] - target_logits
    return losses, shifted / sums


def _after(x: mx.array, previous) -> mx.array:
    """Return ``x`` made to depend on ``previous`` (arrays or None).

    MLX evaluates independent branches of a graph side by side, which would
    compute every chunk's logits at once. Chaining each chunk to the result
    of the one before keeps a single chunk of logits alive.
    """
    if previous is None:
        return x
    return mx.depends(x, previous)


def _token_chunks(length: int, chunk_size: int) -> List[Tuple[int, int]]:
    return [(start, min(start + chunk_size, length)) for start in range(0, length, chunk_size)]


def _frozen_head_loss(head: OutputHead, chunk_size: int, fused: bool, gradient_in_forward: bool):
    """Return the custom function ``(hidden, targets, weights, *head arrays) -> (loss sum, dL/dh)``
    whose backward pass gives the gradient of the hidden states only.

    With ``gradient_in_forward`` the second output is dL/dh for a cotangent
    of 1, formed chunk by chunk in the forward pass, and the backward pass
    scales it. Otherwise the second output is an empty placeholder and the
    backward pass recomputes each chunk's logits.
    """

    def chunk_gradient(probs, rows, scale, arrays, dtype):
        # dL/dh = (scale * softmax) W - scale * W[target] for one chunk, in ``dtype``.
        grad_logits = (probs * scale[:, None]).astype(dtype)
        return _project_back(grad_logits, head, arrays) - (scale[:, None] * rows).astype(dtype)

    @mx.custom_function
    def loss_sum(hidden, targets, weights, *arrays):
        total = mx.array(0.0, dtype=_accumulation_dtype(hidden.dtype))
        rows = _target_rows(targets, head, arrays, hidden.dtype) if gradient_in_forward else None
        grad_hidden = []
        for start, end in _token_chunks(hidden.shape[0], chunk_size):
            # Chaining the chunk to the previous chunk's gradient as well keeps
            # one chunk of logits alive, as in the backward pass below.
            previous = [total, grad_hidden[-1]] if grad_hidden else total
            logits = _project(_after(hidden[start:end], previous), head, arrays)
            if gradient_in_forward:
                losses, probs = _losses_and_softmax(logits.astype(total.dtype), targets[start:end])
                grad_hidden.append(chunk_gradient(probs, rows[start:end], weights[start:end], arrays, hidden.dtype))
            else:
                losses = _token_losses(logits, targets[start:end], fused)
            total = total + (losses * weights[start:end]).sum()
        if gradient_in_forward:
            return total, mx.concatenate(grad_hidden, axis=0)
        return total, mx.zeros((0,), dtype=hidden.dtype)

    @loss_sum.vjp
    def loss_sum_vjp(primals, cotangents, outputs):
        hidden, targets, weights, *arrays = primals
        cotangent = cotangents[0]
        zeros = [mx.zeros_like(targets), mx.zeros_like(weights), *(mx.zeros_like(a) for a in arrays)]
        if gradient_in_forward:
            return (outputs[1] * cotangent.astype(hidden.dtype), *zeros)

        dtype = _accumulation_dtype(hidden.dtype)
        scale = weights.astype(dtype) * cotangent
        rows = _target_rows(targets, head, arrays, hidden.dtype)
        grad_hidden = []
        for start, end in _token_chunks(hidden.shape[0], chunk_size):
            chunk = _after(hidden[start:end], grad_hidden[-1] if grad_hidden else None)
            probs = fast_math.softmax(_project(chunk, head, arrays).astype(dtype))
            grad_hidden.append(chunk_gradient(probs, rows[start:end], scale[start:end], arrays, hidden.dtype))
        return (mx.concatenate(grad_hidden, axis=0), *zeros)

    return loss_sum


def _trained_head_loss(chunk_size: int):
    """Return the custom function ``(hidden, targets, weights, weight) -> (loss sum, logsumexp)``
    whose backward pass gives the gradients of the hidden states and the dense head weight.

    The forward pass keeps the per-token logsumexp [n], so the backward pass
    can form the softmax of any block of the vocabulary. It works through
    blocks of vocabulary rows, each of which contributes one block of rows of
    dW and a term of dh, so dW needs no [V, C] accumulator. Only the loss sum
    has a gradient; the logsumexp output is for the backward pass.
    """

    @mx.custom_function
    def loss_sum(hidden, targets, weights, weight):
        dtype = _accumulation_dtype(hidden.dtype)
        total = mx.array(0.0, dtype=dtype)
        logsumexp = []
        for start, end in _token_chunks(hidden.shape[0], chunk_size):
            logits = (_after(hidden[start:end], total) @ weight.T).astype(dtype)
            chunk_logsumexp = fast_math.logsumexp(logits)
            target_logits = mx.take_along_axis(logits, targets[start:end, None], axis=-1)[:, 0]
            total = total + ((chunk_logsumexp - target_logits) * weights[start:end]).sum()
            logsumexp.append(chunk_logsumexp)
        return total, mx.concatenate(logsumexp)

    @loss_sum.vjp
    def loss_sum_vjp(primals, cotangents, outputs):
        hidden, targets, weights, weight = primals
        dtype = _accumulation_dtype(hidden.dtype)
        scale = weights.astype(dtype) * cotangents[0]
        logsumexp = outputs[1]
        n, vocab_size = hidden.shape[0], weight.shape[0]
        block = max(1, (chunk_size * vocab_size) // max(n, 1))

        grad_hidden = -(scale[:, None] * weight[targets].astype(dtype))
        grad_weight = []
        previous = None
        for start in range(0, vocab_size, block):
            end = min(start + block, vocab_size)
            rows = _after(weight[start:end], previous)

            probs = fast_math.exp((hidden @ rows.T).astype(dtype) - logsumexp[:, None])
            grad_logits = (probs * scale[:, None]).astype(hidden.dtype)
            grad_hidden = grad_hidden + (grad_logits @ rows).astype(dtype)

            # The one-hot part: -scale_i h_i added to the row of target t_i.
            inside = (targets >= start) & (targets < end)
            index = mx.clip(targets - start, 0, end - start - 1)
            one_hot_part = mx.where(inside[:, None], scale[:, None] * hidden.astype(dtype), 0.0)
            grad_block = (grad_logits.T @ hidden).astype(dtype).at[index].add(-one_hot_part)
            grad_weight.append(grad_block.astype(weight.dtype))
            previous = [grad_hidden, grad_weight[-1]]

        return (
            grad_hidden.astype(hidden.dtype),
            mx.zeros_like(targets),
            mx.zeros_like(weights),
            mx.concatenate(grad_weight, axis=0),
        )

    return loss_sum


def _target_rows(targets, head: OutputHead, arrays, dtype) -> mx.array:
    """Return the head's weight rows of the target tokens, [n, C]."""
    if not head.quantized:
        return arrays[0][targets]
    weight, scales, biases = (*arrays, None)[:3]
    return mx.dequantize(
        weight[targets],
        scales[targets],
        biases[targets] if biases is not None else None,
        group_size=head.group_size,
        bits=head.bits,
        mode=head.mode,
    ).astype(dtype)


def chunked_cross_entropy(
    hidden: mx.array,
    targets: mx.array,
    head: OutputHead,
    weights: Optional[mx.array] = None,
    chunk_size: int = DEFAULT_LOSS_CHUNK_SIZE,
    weight_grad: bool = True,
    fused: Optional[bool] = None,
    gradient_in_forward: bool = False,
) -> mx.array:
    """Return the summed cross-entropy of a linear head, a chunk of tokens at a time.

    Args:
        hidden (mx.array): Hidden states before the head, [n, C].
        targets (mx.array): Target token ids, [n].
        head (OutputHead): The output projection.
        weights (mx.array, optional): Per-token loss weights, [n]; 1 when not given.
        chunk_size (int): Tokens per chunk of logits.
        weight_grad (bool): Compute the gradient of the head weight (never
            for a quantized head). Pass False when the head is frozen: the
            backward pass then skips the [V, C] gradient.
        fused (bool, optional): Use ``mx.fast.cross_entropy`` in the forward
            pass. By default only on a GPU, where it is a fused kernel, because
            on the CPU it reduces in the logits' dtype.
        gradient_in_forward (bool): Form the gradient of the hidden states in
            the forward pass, from each chunk's logits, so the backward pass
            needs no second product with the head. Pass True only for a loss
            that will be differentiated: otherwise that product is wasted. A
            trained head (``weight_grad``) always takes its gradients in the
            backward pass.

    Returns:
        mx.array: The scalar ``sum_i weights_i * loss_i``, float32 (float64
        for float64 hidden states).
    """
    if hidden.ndim != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"expected hidden [n, C] and targets [n], got {hidden.shape} and {targets.shape}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    if weights is None:
        weights = mx.ones(targets.shape, dtype=mx.float32)
    if fused is None:
        fused = mx.default_device() == mx.gpu
    if head.quantized:
        weight_grad = False

    targets = targets.astype(mx.int32)
    weights = weights.astype(_accumulation_dtype(hidden.dtype))
    if weight_grad:
        loss_sum, _ = _trained_head_loss(chunk_size)(hidden, targets, weights, head.weight)
        return loss_sum
    loss_sum, _ = _frozen_head_loss(head, chunk_size, fused, gradient_in_forward)(
        hidden, targets, weights, *head.arrays()
    )
    return loss_sum


def module_cross_entropy(
    hidden: mx.array,
    targets: mx.array,
    head: nn.Module,
    weights: Optional[mx.array] = None,
    chunk_size: int = DEFAULT_LOSS_CHUNK_SIZE,
) -> mx.array:
    """Return the summed cross-entropy of any head module, by plain autodiff.

    Used for heads that ``output_head`` cannot describe (a LoRA-wrapped head).
    The forward pass works a chunk at a time, but autodiff keeps every chunk's
    logits for the backward pass, so the memory is that of the dense loss.
    """
    if weights is None:
        weights = mx.ones(targets.shape, dtype=mx.float32)
    total = mx.array(0.0, dtype=_accumulation_dtype(hidden.dtype))
    for start in range(0, hidden.shape[0], chunk_size):
        end = min(start + chunk_size, hidden.shape[0])
        logits = head(hidden[start:end])
        total = total + (_token_losses(logits, targets[start:end], fused=False) * weights[start:end]).sum()
    return total


def dense_cross_entropy(
    hidden: mx.array, targets: mx.array, head: nn.Module, weights: Optional[mx.array] = None
) -> mx.array:
    """Return the summed cross-entropy with the full [n, V] logits: the reference."""
    logits = head(hidden).astype(_accumulation_dtype(hidden.dtype))
    losses = nn.losses.cross_entropy(logits, targets)
    if weights is not None:
        losses = losses * weights
    return losses.sum()
