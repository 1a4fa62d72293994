"""Using these tokenizers inside mlx-lm."""

from __future__ import annotations

from typing import Any, Iterable

from .detokenizer import DecodingStreamingDetokenizer, StreamingDetokenizer


def wrap_for_mlx_lm(tokenizer: Any, eos_token_ids: Iterable[int] | None = None):
    """Wrap a tokenizer of this package in mlx-lm's ``TokenizerWrapper``.

    The wrapper streams text with the tokenizer's own detokenizer, so
    characters split across tokens come out whole, and it reports a chat
    template only when the tokenizer has one.

    Args:
        tokenizer: A tokenizer from ``load_tokenizer``.
        eos_token_ids: Extra ids that end generation, besides
            ``tokenizer.eos_token_id``.

    Returns:
        ``mlx_lm.tokenizer_utils.TokenizerWrapper``
    """
    from mlx_lm.tokenizer_utils import StreamingDetokenizer as MlxLmStreamingDetokenizer
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    # Our detokenizers follow mlx-lm's protocol without importing mlx-lm;
    # registering them makes isinstance checks against mlx-lm's ABC pass.
    MlxLmStreamingDetokenizer.register(StreamingDetokenizer)
    MlxLmStreamingDetokenizer.register(DecodingStreamingDetokenizer)

    wrapper = TokenizerWrapper(tokenizer, lambda wrapped: wrapped.detokenizer, eos_token_ids=eos_token_ids)
    # TokenizerWrapper assumes a chat template because the tokenizer defines
    # apply_chat_template. The assignment goes through to the tokenizer,
    # where the wrapper reads it back.
    wrapper.has_chat_template = tokenizer.chat_template is not None
    return wrapper
