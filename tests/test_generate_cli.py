"""``python -m rwkv_mlx.generate``: output, flags, state files, chat and errors."""

import io
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from random_models import TINY_CONFIG, random_model
from rwkv_mlx import loading
from rwkv_mlx.generate import Session, main, stream_generate
from rwkv_mlx.io.state import save_state
from rwkv_mlx.tokenizer import load_tokenizer

GREEDY = ["--temp", "0", "--presence-penalty", "0", "--frequency-penalty", "0", "--verbose", "False"]


@pytest.fixture(scope="module")
def model():
    return random_model(seed=11)


@pytest.fixture(scope="module")
def model_dir(model, tmp_path_factory):
    directory = tmp_path_factory.mktemp("model")
    loading.save_model(directory, model, TINY_CONFIG)
    return directory


def cli(capsys, *args, stdin=None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def api_text(model, prompt, max_tokens, **kwargs):
    tokenizer = load_tokenizer("bytes")
    return "".join(r.text for r in stream_generate(model, tokenizer, prompt, max_tokens, **kwargs))


def test_greedy_output_matches_api(model, model_dir, capsys):
    code, out, _ = cli(capsys, "--model", model_dir, "--prompt", "hello", "--max-tokens", 20, *GREEDY)

    assert code == 0
    assert out == api_text(model, "hello", 20) + "\n"


def test_verbose_prints_statistics(model_dir, capsys):
    code, out, _ = cli(capsys, "--model", model_dir, "--prompt", "hello", "--max-tokens", 7)

    assert code == 0
    assert "Prompt: 5 tokens, " in out
    assert "Generation: 7 tokens, " in out
    assert "Peak memory: " in out


def test_prompt_from_stdin(model_dir, capsys, monkeypatch):
    _, expected, _ = cli(capsys, "--model", model_dir, "--prompt", "from stdin", "--max-tokens", 8, *GREEDY)
    code, out, _ = cli(
        capsys, "--model", model_dir, "--prompt", "-", "--max-tokens", 8, *GREEDY,
        stdin="from stdin", monkeypatch=monkeypatch,
    )  # fmt: skip

    assert code == 0
    assert out == expected


def test_ban_and_stop(model, model_dir, capsys):
    plain = api_text(model, "hello", 20)
    banned = plain.encode()[0]
    code, out, _ = cli(capsys, "--model", model_dir, "--prompt", "hello", "--max-tokens", 20, "--ban-token", banned, *GREEDY)
    assert code == 0
    assert banned not in out.encode()[:-1]

    stop = plain[4:6]
    code, out, _ = cli(capsys, "--model", model_dir, "--prompt", "hello", "--max-tokens", 20, "--stop", stop, *GREEDY)
    assert code == 0
    assert out == plain.split(stop)[0] + "\n"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--max-tokens", "-1"], "--max-tokens must be 0 or more"),
        (["--top-p", "0"], "--top-p must be in (0, 1]"),
        (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
        (["--temp", "-0.5"], "--temp must be a finite number, 0 or more"),
        (["--top-k", "-2"], "--top-k must be 0 or more"),
        (["--penalty-decay", "1.2"], "--penalty-decay must be in [0, 1]"),
        (["--seed", "-1"], "--seed must be in [0, 2**64), got -1"),
        (["--seed", str(2**64)], "--seed must be in [0, 2**64)"),
    ],
)
def test_invalid_flags(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "unused", *flags])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_save_state_folder_missing(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "unused", "--save-state", str(tmp_path / "absent" / "s.state")])
    assert exit_info.value.code == 2
    assert "the folder does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["", "new/"])
def test_save_state_into_a_folder(tmp_path, capsys, name):
    folder = f"{tmp_path}/{name}" if name else str(tmp_path)

    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "unused", "--save-state", folder])

    assert exit_info.value.code == 2
    assert f"--save-state {folder} names a folder; name a file" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("chat", [False, True])
def test_interrupt_names_what_was_saved(model_dir, tmp_path, capsys, monkeypatch, chat):
    state_file = tmp_path / "s.safetensors"
    replies = []

    def interrupted_reply(session, prompt, max_tokens, stop=()):
        # The first reply completes (and saves) only in chat mode; Ctrl-C comes during the next.
        if chat and not replies:
            replies.append(prompt)
            return original_run(session, prompt, 2, stop)
        raise KeyboardInterrupt

    original_run = Session.run
    monkeypatch.setattr(Session, "run", interrupted_reply)
    argv = ["--model", model_dir, "--save-state", state_file, "--max-tokens", 2]
    code, _, err = cli(capsys, *argv, *(["--chat"] if chat else ["--prompt", "hi"]), stdin="hi\nagain\n", monkeypatch=monkeypatch)

    assert code == 130
    if chat:
        assert f"interrupted; {state_file} contains the state after the last completed reply" in err
        assert state_file.exists()
    else:
        assert f"interrupted before a reply completed; {state_file} was not written" in err
        assert not state_file.exists()


def test_missing_model(tmp_path, capsys):
    code, _, err = cli(capsys, "--model", tmp_path / "no-such-model.pth")

    assert code == 1
    assert "error:" in err
    assert "no-such-model.pth" in err


def test_no_model_and_no_default(tmp_path, capsys, monkeypatch):
    monkeypatch.delattr(loading, "DEFAULT_MODEL", raising=False)
    try:
        from rwkv_mlx import default_model
    except ImportError:
        pass
    else:
        monkeypatch.setattr(default_model, "DEFAULT_MODEL_PATH", tmp_path / "not-installed")
    code, _, err = cli(capsys, "--prompt", "hi")

    assert code == 1
    assert "no --model given" in err


def test_default_model_used(model_dir, capsys, monkeypatch):
    monkeypatch.setattr(loading, "DEFAULT_MODEL", str(model_dir), raising=False)
    try:
        from rwkv_mlx import default_model
    except ImportError:
        pass
    else:
        monkeypatch.setattr(default_model, "DEFAULT_MODEL_PATH", model_dir)
    code, out, _ = cli(capsys, "--prompt", "hello", "--max-tokens", 5, *GREEDY)
    _, expected, _ = cli(capsys, "--model", model_dir, "--prompt", "hello", "--max-tokens", 5, *GREEDY)

    assert code == 0
    assert out == expected


def test_out_of_vocabulary_ban(model_dir, capsys):
    code, _, err = cli(capsys, "--model", model_dir, "--ban-token", 256)

    assert code == 1
    assert "banned token id 256" in err


def test_bad_state_files(model_dir, tmp_path, capsys):
    unreadable = tmp_path / "unreadable.state"
    unreadable.write_bytes(b"\x00" * 40)
    code, _, err = cli(capsys, "--model", model_dir, "--load-state", unreadable)
    assert code == 1
    assert "unreadable.state: not a readable state file" in err

    other = random_model(seed=12)
    cache = other.make_cache()
    other(mx.array([[1, 2, 3]]), cache=cache)
    foreign = tmp_path / "foreign.state"
    save_state(foreign, cache, other, tokenizer="bytes")
    code, _, err = cli(capsys, "--model", model_dir, "--load-state", foreign)
    assert code == 1
    assert "different model" in err

    code, _, err = cli(capsys, "--model", model_dir, "--load-state", tmp_path / "absent.state")
    assert code == 1
    assert "absent.state: state file not found" in err


def test_empty_prompt_after_state(model_dir, tmp_path, capsys):
    state = tmp_path / "s.state"
    cli(capsys, "--model", model_dir, "--prompt", "context", "--max-tokens", 0, "--save-state", state)
    code, _, err = cli(capsys, "--model", model_dir, "--load-state", state, "--prompt", "")

    assert code == 1
    assert "the prompt is empty" in err


def test_chat_turns_equal_one_run(model, model_dir, tmp_path, capsys, monkeypatch):
    tokenizer = load_tokenizer("bytes")
    turns = ["User: hi there\n\nAssistant:", "User: tell me more\n\nAssistant:"]

    # Turn 1, then turn 2 computed from scratch over the whole conversation.
    cache = model.make_cache()
    first = list(stream_generate(model, tokenizer, turns[0], 12, stop=["\n\n"], prompt_cache=cache))
    reply_tokens = [r.token for r in first]
    separator = b"" if first[-1].finish_reason == "stop" else b"\n\n"
    history = list(turns[0].encode()) + reply_tokens + list(separator + turns[1].encode())
    second = list(stream_generate(model, tokenizer, history, 12, stop=["\n\n"]))

    state = tmp_path / "chat.state"
    code, out, _ = cli(
        capsys, "--model", model_dir, "--chat", "--max-tokens", 12, "--save-state", state, *GREEDY,
        stdin="hi there\ntell me more\n", monkeypatch=monkeypatch,
    )  # fmt: skip

    assert code == 0
    assert "Assistant:" + "".join(r.text for r in first) + "\n" in out
    assert "Assistant:" + "".join(r.text for r in second) + "\n" in out
    assert state.is_file()


def run_module(*args):
    command = [sys.executable, "-m", "rwkv_mlx.generate", *[str(a) for a in args]]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_saved_state_continues_in_new_process(model_dir, tmp_path, capsys):
    # Default sampling with a seed, so penalties and random draws must also agree.
    state = tmp_path / "prompt.state"
    sampling = ["--seed", 3, "--verbose", "False", "--max-tokens", 24]
    code, _, _ = cli(capsys, "--model", model_dir, "--prompt", "The first part, ", "--max-tokens", 0, "--save-state", state)
    assert code == 0
    continued = run_module("--model", model_dir, "--load-state", state, "--prompt", "and the rest", *sampling)
    _, uninterrupted, _ = cli(capsys, "--model", model_dir, "--prompt", "The first part, and the rest", *sampling)

    assert continued == uninterrupted
    assert len(continued) > 1


# The tiny rwkv.cpp RWKV-7 model in rwkv.cpp's .bin format.


def test_rwkv_cpp_bin_model(rwkv_cpp_tiny, tmp_path, capsys):
    model_file = rwkv_cpp_tiny / "tiny-rwkv-7v0-834K-FP32.bin"
    expected = np.fromfile(rwkv_cpp_tiny / "expected-logits-7v0-834K.bin", dtype=np.float32)
    code, out, _ = cli(capsys, "--model", model_file, "--prompt", '"in', "--max-tokens", 1, *GREEDY)

    assert code == 0
    assert out == chr(int(np.argmax(expected))) + "\n"

    state = tmp_path / "tiny.state"
    code, _, _ = cli(capsys, "--model", model_file, "--prompt", "In the", "--max-tokens", 0, "--save-state", state)
    assert code == 0
    code, continued, _ = cli(capsys, "--model", model_file, "--load-state", state, "--prompt", " end", "--max-tokens", 16, *GREEDY)
    _, uninterrupted, _ = cli(capsys, "--model", model_file, "--prompt", "In the end", "--max-tokens", 16, *GREEDY)
    assert code == 0
    assert continued == uninterrupted
