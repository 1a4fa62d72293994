"""The one exception type that every checkpoint and state reader raises."""


class CheckpointError(ValueError):
    """A model or state file that cannot be read: missing, truncated, of an
    unknown format, or holding a missing, unexpected or mis-shaped tensor.

    The message names the file, the tensor or field, and what was expected.
    """
