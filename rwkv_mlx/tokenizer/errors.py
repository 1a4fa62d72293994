"""The exception type that the tokenizer layer raises for bad input."""


class TokenizerError(ValueError):
    """A vocabulary or tokenizer file that cannot be used, or token ids that
    are not in the vocabulary.

    The message names the file, line, field or id, and what was expected.
    """
