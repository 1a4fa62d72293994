"""``python -m rwkv_mlx.lora`` and ``python -m rwkv_mlx.fuse`` on a tiny model directory."""

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from random_models import TINY_CONFIG
from rwkv_mlx import fuse as fuse_cli
from rwkv_mlx import lora as lora_cli
from rwkv_mlx.io.state import load_state
from rwkv_mlx.loading import load_model, save_model
from rwkv_mlx.tuner import load_adapters
from rwkv_mlx.tuner.trainer import TrainingInterrupted
from tuner_helpers import pattern_texts, tiny_model, write_jsonl

IDS = mx.array(np.random.default_rng(0).integers(1, 256, (1, 30)))

@pytest.fixture
def model_dir(tmp_path) -> Path:
    directory = tmp_path / "model"
    save_model(directory, tiny_model(), dict(TINY_CONFIG))
    return directory


@pytest.fixture
def data_dir(tmp_path) -> Path:
    directory = tmp_path / "data"
    write_jsonl(directory / "train.jsonl", pattern_texts(16, seed=0))
    write_jsonl(directory / "valid.jsonl", pattern_texts(4, seed=1))
    write_jsonl(directory / "test.jsonl", pattern_texts(4, seed=2))
    return directory


def train_argv(model_dir, data_dir, adapter_path, *extra):
    return [
        "--model", str(model_dir), "--data", str(data_dir), "--adapter-path", str(adapter_path),
        "--train", "--iters", "6", "--batch-size", "2", "--steps-per-eval", "3", "--save-every", "3",
        "--steps-per-report", "3", "--learning-rate", "1e-2", *extra,
    ]  # fmt: skip


def test_lora_train_and_test(tmp_path, model_dir, data_dir, capsys):
    adapters = tmp_path / "adapters"

    status = lora_cli.main(train_argv(model_dir, data_dir, adapters, "--test"))

    output = capsys.readouterr().out
    assert status == 0
    assert "Trainable parameters:" in output
    assert "Test loss" in output
    assert "Test ppl" in output
    config = json.loads((adapters / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "lora"
    assert config["num_layers"] == -1
    assert config["lora_parameters"]["rank"] == 8
    assert config["lora_parameters"]["keys"] == ["attn.r_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "ffn.key", "ffn.value"]
    assert config["base_model_fingerprint"]
    for name in ("adapters.safetensors", "0000003_adapters.safetensors", "0000006_adapters.safetensors"):
        assert (adapters / name).is_file(), name


def test_test_only_evaluates_adapters(tmp_path, model_dir, data_dir, capsys):
    adapters = tmp_path / "adapters"
    lora_cli.main(train_argv(model_dir, data_dir, adapters, "--test"))
    trained = capsys.readouterr().out.split("Test loss")[1]

    assert lora_cli.main(["--model", str(model_dir), "--data", str(data_dir), "--test", "--adapter-path", str(adapters)]) == 0
    adapted = capsys.readouterr().out.split("Test loss")[1]
    assert lora_cli.main(["--model", str(model_dir), "--data", str(data_dir), "--test"]) == 0
    base = capsys.readouterr().out.split("Test loss")[1]

    assert adapted == trained
    assert float(base.split(",")[0]) > float(adapted.split(",")[0]) + 0.5


def test_yaml_config(tmp_path, model_dir, data_dir):
    config_file = tmp_path / "config.yaml"
    config_file.write_text(
        f"model: {model_dir}\ndata: {data_dir}\ntrain: true\nfine_tune_type: dora\n"
        "learning_rate: 1e-2\niters: 100\nbatch_size: 2\nlora_parameters:\n  rank: 4\n  scale: 8.0\n  dropout: 0.0\n"
    )
    adapters = tmp_path / "adapters"

    status = lora_cli.main(["-c", str(config_file), "--iters", "2", "--adapter-path", str(adapters)])

    config = json.loads((adapters / "adapter_config.json").read_text())
    assert status == 0
    assert config["fine_tune_type"] == "dora"
    assert config["iters"] == 2
    assert config["learning_rate"] == 0.01
    assert config["lora_parameters"]["rank"] == 4
    assert any(name.endswith(".m") for name in mx.load(str(adapters / "adapters.safetensors")))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--seed", "-1"], "--seed must be an integer in [0, 2**32), got -1"),
        (["--lora-rank", "0"], "--lora-rank (lora_parameters.rank) must be a positive integer, got 0"),
        (["--lora-scale", "nan"], "--lora-scale (lora_parameters.scale) must be a finite number, got nan"),
        (["--lora-dropout", "1.5"], "--lora-dropout (lora_parameters.dropout) must be in [0, 1), got 1.5"),
        (["--num-layers", "0"], "--num-layers must be a positive integer, or -1 for every layer, got 0"),
        (["--learning-rate", "nan"], "--learning-rate must be a finite number, 0 or more, got nan"),
        (["--learning-rate=-1e-3"], "--learning-rate must be a finite number, 0 or more, got -0.001"),
        (["--val-batches", "0"], "--val-batches must be a positive integer, or -1 for the whole set, got 0"),
        (["--test-batches", "-2"], "--test-batches must be a positive integer, or -1 for the whole set, got -2"),
    ],
)
def test_invalid_options(tmp_path, model_dir, data_dir, capsys, flags, message):
    status = lora_cli.main(train_argv(model_dir, data_dir, tmp_path / "adapters", *flags))

    assert status == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "adapters").exists()


def test_unknown_yaml_option(tmp_path, model_dir, data_dir, capsys):
    config_file = tmp_path / "config.yaml"
    config_file.write_text("learning_rte: 0.1\n")

    status = lora_cli.main(["-c", str(config_file), "--model", str(model_dir), "--data", str(data_dir), "--train"])

    assert status == 1
    assert "unknown option 'learning_rte'" in capsys.readouterr().err


def test_state_tuning_writes_state_file(tmp_path, model_dir, data_dir):
    adapters = tmp_path / "adapters"

    status = lora_cli.main(train_argv(model_dir, data_dir, adapters, "--fine-tune-type", "state"))

    assert status == 0
    assert set(mx.load(str(adapters / "adapters.safetensors"))) == {"initial_state.layers.0.wkv", "initial_state.layers.1.wkv"}
    base, _, _ = load_model(str(model_dir))
    cache, metadata = load_state(adapters / "state.safetensors", base)
    tuned = load_adapters(load_model(str(model_dir))[0], adapters)
    assert metadata["tokenizer"] == "bytes"
    assert mx.abs(base(IDS, cache=cache) - tuned(IDS)).max().item() <= 1e-5


def test_bad_data_reports_file_and_line(tmp_path, model_dir, data_dir, capsys):
    (data_dir / "train.jsonl").write_text('{"text": "fine"}\n{"text": \n')

    status = lora_cli.main(train_argv(model_dir, data_dir, tmp_path / "adapters"))

    assert status == 1
    assert f"{data_dir / 'train.jsonl'}:2: invalid JSON" in capsys.readouterr().err


def test_over_long_record_rejected(tmp_path, model_dir, data_dir, capsys):
    write_jsonl(data_dir / "train.jsonl", [{"text": "short"}, {"text": "y" * 200}])

    status = lora_cli.main(train_argv(model_dir, data_dir, tmp_path / "adapters", "--max-seq-length", "32", "--max-chunks", "2"))

    assert status == 1
    message = r"train\.jsonl:2: the record has 20[01] tokens, more than the 65 allowed \(--max-seq-length 32 times --max-chunks 2"
    assert re.search(message, capsys.readouterr().err)


def test_nothing_to_do(model_dir, data_dir, capsys):
    assert lora_cli.main(["--model", str(model_dir), "--data", str(data_dir)]) == 1
    assert "nothing to do" in capsys.readouterr().err


def test_resume_flag_continues(tmp_path, model_dir, data_dir, capsys, caplog):
    adapters = tmp_path / "adapters"
    lora_cli.main(train_argv(model_dir, data_dir, adapters))
    capsys.readouterr()

    with caplog.at_level(logging.INFO):
        status = lora_cli.main(
            train_argv(model_dir, data_dir, tmp_path / "more", "--resume-adapter-file", str(adapters / "0000003_adapters.safetensors"))
        )

    assert status == 0
    output = capsys.readouterr().out + caplog.text
    assert output.count("at iteration 4") == 1
    _, metadata = mx.load(str(tmp_path / "more" / "adapters.safetensors"), return_metadata=True)
    assert metadata["iteration"] == "6"


def test_sigint_keeps_last_checkpoint(tmp_path, model_dir, data_dir):
    adapters = tmp_path / "adapters"
    argv = train_argv(model_dir, data_dir, adapters)
    argv[argv.index("--iters") + 1] = "100000"
    argv[argv.index("--save-every") + 1] = "2"
    process = subprocess.Popen(
        [sys.executable, "-m", "rwkv_mlx.lora", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=tmp_path, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        # A shell without job control starts background jobs with SIGINT
        # ignored, so Python would install no KeyboardInterrupt handler.
        # Restoring the default makes the test run the same under any parent.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (adapters / "0000004_adapters.safetensors").exists():
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        # Generous, because a loaded machine can take long to finish the step
        # that the signal interrupts.
        _, stderr = process.communicate(timeout=240)
    finally:
        if process.poll() is None:
            process.kill()

    assert process.returncode == 130
    assert "interrupted" in stderr
    _, metadata = mx.load(str(adapters / "adapters.safetensors"), return_metadata=True)
    assert int(metadata["iteration"]) % 2 == 0
    assert not list(adapters.glob(".*partial"))
    load_adapters(load_model(str(model_dir))[0], adapters)

    resumed = train_argv(model_dir, data_dir, adapters, "--resume-adapter-file", str(adapters / "adapters.safetensors"))
    resumed[resumed.index("--iters") + 1] = str(int(metadata["iteration"]) + 2)
    assert lora_cli.main(resumed) == 0


def test_interrupt_message_adds_only_how_to_resume(tmp_path):
    adapter_file = tmp_path / "adapters.safetensors"
    unsaved = TrainingInterrupted("training interrupted at iteration 1; ...", 1, 0, adapter_file, None)
    saved = TrainingInterrupted("training interrupted at iteration 5; ...", 5, 4, adapter_file, None)

    assert lora_cli.interrupt_message(KeyboardInterrupt()) == "interrupted before training started; nothing was saved"
    assert lora_cli.interrupt_message(unsaved) is None
    assert lora_cli.interrupt_message(saved) == f"interrupted; continue from iteration 4 with --resume-adapter-file {adapter_file}"


def test_fuse_matches_unfused(tmp_path, model_dir, data_dir, capsys):
    adapters = tmp_path / "adapters"
    lora_cli.main(train_argv(model_dir, data_dir, adapters, "--fine-tune-type", "dora"))
    adapted = load_adapters(load_model(str(model_dir))[0], adapters)

    status = fuse_cli.main(["--model", str(model_dir), "--adapter-path", str(adapters), "--save-path", str(tmp_path / "fused")])

    fused, config, _ = load_model(str(tmp_path / "fused"))
    assert status == 0
    assert config["hidden_size"] == TINY_CONFIG["hidden_size"]
    assert mx.abs(fused(IDS) - adapted(IDS)).max().item() <= 1e-5


def test_fuse_never_overwrites(tmp_path, model_dir, data_dir, capsys):
    base = tmp_path / "base"
    shutil.copytree(model_dir, base)
    adapters = tmp_path / "adapters"
    lora_cli.main(train_argv(base, data_dir, adapters))
    capsys.readouterr()
    before = {path.name: path.read_bytes() for path in base.iterdir()}
    existing_file = tmp_path / "model.txt"
    existing_file.write_text("mine")

    into_base = fuse_cli.main(["--model", str(base), "--adapter-path", str(adapters), "--save-path", str(base)])
    base_error = capsys.readouterr().err
    into_file = fuse_cli.main(["--model", str(base), "--adapter-path", str(adapters), "--save-path", str(existing_file)])
    file_error = capsys.readouterr().err

    assert (into_base, into_file) == (1, 1)
    assert f"--save-path {base} already exists and is not empty" in base_error
    assert f"--save-path {existing_file} is a file, not a directory" in file_error
    assert {path.name: path.read_bytes() for path in base.iterdir()} == before
    assert existing_file.read_text() == "mine"


def test_fuse_rejects_state(tmp_path, model_dir, data_dir, capsys):
    adapters = tmp_path / "adapters"
    lora_cli.main(train_argv(model_dir, data_dir, adapters, "--fine-tune-type", "state"))
    capsys.readouterr()

    status = fuse_cli.main(["--model", str(model_dir), "--adapter-path", str(adapters), "--save-path", str(tmp_path / "fused")])

    assert status == 1
    assert "a tuned state has no weights to fuse" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flag, value, key",
    [("--lora-rank", "4", "rank"), ("--lora-scale", "8.5", "scale"), ("--lora-dropout", "0.25", "dropout")],
)
def test_lora_flag_reaches_adapter_config(tmp_path, model_dir, data_dir, flag, value, key):
    adapters = tmp_path / "adapters"

    status = lora_cli.main(train_argv(model_dir, data_dir, adapters, flag, value, "--iters", "1", "--save-every", "1"))

    config = json.loads((adapters / "adapter_config.json").read_text())
    assert status == 0
    assert config["lora_parameters"][key] == float(value)
    assert "lora_rank" not in config


def test_lora_rank_flag_sets_tensor_shapes(tmp_path, model_dir, data_dir):
    adapters = tmp_path / "adapters"

    lora_cli.main(train_argv(model_dir, data_dir, adapters, "--lora-rank", "3", "--iters", "1", "--save-every", "1"))

    lora_a = mx.load(str(adapters / "adapters.safetensors"))["model.layers.0.attn.r_proj.lora_a"]
    assert lora_a.shape == (TINY_CONFIG["hidden_size"], 3)


def test_diverged_run_exits_with_error(tmp_path, model_dir, data_dir, capsys):
    adapters = tmp_path / "adapters"
    # The first update of 1e30 leaves finite weights so large that the
    # second iteration's loss is NaN.
    argv = train_argv(model_dir, data_dir, adapters, "--learning-rate", "1e30", "--save-every", "1", "--iters", "4")

    status = lora_cli.main(argv)

    err = capsys.readouterr().err
    assert status == 1
    assert "training diverged at iteration 2: the training loss is nan" in err
    assert f"the last checkpoint, iteration 1 in {adapters / 'adapters.safetensors'}, is unchanged" in err
    assert "Lower the learning rate (it is 1e+30)" in err
    assert "Traceback" not in err
    weights, metadata = mx.load(str(adapters / "adapters.safetensors"), return_metadata=True)
    assert metadata["iteration"] == "1"
    assert all(mx.isfinite(value).all().item() for value in weights.values())
    assert not (adapters / "0000002_adapters.safetensors").exists()


def test_full_fine_tune_of_float16_model(tmp_path, data_dir):
    model_dir = tmp_path / "model16"
    save_model(model_dir, tiny_model(dtype=mx.float16), dict(TINY_CONFIG))
    adapters = tmp_path / "adapters"

    status = lora_cli.main(train_argv(model_dir, data_dir, adapters, "--fine-tune-type", "full", "--learning-rate", "1e-3"))

    assert status == 0
    saved = mx.load(str(adapters / "adapters.safetensors"))
    assert {value.dtype for value in saved.values()} == {mx.float32}
    assert all(mx.isfinite(value).all().item() for value in saved.values())
    base = load_model(str(model_dir))[0]
    before = base(IDS)
    tuned = load_adapters(base, adapters)
    assert {value.dtype for _, value in tree_flatten(tuned.parameters())} == {mx.float16}
    assert mx.isfinite(tuned(IDS)).all().item()
    assert mx.abs(tuned(IDS) - before).max().item() > 1e-3


def failing_data(data_dir):
    """Records whose World tokens fall outside the tiny model's byte vocabulary."""
    write_jsonl(data_dir / "train.jsonl", [{"text": "alpha beta gamma delta"}] * 4)


def test_failed_run_leaves_adapter_folder(tmp_path, model_dir, data_dir, capsys):
    adapters = tmp_path / "adapters"
    assert lora_cli.main(train_argv(model_dir, data_dir, adapters)) == 0
    before = {path.name: path.read_bytes() for path in adapters.iterdir()}
    failing_data(data_dir)
    capsys.readouterr()

    resume = ["--resume-adapter-file", str(adapters / "adapters.safetensors"), "--iters", "12"]
    status = lora_cli.main(train_argv(model_dir, data_dir, adapters, *resume, "--tokenizer", "world"))

    assert status == 1
    assert "outside the model's vocabulary" in capsys.readouterr().err
    assert {path.name: path.read_bytes() for path in adapters.iterdir()} == before
    load_adapters(load_model(str(model_dir))[0], adapters)


@pytest.mark.parametrize("fine_tune_type", ["lora", "state"])
def test_new_run_into_used_folder_rejected(tmp_path, model_dir, data_dir, capsys, fine_tune_type):
    adapters = tmp_path / "adapters"
    assert lora_cli.main(train_argv(model_dir, data_dir, adapters)) == 0
    before = {path.name: path.read_bytes() for path in adapters.iterdir()}
    capsys.readouterr()

    status = lora_cli.main(train_argv(model_dir, data_dir, adapters, "--fine-tune-type", fine_tune_type))

    err = capsys.readouterr().err
    assert status == 1
    assert "already contains a training run's files (0000003_adapters.safetensors, 0000003_optimizer.safetensors, 0000006_adapters.safetensors and " in err
    assert f"--resume-adapter-file {adapters / 'adapters.safetensors'}" in err
    assert {path.name: path.read_bytes() for path in adapters.iterdir()} == before


def test_resume_into_used_folder_rejected(tmp_path, model_dir, data_dir, capsys):
    first, second = tmp_path / "first", tmp_path / "second"
    for folder in (first, second):
        assert lora_cli.main(train_argv(model_dir, data_dir, folder)) == 0
    capsys.readouterr()

    resume = ["--resume-adapter-file", str(first / "adapters.safetensors"), "--iters", "9"]
    status = lora_cli.main(train_argv(model_dir, data_dir, second, *resume))

    assert status == 1
    assert "already contains a training run's files" in capsys.readouterr().err


def test_adapter_path_that_is_a_file_rejected(tmp_path, model_dir, data_dir, capsys):
    target = tmp_path / "adapters.safetensors"
    target.write_text("mine")

    status = lora_cli.main(train_argv(model_dir, data_dir, target))

    assert status == 1
    assert "adapters.safetensors is a file; name a folder for the adapters" in capsys.readouterr().err
    assert target.read_text() == "mine"


def test_adapter_path_below_a_file_rejected(tmp_path, model_dir, data_dir, capsys):
    (tmp_path / "xfile").write_text("mine")

    status = lora_cli.main(train_argv(model_dir, data_dir, tmp_path / "xfile" / "sub"))

    assert status == 1
    assert "xfile is a file; name a folder for the adapters" in capsys.readouterr().err


def test_resume_adapter_file_folder_rejected(tmp_path, model_dir, data_dir, capsys):
    adapters = tmp_path / "adapters"
    assert lora_cli.main(train_argv(model_dir, data_dir, adapters)) == 0
    capsys.readouterr()

    status = lora_cli.main(train_argv(model_dir, data_dir, adapters, "--resume-adapter-file", str(adapters), "--iters", "9"))

    assert status == 1
    assert "--resume-adapter-file" in capsys.readouterr().err.split("is a folder")[0]


def test_folder_with_other_run_files_rejected(tmp_path, model_dir, data_dir, capsys):
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    (adapters / "loss_history.json").write_text("{}")

    status = lora_cli.main(train_argv(model_dir, data_dir, adapters))

    err = capsys.readouterr().err
    assert status == 1
    assert "already contains a training run's files (loss_history.json)" in err
    assert "--resume-adapter-file" not in err


def test_new_run_into_empty_folder(tmp_path, model_dir, data_dir):
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    (adapters / "notes.txt").write_text("kept")

    assert lora_cli.main(train_argv(model_dir, data_dir, adapters)) == 0
    assert (adapters / "notes.txt").read_text() == "kept"
    assert (adapters / "adapters.safetensors").is_file()


def test_failed_run_creates_no_folder(tmp_path, model_dir, data_dir):
    failing_data(data_dir)

    status = lora_cli.main(train_argv(model_dir, data_dir, tmp_path / "new" / "adapters", "--tokenizer", "world"))

    assert status == 1
    assert not (tmp_path / "new").exists()


def test_resume_with_iters_not_above_saved(tmp_path, model_dir, data_dir, capsys):
    adapters = tmp_path / "adapters"
    lora_cli.main(train_argv(model_dir, data_dir, adapters))
    before = {path.name: path.read_bytes() for path in adapters.iterdir()}
    capsys.readouterr()

    status = lora_cli.main(
        train_argv(model_dir, data_dir, adapters, "--resume-adapter-file", str(adapters / "adapters.safetensors"))
    )

    err = capsys.readouterr().err
    assert status == 1
    assert "--iters 6 is not above iteration 6" in err
    assert "pass --iters 12 to train 6 more" in err
    assert {path.name: path.read_bytes() for path in adapters.iterdir()} == before


def test_help_explains_iters_and_full(capsys):
    with pytest.raises(SystemExit):
        lora_cli.main(["--help"])

    text = " ".join(capsys.readouterr().out.split())
    assert "this counts the iterations already done" in text
    assert "not the embedding or the output head" in text


def interrupt_at(monkeypatch, iteration):
    """Make the trainer raise KeyboardInterrupt, as Ctrl-C does, when it reports ``iteration``."""
    from rwkv_mlx.tuner import trainer

    report = trainer._TrainingRun.report

    def interrupting_report(run, reported):
        report(run, reported)
        if reported == iteration:
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer._TrainingRun, "report", interrupting_report)


def test_interrupted_state_tuning_keeps_state_file(tmp_path, model_dir, data_dir, capsys, monkeypatch):
    adapters = tmp_path / "adapters"
    interrupt_at(monkeypatch, 3)
    argv = train_argv(model_dir, data_dir, adapters, "--fine-tune-type", "state", "--steps-per-report", "1", "--save-every", "2")

    status = lora_cli.main(argv)

    err = capsys.readouterr().err
    assert status == 130
    assert f"--resume-adapter-file {adapters / 'adapters.safetensors'}" in err
    assert f"--load-state {adapters / 'state.safetensors'}" in err
    base = load_model(str(model_dir))[0]
    cache, metadata = load_state(adapters / "state.safetensors", base)
    tuned = load_adapters(load_model(str(model_dir))[0], adapters)
    assert metadata["tokenizer"] == "bytes"
    assert mx.abs(base(IDS, cache=cache) - tuned(IDS)).max().item() <= 1e-5


def test_interrupt_before_first_save(tmp_path, model_dir, data_dir, capsys, caplog, monkeypatch):
    adapters = tmp_path / "adapters"
    interrupt_at(monkeypatch, 1)

    with caplog.at_level(logging.WARNING):
        status = lora_cli.main(train_argv(model_dir, data_dir, adapters, "--steps-per-report", "1"))

    err = capsys.readouterr().err + caplog.text
    assert status == 130
    assert err.count("nothing was saved") == 1
    assert "--resume-adapter-file" not in err
    assert not adapters.exists()
