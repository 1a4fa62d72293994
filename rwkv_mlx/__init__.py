"""Run and fine-tune RWKV language models with MLX."""

import warnings

from ._blas import use_optimized_blas

use_optimized_blas()  # must run before mlx.core is first imported


from .loading import load, load_model, save_model

# Binding the functions replaces the attribute that importing the submodule
# sets, so rwkv_mlx.generate is the function, as mlx_lm.generate is.
# ``python -m rwkv_mlx.generate`` then runs a second copy of a module this
# file already imported. The warning runpy prints about that is silenced,
# because the module keeps no state that the two copies could disagree on.
warnings.filterwarnings("ignore", message=r"'rwkv_mlx\.generate' found in sys\.modules", category=RuntimeWarning)

from .generate import batch_generate, generate, stream_generate  # noqa: E402

__version__ = "0.1.0"


def load_tokenizer(name_or_path: str = "world"):
    """Load a tokenizer: ``"world"``, ``"bytes"``, or a tokenizer.json path or its directory."""
    from .tokenizer import load_tokenizer as _load_tokenizer

    return _load_tokenizer(name_or_path)


__all__ = ["batch_generate", "generate", "load", "load_model", "load_tokenizer", "save_model", "stream_generate"]
