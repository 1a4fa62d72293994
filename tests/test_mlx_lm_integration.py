"""mlx-lm's tools on model directories written by rwkv_mlx.convert.

A tiny random RWKV-7 with the World vocabulary is converted twice: plainly,
so that mlx-lm runs its own rwkv7 implementation, and with
``--mlx-lm-model-file``, so that mlx-lm given ``--trust-remote-code`` runs
rwkv_mlx's. mlx-lm's real entry points then run on them: generate,
cache_prompt, lora and server as subprocesses, and convert, load and
batch_generate in-process. Every greedy token is checked against rwkv_mlx.

The model's head is zeroed for every token that does not decode to ASCII
letters with an optional leading space. Greedy decoding then picks only such
tokens, so the generated text compares exactly and no end-of-sequence token
cuts a generation short.
"""

import json
import re
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import List

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm import utils as mlx_lm_utils
from mlx_lm.convert import convert as mlx_lm_convert
from mlx_lm.generate import PromptProcessingBatch
from mlx_lm.generate import batch_generate as mlx_lm_batch_generate
from mlx_lm.generate import generate_step as mlx_lm_generate_step
from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache
from transformers import AutoTokenizer

import rwkv_mlx
from rwkv_mlx.convert import MODEL_FILE_NAME, convert
from rwkv_mlx.loading import load_model, save_model
from rwkv_mlx.models import rwkv7
from rwkv_mlx.tokenizer import TokenizerError
from rwkv_mlx.tuner.adapters import load_adapters

from mlx_lm_helpers import mlx_lm_server, post_json, run_mlx_lm, run_module
from random_models import TINY_CONFIG, random_model

WORLD_CONFIG = {**TINY_CONFIG, "vocab_size": 65536}
WORD_TOKEN = re.compile(r"^ ?[A-Za-z]+$")

PROMPT = "The quick brown fox"
MAX_TOKENS = 8
MODULE_FILE = Path(rwkv_mlx.__file__).with_name("mlx_lm_model.py")


def word_token_mask(tokenizer, vocab_size: int) -> np.ndarray:
    """Return a [vocab_size] bool mask of the tokens that decode to ASCII letters.

    Ids without a token (the World vocabulary leaves a few unused) are False.
    """
    mask = np.zeros(vocab_size, dtype=bool)
    for token_id in range(vocab_size):
        try:
            mask[token_id] = WORD_TOKEN.match(tokenizer.decode([token_id])) is not None
        except TokenizerError:
            pass
    return mask


def greedy_tokens(model, tokenizer, prompt: List[int], max_tokens: int = MAX_TOKENS, prompt_cache=None) -> List[int]:
    """Return the tokens that rwkv_mlx's ``stream_generate`` picks greedily."""
    responses = rwkv_mlx.stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, prompt_cache=prompt_cache)
    return [response.token for response in responses]


def mlx_lm_chat_prompt(mlx_tokenizer, messages: list, **template_args) -> List[int]:
    """Return the prompt ids that mlx-lm's chat template makes of chat messages."""
    return list(mlx_tokenizer.apply_chat_template(messages, tokenize=True, **template_args))


def logits_of(model, ids: List[int]) -> np.ndarray:
    return np.array(model(mx.array([ids])).astype(mx.float32))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mlx_lm")


@pytest.fixture(scope="module")
def converted(workdir: Path) -> SimpleNamespace:
    """The random World-vocabulary model, converted plainly and with the model file.

    Returns:
        SimpleNamespace: ``plain`` and ``model_file`` (the two directories),
        ``model`` and ``tokenizer`` (rwkv_mlx's, loaded from ``plain``) and
        ``mlx_tokenizer`` (mlx-lm's, loaded from ``plain``).
    """
    tokenizer = rwkv_mlx.load_tokenizer("world")
    model = random_model(WORLD_CONFIG)
    keep = mx.array(word_token_mask(tokenizer, WORLD_CONFIG["vocab_size"]))
    model.lm_head.weight = model.lm_head.weight * keep[:, None]
    source = workdir / "source"
    save_model(source, model, WORLD_CONFIG)

    plain = convert(str(source), str(workdir / "plain"), tokenizer="world")
    model_file = workdir / "model_file"
    run_module("rwkv_mlx.convert", "--model", source, "--mlx-path", model_file, "--tokenizer", "world",
               "--mlx-lm-model-file", cwd=workdir)  # fmt: skip

    loaded, loaded_tokenizer = rwkv_mlx.load(str(plain))
    return SimpleNamespace(
        plain=plain,
        model_file=model_file,
        model=loaded,
        tokenizer=loaded_tokenizer,
        mlx_tokenizer=mlx_lm_utils.load_tokenizer(plain),
    )


# ---------------------------------------------------------------------------
# The two kinds of directory


def test_convert_flag_writes_model_file(converted):
    config = json.loads((converted.model_file / "config.json").read_text())
    plain_config = json.loads((converted.plain / "config.json").read_text())

    assert config["model_file"] == MODEL_FILE_NAME
    assert config["model_type"] == "rwkv7"
    assert (converted.model_file / MODEL_FILE_NAME).read_bytes() == MODULE_FILE.read_bytes()
    assert "model_file" not in plain_config
    assert not list(converted.plain.glob("*.py"))


def test_plain_directory_runs_mlx_lm_rwkv7(converted):
    mlx_model, _ = mlx_lm_utils.load_model(converted.plain)
    ids = converted.tokenizer.encode(PROMPT)

    assert type(mlx_model).__module__ == "mlx_lm.models.rwkv7"
    np.testing.assert_allclose(logits_of(mlx_model, ids), logits_of(converted.model, ids), atol=1e-4)


def test_model_file_needs_trust_remote_code(converted):
    with pytest.raises(ValueError, match="trust_remote_code"):
        mlx_lm_utils.load_model(converted.model_file)

    mlx_model, _ = mlx_lm_utils.load_model(converted.model_file, trust_remote_code=True)
    ours, _, _ = load_model(str(converted.model_file))
    ids = converted.tokenizer.encode(PROMPT)

    assert isinstance(mlx_model, rwkv7.Model)
    np.testing.assert_array_equal(logits_of(mlx_model, ids), logits_of(ours, ids))


def test_model_file_without_rwkv_mlx_names_fix(converted):
    # Execute the copied module as mlx-lm's loader does, in an interpreter
    # where importing rwkv_mlx fails.
    script = textwrap.dedent(
        f"""
        import importlib.util, sys

        class HideRwkvMlx:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "rwkv_mlx":
                    raise ModuleNotFoundError(f"No module named {{name!r}}")

        sys.meta_path.insert(0, HideRwkvMlx())
        spec = importlib.util.spec_from_file_location("custom_model", {str(converted.model_file / MODEL_FILE_NAME)!r})
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)

    assert result.returncode != 0
    assert "ImportError" in result.stderr
    assert "pip install rwkv_mlx" in result.stderr
    assert "delete the 'model_file' entry" in result.stderr


def test_model_file_converts_back_to_plain(converted, workdir):
    target = convert(str(converted.model_file), str(workdir / "plain_again"))
    config = json.loads((target / "config.json").read_text())

    assert "model_file" not in config
    assert not list(target.glob("*.py"))


# ---------------------------------------------------------------------------
# The World tokenizer in mlx-lm


@pytest.mark.parametrize(
    "text",
    ["The quick brown fox", "  two spaces\n\nand lines\t", "Grüße, 世界! 🦢", "User: hi\n\nAssistant:"],
    ids=["ascii", "whitespace", "unicode", "chat"],
)
def test_world_tokenizer_encodes_like_rwkv_mlx(converted, text):
    ids = converted.tokenizer.encode(text)

    assert converted.mlx_tokenizer.encode(text) == ids
    assert converted.mlx_tokenizer.decode(ids) == text


def test_world_tokenizer_needs_no_remote_code(converted):
    config = json.loads((converted.plain / "tokenizer_config.json").read_text())
    hf_tokenizer = AutoTokenizer.from_pretrained(converted.plain, trust_remote_code=False)

    assert "auto_map" not in config
    assert not list(converted.plain.glob("*.py"))
    assert type(hf_tokenizer).__module__.startswith("transformers.")
    assert hf_tokenizer.encode(PROMPT) == converted.tokenizer.encode(PROMPT)
    assert 0 in converted.mlx_tokenizer.eos_token_ids


def test_world_chat_template_matches_rwkv_mlx(converted):
    messages = [
        {"role": "system", "content": "You are a goose."},
        {"role": "user", "content": "Where do you live?"},
        {"role": "assistant", "content": "By the lake."},
        {"role": "user", "content": "Why?"},
    ]

    assert converted.mlx_tokenizer.has_chat_template
    assert mlx_lm_chat_prompt(converted.mlx_tokenizer, messages, add_generation_prompt=True) == (
        converted.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    )


# ---------------------------------------------------------------------------
# mlx_lm generate


@pytest.mark.parametrize("implementation", ["mlx-lm", "rwkv_mlx"])
def test_generate_cli_matches_rwkv_mlx(converted, workdir, implementation):
    if implementation == "mlx-lm":
        model_dir, extra = converted.plain, []
    else:
        model_dir, extra = converted.model_file, ["--trust-remote-code"]

    output = run_mlx_lm("generate", "--model", model_dir, *extra, "--prompt", PROMPT, "--max-tokens", MAX_TOKENS,
                        "--temp", 0, "--ignore-chat-template", "--verbose", "False", cwd=workdir)  # fmt: skip
    ids = converted.tokenizer.encode(PROMPT)
    expected = rwkv_mlx.generate(converted.model, converted.tokenizer, ids, max_tokens=MAX_TOKENS)

    assert len(greedy_tokens(converted.model, converted.tokenizer, ids)) == MAX_TOKENS
    assert expected.strip()
    assert output == expected + "\n"


# ---------------------------------------------------------------------------
# Batch generation


def test_batch_generate_honours_padding(converted):
    mlx_model, _ = mlx_lm_utils.load_model(converted.model_file, trust_remote_code=True)
    prompts = [converted.tokenizer.encode(text) for text in ("A much longer prompt than the others here", "Hi", PROMPT)]
    expected = [greedy_tokens(converted.model, converted.tokenizer, ids) for ids in prompts]

    for prefill_step_size in (2048, 3):
        response = mlx_lm_batch_generate(
            mlx_model,
            converted.mlx_tokenizer,
            prompts,
            max_tokens=MAX_TOKENS,
            return_token_ids=True,
            prefill_step_size=prefill_step_size,
        )
        assert response.token_ids == expected, f"prefill_step_size={prefill_step_size}"


def test_padded_prompt_in_chunks_keeps_each_state(converted):
    model = converted.model
    prompts = [converted.tokenizer.encode(text) for text in ("A much longer prompt than the other one", "Hi there")]
    assert len(prompts[0]) > 2 * len(prompts[1])

    batch = PromptProcessingBatch(model, [0, 1], [model.make_cache(), model.make_cache()], prefill_step_size=2)
    batch.prompt(prompts)

    for row, ids in enumerate(prompts):
        alone = model.make_cache()
        model(mx.array([ids]), cache=alone)
        for layer, (batched, single) in enumerate(zip(batch.prompt_cache, alone)):
            for entry in range(3):
                np.testing.assert_allclose(
                    np.array(batched[entry][row]), np.array(single[entry][0]), atol=1e-5,
                    err_msg=f"prompt {row}, layer {layer}, cache entry {entry}",
                )  # fmt: skip


# ---------------------------------------------------------------------------
# Prompt caches


@pytest.mark.slow
def test_prompt_cache_cli_continues(converted, workdir):
    context, question = "Once upon a time there was a goose", " who lived by a lake"
    cache_file = workdir / "prompt_cache.safetensors"
    model_dir = str(converted.model_file)

    run_mlx_lm("cache_prompt", "--model", model_dir, "--trust-remote-code", "--prompt", context,
               "--prompt-cache-file", cache_file, cwd=workdir)  # fmt: skip
    output = run_mlx_lm("generate", "--model", model_dir, "--trust-remote-code", "--prompt-cache-file", cache_file,
                        "--prompt", question, "--max-tokens", MAX_TOKENS, "--temp", 0, "--ignore-chat-template",
                        "--verbose", "False", cwd=workdir)  # fmt: skip

    # mlx_lm cache_prompt applies the chat template and leaves the message
    # open, and mlx_lm generate then appends the raw question.
    mlx_tokenizer = converted.mlx_tokenizer
    messages = [{"role": "user", "content": context}]
    context_ids = mlx_lm_chat_prompt(mlx_tokenizer, messages, add_generation_prompt=False, continue_final_message=True)
    question_ids = mlx_tokenizer.encode(question)
    expected = greedy_tokens(converted.model, converted.tokenizer, context_ids + question_ids)

    assert output == converted.tokenizer.decode(expected) + "\n"

    # rwkv_mlx continues the same file directly.
    cache = load_prompt_cache(str(cache_file))
    assert greedy_tokens(converted.model, converted.tokenizer, question_ids, prompt_cache=cache) == expected


def test_prompt_cache_moves_between_implementations(converted, workdir):
    mlx_model, _ = mlx_lm_utils.load_model(converted.plain)
    context = converted.tokenizer.encode("Once upon a time")
    question = converted.tokenizer.encode(" there was")
    expected = greedy_tokens(converted.model, converted.tokenizer, context + question)

    # rwkv_mlx fills the cache, mlx-lm's own rwkv7 continues it from the file.
    cache = converted.model.make_cache()
    converted.model(mx.array([context]), cache=cache)
    cache_file = workdir / "rwkv_mlx_cache.safetensors"
    save_prompt_cache(str(cache_file), cache)
    steps = mlx_lm_generate_step(mx.array(question), mlx_model, max_tokens=MAX_TOKENS,
                                 prompt_cache=load_prompt_cache(str(cache_file)))  # fmt: skip

    assert [token for token, _ in steps] == expected


# ---------------------------------------------------------------------------
# mlx_lm lora


def write_lora_data(directory: Path) -> Path:
    """Write train.jsonl and valid.jsonl in mlx-lm's text format."""
    directory.mkdir()
    lines = [json.dumps({"text": f"The goose number {i} swims across the lake."}) for i in range(4)]
    (directory / "train.jsonl").write_text("\n".join(lines) + "\n")
    (directory / "valid.jsonl").write_text("\n".join(lines[:2]) + "\n")
    return directory


@pytest.mark.slow
def test_lora_cli_adapter_loads_in_rwkv_mlx(converted, workdir):
    data = write_lora_data(workdir / "lora_data")
    adapter_path = workdir / "adapters"

    run_mlx_lm("lora", "--model", converted.model_file, "--trust-remote-code", "--train", "--data", data,
               "--iters", 2, "--batch-size", 2, "--num-layers", -1, "--learning-rate", 1e-2,
               "--steps-per-report", 1, "--steps-per-eval", 2, "--val-batches", 1, "--max-seq-length", 32,
               "--grad-checkpoint", "--adapter-path", adapter_path, cwd=workdir)  # fmt: skip

    # mlx-lm adapts every linear layer of every block, the low-rank
    # projections included. Layer 0 has no value residual (v_lora).
    trained = mx.load(str(adapter_path / "adapters.safetensors"))
    modules = ["attn.r_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "ffn.key", "ffn.value"]
    modules += [f"attn.{name}_lora.lora.{i}" for name in ("w", "a", "g") for i in (0, 2)]
    for layer in range(WORLD_CONFIG["num_hidden_layers"]):
        for module in modules + (["attn.v_lora.lora.0", "attn.v_lora.lora.2"] if layer > 0 else []):
            assert f"model.layers.{layer}.{module}.lora_a" in trained, f"layer {layer} {module} was not adapted"

    ours, _, _ = load_model(str(converted.model_file))
    load_adapters(ours, adapter_path)
    mlx_model, _ = mlx_lm_utils.load(str(converted.model_file), adapter_path=str(adapter_path),
                                     trust_remote_code=True)  # fmt: skip
    mlx_lm_rwkv7, _ = mlx_lm_utils.load(str(converted.plain), adapter_path=str(adapter_path))
    ids = converted.tokenizer.encode(PROMPT)
    adapted = logits_of(ours, ids)

    np.testing.assert_allclose(adapted, logits_of(mlx_model, ids), atol=1e-5)
    np.testing.assert_allclose(adapted, logits_of(mlx_lm_rwkv7, ids), atol=1e-4)
    assert np.abs(adapted - logits_of(converted.model, ids)).max() > 1e-3


@pytest.mark.slow
def test_rwkv_mlx_adapter_loads_in_mlx_lm(converted, workdir):
    data = write_lora_data(workdir / "rwkv_mlx_lora_data")
    adapter_path = workdir / "rwkv_mlx_adapters"

    run_module("rwkv_mlx.lora", "--model", converted.model_file, "--train", "--data", data, "--iters", 2,
               "--batch-size", 2, "--num-layers", -1, "--learning-rate", 1e-2, "--steps-per-eval", 2,
               "--val-batches", 1, "--adapter-path", adapter_path, cwd=workdir)  # fmt: skip

    ours, _, _ = load_model(str(converted.model_file))
    load_adapters(ours, adapter_path)
    mlx_model, _ = mlx_lm_utils.load(str(converted.model_file), adapter_path=str(adapter_path),
                                     trust_remote_code=True)  # fmt: skip
    mlx_lm_rwkv7, _ = mlx_lm_utils.load(str(converted.plain), adapter_path=str(adapter_path))
    ids = converted.tokenizer.encode(PROMPT)
    adapted = logits_of(ours, ids)

    np.testing.assert_allclose(adapted, logits_of(mlx_model, ids), atol=1e-5)
    np.testing.assert_allclose(adapted, logits_of(mlx_lm_rwkv7, ids), atol=1e-4)
    assert np.abs(adapted - logits_of(converted.model, ids)).max() > 1e-3


# ---------------------------------------------------------------------------
# mlx_lm server


@pytest.mark.slow
def test_server_completions_match_rwkv_mlx(converted, workdir):
    messages = [{"role": "user", "content": "Tell me about geese"}]
    completion_ids = converted.mlx_tokenizer.encode(PROMPT)
    chat_ids = mlx_lm_chat_prompt(converted.mlx_tokenizer, messages, add_generation_prompt=True)
    expected_completion = greedy_tokens(converted.model, converted.tokenizer, completion_ids)
    expected_chat = greedy_tokens(converted.model, converted.tokenizer, chat_ids)
    request = {"max_tokens": MAX_TOKENS, "temperature": 0.0, "logprobs": True}

    with mlx_lm_server(converted.model_file, "--trust-remote-code", cwd=workdir) as url:
        # Both requests at once, so the server may batch them with padding.
        with ThreadPoolExecutor(max_workers=2) as pool:
            completion = pool.submit(post_json, f"{url}/v1/completions", {**request, "prompt": PROMPT})
            chat = pool.submit(post_json, f"{url}/v1/chat/completions", {**request, "messages": messages})
            completion, chat = completion.result(), chat.result()

    completion_choice, chat_choice = completion["choices"][0], chat["choices"][0]
    assert [entry["id"] for entry in completion_choice["logprobs"]["content"]] == expected_completion
    assert completion_choice["text"] == converted.tokenizer.decode(expected_completion)
    assert [entry["id"] for entry in chat_choice["logprobs"]["content"]] == expected_chat
    assert chat_choice["message"]["content"] == converted.tokenizer.decode(expected_chat)


# ---------------------------------------------------------------------------
# mlx_lm convert, and directories that mlx-lm wrote


def test_mlx_lm_convert_uses_quant_predicate(converted, workdir):
    target = workdir / "quantized"
    mlx_lm_convert(str(converted.model_file), str(target), quantize=True, trust_remote_code=True)
    config = json.loads((target / "config.json").read_text())
    weights = mx.load(str(target / "model.safetensors"))

    assert config["model_file"] == MODEL_FILE_NAME
    assert (target / MODEL_FILE_NAME).exists()
    assert config["quantization"]["model.embeddings"]["bits"] == 8
    assert config["quantization"]["lm_head"]["bits"] == 8
    assert "model.layers.0.attn.r_proj.scales" in weights
    assert not [name for name in weights if ".lora." in name and name.endswith(".scales")]

    ours, _, _ = load_model(str(target))
    mlx_model, _ = mlx_lm_utils.load_model(target, trust_remote_code=True)
    ids = converted.tokenizer.encode(PROMPT)
    np.testing.assert_array_equal(logits_of(ours, ids), logits_of(mlx_model, ids))


def fla_directory(converted, directory: Path) -> Path:
    """Write the model as flash-linear-attention's Hugging Face checkpoints
    are laid out: [C] vectors and fla's config fields."""
    directory.mkdir()
    weights = dict(tree_flatten(converted.model.parameters()))
    for name in list(weights):
        if name.endswith(("attn.k_k", "attn.k_a", "attn.g_norm.weight", "attn.g_norm.bias")):
            weights[name] = weights[name].reshape(-1)
    mx.save_safetensors(str(directory / "model.safetensors"), weights)

    config = {
        **WORLD_CONFIG,
        "architectures": ["RWKV7ForCausalLM"],
        "attn": None,
        "attn_mode": "chunk",
        "bos_token_id": 0,
        "eos_token_id": 0,
        "fuse_norm": False,
        "hidden_act": "sqrelu",
        "norm_bias": True,
        "norm_first": True,
        "num_heads": WORLD_CONFIG["hidden_size"] // WORLD_CONFIG["head_dim"],
        "torch_dtype": "float32",
        "value_dim": [WORLD_CONFIG["hidden_size"]] * WORLD_CONFIG["num_hidden_layers"],
    }
    (directory / "config.json").write_text(json.dumps(config))
    for item in converted.plain.iterdir():
        if item.name.startswith(("tokenizer", "special_tokens")):
            (directory / item.name).write_bytes(item.read_bytes())
    return directory


@pytest.mark.parametrize("quantize", [False, True], ids=["float", "quantized"])
def test_mlx_community_directory_loads(converted, workdir, quantize):
    name = "quantized" if quantize else "float"
    source = fla_directory(converted, workdir / f"fla-{name}")
    target = workdir / f"mlx-community-{name}"
    mlx_lm_convert(str(source), str(target), quantize=quantize)

    mlx_model, _ = mlx_lm_utils.load_model(target)
    ours, tokenizer = rwkv_mlx.load(str(target))
    mlx_weights = dict(tree_flatten(mlx_model.parameters()))
    our_weights = dict(tree_flatten(ours.parameters()))
    ids = converted.tokenizer.encode(PROMPT)

    assert sorted(our_weights) == sorted(mlx_weights)
    for key, value in mlx_weights.items():
        np.testing.assert_array_equal(np.array(our_weights[key]), np.array(value), err_msg=key)
    np.testing.assert_allclose(logits_of(ours, ids), logits_of(mlx_model, ids), atol=1e-4)
    assert tokenizer.encode(PROMPT) == ids


def test_remote_code_tokenizer_falls_back_to_world(converted, workdir):
    # Checkpoints converted from flash-linear-attention ship the World
    # tokenizer as remote code and no tokenizer.json. rwkv_mlx must not run it.
    directory = workdir / "remote-code-tokenizer"
    directory.mkdir()
    for name in ("config.json", "model.safetensors"):
        (directory / name).write_bytes((converted.plain / name).read_bytes())
    auto_map = {"AutoTokenizer": ["hf_rwkv_tokenizer.RwkvTokenizer", None]}
    (directory / "tokenizer_config.json").write_text(json.dumps({"auto_map": auto_map}))
    (directory / "hf_rwkv_tokenizer.py").write_text('raise RuntimeError("remote code ran")\n')

    _, tokenizer = rwkv_mlx.load(str(directory))

    assert tokenizer.encode(PROMPT) == converted.tokenizer.encode(PROMPT)
    assert tokenizer.vocab_size == WORLD_CONFIG["vocab_size"]


def test_mlx_lm_streams_bundled_model_text_unchanged():
    # mlx-lm picks its streaming detokenizer from tokenizer.json's decoder, and
    # the one for a bare ByteLevel decoder drops the first space of the output.
    from mlx_lm import generate as mlx_lm_generate
    from mlx_lm import load as mlx_lm_load

    from rwkv_mlx.default_model import DEFAULT_MODEL_PATH

    prompt = "She was not sure that Mr. Darcy"
    model, tokenizer = mlx_lm_load(str(DEFAULT_MODEL_PATH))
    ours, our_tokenizer = rwkv_mlx.load(str(DEFAULT_MODEL_PATH))

    text = mlx_lm_generate(model, tokenizer, prompt, max_tokens=12)

    assert text == rwkv_mlx.generate(ours, our_tokenizer, prompt, max_tokens=12)
    assert text.startswith(" ")
