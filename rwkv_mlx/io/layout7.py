"""RWKV-7 weight layouts and the translation into the canonical one.

The canonical layout is the parameter tree of ``rwkv_mlx.models.rwkv7.Model``,
which uses the same names and shapes as mlx-lm's ``rwkv7`` model, so a
directory written from it is also a stock mlx-lm model. With C the model
width, H the head count, N the head size (C = H * N), F the channel-mix width
and D_* the low-rank sizes, per layer ``i`` (prefix ``model.layers.i.``):

| canonical name                 | shape     | official ``.pth`` name (``blocks.i.``) |
|--------------------------------|-----------|----------------------------------------|
| pre_norm.{weight,bias} (i = 0) | [C]       | ln0.{weight,bias}                      |
| attn_norm.{weight,bias}        | [C]       | ln1.{weight,bias}                      |
| ffn_norm.{weight,bias}         | [C]       | ln2.{weight,bias}                      |
| attn.x_{r,w,k,v,a,g}           | [1, 1, C] | att.x_{r,w,k,v,a,g}                    |
| attn.k_k, attn.k_a             | [H, N]    | att.k_k, att.k_a ([1, 1, C])           |
| attn.r_k                       | [H, N]    | att.r_k                                |
| attn.{r,k,v,o}_proj.weight     | [C, C]    | att.{receptance,key,value,output}.weight |
| attn.w_lora.lora.0.weight      | [D_w, C]  | att.w1 ([C, D_w], transposed)          |
| attn.w_lora.lora.2.weight      | [C, D_w]  | att.w2 ([D_w, C], transposed)          |
| attn.w_lora.lora.2.bias        | [C]       | att.w0 ([1, 1, C])                     |
| attn.a_lora.*                  | as w_lora | att.a1, att.a2, att.a0                 |
| attn.v_lora.* (i > 0)          | as w_lora | att.v1, att.v2, att.v0                 |
| attn.g_lora.lora.{0,2}.weight  | as w_lora | att.g1, att.g2 (no bias)               |
| attn.g_norm.{weight,bias}      | [H, N]    | att.ln_x.{weight,bias} ([C])           |
| ffn.x_k                        | [C]       | ffn.x_k ([1, 1, C])                    |
| ffn.key.weight                 | [F, C]    | ffn.key.weight                         |
| ffn.value.weight               | [C, F]    | ffn.value.weight                       |

plus ``model.embeddings.weight`` [V, C] (``emb.weight``), ``model.norm.*``
(``ln_out.*``) and ``lm_head.weight`` [V, C] (``head.weight``).
"""

from typing import Dict

import mlx.core as mx

from .errors import CheckpointError

# Official suffix within ``blocks.i.`` -> canonical suffix within ``model.layers.i.``,
# for tensors whose values move unchanged (a reshape at most).
_RENAMED = {
    "ln0.weight": "pre_norm.weight",
    "ln0.bias": "pre_norm.bias",
    "ln1.weight": "attn_norm.weight",
    "ln1.bias": "attn_norm.bias",
    "ln2.weight": "ffn_norm.weight",
    "ln2.bias": "ffn_norm.bias",
    "att.x_r": "attn.x_r",
    "att.x_w": "attn.x_w",
    "att.x_k": "attn.x_k",
    "att.x_v": "attn.x_v",
    "att.x_a": "attn.x_a",
    "att.x_g": "attn.x_g",
    "att.k_k": "attn.k_k",
    "att.k_a": "attn.k_a",
    "att.r_k": "attn.r_k",
    "att.receptance.weight": "attn.r_proj.weight",
    "att.key.weight": "attn.k_proj.weight",
    "att.value.weight": "attn.v_proj.weight",
    "att.output.weight": "attn.o_proj.weight",
    "att.ln_x.weight": "attn.g_norm.weight",
    "att.ln_x.bias": "attn.g_norm.bias",
    "ffn.x_k": "ffn.x_k",
    "ffn.key.weight": "ffn.key.weight",
    "ffn.value.weight": "ffn.value.weight",
}

# Official low-rank names: (first matrix, second matrix, bias) -> canonical module.
_LOW_RANK = {
    "w": ("w_lora", True),
    "a": ("a_lora", True),
    "v": ("v_lora", True),
    "g": ("g_lora", False),
}

_TOP_LEVEL = {
    "emb.weight": "model.embeddings.weight",
    "ln_out.weight": "model.norm.weight",
    "ln_out.bias": "model.norm.bias",
    "head.weight": "lm_head.weight",
}


def official_to_canonical(weights: Dict[str, mx.array], source: str) -> Dict[str, mx.array]:
    """Rename and reshape official RWKV-7 (``x070``) weights into the canonical layout.

    Args:
        weights (dict[str, mx.array]): Tensors named as in BlinkDL's ``.pth`` files.
        source (str): The file the weights came from, for error messages.

    Returns:
        dict[str, mx.array]: The canonical weights, shaped as the model expects.
    """
    out = {}
    for name, value in weights.items():
        if name in _TOP_LEVEL:
            out[_TOP_LEVEL[name]] = value
            continue

        parts = name.split(".", 2)
        if len(parts) != 3 or parts[0] != "blocks" or not parts[1].isdigit():
            raise CheckpointError(f"{source}: unexpected tensor '{name}' in an RWKV-7 checkpoint")
        prefix = f"model.layers.{parts[1]}."
        suffix = parts[2]

        if suffix in _RENAMED:
            out[prefix + _RENAMED[suffix]] = value
            continue

        low_rank = suffix[len("att.") :] if suffix.startswith("att.") else ""
        if len(low_rank) == 2 and low_rank[0] in _LOW_RANK and low_rank[1] in "012":
            if low_rank[0] == "v" and parts[1] == "0":
                # Training code creates the value-residual mix in every layer,
                # but layer 0 is where the residual comes from and never uses it.
                continue
            module, has_bias = _LOW_RANK[low_rank[0]]
            role = low_rank[1]
            if role == "0" and has_bias:
                out[f"{prefix}attn.{module}.lora.2.bias"] = value.reshape(-1)
                continue
            if role in "12":
                index = "0" if role == "1" else "2"
                out[f"{prefix}attn.{module}.lora.{index}.weight"] = value.T
                continue
        raise CheckpointError(f"{source}: unexpected tensor '{name}' in an RWKV-7 checkpoint")

    return reshape_canonical(out, source)


def reshape_canonical(weights: Dict[str, mx.array], source: str) -> Dict[str, mx.array]:
    """Give per-head and token-shift tensors their canonical shapes.

    Layouts disagree on these shapes (``[C]``, ``[1, 1, C]`` or ``[H, N]``), so
    every reader passes its result through here. The head size comes from
    ``attn.r_k``, which every layout stores as [H, N].
    """
    r_k = next((v for k, v in weights.items() if k.endswith("attn.r_k")), None)
    if r_k is None:
        raise CheckpointError(f"{source}: missing tensor 'attn.r_k' (the per-head receptance-key bonus)")
    if r_k.ndim != 2:
        raise CheckpointError(
            f"{source}: tensor 'attn.r_k' has shape {tuple(r_k.shape)}, expected [heads, head size]"
        )
    heads, head_size = r_k.shape

    for name, value in weights.items():
        if name.endswith(("attn.k_k", "attn.k_a", "attn.r_k", "attn.g_norm.weight", "attn.g_norm.bias")):
            if value.size != heads * head_size:
                raise CheckpointError(
                    f"{source}: tensor '{name}' has shape {tuple(value.shape)}, expected {heads * head_size} values"
                )
            weights[name] = value.reshape(heads, head_size)
        elif ".attn.x_" in name:
            weights[name] = value.reshape(1, 1, -1)
        elif name.endswith("ffn.x_k"):
            weights[name] = value.reshape(-1)
    return weights
