"""Samplers and logits processors: exact edge cases and RWKV penalty semantics."""

import math
import re

import mlx.core as mx
import numpy as np
import pytest

from rwkv_mlx.sample import (
    RepetitionPenalty,
    make_logits_processors,
    make_sampler,
    make_token_ban,
    uncounted_token_ids,
    validate_sampling,
)


class ByteTokenizer:
    def encode(self, text):
        return list(text.encode("utf-8"))


def draw(sampler, logprobs, count, seed=0):
    mx.random.seed(seed)
    return [sampler(logprobs).item() for _ in range(count)]


def log_softmax(values):
    logits = mx.array([values], dtype=mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def test_temperature_zero_is_argmax():
    rng = np.random.default_rng(0)
    logits = mx.array(rng.standard_normal((4, 300)).astype(np.float32))
    sampler = make_sampler(temp=0.0, top_p=0.5, top_k=3)

    for dtype in (mx.float32, mx.float16, mx.bfloat16):
        values = logits.astype(dtype)
        expected = np.argmax(np.array(values.astype(mx.float32)), axis=-1)
        assert sampler(values).tolist() == expected.tolist()


def test_top_p_one_keeps_every_token():
    # The second token's probability (1e-11) vanishes next to 1 in float32,
    # so a cumulative-mass filter at 1.0 would drop it. Temperature 100,
    # applied after the filters, then makes it almost as likely as the first.
    logprobs = log_softmax([0.0, -25.0])
    draws = draw(make_sampler(temp=100.0, top_p=1.0), logprobs, 200)

    assert 1 in draws
    assert 0 in draws


def test_top_p_one_equals_plain_categorical():
    logprobs = log_softmax(np.random.default_rng(1).standard_normal(50).tolist())
    sampled = draw(make_sampler(temp=0.7, top_p=1.0), logprobs, 50, seed=3)

    mx.random.seed(3)
    plain = [mx.random.categorical(logprobs * (1 / 0.7)).item() for _ in range(50)]
    assert sampled == plain


def test_top_p_chosen_before_temperature():
    # At temperature 1 the nucleus of mass 0.7 is tokens {0, 1} (0.45 + 0.35).
    # Were temperature 100 applied first, the flattened distribution would
    # need all three tokens to reach 0.7.
    logprobs = mx.log(mx.array([[0.45, 0.35, 0.2]]))
    draws = draw(make_sampler(temp=100.0, top_p=0.7), logprobs, 300)

    assert 2 not in draws
    assert set(draws) == {0, 1}


def test_top_k_and_min_p():
    logprobs = mx.log(mx.array([[0.5, 0.3, 0.15, 0.05]]))

    assert set(draw(make_sampler(temp=1.0, top_k=2), logprobs, 200)) == {0, 1}
    assert set(draw(make_sampler(temp=1.0, min_p=0.5), logprobs, 200)) == {0, 1}
    assert set(draw(make_sampler(temp=1.0, top_k=4), logprobs, 400)) == {0, 1, 2, 3}


def test_invalid_sampling_values():
    for kwargs, name in (
        (dict(temp=-0.1), "temperature"),
        (dict(temp=math.nan), "temperature"),
        (dict(top_p=0.0), "top-p"),
        (dict(top_p=1.5), "top-p"),
        (dict(min_p=1.5), "min-p"),
        (dict(top_k=-1), "top-k"),
    ):
        with pytest.raises(ValueError, match=name):
            make_sampler(**{"temp": 1.0, **kwargs})
    validate_sampling(0.0, 1.0, 0.0, 0)


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_banned_token_never_sampled_low_precision(dtype):
    # The banned token has by far the highest logit, near the float16 maximum.
    logits = mx.array([[60000.0, 1.0, 0.5, 0.25]], dtype=dtype)
    processed = make_token_ban([0], vocab_size=4)(mx.array([1, 2]), logits)

    assert processed.dtype == dtype
    assert processed[0, 0].item() == -math.inf
    assert not mx.isnan(processed).any().item()
    assert np.isfinite(np.array(processed[0, 1:].astype(mx.float32))).all()

    logprobs = processed.astype(mx.float32) - mx.logsumexp(processed.astype(mx.float32), axis=-1, keepdims=True)
    assert make_sampler(temp=0.0)(logprobs).item() != 0
    assert 0 not in draw(make_sampler(temp=5.0), logprobs, 300)


def test_banned_token_with_penalties_bfloat16():
    logits = mx.array([[1e30, 2.0, 1.0]], dtype=mx.bfloat16)
    processors = make_logits_processors(ban_tokens=[0], presence_penalty=0.5, frequency_penalty=0.5, vocab_size=3)
    tokens = mx.array([1])
    for processor in processors:
        logits = processor(tokens, logits)

    assert logits[0, 0].item() == -math.inf
    assert mx.argmax(logits, axis=-1).item() == 1


def test_invalid_ban_lists():
    with pytest.raises(ValueError, match="banned token id 300"):
        make_token_ban([1, 300], vocab_size=256)
    with pytest.raises(ValueError, match="banned token id -1"):
        make_token_ban([-1])
    with pytest.raises(ValueError, match="all 3 tokens are banned"):
        make_token_ban([0, 1, 2], vocab_size=3)


def test_logit_bias_outside_vocabulary_rejected():
    with pytest.raises(ValueError, match=r"logit_bias token id 999 is outside the vocabulary; ids must be \[0, 256\)"):
        make_logits_processors(logit_bias={5: 1.0, 999: 5.0}, vocab_size=256)
    with pytest.raises(ValueError, match="logit_bias token id -2"):
        make_logits_processors(logit_bias={-2: 1.0})


@pytest.mark.parametrize(
    "logit_bias, message",
    [
        ({"a": 1.0}, "logit_bias keys must be integer token ids, got 'a'"),
        ({2.5: 1.0}, "logit_bias keys must be integer token ids, got 2.5"),
        ({3: "x"}, "logit_bias value for token 3 must be a finite number, got 'x'"),
        ({3: float("nan")}, "logit_bias value for token 3 must be a finite number, got nan"),
    ],
)
def test_logit_bias_invalid_items_named(logit_bias, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make_logits_processors(logit_bias=logit_bias, vocab_size=256)


def test_logit_bias_string_ids_accepted():
    (bias,) = make_logits_processors(logit_bias={"7": 2.0}, vocab_size=256)

    assert bias(mx.zeros((1, 0), dtype=mx.int32), mx.zeros((1, 256)))[0, 7].item() == 2.0


def test_ban_tokens_of_wrong_type_rejected():
    with pytest.raises(TypeError, match="ban_tokens must be a list of token ids, got 'abc'"):
        make_logits_processors(ban_tokens="abc")
    with pytest.raises(TypeError, match="ban_tokens must be a list of token ids, got 5"):
        make_logits_processors(ban_tokens=5)
    with pytest.raises(ValueError, match="banned token ids must be integers, got 2.5"):
        make_logits_processors(ban_tokens=[1, 2.5])


def test_ban_tokens_as_array():
    (ban,) = make_logits_processors(ban_tokens=mx.array([1, 2]), vocab_size=8)

    assert ban(mx.zeros((1, 0), dtype=mx.int32), mx.zeros((1, 8)))[0, 2].item() == -math.inf


def test_ban_checked_against_logits():
    (ban,) = make_logits_processors(ban_tokens=(t for t in [3, 300]))

    with pytest.raises(ValueError, match=r"banned token id 300 is outside the vocabulary; ids must be \[0, 256\)"):
        ban(mx.zeros((1, 0), dtype=mx.int32), mx.zeros((1, 256)))
    assert ban(mx.zeros((1, 0), dtype=mx.int32), mx.zeros((1, 400)))[0, 300].item() == -math.inf


def test_logit_bias_checked_against_logits():
    (bias,) = make_logits_processors(logit_bias={5: 1.0, 999: 5.0})
    tokens = mx.zeros((1, 0), dtype=mx.int32)

    with pytest.raises(ValueError, match=r"logit_bias token id 999 is outside the vocabulary; ids must be \[0, 256\)"):
        bias(tokens, mx.zeros((1, 256)))
    assert bias(tokens, mx.zeros((1, 1000)))[0, 999].item() == 5.0


def official_penalties(generated, vocab_size, presence, frequency, decay, uncounted):
    """The penalty loop of BlinkDL's rwkv.utils.PIPELINE.generate, in plain Python."""
    occurrence = {}
    penalties = []
    for token in generated:
        penalty = np.zeros(vocab_size)
        for n, count in occurrence.items():
            penalty[n] = presence + count * frequency
        penalties.append(penalty)
        for n in occurrence:
            occurrence[n] *= decay
        weight = 0 if token in uncounted else 1
        occurrence[token] = occurrence.get(token, 0) + weight
    return penalties


def test_penalty_matches_official_loop():
    vocab_size = 12
    prompt = [3, 3, 4]
    generated = [1, 2, 1, 1, 5, 2, 7, 1, 5, 5]
    uncounted = {5}
    penalty = RepetitionPenalty(0.4, 0.7, 0.9, uncounted_token_ids=sorted(uncounted))
    expected = official_penalties(generated, vocab_size, 0.4, 0.7, 0.9, uncounted)

    zeros = mx.zeros((1, vocab_size))
    history = list(prompt)
    for step, token in enumerate(generated):
        got = -np.array(penalty(mx.array(history), zeros))[0]
        np.testing.assert_allclose(got, expected[step], atol=1e-6, err_msg=f"step {step}")
        history.append(token)


def test_penalty_ignores_prompt_and_resets():
    penalty = RepetitionPenalty(1.0, 1.0, 0.996)
    zeros = mx.zeros((1, 8))

    first = penalty(mx.array([1, 2, 3]), zeros)
    assert mx.all(first == 0).item()
    second = penalty(mx.array([1, 2, 3, 4]), zeros)
    assert second[0, 4].item() == pytest.approx(-2.0)
    assert mx.sum(second != 0).item() == 1

    penalty.reset()
    assert mx.all(penalty(mx.array([4]), zeros) == 0).item()


def test_penalty_batched_rows_independent():
    penalty = RepetitionPenalty(0.5, 1.0, 1.0)
    zeros = mx.zeros((2, 6))
    penalty(mx.array([[0, 1], [2, 3]]), zeros)
    out = np.array(penalty(mx.array([[0, 1, 4], [2, 3, 5]]), zeros))

    assert out[0, 4] == pytest.approx(-1.5)
    assert out[0, 5] == 0
    assert out[1, 5] == pytest.approx(-1.5)
    assert out[1, 4] == 0


def test_uncounted_tokens_byte_vocabulary():
    ids = uncounted_token_ids(ByteTokenizer())

    assert ids == sorted([ord(c) for c in " \t0123456789"])


def test_invalid_penalty_values():
    with pytest.raises(ValueError, match="penalty decay"):
        RepetitionPenalty(0.1, 0.1, 1.5)
    with pytest.raises(ValueError, match="presence penalty"):
        RepetitionPenalty(math.inf, 0.1)


def test_processor_order():
    processors = make_logits_processors(
        ban_tokens=[2], presence_penalty=1.0, logit_bias={0: 5.0}, vocab_size=4
    )

    assert len(processors) == 3
    assert isinstance(processors[-1], RepetitionPenalty)
    assert make_logits_processors() == []
