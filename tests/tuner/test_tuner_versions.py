"""``python -m rwkv_mlx.lora``, ``rwkv_mlx.fuse`` and ``rwkv_mlx.generate`` on
RWKV-4, 5 and 6 checkpoints: the small official-layout .pth files of
``tests/fixtures`` and a saved model directory."""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from rwkv_mlx import fuse as fuse_cli
from rwkv_mlx import load
from rwkv_mlx import lora as lora_cli
from rwkv_mlx.generate import main as generate_main
from rwkv_mlx.generate import stream_generate
from rwkv_mlx.io.state import load_state
from rwkv_mlx.loading import load_model, save_model
from tuner_helpers import older_config, older_model, pattern_texts, write_jsonl

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
CHECKPOINTS = {
    "4": FIXTURES / "rwkv4" / "rwkv4.pth",
    "5": FIXTURES / "rwkv5" / "rwkv5_0.pth",
    "5.1": FIXTURES / "rwkv5" / "rwkv5_1.pth",
    "5.2": FIXTURES / "rwkv5" / "rwkv5_2.pth",
    "6": FIXTURES / "rwkv6" / "rwkv6.pth",
}
GREEDY = ["--temp", "0", "--presence-penalty", "0", "--frequency-penalty", "0", "--verbose", "False"]
IDS = mx.array(np.random.default_rng(0).integers(1, 256, (1, 30)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("data")
    write_jsonl(directory / "train.jsonl", pattern_texts(8, seed=0))
    write_jsonl(directory / "valid.jsonl", pattern_texts(4, seed=1))
    write_jsonl(directory / "test.jsonl", pattern_texts(4, seed=2))
    return directory


def train_cli(model, data_dir, adapter_path, *extra, learning_rate="1e-3") -> int:
    # A learning rate of 1e-2 with the default LoRA scale of 20 makes these
    # random models' activations grow past float16's range within 4 steps.
    argv = [
        "--model", str(model), "--data", str(data_dir), "--adapter-path", str(adapter_path),
        "--train", "--iters", "4", "--batch-size", "2", "--steps-per-eval", "4", "--save-every", "4",
        "--steps-per-report", "2", "--learning-rate", learning_rate, "--max-seq-length", "32", *extra,
    ]  # fmt: skip
    return lora_cli.main(argv)


def state_cli(model, data_dir, adapter_path, *extra) -> int:
    return train_cli(model, data_dir, adapter_path, "--fine-tune-type", "state", *extra, learning_rate="5e-2")


def generated_text(model, tokenizer, prompt="alpha beta", max_tokens=12) -> str:
    return "".join(response.text for response in stream_generate(model, tokenizer, prompt, max_tokens))


@pytest.mark.parametrize("version", list(CHECKPOINTS))
def test_lora_then_generate_with_adapters(tmp_path, data_dir, capsys, version):
    checkpoint = CHECKPOINTS[version]
    adapters = tmp_path / "adapters"

    assert train_cli(checkpoint, data_dir, adapters, "--test") == 0
    output = capsys.readouterr().out
    test_loss = float(output.split("Test loss ")[1].split(",")[0])
    first_validation = float(output.split("Iter 0: validation loss ")[1].split(",")[0])
    assert test_loss < first_validation - 1.0

    base, _ = load(str(checkpoint))
    adapted, tokenizer = load(str(checkpoint), adapter_path=str(adapters))
    expected = generated_text(adapted, tokenizer)
    status = generate_main(
        ["--model", str(checkpoint), "--adapter-path", str(adapters), "--prompt", "alpha beta", "--max-tokens", "12", *GREEDY]
    )

    assert status == 0
    assert capsys.readouterr().out == expected + "\n"
    assert mx.abs(adapted(IDS) - base(IDS)).max().item() > 1e-3
    config = json.loads((adapters / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "lora"
    assert config["base_model_fingerprint"]


@pytest.mark.parametrize("version", ["4", "5.1", "6"])
def test_fuse_equals_unfused(tmp_path, data_dir, version):
    # A float32 model, so the merged weights round no more than the adapter's
    # outputs do.
    model_dir = tmp_path / "model"
    save_model(model_dir, older_model(version), older_config(version))
    adapters = tmp_path / "adapters"
    assert train_cli(model_dir, data_dir, adapters, "--fine-tune-type", "dora", "--tokenizer", "bytes") == 0
    adapted = load(str(model_dir), tokenizer="bytes", adapter_path=str(adapters))[0]

    status = fuse_cli.main(
        ["--model", str(model_dir), "--tokenizer", "bytes", "--adapter-path", str(adapters), "--save-path", str(tmp_path / "fused")]
    )

    fused, config, _ = load_model(str(tmp_path / "fused"))
    assert status == 0
    assert config["model_type"] == f"rwkv{version[0]}"
    assert mx.abs(fused(IDS) - adapted(IDS)).max().item() <= 1e-4
    assert mx.abs(fused(IDS) - older_model(version)(IDS)).max().item() > 1e-3


def test_rwkv4_state_file_continues_like_adapter(tmp_path, data_dir, capsys):
    checkpoint = CHECKPOINTS["4"]
    adapters = tmp_path / "adapters"

    assert state_cli(checkpoint, data_dir, adapters) == 0
    capsys.readouterr()

    assert set(mx.load(str(adapters / "adapters.safetensors"))) == {
        "initial_state.layers.0.wkv_sums",
        "initial_state.layers.1.wkv_sums",
    }
    prompt = ["--prompt", "alpha beta", "--max-tokens", "12", *GREEDY]
    assert generate_main(["--model", str(checkpoint), "--adapter-path", str(adapters), *prompt]) == 0
    with_adapter = capsys.readouterr().out
    assert generate_main(["--model", str(checkpoint), "--load-state", str(adapters / "state.safetensors"), *prompt]) == 0
    with_state_file = capsys.readouterr().out

    assert with_state_file == with_adapter
    base, _, _ = load_model(str(checkpoint))
    cache, metadata = load_state(adapters / "state.safetensors", base)
    assert metadata["rwkv_version"] == "4"
    assert cache[0][1].shape == (1, 3, 64)
    assert mx.abs(cache[0][1][:, 2]).max().item() == 0.0
    tuned = load(str(checkpoint), adapter_path=str(adapters))[0]
    assert mx.abs(tuned(IDS) - base(IDS)).max().item() > 1e-3
    assert mx.abs(base(IDS, cache=cache) - tuned(IDS)).max().item() <= 1e-5


def test_state_tuning_saved_directory(tmp_path, data_dir, capsys):
    model_dir = tmp_path / "model"
    save_model(model_dir, older_model("5.2"), older_config("5.2"))
    adapters = tmp_path / "adapters"

    assert state_cli(model_dir, data_dir, adapters, "--tokenizer", "bytes") == 0

    base, _, _ = load_model(str(model_dir))
    cache, metadata = load_state(adapters / "state.safetensors", base)
    tuned = load(str(model_dir), tokenizer="bytes", adapter_path=str(adapters))[0]
    assert metadata["tokenizer"] == "bytes"
    assert mx.abs(base(IDS, cache=cache) - tuned(IDS)).max().item() <= 1e-5


def test_state_adapter_for_other_version_rejected(tmp_path, data_dir, capsys):
    adapters = tmp_path / "adapters"
    assert state_cli(CHECKPOINTS["5.2"], data_dir, adapters) == 0
    capsys.readouterr()

    status = generate_main(["--model", str(CHECKPOINTS["6"]), "--adapter-path", str(adapters), "--prompt", "a", *GREEDY])
    err = capsys.readouterr().err

    assert status != 0
    assert "the adapters are for RWKV-5.2 (rwkv5), but the model is RWKV-6 (rwkv6)" in err
    assert "use the base model they were trained on" in err


def test_state_file_for_other_version_rejected(tmp_path, data_dir, capsys):
    adapters = tmp_path / "adapters"
    assert state_cli(CHECKPOINTS["4"], data_dir, adapters) == 0
    capsys.readouterr()

    status = generate_main(
        ["--model", str(CHECKPOINTS["5.2"]), "--load-state", str(adapters / "state.safetensors"), "--prompt", "a", *GREEDY]
    )
    err = capsys.readouterr().err

    assert status != 0
    assert "the state is from an RWKV-4 model, but the model is RWKV-5.2" in err


OTHER_VERSION = "the adapters are for RWKV-5.2 (rwkv5), but the model is RWKV-6 (rwkv6); use the base model they were trained on"


@pytest.fixture(scope="module")
def lora_for_5_2(tmp_path_factory, data_dir):
    """A LoRA adapter folder trained on a tiny RWKV-5.2 model directory, and an
    RWKV-6 model directory whose adapted weights have the same shapes."""
    root = tmp_path_factory.mktemp("versions")
    for version in ("5.2", "6"):
        save_model(root / version, older_model(version), older_config(version))
    assert train_cli(root / "5.2", data_dir, root / "adapters", "--tokenizer", "bytes") == 0
    return root


def test_adapter_records_model_version(lora_for_5_2):
    config = json.loads((lora_for_5_2 / "adapters" / "adapter_config.json").read_text())
    _, metadata = mx.load(str(lora_for_5_2 / "adapters" / "adapters.safetensors"), return_metadata=True)

    assert config["model_type"] == "rwkv5"
    assert config["rwkv_version"] == "5.2"
    assert metadata["model_type"] == "rwkv5"
    assert metadata["rwkv_version"] == "5.2"


def test_lora_for_other_version_rejected_by_generate(lora_for_5_2, capsys):
    argv = ["--model", str(lora_for_5_2 / "6"), "--tokenizer", "bytes", "--adapter-path", str(lora_for_5_2 / "adapters")]

    status = generate_main([*argv, "--prompt", "a", *GREEDY])

    assert status != 0
    assert OTHER_VERSION in capsys.readouterr().err


def test_lora_for_other_version_rejected_by_resume(tmp_path, lora_for_5_2, data_dir, capsys):
    adapter_file = lora_for_5_2 / "adapters" / "adapters.safetensors"

    status = train_cli(lora_for_5_2 / "6", data_dir, tmp_path / "more", "--tokenizer", "bytes", "--resume-adapter-file", str(adapter_file))

    assert status == 1
    assert OTHER_VERSION in capsys.readouterr().err
    assert not (tmp_path / "more").exists()


def test_lora_for_other_version_rejected_by_fuse(tmp_path, lora_for_5_2, capsys):
    argv = ["--model", str(lora_for_5_2 / "6"), "--tokenizer", "bytes", "--adapter-path", str(lora_for_5_2 / "adapters")]

    status = fuse_cli.main([*argv, "--save-path", str(tmp_path / "fused")])

    assert status == 1
    assert OTHER_VERSION in capsys.readouterr().err


def test_adapters_without_version_still_load(tmp_path, lora_for_5_2):
    # Folders saved before the version was recorded, and mlx-lm's.
    folder = tmp_path / "old"
    folder.mkdir()
    config = json.loads((lora_for_5_2 / "adapters" / "adapter_config.json").read_text())
    weights, metadata = mx.load(str(lora_for_5_2 / "adapters" / "adapters.safetensors"), return_metadata=True)
    for key in ("model_type", "rwkv_version"):
        del config[key], metadata[key]
    (folder / "adapter_config.json").write_text(json.dumps(config))
    mx.save_safetensors(str(folder / "adapters.safetensors"), weights, metadata=metadata)

    adapted = load(str(lora_for_5_2 / "5.2"), tokenizer="bytes", adapter_path=str(folder))[0]
    expected = load(str(lora_for_5_2 / "5.2"), tokenizer="bytes", adapter_path=str(lora_for_5_2 / "adapters"))[0]

    assert mx.array_equal(adapted(IDS), expected(IDS))
