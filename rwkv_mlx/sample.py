"""Samplers and logits processors for generation.

A generation step turns the model's logits into the next token in this order:

1. Logits processors, in list order: banned tokens get ``-inf``, then the
   RWKV presence and frequency penalties are subtracted (the order of
   BlinkDL's ``rwkv.utils.PIPELINE.generate``).
2. The logits become log-probabilities in float32.
3. The sampler keeps the top-p nucleus, the tokens above the min-p threshold
   and the top-k tokens, all chosen on the distribution at temperature 1,
   and only then divides by the temperature and draws a token. So the
   temperature changes how the kept tokens are weighted, never which tokens
   are kept. This is the order of mlx-lm's ``make_sampler`` and of the
   official RWKV pipeline. A temperature of 0 takes the argmax.

Processors follow mlx-lm's contract ``processor(tokens, logits) -> logits``,
where ``tokens`` contains every token of the current call so far (the prompt,
then the generated tokens) and ``logits`` is [B, vocab_size].
"""

import math
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]

# BlinkDL's rwkv.utils.PIPELINE (rwkv 0.8) counts a generated token with
# weight 0 when its text is a substring of this string.
UNCOUNTED_TEXT = " \t0123456789"


def validate_sampling(temp: float, top_p: float, min_p: float, top_k: int) -> None:
    """Raise ValueError for a sampling parameter outside its valid range.

    Args:
        temp (float): Temperature, ``>= 0``.
        top_p (float): Nucleus mass, in (0, 1].
        min_p (float): Min-p threshold, in [0, 1].
        top_k (int): Number of tokens to keep, ``>= 0`` (0 keeps all).
    """
    if not math.isfinite(temp) or temp < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temp}; use 0 for greedy decoding")
    if not 0 < top_p <= 1:
        raise ValueError(f"top-p must be in (0, 1], got {top_p}; use 1 to keep every token")
    if not 0 <= min_p <= 1:
        raise ValueError(f"min-p must be in [0, 1], got {min_p}; use 0 to turn it off")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top-k must be an integer >= 0, got {top_k!r}; use 0 to keep every token")


def greedy_sampler(logprobs: mx.array) -> mx.array:
    """Return the most likely token of each row.

    Args:
        logprobs (mx.array): Log-probabilities, [B, V].

    Returns:
        mx.array: The token ids, [B].
    """
    return mx.argmax(logprobs, axis=-1)


def make_sampler(
    temp: float = 0.0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    min_tokens_to_keep: int = 1,
    top_k: int = 0,
) -> Sampler:
    """Make a sampler that draws one token per row of log-probabilities.

    The arguments and their order follow mlx-lm's ``make_sampler``. The
    filters use mlx-lm's ``sample_utils`` on the distribution at temperature
    1; the temperature is applied after them (see the module docstring).

    Args:
        temp (float): Temperature; 0 takes the argmax.
        top_p (float): Keep the smallest set of most likely tokens whose
            probability reaches ``top_p``; 1 keeps every token.
        min_p (float): Keep tokens whose probability is at least ``min_p``
            times that of the most likely token; 0 turns it off.
        min_tokens_to_keep (int): Tokens that min-p always keeps.
        top_k (int): Keep the ``top_k`` most likely tokens; 0, or a value
            of at least the vocabulary size, keeps every token.

    Returns:
        Sampler: A function from log-probabilities [B, V] to token ids [B].
    """
    validate_sampling(temp, top_p, min_p, top_k)
    if temp == 0:
        return greedy_sampler

    def sampler(logprobs: mx.array) -> mx.array:
        logprobs = logprobs.astype(mx.float32)
        if top_p < 1:
            logprobs = apply_top_p(logprobs, top_p)
        if min_p > 0:
            logprobs = apply_min_p(logprobs, min_p, min_tokens_to_keep)
        if 0 < top_k < logprobs.shape[-1]:
            logprobs = apply_top_k(logprobs, top_k)
        return mx.random.categorical(logprobs * (1.0 / temp))

    return sampler


def check_token_range(token_ids: Iterable[int], vocab_size: Optional[int], name: str) -> None:
    """Raise ValueError for an id below 0, or not below ``vocab_size`` when it is given."""
    for token in token_ids:
        if token < 0 or (vocab_size is not None and token >= vocab_size):
            limit = f"[0, {vocab_size})" if vocab_size is not None else "0 or more"
            raise ValueError(f"{name} {token} is outside the vocabulary; ids must be {limit}")


def make_token_ban(token_ids: Iterable[int], vocab_size: Optional[int] = None) -> LogitsProcessor:
    """Make a processor that gives the banned tokens a logit of ``-inf``.

    The ban is a select, not an added bias, so float16 and bfloat16 logits
    cannot overflow and the banned tokens can never be sampled.

    Args:
        token_ids (Iterable[int]): The banned token ids.
        vocab_size (int, optional): Reject ids outside [0, vocab_size).

    Returns:
        LogitsProcessor: The processor.
    """
    if isinstance(token_ids, str) or not isinstance(token_ids, (Iterable, mx.array)):
        raise TypeError(f"ban_tokens must be a list of token ids, got {token_ids!r}")
    token_ids = token_ids.tolist() if isinstance(token_ids, (mx.array, np.ndarray)) else list(token_ids)
    for token in token_ids:
        if isinstance(token, bool) or not isinstance(token, (int, np.integer)):
            raise ValueError(f"banned token ids must be integers, got {token!r}")
    banned = sorted({int(t) for t in token_ids})
    check_token_range(banned, vocab_size, "banned token id")
    if vocab_size is not None and len(banned) >= vocab_size:
        raise ValueError(f"all {vocab_size} tokens are banned, so none can be sampled")
    masks = {}

    def token_ban(tokens: mx.array, logits: mx.array) -> mx.array:
        if not banned:
            return logits
        size = logits.shape[-1]
        if size not in masks:
            # Without vocab_size the range is known only here.
            check_token_range(banned, size, "banned token id")
            mask = mx.zeros((size,), dtype=mx.int32).at[mx.array(banned)].add(1)
            masks[size] = mask > 0
        return mx.where(masks[size], mx.array(-math.inf, dtype=logits.dtype), logits)

    return token_ban


class RepetitionPenalty:
    """The presence and frequency penalties of the official RWKV pipeline.

    Only generated tokens count, and each count decays every step. Before
    sampling step ``t`` the logit of every token that was generated earlier
    in this call is lowered by

        presence_penalty + frequency_penalty * count[token]

    and after each generated token every count is multiplied by
    ``penalty_decay`` and the new token's count grows by 1 (by 0 for an
    uncounted token, which still gets the presence penalty). This matches
    ``alpha_presence``, ``alpha_frequency`` and ``alpha_decay`` of BlinkDL's
    ``rwkv.utils.PIPELINE.generate`` (rwkv 0.8).

    The counts live in the object; ``reset`` clears them, and the generation
    functions call it at the start of every call.
    """

    def __init__(
        self,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        penalty_decay: float = 0.996,
        uncounted_token_ids: Sequence[int] = (),
    ):
        """
        Args:
            presence_penalty (float): Subtracted once from every generated token.
            frequency_penalty (float): Subtracted per (decayed) occurrence.
            penalty_decay (float): Factor applied to the counts each step, in [0, 1].
            uncounted_token_ids (Sequence[int]): Tokens counted with weight 0,
                as the official pipeline does for spaces, tabs and digits
                (see ``uncounted_token_ids``).
        """
        for name, value in (("presence penalty", presence_penalty), ("frequency penalty", frequency_penalty)):
            if not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value}")
        if not 0 <= penalty_decay <= 1:
            raise ValueError(f"penalty decay must be in [0, 1], got {penalty_decay}")
        self.presence_penalty = float(presence_penalty)
        self.frequency_penalty = float(frequency_penalty)
        self.penalty_decay = float(penalty_decay)
        self.uncounted_token_ids = sorted({int(t) for t in uncounted_token_ids})
        self.reset()

    def reset(self) -> None:
        """Forget every counted token, as at the start of a new generation."""
        self._consumed = None
        self._counts = None
        self._present = None
        self._weights = None

    def _start(self, batch_size: int, vocab_size: int) -> None:
        self._counts = mx.zeros((batch_size, vocab_size), dtype=mx.float32)
        self._present = mx.zeros((batch_size, vocab_size), dtype=mx.float32)
        weights = mx.ones((vocab_size,), dtype=mx.float32)
        uncounted = [t for t in self.uncounted_token_ids if t < vocab_size]
        if uncounted:
            weights = weights.at[mx.array(uncounted)].multiply(0.0)
        self._weights = weights

    def _count(self, token: mx.array) -> None:
        rows = mx.arange(token.shape[0])
        self._counts = (self._counts * self.penalty_decay).at[rows, token].add(self._weights[token])
        self._present = self._present.at[rows, token].add(1.0)

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        """Apply the penalties.

        Args:
            tokens (mx.array): Every token of this call so far, [T] or [B, T].
                The tokens present at the first call are the prompt and are
                not counted; each later call adds the newly generated ones.
            logits (mx.array): [B, vocab_size].

        Returns:
            mx.array: The penalized logits, float32.
        """
        tokens = tokens if tokens.ndim == 2 else tokens[None]
        if self._consumed is None:
            self._start(logits.shape[0], logits.shape[-1])
            self._consumed = tokens.shape[1]
        for position in range(self._consumed, tokens.shape[1]):
            self._count(tokens[:, position])
        self._consumed = tokens.shape[1]

        penalty = self.presence_penalty * (self._present > 0) + self.frequency_penalty * self._counts
        return logits.astype(mx.float32) - penalty


def uncounted_token_ids(tokenizer) -> List[int]:
    """Return the tokens the official pipeline counts with weight 0.

    Those are the tokens whose text is a substring of ``" \\t0123456789"``.
    Here they are found by encoding every such substring and keeping the ones
    that encode to a single token.

    Args:
        tokenizer: Any object with ``encode(text) -> list[int]``.

    Returns:
        list[int]: The token ids, sorted.
    """
    found = set()
    for start in range(len(UNCOUNTED_TEXT)):
        for end in range(start + 1, len(UNCOUNTED_TEXT) + 1):
            ids = list(tokenizer.encode(UNCOUNTED_TEXT[start:end]))
            if len(ids) == 1:
                found.add(int(ids[0]))
    return sorted(found)


def _logit_bias_items(logit_bias: dict) -> Tuple[List[int], List[float]]:
    """Return the token ids and the finite biases of a logit_bias mapping.

    Ids may be integers or strings of digits, as JSON object keys are.
    """
    ids, values = [], []
    for token, value in logit_bias.items():
        if isinstance(token, str) and token.lstrip("-").isdigit():
            token = int(token)
        if isinstance(token, bool) or not isinstance(token, (int, np.integer)):
            raise ValueError(f"logit_bias keys must be integer token ids, got {token!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not math.isfinite(value):
            raise ValueError(f"logit_bias value for token {token} must be a finite number, got {value!r}")
        ids.append(int(token))
        values.append(float(value))
    return ids, values


def make_logits_processors(
    ban_tokens: Optional[Iterable[int]] = None,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    penalty_decay: float = 0.996,
    uncounted_token_ids: Sequence[int] = (),
    logit_bias: Optional[dict] = None,
    vocab_size: Optional[int] = None,
) -> List[LogitsProcessor]:
    """Make the logits processors for the RWKV sampling options.

    Args:
        ban_tokens (Iterable[int], optional): Token ids that are never sampled.
        presence_penalty (float): See ``RepetitionPenalty``.
        frequency_penalty (float): See ``RepetitionPenalty``.
        penalty_decay (float): See ``RepetitionPenalty``.
        uncounted_token_ids (Sequence[int]): See ``RepetitionPenalty``.
        logit_bias (dict[int, float], optional): Added to the given tokens' logits.
        vocab_size (int, optional): Reject token ids outside [0, vocab_size).

    Returns:
        list[LogitsProcessor]: The processors in the order they apply:
        logit bias, ban, penalties.
    """
    processors = []
    if logit_bias:
        ids, values = _logit_bias_items(logit_bias)
        check_token_range(ids, vocab_size, "logit_bias token id")
        bias_ids = mx.array(ids)
        bias_values = mx.array(values)
        highest = max(ids)

        def add_logit_bias(tokens: mx.array, logits: mx.array) -> mx.array:
            # Without vocab_size the range is known only here.
            if highest >= logits.shape[-1]:
                check_token_range(ids, logits.shape[-1], "logit_bias token id")
            return logits.astype(mx.float32).at[:, bias_ids].add(bias_values)

        processors.append(add_logit_bias)
    if isinstance(ban_tokens, (mx.array, np.ndarray)):
        ban_tokens = ban_tokens.tolist()
    # Empty collections add nothing, and anything else but None reaches the checks of make_token_ban.
    if ban_tokens or not isinstance(ban_tokens, (type(None), list, tuple, set, str)):
        processors.append(make_token_ban(ban_tokens, vocab_size))
    if presence_penalty or frequency_penalty:
        processors.append(RepetitionPenalty(presence_penalty, frequency_penalty, penalty_decay, uncounted_token_ids))
    return processors
