"""The chunked cross-entropy against the dense one: loss, gradients and memory."""

import gc
import mlx.core as mx
import mlx.nn as nn
import pytest

from rwkv_mlx.tuner.losses import OutputHead, chunked_cross_entropy, dense_cross_entropy, output_head


def inputs(tokens=50, width=32, vocab=70, seed=0, dtype=mx.float32):
    mx.random.seed(seed)
    hidden = mx.random.normal((tokens, width)).astype(dtype)
    targets = mx.random.randint(0, vocab, (tokens,))
    weights = (mx.random.uniform(shape=(tokens,)) > 0.3).astype(mx.float32)
    head = nn.Linear(width, vocab, bias=False)
    head.weight = head.weight.astype(dtype)
    return hidden, targets, weights, head


def dense_value_and_grads(hidden, targets, weights, head):
    def loss(h, w):
        head.weight = w
        return dense_cross_entropy(h, targets, head, weights)

    weight = head.weight
    value, grads = mx.value_and_grad(loss, argnums=(0, 1))(hidden, weight)
    head.weight = weight
    return value, grads


@pytest.mark.parametrize("chunk_size", [1, 7, 16, 64])
@pytest.mark.parametrize("weight_grad", [True, False])
@pytest.mark.parametrize("gradient_in_forward", [False, True])
def test_chunked_equals_dense(chunk_size, weight_grad, gradient_in_forward):
    hidden, targets, weights, head = inputs()
    expected, (grad_hidden, grad_weight) = dense_value_and_grads(hidden, targets, weights, head)

    def loss(h, w):
        return chunked_cross_entropy(
            h,
            targets,
            OutputHead(w),
            weights,
            chunk_size=chunk_size,
            weight_grad=weight_grad,
            gradient_in_forward=gradient_in_forward,
        )

    value, grads = mx.value_and_grad(loss, argnums=(0, 1))(hidden, head.weight)

    assert abs(value.item() - expected.item()) <= 1e-5 * abs(expected.item())
    assert mx.abs(grads[0] - grad_hidden).max().item() <= 1e-6
    if weight_grad:
        assert mx.abs(grads[1] - grad_weight).max().item() <= 1e-6


def test_chunked_equals_dense_float64():
    # MLX 0.32's float64 exp on the CPU is only accurate to about 1e-7
    # relative, so the gradients agree to about 1e-7 rather than to rounding.
    hidden, targets, weights, head = inputs(dtype=mx.float64)
    expected, (grad_hidden, grad_weight) = dense_value_and_grads(hidden, targets, weights, head)

    value, grads = mx.value_and_grad(
        lambda h, w: chunked_cross_entropy(h, targets, OutputHead(w), weights, chunk_size=9), argnums=(0, 1)
    )(hidden, head.weight)

    assert value.dtype == mx.float64
    assert abs(value.item() - expected.item()) <= 1e-12 * abs(expected.item())
    assert mx.abs(grads[0] - grad_hidden).max().item() <= 2e-7
    assert mx.abs(grads[1] - grad_weight).max().item() <= 2e-7


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("gradient_in_forward", [False, True])
def test_quantized_head(bits, gradient_in_forward):
    hidden, targets, weights, head = inputs(width=64)
    quantized = nn.QuantizedLinear.from_linear(head, group_size=32, bits=bits)
    described = output_head(quantized)

    expected, grad_hidden = mx.value_and_grad(lambda h: dense_cross_entropy(h, targets, quantized, weights))(hidden)
    value, grads = mx.value_and_grad(
        lambda h: chunked_cross_entropy(
            h, targets, described, weights, chunk_size=8, gradient_in_forward=gradient_in_forward
        )
    )(hidden)

    assert described.quantized
    assert abs(value.item() - expected.item()) <= 1e-5 * abs(expected.item())
    assert mx.abs(grads - grad_hidden).max().item() <= 1e-6


@pytest.mark.parametrize("gradient_in_forward", [False, True])
def test_tied_embedding_head(gradient_in_forward):
    hidden, targets, weights, _ = inputs()
    embedding = nn.Embedding(70, 32)

    expected, grad_hidden = mx.value_and_grad(
        lambda h: (nn.losses.cross_entropy(embedding.as_linear(h), targets) * weights).sum()
    )(hidden)
    value, grads = mx.value_and_grad(
        lambda h: chunked_cross_entropy(
            h, targets, output_head(embedding), weights, chunk_size=8, gradient_in_forward=gradient_in_forward
        )
    )(hidden)

    assert abs(value.item() - expected.item()) <= 1e-5 * abs(expected.item())
    assert mx.abs(grads - grad_hidden).max().item() <= 1e-6


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_forward_gradient_scaled_by_cotangent(dtype):
    # The backward pass only scales the gradient formed in the forward pass,
    # so a loss used inside a larger expression must still get its share.
    hidden, targets, weights, head = inputs(dtype=dtype)

    def outer(h, gradient_in_forward):
        loss = chunked_cross_entropy(
            h, targets, output_head(head), weights, chunk_size=16, weight_grad=False, gradient_in_forward=gradient_in_forward
        )
        return -2.5 * loss / 7 + (h.astype(mx.float32) ** 2).sum()

    expected = mx.grad(lambda h: outer(h, False))(hidden)
    got = mx.grad(lambda h: outer(h, True))(hidden)

    assert got.dtype == dtype
    tolerance = 1e-6 if dtype == mx.float32 else 2e-2
    assert mx.abs(got.astype(mx.float32) - expected.astype(mx.float32)).max().item() <= tolerance


def test_forward_gradient_same_loss():
    hidden, targets, weights, head = inputs(tokens=40)
    plain, with_gradient = (
        chunked_cross_entropy(hidden, targets, output_head(head), weights, chunk_size=16, gradient_in_forward=flag)
        for flag in (False, True)
    )
    assert abs(plain.item() - with_gradient.item()) <= 1e-6 * abs(plain.item())


def test_head_with_bias_is_not_described():
    assert output_head(nn.Linear(4, 8, bias=True)) is None


def test_bad_shapes_rejected():
    hidden, targets, _, head = inputs()
    with pytest.raises(ValueError, match=r"expected hidden \[n, C\]"):
        chunked_cross_entropy(hidden[None], targets, OutputHead(head.weight))
    with pytest.raises(ValueError, match="chunk_size must be at least 1"):
        chunked_cross_entropy(hidden, targets, OutputHead(head.weight), chunk_size=0)


def peak_memory(function, *arrays):
    mx.eval(*arrays)
    # Garbage cycles of earlier tests, freed during the call, would lower the baseline.
    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()
    baseline = mx.get_active_memory()
    mx.eval(function(*arrays))
    return mx.get_peak_memory() - baseline


@pytest.mark.parametrize("gradient_in_forward", [False, True])
def test_chunked_peak_memory_lower(gradient_in_forward):
    # 512 tokens and a 16384-token vocabulary. The dense loss and gradient keep
    # several [512, 16384] float32 arrays of 32 MiB each, the chunked ones only
    # a few [32, 16384] arrays.
    hidden, targets, weights, head = inputs(tokens=512, width=64, vocab=16384)

    def dense(h):
        return mx.grad(lambda h: dense_cross_entropy(h, targets, head, weights))(h)

    def chunked(h):
        return mx.grad(
            lambda h: chunked_cross_entropy(
                h,
                targets,
                output_head(head),
                weights,
                chunk_size=32,
                weight_grad=False,
                gradient_in_forward=gradient_in_forward,
            )
        )(h)

    dense_peak = peak_memory(dense, hidden)
    chunked_peak = peak_memory(chunked, hidden)

    assert dense_peak >= 2 * 512 * 16384 * 4
    assert chunked_peak <= dense_peak / 4
