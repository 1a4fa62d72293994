"""Reader for RWKV-6 GGUF files written by llama.cpp (architecture "rwkv6").

The file format and its parser are described in ``rwkv_mlx.io.gguf``, which
reads RWKV-7 files. llama.cpp's converter (``convert_hf_to_gguf.py``,
``Rwkv6Model``) starts from the Hugging Face layout (``rwkv_mlx.io.hf_older``)
and renames the tensors, changes some shapes and divides two matrices per
layer. With C the width, F the channel-mix width, H the head count, N the
head size, D the token-shift low-rank size, D_w the decay low-rank size and V
the vocabulary, per layer ``i`` (``blk.i.`` -> ``model.layers.i.``), with
shapes in numpy order (GGUF's dimensions reversed):

| GGUF name                                | shape           | canonical name                              |
|------------------------------------------|-----------------|---------------------------------------------|
| token_embd.weight                        | [V, C]          | model.embeddings.weight                     |
| token_embd_norm.{weight,bias}            | [C]             | model.layers.0.pre_norm.*                   |
| output_norm.{weight,bias}                | [C]             | model.norm.*                                |
| output.weight                            | [V, C]          | lm_head.weight                              |
| attn_norm.*, attn_norm_2.*               | [C]             | attn_norm.*, ffn_norm.*                     |
| time_mix_w1.weight                       | [5 D, C]        | attn.time_maa_w1 [C, 5 D] (transposed)      |
| time_mix_w2.weight                       | [5, C, D]       | attn.time_maa_w2 [5, D, C] (last two swapped) |
| time_mix_lerp_x.weight                   | [C]             | attn.time_maa_x                             |
| time_mix_lerp_fused.weight               | [5, 1, 1, C]    | attn.time_maa_{w,k,v,r,g} (in that order)   |
| time_mix_lerp_{w,k,v,r,g}.weight         | [C]             | attn.time_maa_* (files from before fusing)  |
| time_mix_first.weight                    | [H, N]          | attn.time_faaaa                             |
| time_mix_decay.weight                    | [C]             | attn.time_decay                             |
| time_mix_decay_w1.weight                 | [D_w, C]        | attn.time_decay_w1 [C, D_w] (transposed)    |
| time_mix_decay_w2.weight                 | [C, D_w]        | attn.time_decay_w2 [D_w, C] (transposed)    |
| time_mix_{receptance,key,value,gate}.weight | [C, C]       | attn.{r,k,v,g}_proj.weight                  |
| time_mix_output.weight                   | [C, C]          | attn.o_proj.weight (times 2^(i // R))       |
| time_mix_ln.{weight,bias}                | [C]             | attn.g_norm.* ([H, N])                      |
| channel_mix_lerp_{k,r}.weight            | [C]             | ffn.time_maa_{k,r}                          |
| channel_mix_{key,receptance}.weight      | [F, C], [C, C]  | ffn.{key,receptance}.weight                 |
| channel_mix_value.weight                 | [C, F]          | ffn.value.weight (times 2^(i // R))         |

R is ``rwkv6.rescale_every_n_layers``. When it is above 0, the converter
divides layer i's ``time_mix_output`` and ``channel_mix_value`` by
2^(i // R), and llama.cpp halves the residual stream after every R-th
layer. The reader multiplies them back, so the canonical weights are the
official ones, and keeps R as ``rescale_every``, which the models apply in
float16. The vector tensors may be stored squeezed ([C]) or not
([1, 1, C]), so only their size is checked. The sizes come from the metadata
``rwkv6.embedding_length`` (C), ``feed_forward_length`` (F),
``wkv.head_size`` (N), ``time_mix_extra_dim`` (D), ``time_decay_extra_dim``
(D_w) and ``block_count``, which llama.cpp requires too.
"""

import logging
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import mlx.core as mx
import numpy as np

from . import gguf
from .errors import CheckpointError
from .gguf import GGUFTensor, read_gguf_file
from .layout_older import infer_config, reshape_canonical

logger = logging.getLogger(__name__)

ARCHITECTURE = "rwkv6"
VERSION = "6"
# The token-shift mixes in the fused tensor, in its order (the order of the low-rank projection).
FUSED_MIXES = ("w", "k", "v", "r", "g")

# GGUF name within "blk.i." -> (canonical name within "model.layers.i.", shape in the
# file in numpy order, how the values change). A one-entry shape is a vector, whose
# size alone is checked; the other shapes must match exactly.
_LAYER_TENSORS = {
    "attn_norm.weight": ("attn_norm.weight", ("C",), None),
    "attn_norm.bias": ("attn_norm.bias", ("C",), None),
    "attn_norm_2.weight": ("ffn_norm.weight", ("C",), None),
    "attn_norm_2.bias": ("ffn_norm.bias", ("C",), None),
    "time_mix_w1.weight": ("attn.time_maa_w1", ("5D", "C"), "transpose"),
    "time_mix_w2.weight": ("attn.time_maa_w2", ("5", "C", "D"), "swap_last"),
    "time_mix_lerp_x.weight": ("attn.time_maa_x", ("C",), None),
    # The five mixes get the names "attn.time_maa_" + w, k, v, r, g.
    "time_mix_lerp_fused.weight": ("attn.time_maa_", ("5C",), "split_mixes"),
    **{f"time_mix_lerp_{mix}.weight": (f"attn.time_maa_{mix}", ("C",), None) for mix in FUSED_MIXES},
    "time_mix_first.weight": ("attn.time_faaaa", ("H", "N"), None),
    "time_mix_decay.weight": ("attn.time_decay", ("C",), None),
    "time_mix_decay_w1.weight": ("attn.time_decay_w1", ("Dw", "C"), "transpose"),
    "time_mix_decay_w2.weight": ("attn.time_decay_w2", ("C", "Dw"), "transpose"),
    "time_mix_receptance.weight": ("attn.r_proj.weight", ("C", "C"), None),
    "time_mix_key.weight": ("attn.k_proj.weight", ("C", "C"), None),
    "time_mix_value.weight": ("attn.v_proj.weight", ("C", "C"), None),
    "time_mix_gate.weight": ("attn.g_proj.weight", ("C", "C"), None),
    "time_mix_output.weight": ("attn.o_proj.weight", ("C", "C"), "rescale"),
    "time_mix_ln.weight": ("attn.g_norm.weight", ("C",), None),
    "time_mix_ln.bias": ("attn.g_norm.bias", ("C",), None),
    "channel_mix_lerp_k.weight": ("ffn.time_maa_k", ("C",), None),
    "channel_mix_lerp_r.weight": ("ffn.time_maa_r", ("C",), None),
    "channel_mix_key.weight": ("ffn.key.weight", ("F", "C"), None),
    "channel_mix_value.weight": ("ffn.value.weight", ("C", "F"), "rescale"),
    "channel_mix_receptance.weight": ("ffn.receptance.weight", ("C", "C"), None),
}
_TOP_TENSORS = {
    "token_embd.weight": ("model.embeddings.weight", ("V", "C"), None),
    "token_embd_norm.weight": ("model.layers.0.pre_norm.weight", ("C",), None),
    "token_embd_norm.bias": ("model.layers.0.pre_norm.bias", ("C",), None),
    "output_norm.weight": ("model.norm.weight", ("C",), None),
    "output_norm.bias": ("model.norm.bias", ("C",), None),
    "output.weight": ("lm_head.weight", ("V", "C"), None),
}
_FUSED = "time_mix_lerp_fused.weight"
_UNFUSED = tuple(f"time_mix_lerp_{mix}.weight" for mix in FUSED_MIXES)

# Metadata key (after "rwkv6.") -> size symbol of the shapes above.
_SIZE_FIELDS = {
    "embedding_length": "C",
    "feed_forward_length": "F",
    "wkv.head_size": "N",
    "time_mix_extra_dim": "D",
    "time_decay_extra_dim": "Dw",
    "block_count": "L",
}
# Canonical weights of nn.Linear and nn.Embedding modules, which may stay quantized.
_QUANTIZABLE_SUFFIXES = ("_proj.weight", "ffn.key.weight", "ffn.value.weight", "ffn.receptance.weight",
                         "embeddings.weight", "lm_head.weight")  # fmt: skip


def read_gguf_older(
    path: Union[str, Path], keep_quantized: bool = False
) -> Optional[Tuple[Dict[str, mx.array], Dict[str, Any]]]:
    """Read an RWKV-6 GGUF file into canonical weights and the model config.

    Args:
        path (str | Path): The ``.gguf`` file.
        keep_quantized (bool): Keep the Q4_0, Q4_1 and Q8_0 weights of linear
            and embedding layers quantized, as ``rwkv_mlx.io.gguf.read_gguf``
            describes. All other tensors are dequantized.

    Returns:
        tuple[dict[str, mx.array], dict] | None: The canonical weights
        (float16 for F16 tensors, float32 for all others) and the
        ``ModelArgs`` fields of ``rwkv_mlx.models.rwkv6``, plus
        ``quantization`` when weights stayed quantized. None for an RWKV-7
        file, which ``rwkv_mlx.io.gguf.read_gguf`` reads.

    Raises:
        CheckpointError: If the file is missing, truncated or not GGUF, its
            architecture is neither "rwkv6" nor "rwkv7", a size field is
            missing, or a tensor is missing, unexpected or mis-shaped.
    """
    path = Path(path)
    metadata, tensors = read_gguf_file(path)
    architecture = metadata.get("general.architecture")
    if architecture == gguf.ARCHITECTURE:
        return None
    if architecture != ARCHITECTURE:
        found = "missing" if architecture is None else f"'{architecture}'"
        raise CheckpointError(
            f"{path}: field 'general.architecture' is {found}, expected '{ARCHITECTURE}' (an RWKV-6 model) "
            f"or '{gguf.ARCHITECTURE}' (an RWKV-7 model)"
        )

    sizes = _read_sizes(path, metadata, tensors)
    rescale_every = int(metadata.get(f"{ARCHITECTURE}.rescale_every_n_layers", 0))
    _check_tensors(path, tensors, sizes)

    weights, quantized_bits = _translate(tensors, rescale_every, keep_quantized)
    weights = reshape_canonical(weights, VERSION, str(path))
    config = infer_config(weights, VERSION, str(path))
    epsilon = metadata.get(f"{ARCHITECTURE}.attention.layer_norm_epsilon")
    if epsilon is not None:
        # GGUF stores a float32; its shortest decimal form gives back 1e-05, not 9.99999974e-06.
        config["norm_eps"] = float(str(np.float32(epsilon)))
    if f"{ARCHITECTURE}.rescale_every_n_layers" in metadata:
        config["rescale_every"] = rescale_every
    if quantized_bits:
        config["quantization"] = gguf._quantization_config(quantized_bits)

    logger.info("Read RWKV-6 from %s (%d tensors)", path, len(tensors))
    return weights, config


def _translate(
    tensors: Dict[str, GGUFTensor], rescale_every: int, keep_quantized: bool
) -> Tuple[Dict[str, mx.array], Dict[str, int]]:
    """Decode and rename every tensor, undoing the converter's changes.

    Returns:
        tuple[dict[str, mx.array], dict[str, int]]: The canonical weights, not
        yet reshaped, and the bits of each module kept quantized.
    """
    weights: Dict[str, mx.array] = {}
    quantized_bits: Dict[str, int] = {}
    for name, tensor in tensors.items():
        layer, (canonical, _, change) = _layout(name)
        factor = 2.0 ** (layer // rescale_every) if change == "rescale" and rescale_every > 0 else 1.0
        if keep_quantized and tensor.type_name in gguf._MLX_AFFINE and canonical.endswith(_QUANTIZABLE_SUFFIXES):
            module = canonical[: -len(".weight")]
            triplet = gguf._to_mlx_affine(tensor, module)
            # Scaling the scales and biases scales every value the blocks decode to.
            for part in ("scales", "biases"):
                triplet[f"{module}.{part}"] = triplet[f"{module}.{part}"] * factor
            weights.update(triplet)
            quantized_bits[module] = gguf._MLX_AFFINE[tensor.type_name]
            continue
        weights.update(_decode(tensor, canonical, change, factor))
    return weights, quantized_bits


def _layout(name: str) -> Tuple[int, Tuple[str, Tuple[str, ...], Optional[str]]]:
    """Return a GGUF tensor's layer (0 for top-level tensors) and its row of the layout tables, with the
    canonical name in full. Assumes ``_check_tensors`` accepted the name."""
    if name in _TOP_TENSORS:
        return 0, _TOP_TENSORS[name]
    _, layer, suffix = name.split(".", 2)
    canonical, shape, change = _LAYER_TENSORS[suffix]
    return int(layer), (f"model.layers.{layer}.{canonical}", shape, change)


def _read_sizes(path: Path, metadata: Dict[str, Any], tensors: Dict[str, GGUFTensor]) -> Dict[str, int]:
    """Return the size of each shape symbol, from the metadata and the embedding's rows."""
    sizes = {}
    for key, symbol in _SIZE_FIELDS.items():
        value = metadata.get(f"{ARCHITECTURE}.{key}")
        if value is None:
            raise CheckpointError(f"{path}: missing field '{ARCHITECTURE}.{key}', which llama.cpp requires too")
        sizes[symbol] = int(value)
    if sizes["N"] <= 0 or sizes["C"] % sizes["N"]:
        raise CheckpointError(
            f"{path}: field '{ARCHITECTURE}.wkv.head_size' is {sizes['N']}, which does not divide "
            f"'{ARCHITECTURE}.embedding_length' {sizes['C']}"
        )
    sizes["H"] = sizes["C"] // sizes["N"]
    sizes["5"] = 5
    sizes["5D"] = 5 * sizes["D"]
    sizes["5C"] = 5 * sizes["C"]

    embedding = tensors.get("token_embd.weight")
    if embedding is None:
        raise CheckpointError(f"{path}: missing tensor 'token_embd.weight' of an RWKV-6 GGUF file")
    sizes["V"] = embedding.shape[0]
    return sizes


def _check_tensors(path: Path, tensors: Dict[str, GGUFTensor], sizes: Dict[str, int]) -> None:
    """Raise CheckpointError for an unexpected, mis-shaped or missing tensor, named as in the file."""
    layers = sizes["L"]
    for name, tensor in tensors.items():
        parts = name.split(".", 2)
        in_layer = len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and int(parts[1]) < layers
        if name in _TOP_TENSORS:
            symbols = _TOP_TENSORS[name][1]
        elif in_layer and parts[2] in _LAYER_TENSORS:
            symbols = _LAYER_TENSORS[parts[2]][1]
        else:
            raise CheckpointError(f"{path}: unexpected tensor '{name}' in an RWKV-6 GGUF file with {layers} layers")

        expected = [sizes[symbol] for symbol in symbols]
        if len(expected) == 1 and int(np.prod(tensor.shape)) != expected[0]:
            raise CheckpointError(
                f"{path}: tensor '{name}' has shape {list(tensor.shape)}, expected {expected[0]} values"
            )
        if len(expected) > 1 and list(tensor.shape) != expected:
            raise CheckpointError(f"{path}: tensor '{name}' has shape {list(tensor.shape)}, expected {expected}")

    required = [name for name in _TOP_TENSORS]
    for i in range(layers):
        fused = f"blk.{i}.{_FUSED}" in tensors
        for suffix in _LAYER_TENSORS:
            if suffix in _UNFUSED and fused or suffix == _FUSED and not fused:
                continue
            required.append(f"blk.{i}.{suffix}")
    missing = [name for name in required if name not in tensors]
    if missing:
        raise CheckpointError(
            f"{path}: missing tensor '{missing[0]}' ({len(missing)} missing in all) of an RWKV-6 GGUF file "
            f"with {layers} layers"
        )


def _decode(tensor: GGUFTensor, canonical: str, change: Optional[str], factor: float) -> Dict[str, mx.array]:
    """Decode one tensor and undo the converter's change to it."""
    values = tensor.decode()
    if change == "transpose":
        values = values.T
    elif change == "swap_last":
        values = values.swapaxes(1, 2)
    elif change == "split_mixes":
        mixes = values.reshape(len(FUSED_MIXES), -1)
        return {canonical + mix: mx.array(mixes[i]) for i, mix in enumerate(FUSED_MIXES)}
    elif change == "rescale" and factor != 1.0:
        # Powers of two scale float32 values exactly.
        values = values.astype(np.float32) * np.float32(factor)
    return {canonical: mx.array(np.ascontiguousarray(values))}
