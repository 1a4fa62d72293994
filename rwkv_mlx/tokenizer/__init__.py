"""Tokenizers for RWKV models: World, byte-level, and any tokenizer.json.

``load_tokenizer("world")`` returns the RWKV World tokenizer, which encodes by
greedy longest match exactly as BlinkDL's reference does, and can write
itself as a ``tokenizer.json`` for ``tokenizers`` and transformers.
"""

from .base import ByteVocabTokenizer
from .chat import WORLD_CHAT_TEMPLATE, format_world_chat
from .detokenizer import DecodingStreamingDetokenizer, StreamingDetokenizer
from .errors import TokenizerError
from .json_tokenizer import JsonTokenizer
from .loading import Tokenizer, load_tokenizer
from .mlx_lm_compat import wrap_for_mlx_lm
from .vocab import WORLD_VOCAB_SIZE, read_world_vocab, world_vocab_path
from .world import ByteTokenizer, WorldTokenizer

__all__ = [
    "ByteTokenizer",
    "ByteVocabTokenizer",
    "DecodingStreamingDetokenizer",
    "JsonTokenizer",
    "StreamingDetokenizer",
    "Tokenizer",
    "TokenizerError",
    "WORLD_CHAT_TEMPLATE",
    "WORLD_VOCAB_SIZE",
    "WorldTokenizer",
    "format_world_chat",
    "load_tokenizer",
    "read_world_vocab",
    "world_vocab_path",
    "wrap_for_mlx_lm",
]
