"""Run and fine-tune RWKV language models with MLX."""

from ._blas import use_optimized_blas

use_optimized_blas()  # must run before mlx.core is first imported


from .loading import load, load_model, save_model

__version__ = "0.1.0"


def load_tokenizer(name_or_path: str = "world"):
    """Load a tokenizer: ``"world"``, ``"bytes"``, or a tokenizer.json path or its directory."""
    from .tokenizer import load_tokenizer as _load_tokenizer

    return _load_tokenizer(name_or_path)


def generate(*args, **kwargs):
    """Generate a completion; see ``rwkv_mlx.generate.generate``."""
    from .generate import generate as _generate

    return _generate(*args, **kwargs)


def stream_generate(*args, **kwargs):
    """Stream a completion; see ``rwkv_mlx.generate.stream_generate``."""
    from .generate import stream_generate as _stream_generate

    return _stream_generate(*args, **kwargs)


__all__ = ["generate", "load", "load_model", "load_tokenizer", "save_model", "stream_generate"]
