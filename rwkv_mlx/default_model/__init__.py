"""The small byte-level RWKV-7 model that ships inside the package.

``generate`` and chat load it when no ``--model`` is given, so a first command
works offline. It was trained on Jane Austen's novels by
``examples/train_default_model.py``, and ``MODEL_CARD.md`` in this folder
describes its data, size, training and validation loss.
"""

from pathlib import Path

DEFAULT_MODEL_PATH = Path(__file__).resolve().parent

DEFAULT_MODEL_NOTICE = (
    "No --model given: using the built-in demo model, a tiny RWKV-7 trained on Jane Austen's novels. "
    "For a real model pass --model OWNER/NAME (a Hugging Face repo id) or --model path/to/model.pth"
)
