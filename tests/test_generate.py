"""The generation API: greedy decoding, streaming text, contexts kept in the
cache, batches, and the tiny trained RWKV-7 model."""

from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import ArraysCache

import rwkv_mlx
from random_models import random_model
from rwkv_mlx.generate import (
    StopStrings,
    batch_generate,
    batch_generate_step,
    generate_step,
    stream_generate,
)
from rwkv_mlx.sample import make_logits_processors, make_sampler
from rwkv_mlx.tokenizer import load_tokenizer


class ByteTokenizer:
    """Token id = byte value; no streaming detokenizer of its own."""

    vocab_size = 256

    def __init__(self, eos_token_id=None):
        self.eos_token_id = eos_token_id

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


class ScriptedModel:
    """A stand-in model whose greedy output is a fixed token script."""

    def __init__(self, script, vocab_size=256):
        self.script = list(script)
        self.args = SimpleNamespace(vocab_size=vocab_size)

    def make_cache(self):
        return [ArraysCache(size=1)]

    def __call__(self, inputs, cache=None, mask=None):
        position = cache[0][0]
        position = mx.zeros((1,), dtype=mx.int32) if position is None else position
        index = min(int(position.item()), len(self.script) - 1)
        cache[0][0] = position + 1 if inputs.shape[1] == 1 else position
        logits = mx.full((1, inputs.shape[1], self.args.vocab_size), -10.0)
        return logits.at[:, :, self.script[index]].add(20.0)


def greedy_reference(model, ids, count):
    """Greedy tokens from the model's own logits, one model call per token."""
    cache = model.make_cache()
    logits = model(mx.array([ids]), cache=cache)[0, -1]
    tokens = []
    for _ in range(count):
        token = mx.argmax(logits).item()
        tokens.append(token)
        logits = model(mx.array([[token]]), cache=cache)[0, -1]
    return tokens


def run(model, ids, count, **kwargs):
    return [token for token, _ in generate_step(mx.array(ids), model, max_tokens=count, **kwargs)]


@pytest.fixture(scope="module")
def model():
    return random_model(seed=3)


def test_greedy_equals_argmax_of_logits(model):
    ids = list(b"The state is small")

    assert run(model, ids, 30) == greedy_reference(model, ids, 30)


def test_chunked_prefill_same_tokens(model):
    ids = list(b"a prompt that spans several prefill chunks")

    assert run(model, ids, 12, prefill_step_size=5) == run(model, ids, 12)


def test_stream_assembles_utf8():
    text = "héllo wörld ✓ 🙂!"
    script = list(text.encode("utf-8"))
    responses = list(stream_generate(ScriptedModel(script), ByteTokenizer(), "x", max_tokens=len(script)))

    assert "".join(r.text for r in responses) == text
    assert all("\ufffd" not in r.text for r in responses)
    assert [r.token for r in responses] == script
    assert responses[-1].finish_reason == "length"
    assert responses[-1].generation_tokens == len(script)


@pytest.mark.parametrize("name", ["world", "bytes"])
def test_stream_utf8_product_tokenizers(name):
    # World splits the emoji's four bytes over two tokens.
    tokenizer = load_tokenizer(name)
    text = "Grüße, 世界 🙂 done"
    script = tokenizer.encode(text)
    model = ScriptedModel(script, vocab_size=tokenizer.vocab_size)
    responses = list(stream_generate(model, tokenizer, "x", max_tokens=len(script)))

    assert "".join(r.text for r in responses) == text
    assert all("\ufffd" not in r.text for r in responses)


def test_stream_stop_string_across_tokens():
    script = list(b"abc\n\nUser: more")
    responses = list(stream_generate(ScriptedModel(script), ByteTokenizer(), "x", max_tokens=50, stop=["\n\n"]))

    assert "".join(r.text for r in responses) == "abc"
    assert responses[-1].finish_reason == "stop"
    assert responses[-1].token == ord("\n")


def test_stream_partial_stop_string_emitted():
    script = list(b"aXYbXYZc")
    responses = list(stream_generate(ScriptedModel(script), ByteTokenizer(), "x", max_tokens=50, stop=["XYZ"]))

    assert "".join(r.text for r in responses) == "aXYb"
    assert responses[-1].finish_reason == "stop"


def test_stop_strings_hold_back_prefixes():
    stops = StopStrings(["END"])

    assert stops.feed("abcE") == ("abc", False)
    assert stops.feed("N") == ("", False)
    assert stops.feed("x") == ("ENx", False)
    assert stops.feed("yEND") == ("y", True)


def test_generate_step_rejects_text(model):
    with pytest.raises(TypeError, match=r"the prompt is text, but no tokenizer is given here; .*stream_generate"):
        next(generate_step("abc", model))


def test_misspelt_option_named(model):
    with pytest.raises(TypeError, match="stream_generate\\(\\) got unexpected keyword arguments max_token; it passes on"):
        rwkv_mlx.generate(model, ByteTokenizer(), "abc", max_token=5)


def test_batch_misspelt_option_named(model):
    with pytest.raises(TypeError, match="batch_generate\\(\\) got unexpected keyword arguments max_token; it passes on"):
        batch_generate(model, ByteTokenizer(), ["abc"], max_token=5)


def test_stop_of_wrong_type_rejected():
    with pytest.raises(TypeError, match="stop must be a string or a list of strings, got 5"):
        StopStrings(5)


def test_single_stop_string_kept_whole():
    assert StopStrings("a m").stop == ["a m"]


@pytest.mark.parametrize("stop", [[""], ["ok", 3]])
def test_invalid_stop_strings_rejected(stop):
    with pytest.raises(ValueError, match="stop strings must be non-empty strings"):
        StopStrings(stop)


def test_batch_generate_rejects_one_string(model):
    with pytest.raises(TypeError, match=r"prompts must be a list of prompts; pass a single prompt as \[prompt\]"):
        batch_generate(model, ByteTokenizer(), "She was", max_tokens=2)


def test_stream_stops_at_eos():
    script = list(b"ok") + [0] + list(b"never")
    responses = list(stream_generate(ScriptedModel(script), ByteTokenizer(eos_token_id=0), "x", max_tokens=50))

    assert "".join(r.text for r in responses) == "ok"
    assert responses[-1].finish_reason == "stop"
    assert responses[-1].token == 0
    assert responses[-1].generation_tokens == 3


def test_response_statistics(model):
    responses = list(stream_generate(model, ByteTokenizer(), "hello", max_tokens=5))

    assert len(responses) == 5
    assert [r.generation_tokens for r in responses] == [1, 2, 3, 4, 5]
    assert all(r.prompt_tokens == 5 for r in responses)
    assert responses[-1].prompt_tps > 0
    assert responses[-1].generation_tps > 0
    assert responses[-1].peak_memory >= 0
    assert responses[-1].logprobs.shape == (256,)
    assert [r.finish_reason for r in responses] == [None] * 4 + ["length"]


def test_max_tokens_zero_processes_prompt(model):
    cache = model.make_cache()
    responses = list(stream_generate(model, ByteTokenizer(), "hello", max_tokens=0, prompt_cache=cache))

    assert len(responses) == 1
    assert responses[0].token is None
    assert responses[0].generation_tokens == 0
    reference = model.make_cache()
    model(mx.array([list(b"hello")]), cache=reference)
    for ours, theirs in zip(cache, reference):
        for a, b in zip(ours.cache, theirs.cache):
            assert mx.allclose(a, b, atol=1e-5).item()


def test_invalid_arguments(model):
    tokenizer = ByteTokenizer()
    with pytest.raises(ValueError, match="max_tokens"):
        list(stream_generate(model, tokenizer, "hi", max_tokens=-2))
    with pytest.raises(ValueError, match="empty"):
        list(stream_generate(model, tokenizer, "", max_tokens=3))
    with pytest.raises(ValueError, match="token id 256 at position 1"):
        list(stream_generate(model, tokenizer, [5, 256, 7], max_tokens=3))
    with pytest.raises(ValueError, match="token id -3"):
        rwkv_mlx.generate(model, tokenizer, mx.array([-3, 4]), max_tokens=3)
    with pytest.raises(ValueError, match="token id 999 at position 0 of prompt 1 "):
        batch_generate(model, tokenizer, [[1, 2], [999]], max_tokens=3)


@pytest.mark.parametrize(
    "prompt, error, message",
    [
        (mx.array([72.7, 101.2]), TypeError, "the prompt is an array of mlx.core.float32"),
        ([72.7, 101.2], TypeError, r"the prompt has 72.7 \(float\) at position 0"),
        (mx.array([True, False]), TypeError, "the prompt is an array of mlx.core.bool"),
        (np.array([1.0, 2.0]), TypeError, "the prompt is an array of float64"),
        (["H", "i"], TypeError, r"the prompt has 'H' \(str\) at position 0"),
        (None, TypeError, "the prompt is of type NoneType"),
        (72, TypeError, "the prompt is of type int"),
        (mx.array([[72, 101], [105, 33]]), ValueError, r"the prompt has shape \[2, 2\]; pass the token ids as a 1-D array"),
    ],
)
def test_prompt_of_wrong_type_rejected(model, prompt, error, message):
    with pytest.raises(error, match=message):
        list(stream_generate(model, ByteTokenizer(), prompt, max_tokens=3))


def test_generate_step_checks_prompt(model):
    with pytest.raises(ValueError, match=r"token id 999 at position 1 of the prompt is outside the model's vocabulary \[0, 256\)"):
        next(generate_step(mx.array([72, 999]), model, max_tokens=2))
    with pytest.raises(ValueError, match="the prompt is empty"):
        next(generate_step(mx.array([], dtype=mx.int32), model, max_tokens=2))


@pytest.mark.parametrize("prompt", [[72, 101], (72, 101), np.array([72, 101], dtype=np.int64), mx.array([72, 101], dtype=mx.uint8)])
def test_prompt_ids_in_any_integer_form(model, prompt):
    expected = rwkv_mlx.generate(model, ByteTokenizer(), [72, 101], max_tokens=4)

    assert rwkv_mlx.generate(model, ByteTokenizer(), prompt, max_tokens=4) == expected


def test_continuation_equals_one_run(model):
    first, second = list(b"User: hi\n\nAssistant:"), list(b"\n\nUser: and then?\n\nAssistant:")
    cache = model.make_cache()
    reply = run(model, first, 8, prompt_cache=cache)
    continued = run(model, second, 8, prompt_cache=cache)

    assert continued == greedy_reference(model, first + reply + second, 8)


def test_calls_share_no_state(model):
    # Strong penalties, so a leaked count would change the argmax.
    processors = make_logits_processors(presence_penalty=3.0, frequency_penalty=3.0)
    prompt_a, prompt_b = list(b"first prompt"), list(b"second")
    fresh_b = run(model, prompt_b, 20, logits_processors=processors)

    run(model, prompt_a, 20, logits_processors=processors)
    again_b = run(model, prompt_b, 20, logits_processors=processors)

    assert again_b == fresh_b
    assert fresh_b != run(model, prompt_b, 20)


def test_seeded_sampling_repeats(model):
    sampler = make_sampler(temp=1.0, top_p=0.9)
    mx.random.seed(7)
    first = run(model, list(b"seed"), 15, sampler=sampler)
    mx.random.seed(7)
    second = run(model, list(b"seed"), 15, sampler=sampler)

    assert first == second


def test_batched_logits_equal_alone(model):
    prompts = [list(b"a long prompt of many bytes"), list(b"short"), list(b"mid length")]
    width = max(len(p) for p in prompts)
    ids = mx.array([[0] * (width - len(p)) + p for p in prompts])
    mask = mx.arange(width)[None] >= mx.array([width - len(p) for p in prompts])[:, None]
    cache = model.make_cache()
    batched = model(ids, cache=cache, mask=mask)[:, -1]
    steps = [list(b"xyz"[i : i + 1]) * 3 for i in range(3)]
    batched_steps = [model(mx.array(column)[:, None], cache=cache)[:, -1] for column in zip(*steps)]

    for row, prompt in enumerate(prompts):
        alone_cache = model.make_cache()
        alone = model(mx.array([prompt]), cache=alone_cache)[0, -1]
        assert mx.abs(batched[row] - alone).max().item() <= 1e-5
        for step, token in enumerate(steps[row]):
            alone = model(mx.array([[token]]), cache=alone_cache)[0, -1]
            assert mx.abs(batched_steps[step][row] - alone).max().item() <= 1e-5


def test_batch_generate_equals_one_by_one(model):
    prompts = ["a long prompt of many bytes", "short", "mid length"]
    result = batch_generate(model, ByteTokenizer(), prompts, max_tokens=12)

    for i, prompt in enumerate(prompts):
        assert result.tokens[i] == run(model, list(prompt.encode()), 12), prompt
        assert result.texts[i] == ByteTokenizer().decode(result.tokens[i])
    assert result.finish_reasons == ["length"] * 3
    assert result.generation_tokens == 36


def test_batch_logprobs_equal_alone(model):
    prompts = [list(b"one"), list(b"a longer second prompt")]
    steps = batch_generate_step(prompts, model, max_tokens=6)
    batched = [logprobs for _, logprobs in steps]

    for row, prompt in enumerate(prompts):
        alone = [logprobs for _, logprobs in generate_step(mx.array(prompt), model, max_tokens=6)]
        for step in range(6):
            assert mx.abs(batched[step][row] - alone[step]).max().item() <= 1e-5


def truncate_at(tokens, end):
    return tokens[: tokens.index(end) + 1] if end in tokens else tokens


def test_batch_finished_rows_freeze(model):
    prompts = ["row one", "another row"]
    alone = [run(model, list(p.encode()), 10) for p in prompts]
    tokenizer = ByteTokenizer(eos_token_id=alone[0][2])
    expected = [truncate_at(tokens, tokenizer.eos_token_id) for tokens in alone]
    result = batch_generate(model, tokenizer, prompts, max_tokens=10, return_prompt_caches=True)

    assert result.tokens == expected
    assert result.finish_reasons[0] == "stop"
    for i, prompt in enumerate(prompts):
        # Each row's state contains its prompt and generated tokens, including
        # the end-of-sequence token, and nothing after it.
        reference = model.make_cache()
        model(mx.array([list(prompt.encode()) + expected[i]]), cache=reference)
        for ours, theirs in zip(result.caches[i], reference):
            for a, b in zip(ours.cache, theirs.cache):
                assert mx.abs(a - b).max().item() <= 1e-5


def test_batch_stop_strings(model):
    prompts = ["first", "second prompt"]
    alone = [ByteTokenizer().decode(run(model, list(p.encode()), 12)) for p in prompts]
    stop = alone[1][3:5]
    result = batch_generate(model, ByteTokenizer(), prompts, max_tokens=12, stop=[stop])

    for i in range(2):
        assert result.texts[i] == alone[i].split(stop)[0]
    assert result.finish_reasons[1] == "stop"


def test_batch_max_tokens_zero_fills_caches(model):
    result = batch_generate(model, ByteTokenizer(), ["ab", "longer"], max_tokens=0, return_prompt_caches=True)
    reference = model.make_cache()
    model(mx.array([list(b"ab")]), cache=reference)

    assert result.tokens == [[], []]
    assert mx.abs(result.caches[0][0][1] - reference[0][1]).max().item() <= 1e-5


def test_generate_returns_text(model):
    text = rwkv_mlx.generate(model, ByteTokenizer(), "hello", max_tokens=10)

    assert text == ByteTokenizer().decode(run(model, list(b"hello"), 10))


# The tiny rwkv.cpp RWKV-7 model (834K parameters, byte vocabulary).


@pytest.fixture(scope="module")
def tiny_v7(rwkv_cpp_tiny_folder):
    return rwkv_mlx.load_model(str(rwkv_cpp_tiny_folder / "tiny-rwkv-7v0-834K-FP32.bin"))[0]


@pytest.fixture(scope="module")
def rwkv_cpp_tiny_folder(rwkv_cpp_tiny):
    return rwkv_cpp_tiny


def test_tiny_v7_first_byte_after_in(tiny_v7, rwkv_cpp_tiny_folder):
    expected = np.fromfile(rwkv_cpp_tiny_folder / "expected-logits-7v0-834K.bin", dtype=np.float32)
    first = run(tiny_v7, list(b'"in'), 1)

    assert first == [int(np.argmax(expected))]


def test_tiny_v7_greedy_equals_argmax(tiny_v7):
    ids = list(b"In the beginning")
    generated = run(tiny_v7, ids, 24)

    assert generated == greedy_reference(tiny_v7, ids, 24)
    assert len(rwkv_mlx.generate(tiny_v7, ByteTokenizer(), "In the beginning", max_tokens=24)) > 0
