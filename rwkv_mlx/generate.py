"""Generate text with RWKV models: the Python API and ``python -m rwkv_mlx.generate``.

The API follows mlx-lm's ``generate`` module: ``generate_step`` yields token
ids, ``stream_generate`` yields ``GenerationResponse`` objects with text, and
``generate`` returns the whole completion. ``batch_generate`` runs several
prompts of different lengths together.

An RWKV model's context is its cache: per layer two token-shift vectors and
one WKV state, whose size does not depend on the length of the text. Passing
the same ``prompt_cache`` to successive calls continues one context, so each
call feeds only its new text. After a call the cache contains the state
after the prompt and every generated token, including the last one, also
when that token is an end-of-sequence token or completes a stop string.

Example::

    python -m rwkv_mlx.generate --model model.pth --prompt "The capital of France is"
"""

import argparse
import contextlib
import inspect
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Generator, Iterable, List, Optional, Sequence, Set, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .io.errors import CheckpointError
from .io.state import load_state, save_state, tokenizer_identity
from .sample import (
    LogitsProcessor,
    Sampler,
    greedy_sampler,
    make_logits_processors,
    make_sampler,
    uncounted_token_ids,
)

logger = logging.getLogger(__name__)

Prompt = Union[str, Sequence[int], mx.array]

DEFAULT_PROMPT = "hello"
DEFAULT_MAX_TOKENS = 100
DEFAULT_PREFILL_STEP_SIZE = 512

# Command-line sampling defaults: those of the RWKV-7 chat demo scripts built
# on BlinkDL's rwkv package. mlx-lm's command line defaults to greedy decoding
# (temp 0, top-p 1, no penalties), under which small RWKV models tend to loop
# (an 834K-parameter byte-level RWKV-7 repeats " the" forever).
DEFAULT_TEMP = 1.0
DEFAULT_TOP_P = 0.3
DEFAULT_TOP_K = 0
DEFAULT_MIN_P = 0.0
DEFAULT_PRESENCE_PENALTY = 0.5
DEFAULT_FREQUENCY_PENALTY = 0.5
DEFAULT_PENALTY_DECAY = 0.996

# RWKV World chat format: "User: ...\n\nAssistant: ...\n\n", one turn after
# another, so a blank line ends the assistant's turn.
CHAT_TURN_END = "\n\n"


@dataclass
class GenerationResponse:
    """One step of ``stream_generate``.

    Args:
        text (str): The next segment of decoded text; may be empty.
        token (int, optional): The generated token; None when nothing was
            generated (``max_tokens=0``).
        logprobs (mx.array, optional): Log-probabilities over the vocabulary
            for this token, after the logits processors.
        prompt_tokens (int): Tokens in the prompt of this call.
        prompt_tps (float): Prompt tokens processed per second.
        generation_tokens (int): Tokens generated so far.
        generation_tps (float): Tokens generated per second.
        peak_memory (float): Peak memory used by MLX so far, in GB.
        finish_reason (str, optional): ``"stop"`` (end-of-sequence token or
            stop string), ``"length"`` (``max_tokens`` reached), or None
            while generation continues.
    """

    text: str
    token: Optional[int]
    logprobs: Optional[mx.array]
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float
    finish_reason: Optional[str] = None


@dataclass
class BatchResponse:
    """The result of ``batch_generate``, one entry per prompt.

    Args:
        texts (list[str]): The completions, without stop strings.
        tokens (list[list[int]]): The generated tokens of each completion.
        finish_reasons (list[str]): ``"stop"`` or ``"length"``.
        prompt_tokens (int): Prompt tokens of all sequences.
        prompt_tps (float): Prompt tokens processed per second.
        generation_tokens (int): Tokens generated for all sequences.
        generation_tps (float): Tokens generated per second.
        peak_memory (float): Peak memory used by MLX, in GB.
        caches (list[list[ArraysCache]], optional): Each sequence's layer
            caches (batch size 1) after its prompt and generated tokens,
            when requested with ``return_prompt_caches``.
    """

    texts: List[str]
    tokens: List[List[int]]
    finish_reasons: List[str]
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float
    caches: Optional[List[List[Any]]] = None


# ---------------------------------------------------------------------------
# Prompts, tokens and text


def vocab_size_of(model: nn.Module) -> int:
    """Return the number of token ids the model accepts."""
    return model.args.vocab_size


def check_token_ids(ids: Sequence[int], vocab_size: int, prompt_name: str = "the prompt") -> None:
    """Raise ValueError if ``ids`` is empty or contains an id outside [0, vocab_size)."""
    if len(ids) == 0:
        raise ValueError(f"{prompt_name} is empty; it must contain at least one token")
    for position, token in enumerate(ids):
        if not 0 <= token < vocab_size:
            raise ValueError(
                f"token id {token} at position {position} of {prompt_name} is outside the model's "
                f"vocabulary [0, {vocab_size})"
            )


def _is_integer_array(array) -> bool:
    """Return whether an MLX or numpy array contains integers (booleans are not integers here)."""
    if isinstance(array, mx.array):
        return mx.issubdtype(array.dtype, mx.integer)
    return np.issubdtype(array.dtype, np.integer)


def encode_prompt(tokenizer, prompt: Prompt, vocab_size: int, prompt_name: str = "the prompt") -> mx.array:
    """Turn a prompt into a 1-D array of checked token ids.

    Args:
        tokenizer: Encodes a string prompt with ``encode(text) -> list[int]``.
        prompt (str | Sequence[int] | mx.array): Text or token ids.
        vocab_size (int): The model's vocabulary size.
        prompt_name (str): How error messages name the prompt.

    Returns:
        mx.array: The token ids, [T] int32.

    Raises:
        TypeError: If the prompt is neither text nor integer token ids.
        ValueError: If an array of ids is not 1-D, or an id is outside the vocabulary.
    """
    if isinstance(prompt, str) and tokenizer is None:
        raise TypeError(
            f"{prompt_name} is text, but no tokenizer is given here; encode it with the tokenizer first, "
            "or call stream_generate(model, tokenizer, text)"
        )
    if isinstance(prompt, str):
        ids = [int(t) for t in tokenizer.encode(prompt)]
    elif isinstance(prompt, (mx.array, np.ndarray)):
        if prompt.ndim != 1:
            raise ValueError(f"{prompt_name} has shape {list(prompt.shape)}; pass the token ids as a 1-D array")
        if not _is_integer_array(prompt):
            raise TypeError(f"{prompt_name} is an array of {prompt.dtype}; pass text or integer token ids")
        ids = prompt.tolist()
    elif isinstance(prompt, Sequence):
        for position, token in enumerate(prompt):
            if isinstance(token, bool) or not isinstance(token, (int, np.integer)):
                raise TypeError(
                    f"{prompt_name} has {token!r} ({type(token).__name__}) at position {position}; "
                    "pass text or integer token ids"
                )
        ids = [int(t) for t in prompt]
    else:
        raise TypeError(f"{prompt_name} is of type {type(prompt).__name__}; pass text or a sequence of integer token ids")
    check_token_ids(ids, vocab_size, prompt_name)
    return mx.array(ids, dtype=mx.int32)


def eos_token_ids(tokenizer) -> Set[int]:
    """Return the tokenizer's end-of-sequence ids (``eos_token_ids`` or ``eos_token_id``)."""
    ids = getattr(tokenizer, "eos_token_ids", None)
    if ids is None:
        single = getattr(tokenizer, "eos_token_id", None)
        ids = [] if single is None else [single]
    return {int(t) for t in ids}


class IncrementalDetokenizer:
    """A streaming detokenizer for tokenizers that do not provide one.

    It decodes the tokens since the last complete character and holds back
    text that ends in U+FFFD, the mark of an incomplete UTF-8 sequence. This
    is exact for byte-level vocabularies such as RWKV's, where decoding
    tokens one after another and joining the text equals decoding them all.
    """

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.reset()

    def reset(self) -> None:
        self.tokens: List[int] = []
        self.text = ""
        self.offset = 0
        self._pending: List[int] = []

    def add_token(self, token: int) -> None:
        self.tokens.append(token)
        self._pending.append(token)
        decoded = self._tokenizer.decode(self._pending)
        if not decoded.endswith("\ufffd"):
            self.text += decoded
            self._pending = []

    def finalize(self) -> None:
        if self._pending:
            self.text += self._tokenizer.decode(self._pending)
            self._pending = []

    @property
    def last_segment(self) -> str:
        """The text added since this property was last read."""
        segment = self.text[self.offset :]
        self.offset = len(self.text)
        return segment


def make_detokenizer(tokenizer):
    """Return a fresh streaming detokenizer: the tokenizer's own (as mlx-lm's
    ``TokenizerWrapper.detokenizer``), else an ``IncrementalDetokenizer``."""
    detokenizer = getattr(tokenizer, "detokenizer", None)
    if detokenizer is None:
        detokenizer = IncrementalDetokenizer(tokenizer)
    detokenizer.reset()
    return detokenizer


class StopStrings:
    """Find stop strings in streamed text.

    Text that could be the start of a stop string is held back until the
    next segment shows whether it is one, so a stop string is never emitted.
    """

    def __init__(self, stop: Optional[Iterable[str]] = None):
        if isinstance(stop, str):
            stop = [stop]
        if stop is not None and not isinstance(stop, Iterable):
            raise TypeError(f"stop must be a string or a list of strings, got {stop!r}")
        self.stop = list(stop or [])
        for string in self.stop:
            if not isinstance(string, str) or not string:
                raise ValueError(f"stop strings must be non-empty strings, got {string!r}")
        self._pending = ""

    def feed(self, segment: str) -> Tuple[str, bool]:
        """Add a segment of text.

        Returns:
            tuple[str, bool]: The text that is safe to emit, and whether a
            stop string was found (the text then ends just before it).
        """
        if not self.stop:
            return segment, False
        self._pending += segment
        found = [index for index in (self._pending.find(s) for s in self.stop) if index >= 0]
        if found:
            text = self._pending[: min(found)]
            self._pending = ""
            return text, True

        # Hold back the longest end of the text that starts a stop string.
        held_length = 0
        for stop in self.stop:
            for length in range(min(len(stop) - 1, len(self._pending)), held_length, -1):
                if self._pending.endswith(stop[:length]):
                    held_length = length
                    break
        split = len(self._pending) - held_length
        text, self._pending = self._pending[:split], self._pending[split:]
        return text, False

    def flush(self) -> str:
        """Return the held-back text at the end of generation."""
        text, self._pending = self._pending, ""
        return text


@contextlib.contextmanager
def wired_limit():
    """Wire the model's memory on a Mac GPU while generating, as mlx-lm does.

    Outside Metal this does nothing.
    """
    if not mx.metal.is_available():
        yield
        return
    limit = mx.device_info()["max_recommended_working_set_size"]
    old_limit = mx.set_wired_limit(limit)
    try:
        yield
    finally:
        mx.synchronize()
        mx.set_wired_limit(old_limit)


# ---------------------------------------------------------------------------
# Token generation


def reset_processors(processors: Iterable[LogitsProcessor]) -> None:
    """Call ``reset()`` on every processor that keeps counts between steps."""
    for processor in processors:
        reset = getattr(processor, "reset", None)
        if callable(reset):
            reset()


def check_max_tokens(max_tokens: int) -> None:
    """Raise ValueError unless ``max_tokens`` is >= 0, or -1 for no limit."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < -1:
        raise ValueError(f"max_tokens must be 0 or more (or -1 for no limit), got {max_tokens!r}")


def cache_arrays(cache: List[Any]) -> List[mx.array]:
    """Return every array in a list of layer caches."""
    return [entry for layer in cache for entry in layer.cache if entry is not None]


def prefill(
    model: nn.Module,
    ids: mx.array,
    cache: List[Any],
    prefill_step_size: int,
    mask: Optional[mx.array] = None,
    progress: Optional[Callable[[int], None]] = None,
) -> None:
    """Feed tokens into the cache in chunks, evaluating the state after each.

    Only the state is evaluated, so the head's logits for these positions are
    never computed.

    Args:
        model (nn.Module): The model.
        ids (mx.array): Token ids, [B, T].
        cache (list): The layer caches, updated in place.
        prefill_step_size (int): Tokens per chunk.
        mask (mx.array, optional): Valid positions, [B, T] bool.
        progress (Callable[[int], None], optional): Called with the number of
            positions processed after each chunk.
    """
    length = ids.shape[1]
    for start in range(0, length, prefill_step_size):
        end = min(start + prefill_step_size, length)
        chunk_mask = None if mask is None else mask[:, start:end]
        model(ids[:, start:end], cache=cache, mask=chunk_mask)
        mx.eval(cache_arrays(cache))
        mx.clear_cache()
        if progress is not None:
            progress(end)


def generate_step(
    prompt: mx.array,
    model: nn.Module,
    *,
    max_tokens: int = 256,
    sampler: Optional[Sampler] = None,
    logits_processors: Optional[List[LogitsProcessor]] = None,
    prompt_cache: Optional[List[Any]] = None,
    prefill_step_size: int = DEFAULT_PREFILL_STEP_SIZE,
    prompt_progress_callback: Optional[Callable[[int, int], None]] = None,
) -> Generator[Tuple[int, mx.array], None, None]:
    """Generate token ids from a prompt, one at a time.

    The step for token ``n + 1`` is queued with ``mx.async_eval`` before
    token ``n`` is yielded, so the model runs while the caller handles a
    token. When the caller stops early, the cache already contains the last
    yielded token.

    Args:
        prompt (mx.array): Token ids, [T]; must not be empty, and every id
            must be in the model's vocabulary.
        model (nn.Module): The model.
        max_tokens (int): Tokens to generate; 0 only processes the prompt,
            -1 means no limit.
        sampler (Sampler, optional): Draws a token from log-probabilities
            [1, V]; greedy when not given.
        logits_processors (list[LogitsProcessor], optional): Applied to the
            logits before sampling; each gets the prompt and generated
            tokens so far. Processors with a ``reset`` method are reset first.
        prompt_cache (list, optional): Layer caches from
            ``model.make_cache()`` or ``load_state``, continued and updated
            in place. A fresh cache is used when not given.
        prefill_step_size (int): Prompt tokens processed per chunk.
        prompt_progress_callback (Callable[[int, int], None], optional):
            Called with (tokens processed, prompt tokens).

    Yields:
        tuple[int, mx.array]: A token id and the log-probabilities [V] it
        was drawn from.
    """
    yield from _generate_from_ids(
        encode_prompt(None, prompt, vocab_size_of(model)),
        model,
        max_tokens=max_tokens,
        sampler=sampler,
        logits_processors=logits_processors,
        prompt_cache=prompt_cache,
        prefill_step_size=prefill_step_size,
        prompt_progress_callback=prompt_progress_callback,
    )


def check_step_options(options: Dict[str, Any], caller: str, step: Callable = None) -> None:
    """Raise TypeError for keyword arguments that the step function does not take.

    Args:
        options (dict): The keyword arguments passed on to ``step``.
        caller (str): The public function that received them, for the message.
        step (Callable, optional): ``generate_step`` when not given, or
            ``batch_generate_step``.
    """
    step = step or generate_step
    accepted = set(inspect.signature(step).parameters) - {"prompt", "prompts", "model"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise TypeError(
            f"{caller}() got unexpected keyword arguments {', '.join(unknown)}; it passes on those of "
            f"{step.__name__}: {', '.join(sorted(accepted))}. Sampling options go into sampler=make_sampler(...) "
            "and logits_processors=make_logits_processors(...)"
        )


def _generate_from_ids(
    prompt: mx.array,
    model: nn.Module,
    *,
    max_tokens: int = 256,
    sampler: Optional[Sampler] = None,
    logits_processors: Optional[List[LogitsProcessor]] = None,
    prompt_cache: Optional[List[Any]] = None,
    prefill_step_size: int = DEFAULT_PREFILL_STEP_SIZE,
    prompt_progress_callback: Optional[Callable[[int, int], None]] = None,
) -> Generator[Tuple[int, mx.array], None, None]:
    """Run ``generate_step`` on ids that ``encode_prompt`` has already checked."""
    check_max_tokens(max_tokens)
    if prefill_step_size < 1:
        raise ValueError(f"prefill_step_size must be at least 1, got {prefill_step_size}")
    cache = prompt_cache if prompt_cache is not None else model.make_cache()
    sampler = sampler or greedy_sampler
    processors = list(logits_processors or [])
    reset_processors(processors)
    history = None
    total = prompt.size
    report = prompt_progress_callback or (lambda processed, total: None)

    def step(ids: mx.array) -> Tuple[mx.array, mx.array]:
        nonlocal history
        logits = model(ids[None], cache=cache)[:, -1, :]
        if processors:
            history = ids if history is None else mx.concatenate([history, ids])
            for processor in processors:
                logits = processor(history, logits)
        logits = logits.astype(mx.float32)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return sampler(logprobs), logprobs[0]

    # Every prompt token but the last goes through the chunked prefill; the
    # last one is the first decoding step, unless nothing is generated.
    report(0, total)
    prefill_length = total if max_tokens == 0 else total - 1
    if prefill_length > 0:
        prefill(model, prompt[None, :prefill_length], cache, prefill_step_size, progress=lambda n: report(n, total))
        if processors:
            history = prompt[:prefill_length]
    if max_tokens == 0:
        return

    y, logprobs = step(prompt[prefill_length:])
    mx.async_eval(y, logprobs)
    n = 0
    while True:
        if n != max_tokens:
            next_y, next_logprobs = step(y)
            # The state and the token history are evaluated every step, so
            # the lazy graph never grows beyond one step.
            mx.async_eval(next_y, next_logprobs, cache_arrays(cache), history)
        if n == 0:
            mx.eval(y)
            report(total, total)
        if n == max_tokens:
            break
        yield y.item(), logprobs
        if n % 256 == 0:
            mx.clear_cache()
        y, logprobs = next_y, next_logprobs
        n += 1


def stream_generate(
    model: nn.Module,
    tokenizer,
    prompt: Prompt,
    max_tokens: int = 256,
    *,
    stop: Optional[Iterable[str]] = None,
    **kwargs,
) -> Generator[GenerationResponse, None, None]:
    """Generate text from a prompt, one response per generated token.

    Generation ends at an end-of-sequence token (not added to the text), at
    a stop string (the text ends just before it), or after ``max_tokens``
    tokens. The last response carries the ``finish_reason``.

    Args:
        model (nn.Module): The model.
        tokenizer: The tokenizer (``encode``, ``decode``, ``eos_token_id``
            and, ideally, a streaming ``detokenizer``).
        prompt (str | Sequence[int] | mx.array): Text or token ids; must not
            be empty, and every id must be in the model's vocabulary.
        max_tokens (int): Tokens to generate; 0 only processes the prompt
            (one response with ``token=None``), -1 means no limit.
        stop (str | Iterable[str], optional): A string, or strings, that end generation.
        kwargs: Passed to ``generate_step`` (``sampler``,
            ``logits_processors``, ``prompt_cache``, ``prefill_step_size``,
            ``prompt_progress_callback``).

    Yields:
        GenerationResponse: The text segment and statistics of each step.
    """
    check_max_tokens(max_tokens)
    ids = encode_prompt(tokenizer, prompt, vocab_size_of(model))
    detokenizer = make_detokenizer(tokenizer)
    stop_strings = StopStrings(stop)
    end_ids = eos_token_ids(tokenizer)

    def response(text, token, logprobs, count, finish_reason):
        elapsed = time.perf_counter() - generation_start
        return GenerationResponse(
            text=text,
            token=token,
            logprobs=logprobs,
            prompt_tokens=ids.size,
            prompt_tps=ids.size / max(prompt_time, 1e-9),
            generation_tokens=count,
            generation_tps=count / max(elapsed, 1e-9),
            peak_memory=mx.get_peak_memory() / 1e9,
            finish_reason=finish_reason,
        )

    check_step_options(kwargs, "stream_generate")
    with wired_limit():
        start = time.perf_counter()
        token_stream = _generate_from_ids(ids, model, max_tokens=max_tokens, **kwargs)
        if max_tokens == 0:
            for _ in token_stream:
                pass
            prompt_time = time.perf_counter() - start
            generation_start = time.perf_counter()
            yield response("", None, None, 0, "length")
            return

        finish_reason = None
        stopped = False
        for n, (token, logprobs) in enumerate(token_stream):
            if n == 0:
                prompt_time = time.perf_counter() - start
                generation_start = time.perf_counter()
            if token in end_ids:
                finish_reason = "stop"
                text = ""
                break
            detokenizer.add_token(token)
            text, stopped = stop_strings.feed(detokenizer.last_segment)
            if stopped:
                finish_reason = "stop"
                break
            if n + 1 == max_tokens:
                finish_reason = "length"
                break
            yield response(text, token, logprobs, n + 1, None)
        token_stream.close()

        # Flush the text the detokenizer and the stop strings held back.
        if not stopped:
            detokenizer.finalize()
            more, stopped = stop_strings.feed(detokenizer.last_segment)
            text += more if stopped else more + stop_strings.flush()
            finish_reason = "stop" if stopped else finish_reason or "length"
        yield response(text, token, logprobs, n + 1, finish_reason)


def generate(
    model: nn.Module,
    tokenizer,
    prompt: Prompt,
    verbose: bool = False,
    **kwargs,
) -> str:
    """Generate a whole completion.

    Args:
        model (nn.Module): The model.
        tokenizer: The tokenizer.
        prompt (str | Sequence[int] | mx.array): Text or token ids.
        verbose (bool): Print the text as it is generated, then the speeds
            and peak memory.
        kwargs: Passed to ``stream_generate`` (``max_tokens``, ``stop``,
            ``sampler``, ``logits_processors``, ``prompt_cache``, ...).

    Returns:
        str: The generated text.
    """
    if verbose:
        print("=" * 10)
    text = ""
    response = None
    for response in stream_generate(model, tokenizer, prompt, **kwargs):
        if verbose:
            print(response.text, end="", flush=True)
        text += response.text
    if verbose:
        print()
        print_statistics(response)
    return text


def print_statistics(response: GenerationResponse, file=None) -> None:
    """Print prompt and generation speed and peak memory, as mlx-lm does."""
    file = file or sys.stdout
    print("=" * 10, file=file)
    print(f"Prompt: {response.prompt_tokens} tokens, {response.prompt_tps:.3f} tokens-per-sec", file=file)
    print(
        f"Generation: {response.generation_tokens} tokens, {response.generation_tps:.3f} tokens-per-sec",
        file=file,
    )
    print(f"Peak memory: {response.peak_memory:.3f} GB", file=file, flush=True)


# ---------------------------------------------------------------------------
# Batches


def batch_generate_step(
    prompts: Sequence[Sequence[int]],
    model: nn.Module,
    *,
    max_tokens: int = 256,
    sampler: Optional[Sampler] = None,
    logits_processors: Optional[List[LogitsProcessor]] = None,
    prefill_step_size: int = DEFAULT_PREFILL_STEP_SIZE,
    prompt_cache: Optional[List[Any]] = None,
) -> Generator[Tuple[List[int], mx.array], Optional[Sequence[bool]], None]:
    """Generate tokens for several prompts of different lengths together.

    The prompts are left-padded to one length, and a mask keeps the padding
    out of every state and token shift, so each sequence gets the logits it
    would get alone. To freeze the state of finished sequences, send the
    generator a list of booleans, True for each sequence that has finished.
    A frozen state contains the sequence's prompt and its tokens up to and
    including the one it finished on.

    Args:
        prompts (Sequence[Sequence[int]]): Token ids of each prompt; none
            may be empty.
        model (nn.Module): The model.
        max_tokens (int): Steps to generate; -1 means no limit.
        sampler (Sampler, optional): Draws one token per row from
            log-probabilities [B, V]; greedy when not given.
        logits_processors (list[LogitsProcessor], optional): Get tokens
            [B, T] (the padded prompts, then the generated tokens) and
            logits [B, V].
        prefill_step_size (int): Prompt positions processed per chunk.
        prompt_cache (list, optional): An empty cache from
            ``model.make_cache()`` to run the batch in, so the caller can
            read the states afterwards; a fresh one is used when not given.

    Yields:
        tuple[list[int], mx.array]: One token per sequence and the
        log-probabilities [B, V] they were drawn from.
    """
    check_max_tokens(max_tokens)
    if not prompts:
        raise ValueError("no prompts given")
    vocab_size = vocab_size_of(model)
    for i, prompt in enumerate(prompts):
        check_token_ids(list(prompt), vocab_size, prompt_name=f"prompt {i}")

    lengths = [len(p) for p in prompts]
    width = max(lengths)
    ids = mx.array([[0] * (width - len(p)) + [int(t) for t in p] for p in prompts], dtype=mx.int32)
    mask = mx.arange(width)[None, :] >= mx.array([width - n for n in lengths])[:, None]
    cache = prompt_cache if prompt_cache is not None else model.make_cache()
    if cache_arrays(cache):
        raise ValueError("batch generation needs an empty cache from model.make_cache(), but this cache contains a state")
    sampler = sampler or greedy_sampler
    processors = list(logits_processors or [])
    reset_processors(processors)
    history = None

    def step(step_ids: mx.array, step_mask: Optional[mx.array]) -> Tuple[mx.array, mx.array]:
        nonlocal history
        logits = model(step_ids, cache=cache, mask=step_mask)[:, -1, :]
        if processors:
            history = step_ids if history is None else mx.concatenate([history, step_ids], axis=1)
            for processor in processors:
                logits = processor(history, logits)
        logits = logits.astype(mx.float32)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return sampler(logprobs), logprobs

    padded = width != min(lengths)
    if max_tokens == 0:
        prefill(model, ids, cache, prefill_step_size, mask=mask if padded else None)
        return
    if width > 1:
        prefill(model, ids[:, :-1], cache, prefill_step_size, mask=mask[:, :-1] if padded else None)
        if processors:
            history = ids[:, :-1]

    # Every prompt ends in the last column, so the first step needs no mask.
    y, logprobs = step(ids[:, -1:], None)
    mx.async_eval(y, logprobs)
    active = [True] * len(prompts)
    n = 0
    while True:
        if n != max_tokens:
            step_mask = None if all(active) else mx.array(active)[:, None]
            next_y, next_logprobs = step(y[:, None], step_mask)
            mx.async_eval(next_y, next_logprobs, cache_arrays(cache), history)
        if n == max_tokens:
            break
        finished = yield y.tolist(), logprobs
        if finished is not None:
            active = [a and not f for a, f in zip(active, finished)]
        if n % 256 == 0:
            mx.clear_cache()
        y, logprobs = next_y, next_logprobs
        n += 1


def batch_generate(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[Prompt],
    max_tokens: int = 256,
    *,
    stop: Optional[Iterable[str]] = None,
    verbose: bool = False,
    return_prompt_caches: bool = False,
    **kwargs,
) -> BatchResponse:
    """Generate completions for several prompts together.

    With greedy decoding each sequence gets the tokens it would get alone.
    A random sampler draws all rows from one random stream, so its tokens
    differ from single runs. A sequence stops at an end-of-sequence token, a
    stop string or ``max_tokens``, and the batch runs until every sequence
    has stopped.

    Args:
        model (nn.Module): The model.
        tokenizer: The tokenizer.
        prompts (Sequence[str | Sequence[int] | mx.array]): The prompts.
        max_tokens (int): Tokens to generate per sequence; -1 means no limit.
        stop (str | Iterable[str], optional): A string, or strings, that end a sequence.
        verbose (bool): Print the speeds and peak memory at the end.
        return_prompt_caches (bool): Return each sequence's layer caches,
            to continue it with ``stream_generate(..., prompt_cache=...)``.
        kwargs: Passed to ``batch_generate_step`` (``sampler``,
            ``logits_processors``, ``prefill_step_size``).

    Returns:
        BatchResponse: Texts, tokens and statistics.
    """
    check_max_tokens(max_tokens)
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of prompts; pass a single prompt as [prompt]")
    check_step_options(kwargs, "batch_generate", batch_generate_step)
    vocab_size = vocab_size_of(model)
    encoded = [encode_prompt(tokenizer, p, vocab_size, prompt_name=f"prompt {i}").tolist() for i, p in enumerate(prompts)]
    count = len(encoded)
    detokenizers = [make_detokenizer(tokenizer) for _ in range(count)]
    stop_strings = [StopStrings(stop) for _ in range(count)]
    end_ids = eos_token_ids(tokenizer)
    texts = [""] * count
    tokens: List[List[int]] = [[] for _ in range(count)]
    finish_reasons: List[Optional[str]] = [None] * count

    def finish(i: int, reason: str) -> None:
        finish_reasons[i] = reason
        if reason == "length" or tokens[i][-1] in end_ids:
            detokenizers[i].finalize()
            more, stopped = stop_strings[i].feed(detokenizers[i].last_segment)
            texts[i] += more if stopped else more + stop_strings[i].flush()

    with wired_limit():
        start = time.perf_counter()
        prompt_time = 0.0
        cache = model.make_cache()
        steps = batch_generate_step(encoded, model, max_tokens=max_tokens, prompt_cache=cache, **kwargs)
        finished = None
        n = 0
        while True:
            try:
                step_tokens, _ = steps.send(finished) if n > 0 else next(steps)
            except StopIteration:
                prompt_time = prompt_time or time.perf_counter() - start
                break
            if n == 0:
                prompt_time = time.perf_counter() - start
                generation_start = time.perf_counter()
            n += 1
            for i, token in enumerate(step_tokens):
                if finish_reasons[i] is not None:
                    continue
                tokens[i].append(token)
                if token in end_ids:
                    finish(i, "stop")
                    continue
                detokenizers[i].add_token(token)
                text, stopped = stop_strings[i].feed(detokenizers[i].last_segment)
                texts[i] += text
                if stopped:
                    finish(i, "stop")
                elif len(tokens[i]) == max_tokens:
                    finish(i, "length")
            finished = [reason is not None for reason in finish_reasons]
            if all(finished):
                break
        steps.close()

    for i in range(count):
        if finish_reasons[i] is None:
            finish(i, "length")
    generated = sum(len(t) for t in tokens)
    elapsed = time.perf_counter() - generation_start if n else 0.0
    result = BatchResponse(
        texts=texts,
        tokens=tokens,
        finish_reasons=finish_reasons,
        prompt_tokens=sum(len(p) for p in encoded),
        prompt_tps=sum(len(p) for p in encoded) / max(prompt_time, 1e-9),
        generation_tokens=generated,
        generation_tps=generated / max(elapsed, 1e-9),
        peak_memory=mx.get_peak_memory() / 1e9,
        caches=[[layer.extract(i) for layer in cache] for i in range(count)] if return_prompt_caches else None,
    )
    if verbose:
        print(f"Prompt: {result.prompt_tokens} tokens, {result.prompt_tps:.3f} tokens-per-sec")
        print(f"Generation: {result.generation_tokens} tokens, {result.generation_tps:.3f} tokens-per-sec")
        print(f"Peak memory: {result.peak_memory:.3f} GB")
    return result


# ---------------------------------------------------------------------------
# Command line


def str2bool(value: str) -> bool:
    """Parse a --verbose value as mlx-lm does: anything but false/f is True."""
    return value.lower() not in ("false", "f", "0", "no")


def setup_arg_parser() -> argparse.ArgumentParser:
    """Return the argument parser of ``python -m rwkv_mlx.generate``."""
    parser = argparse.ArgumentParser(
        prog="python -m rwkv_mlx.generate",
        description="Generate text with an RWKV model. Sampling order: the ban and the penalties change the "
        "logits, top-p, min-p and top-k choose the candidate tokens at temperature 1, then the temperature "
        "is applied to the candidates.",
    )
    parser.add_argument(
        "--model",
        help="a model directory, a .pth, rwkv.cpp .bin or .gguf checkpoint, or a Hugging Face repo id "
        "(default: the package's bundled model, when installed)",
    )
    parser.add_argument(
        "--adapter-path",
        help="a folder of LoRA, DoRA, full or state-tuning adapters from python -m rwkv_mlx.lora (or mlx_lm.lora)",
    )
    parser.add_argument(
        "--tokenizer",
        help="'world', 'bytes', or a tokenizer.json file (default: the model's own, else by vocabulary size: "
        "256 tokens use 'bytes', 65536 use 'world')",
    )

    parser.add_argument("--prompt", "-p", help=f"the prompt text; '-' reads it from stdin (default: {DEFAULT_PROMPT!r}). With --chat, text the model reads before the first turn")
    parser.add_argument(
        "--max-tokens", "-m", type=int, default=DEFAULT_MAX_TOKENS,
        help="maximum number of tokens to generate (per turn with --chat); 0 only processes the prompt "
        "(default: %(default)s)",
    )  # fmt: skip

    parser.add_argument(
        "--temp", type=float, default=DEFAULT_TEMP,
        help="sampling temperature; 0 picks the most likely token after the penalties, and with "
        "--presence-penalty 0 --frequency-penalty 0 it is mlx-lm's greedy decoding (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--top-p", type=float, default=DEFAULT_TOP_P, help="nucleus sampling mass, in (0, 1]; 1 keeps every token (default: %(default)s)"
    )
    parser.add_argument("--top-k", type=int, default=DEFAULT_TOP_K, help="sample from the k most likely tokens; 0 keeps all (default: %(default)s)")
    parser.add_argument(
        "--min-p", type=float, default=DEFAULT_MIN_P,
        help="keep tokens with at least this fraction of the top token's probability; 0 turns it off "
        "(default: %(default)s)",
    )  # fmt: skip

    parser.add_argument(
        "--presence-penalty", type=float, default=DEFAULT_PRESENCE_PENALTY,
        help="subtracted from the logit of every token generated before in this reply (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--frequency-penalty", type=float, default=DEFAULT_FREQUENCY_PENALTY,
        help="subtracted from a token's logit once per earlier occurrence, each occurrence decaying "
        "(default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--penalty-decay", type=float, default=DEFAULT_PENALTY_DECAY,
        help="factor applied to the occurrence counts after every generated token, in [0, 1] "
        "(default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--ban-token", type=int, nargs="+", action="extend", default=[], metavar="ID",
        help="token ids that are never generated",
    )  # fmt: skip
    parser.add_argument(
        "--stop", nargs="+", action="extend", default=[], metavar="TEXT",
        help="strings that end generation; \\n and \\t are unescaped",
    )  # fmt: skip

    parser.add_argument("--seed", type=int, help="random seed for sampling")
    parser.add_argument(
        "--save-state", metavar="FILE",
        help="write the state after the prompt and the generated tokens to FILE (after every turn with --chat); "
        "an existing FILE is replaced, in one step, so it can be the --load-state file",
    )  # fmt: skip
    parser.add_argument(
        "--load-state", metavar="FILE",
        help="continue from a state saved with --save-state; the prompt is appended to its context",
    )  # fmt: skip
    parser.add_argument(
        "--system-prompt",
        help="with --chat, a system message fed before the first turn, in the tokenizer's chat format",
    )
    parser.add_argument(
        "--chat", action="store_true",
        help="interactive chat: each line read from stdin is one user turn; the history lives in the state",
    )  # fmt: skip

    parser.add_argument(
        "--prefill-step-size", type=int, default=DEFAULT_PREFILL_STEP_SIZE,
        help="prompt tokens processed per chunk; smaller lowers peak memory (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--verbose", type=str2bool, nargs="?", const=True, default=True,
        help="print timing and memory statistics; 'False' prints only the generated text",
    )  # fmt: skip
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit with a usage error for flag values outside their range."""
    if args.max_tokens < 0:
        parser.error(f"--max-tokens must be 0 or more, got {args.max_tokens}")
    if args.prefill_step_size < 1:
        parser.error(f"--prefill-step-size must be at least 1, got {args.prefill_step_size}")
    if not 0 <= args.penalty_decay <= 1:
        parser.error(f"--penalty-decay must be in [0, 1], got {args.penalty_decay}")
    if not 0 <= args.temp < float("inf"):
        parser.error(f"--temp must be a finite number, 0 or more, got {args.temp}; 0 is greedy decoding")
    if not 0 < args.top_p <= 1:
        parser.error(f"--top-p must be in (0, 1], got {args.top_p}; 1 keeps every token")
    if not 0 <= args.min_p <= 1:
        parser.error(f"--min-p must be in [0, 1], got {args.min_p}; 0 turns it off")
    if args.top_k < 0:
        parser.error(f"--top-k must be 0 or more, got {args.top_k}; 0 keeps every token")
    if args.seed is not None and not 0 <= args.seed < 2**64:
        parser.error(f"--seed must be in [0, 2**64), got {args.seed}")
    if args.save_state and not Path(args.save_state).resolve().parent.is_dir():
        parser.error(f"--save-state {args.save_state}: the folder does not exist; create it first")
    if args.save_state and (Path(args.save_state).is_dir() or args.save_state.endswith("/")):
        parser.error(
            f"--save-state {args.save_state} names a folder; name a file, such as {Path(args.save_state) / 'state.safetensors'}"
        )
    if args.system_prompt and not args.chat:
        parser.error("--system-prompt is used only with --chat")
    if args.chat and args.prompt == "-":
        parser.error("--chat reads the turns from stdin, so --prompt cannot be '-'")


def unescape(text: str) -> str:
    """Turn the two-character sequences \\n and \\t into a newline and a tab, as mlx-lm does for prompts."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


MODEL_FILE_PATTERNS = ("config.json", "*.safetensors", "*.pth", "*.bin", "*.gguf")


def default_model_source() -> Optional[str]:
    """Return the bundled default model's path, or None when it is not installed.

    The path is ``rwkv_mlx.default_model.DEFAULT_MODEL_PATH``, else
    ``rwkv_mlx.loading.DEFAULT_MODEL``; it counts as installed when it
    contains a model file.
    """
    candidates = []
    try:
        from . import default_model

        candidates.append(getattr(default_model, "DEFAULT_MODEL_PATH", None))
    except ImportError:
        pass
    from . import loading

    candidates.append(getattr(loading, "DEFAULT_MODEL", None))
    for candidate in candidates:
        if not candidate:
            continue
        path = Path(candidate)
        if path.is_file() or (path.is_dir() and any(any(path.glob(p)) for p in MODEL_FILE_PATTERNS)):
            return str(path)
    return None


def resolve_model_source(model: Optional[str]) -> str:
    """Return the --model value, or the bundled default model (with a notice on stderr)."""
    if model:
        return model
    default = default_model_source()
    if default is None:
        raise CheckpointError("no --model given and no default model is installed; pass --model PATH_OR_REPO_ID")
    try:
        from .default_model import DEFAULT_MODEL_NOTICE

        print(DEFAULT_MODEL_NOTICE, file=sys.stderr)
    except ImportError:
        print(f"no --model given: using the default model {default}", file=sys.stderr)
    return default


def load_for_cli(args: argparse.Namespace):
    """Load the model and tokenizer named by the flags.

    Returns:
        tuple: The model, the tokenizer and ``tokenizer_identity`` of it.
    """
    from .loading import check_tokenizer_size, default_tokenizer_name, load_model
    from .tokenizer import load_tokenizer

    model, config, path = load_model(resolve_model_source(args.model))
    if args.adapter_path:
        from .tuner import load_adapters

        model = load_adapters(model, args.adapter_path)
    tokenizer_name = args.tokenizer or default_tokenizer_name(path, config)
    tokenizer = load_tokenizer(tokenizer_name)
    check_tokenizer_size(tokenizer, tokenizer_name, vocab_size_of(model))
    return model, tokenizer, tokenizer_identity(tokenizer_name)


def format_chat_message(tokenizer, role: str, message: str, add_generation_prompt: bool) -> str:
    """Render one chat message with the tokenizer's chat template, else in the World chat format.

    Args:
        tokenizer: The tokenizer; its ``apply_chat_template`` is used when it
            has a ``chat_template``.
        role (str): ``"system"`` or ``"user"``.
        message (str): The message text.
        add_generation_prompt (bool): End with the cue for the model's reply.

    Returns:
        str: The text to feed, for example ``User: hi``, a blank line, then ``Assistant:``.
    """
    messages = [{"role": role, "content": message}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    from .tokenizer.chat import format_world_chat

    return format_world_chat(messages, add_generation_prompt)


def undecodable_token_ids(tokenizer, vocab_size: int) -> List[int]:
    """Return the ids below ``vocab_size`` that the tokenizer has no token for.

    RWKV World models have more output rows (65,536) than the World
    vocabulary has tokens, and sampling one of the extra ids would stop the
    streaming detokenizer with an error.
    """
    token_vocab = getattr(tokenizer, "vocab_size", None) or vocab_size
    missing = list(range(min(token_vocab, vocab_size), vocab_size))
    token_bytes = getattr(tokenizer, "token_bytes", None)
    if callable(token_bytes):
        for token in range(min(token_vocab, vocab_size)):
            try:
                token_bytes(token)
            except ValueError:
                missing.append(token)
    return sorted(missing)


class Session:
    """The model, tokenizer, state and sampling settings of one command-line run."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.model, self.tokenizer, self.tokenizer_id = load_for_cli(args)
        if args.load_state:
            self.cache, metadata = load_state(args.load_state, self.model, tokenizer=self.tokenizer_id)
            self.tokens_in_state = int(metadata["tokens"]) if metadata.get("tokens") else None
            logger.info("continuing from %s (%s tokens of context)", args.load_state, metadata.get("tokens") or "unknown")
        else:
            self.cache = self.model.make_cache()
            self.tokens_in_state = 0
        self.sampler = make_sampler(args.temp, args.top_p, args.min_p, top_k=args.top_k)
        self.logits_processors = make_logits_processors(
            ban_tokens=[*args.ban_token, *undecodable_token_ids(self.tokenizer, vocab_size_of(self.model))],
            presence_penalty=args.presence_penalty,
            frequency_penalty=args.frequency_penalty,
            penalty_decay=args.penalty_decay,
            uncounted_token_ids=uncounted_token_ids(self.tokenizer),
            vocab_size=vocab_size_of(self.model),
        )
        self.stop = [unescape(s) for s in args.stop]
        self.saved_state = False

    def run(self, prompt: str, max_tokens: int, stop: Sequence[str] = ()) -> Tuple[str, GenerationResponse]:
        """Feed ``prompt``, stream the completion to stdout, and save the state if asked.

        Returns:
            tuple[str, GenerationResponse]: The text and the last response.
        """
        text = ""
        response = None
        for response in stream_generate(
            self.model,
            self.tokenizer,
            prompt,
            max_tokens,
            stop=[*self.stop, *stop],
            sampler=self.sampler,
            logits_processors=self.logits_processors,
            prompt_cache=self.cache,
            prefill_step_size=self.args.prefill_step_size,
        ):
            print(response.text, end="", flush=True)
            text += response.text
        if self.tokens_in_state is not None:
            self.tokens_in_state += response.prompt_tokens + response.generation_tokens
        if self.args.save_state:
            save_state(
                self.args.save_state, self.cache, self.model, tokenizer=self.tokenizer_id, tokens=self.tokens_in_state
            )
            self.saved_state = True
        return text, response


def run_completion(session: Session) -> None:
    """Generate one completion for --prompt and print it."""
    args = session.args
    prompt = args.prompt if args.prompt is not None else DEFAULT_PROMPT
    prompt = sys.stdin.read() if prompt == "-" else unescape(prompt)
    if not prompt and args.load_state:
        raise ValueError(
            "the prompt is empty; a saved state stores no logits, so pass at least one new token of text "
            "to continue with --prompt"
        )
    if args.verbose:
        print("=" * 10)
    _, response = session.run(prompt, args.max_tokens)
    print()
    if args.verbose:
        print_statistics(response)


def run_chat(session: Session) -> None:
    """Chat turn by turn: read a line, feed only that turn, stream the reply.

    A reply ends at a blank line (the end of a turn in the chat format), at
    an end-of-sequence token or after --max-tokens tokens. The next turn
    starts with a blank line unless the context already ends with one.
    """
    args = session.args
    tokenizer = session.tokenizer
    parts = [unescape(args.prompt)] if args.prompt else []
    if args.system_prompt:
        parts.append(format_chat_message(tokenizer, "system", unescape(args.system_prompt), add_generation_prompt=False))
    preamble = ""
    for part in parts:
        if preamble and not preamble.endswith(CHAT_TURN_END):
            preamble += CHAT_TURN_END
        preamble += part
    if preamble:
        session.run(preamble, 0)
    needs_separator = bool(preamble) and not preamble.endswith(CHAT_TURN_END)
    print("Chat started; type a message and press Enter, Ctrl-D ends the chat.", file=sys.stderr, flush=True)

    while True:
        try:
            line = input("User: ")
        except EOFError:
            print()
            break
        if not line.strip():
            continue

        turn = format_chat_message(tokenizer, "user", line, add_generation_prompt=True)
        if needs_separator:
            turn = CHAT_TURN_END + turn
        print("Assistant:", end="", flush=True)
        _, response = session.run(turn, args.max_tokens, stop=[CHAT_TURN_END])
        print()
        if args.verbose:
            print_statistics(response, file=sys.stderr)
        ended_turn = response.finish_reason == "stop" and response.token not in eos_token_ids(tokenizer)
        needs_separator = not ended_turn


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit status."""
    parser = setup_arg_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.seed is not None:
        mx.random.seed(args.seed)

    session = None
    try:
        session = Session(args)
        if args.chat:
            run_chat(session)
        else:
            run_completion(session)
    except (CheckpointError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\n{interrupt_message(args, session)}", file=sys.stderr)
        return 130
    return 0


def interrupt_message(args: argparse.Namespace, session: Optional[Session]) -> str:
    """Return what Ctrl-C left behind: the --save-state file is written only after a completed reply."""
    if not args.save_state:
        return "interrupted"
    if session is not None and session.saved_state:
        return f"interrupted; {args.save_state} contains the state after the last completed reply"
    return f"interrupted before a reply completed; {args.save_state} was not written"


if __name__ == "__main__":
    sys.exit(main())
