"""The training loop: batching, learning, checkpoints, resuming and interruption."""

import gc
import json
import logging

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten

from random_models import random_older_model
from rwkv_mlx.io.state import load_state
from rwkv_mlx.tuner import (
    AdapterError,
    TrainingArgs,
    TrainingError,
    TrainingInterrupted,
    evaluate,
    iterate_batches,
    load_adapters,
    load_tuned_cache,
    make_example,
    prepare_for_training,
    resume_from,
    train,
)
from rwkv_mlx.tuner.trainer import batch_loss_and_grad, collate, earlier_history, optimizer_file_for, plot_losses
from tuner_helpers import older_config, older_model, random_batch, tiny_model


def pattern_examples(count, start=40, seed=0):
    """Sequences that repeat a 12-token pattern: quick to learn."""
    rng = np.random.default_rng(seed)
    return [make_example(np.tile(np.arange(start, start + 12), 12)[: int(rng.integers(20, 60))]) for _ in range(count)]


def quick_args(tmp_path=None, **overrides):
    options = dict(
        batch_size=2,
        iters=6,
        steps_per_report=1,
        steps_per_eval=1000,
        steps_per_save=2,
        learning_rate=1e-2,
        adapter_file=str(tmp_path / "adapters.safetensors") if tmp_path else None,
    )
    options.update(overrides)
    return TrainingArgs(**options)


def test_collate_pads_to_multiple():
    batch = collate([make_example([1, 2, 3]), make_example(list(range(40)))])

    assert batch.tokens.shape == (2, 65)
    assert batch.tokens[0, :4].tolist() == [1, 2, 3, 0]
    assert batch.loss_mask[0].sum() == 2
    assert batch.trained_tokens == 2 + 39


def test_batches_group_similar_lengths():
    examples = [make_example(list(range(1, n + 1))) for n in (5, 50, 6, 51, 7, 52)]

    batches = list(iterate_batches(examples, batch_size=3, seed=None))

    assert [b.tokens.shape for b in batches] == [(3, 33), (3, 65)]


def test_batch_order_is_seeded_and_skippable():
    examples = [make_example(list(range(1, n + 2))) for n in range(0, 80, 5)]

    first = [b.tokens.tolist() for b in iterate_batches(examples, 2, seed=3)]
    again = [b.tokens.tolist() for b in iterate_batches(examples, 2, seed=3)]
    skipped = [b.tokens.tolist() for b in iterate_batches(examples, 2, seed=3, skip=3)]

    assert first == again
    assert skipped == first[3:]


def test_too_few_records_rejected():
    with pytest.raises(ValueError, match="the data has 1 record, fewer than the batch size 2"):
        next(iterate_batches([make_example([1, 2])], 2))


def test_training_lowers_validation_loss():
    model = prepare_for_training(tiny_model(), "lora")
    valid = pattern_examples(4, seed=9)

    history = train(model, pattern_examples(12), valid, quick_args(iters=20, steps_per_eval=10))

    losses = [loss for _, loss in history.valid]
    assert [it for it, _ in history.valid] == [0, 10, 20]
    assert losses[-1] < losses[0] - 1.0


def test_long_records_train_in_chunks():
    # Records of up to 60 tokens, trained 16 tokens at a time with the state
    # carried between chunks.
    model = prepare_for_training(tiny_model(), "state")
    valid = pattern_examples(4, seed=9)

    history = train(model, pattern_examples(12), valid, quick_args(iters=12, steps_per_eval=12, max_seq_length=16, learning_rate=5e-2))

    assert history.valid[-1][1] < history.valid[0][1] - 0.3


def test_evaluate_matches_mean_token_loss():
    model = tiny_model()
    examples = pattern_examples(5)

    loss = evaluate(model, examples, batch_size=2)

    total, count = 0.0, 0
    for example in examples:
        logits = model(mx.array(example.tokens[None, :-1]))
        targets = mx.array(example.tokens[None, 1:])
        losses = -mx.take_along_axis(logits - mx.logsumexp(logits, axis=-1, keepdims=True), targets[..., None], axis=-1)
        total += losses.sum().item()
        count += len(example) - 1
    assert abs(loss - total / count) <= 1e-4


def test_out_of_vocabulary_token_rejected():
    with pytest.raises(ValueError, match="token id 300 is outside the model's vocabulary of 256"):
        evaluate(tiny_model(), [make_example([1, 300, 2])], batch_size=1)


def test_example_without_trained_tokens_rejected():
    examples = pattern_examples(4) + [make_example([1, 2, 3], [False, False, False])]

    with pytest.raises(ValueError, match="example 4: no token of the example counts in the loss"):
        train(prepare_for_training(tiny_model(), "lora"), examples, None, quick_args())


def test_nothing_to_train_rejected():
    with pytest.raises(ValueError, match="no trainable parameters"):
        train(tiny_model().freeze(), pattern_examples(4), None, quick_args())


def test_checkpoints_saved_every_n_steps(tmp_path):
    model = prepare_for_training(tiny_model(), "lora")

    train(model, pattern_examples(8), None, quick_args(tmp_path, iters=5))

    names = sorted(p.name for p in tmp_path.iterdir())
    assert "0000002_adapters.safetensors" in names
    assert "0000004_adapters.safetensors" in names
    assert "0000005_adapters.safetensors" in names
    assert "0000004_optimizer.safetensors" in names
    _, metadata = mx.load(str(tmp_path / "adapters.safetensors"), return_metadata=True)
    assert metadata["iteration"] == "5"
    history = json.loads((tmp_path / "loss_history.json").read_text())
    assert [it for it, _ in history["train"]] == [1, 2, 3, 4, 5]


def test_resume_continues_like_one_run(tmp_path):
    data = pattern_examples(10)
    mx.random.seed(1)
    straight = prepare_for_training(tiny_model(), "lora")
    train(straight, data, None, quick_args(tmp_path / "straight", iters=6, steps_per_save=3))

    mx.random.seed(1)
    first = prepare_for_training(tiny_model(), "lora")
    train(first, data, None, quick_args(tmp_path / "first", iters=3, steps_per_save=3))

    resumed = prepare_for_training(tiny_model(), "lora")
    optimizer = optim.Adam(learning_rate=1e-2)
    start = resume_from(tmp_path / "first" / "adapters.safetensors", resumed, optimizer)
    train(resumed, data, None, quick_args(tmp_path / "resumed", iters=6, start_iteration=start), optimizer=optimizer)

    assert start == 4
    for (name, a), (_, b) in zip(tree_flatten(straight.trainable_parameters()), tree_flatten(resumed.trainable_parameters())):
        assert mx.abs(a - b).max().item() <= 1e-6, name


def test_second_run_rejects_used_folder(tmp_path):
    data = pattern_examples(4)
    train(prepare_for_training(tiny_model(), "lora"), data, None, quick_args(tmp_path, iters=2, steps_per_save=2))
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}

    with pytest.raises(ValueError, match="already contains a training run's files .*train into a new folder"):
        train(prepare_for_training(tiny_model(), "lora"), data, None, quick_args(tmp_path, iters=2))
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before


def test_adapter_file_folder_rejected(tmp_path):
    args = quick_args(tmp_path, iters=2)
    args.adapter_file = str(tmp_path)

    with pytest.raises(ValueError, match="names a folder; name the weights file, such as .*adapters.safetensors"):
        train(prepare_for_training(tiny_model(), "lora"), pattern_examples(4), None, args)
    assert list(tmp_path.iterdir()) == []


def test_zero_batch_size_rejected(tmp_path):
    args = quick_args(tmp_path, iters=2)
    args.batch_size = 0
    model = prepare_for_training(tiny_model(), "lora")

    with pytest.raises(ValueError, match="the batch size must be at least 1, got 0"):
        train(model, pattern_examples(4), None, args)
    with pytest.raises(ValueError, match="the batch size must be at least 1, got 0"):
        evaluate(model, pattern_examples(4), batch_size=0)


def test_evaluate_empty_data_rejected():
    with pytest.raises(ValueError, match="the evaluation data has no records"):
        evaluate(tiny_model(), [], batch_size=2)


@pytest.mark.parametrize("rate", [1e-2, 1e-4])
def test_resume_keeps_given_learning_rate(tmp_path, rate):
    data = pattern_examples(6)
    first = prepare_for_training(tiny_model(), "lora")
    train(first, data, None, quick_args(tmp_path, iters=2, steps_per_save=2), optimizer=optim.Adam(learning_rate=1e-2))

    resumed = prepare_for_training(tiny_model(), "lora")
    optimizer = optim.Adam(learning_rate=rate)
    resume_from(tmp_path / "adapters.safetensors", resumed, optimizer)

    assert optimizer.state["step"].item() == 2
    assert optimizer.learning_rate.item() == pytest.approx(rate)


def test_resume_in_same_folder_keeps_loss_history(tmp_path):
    data = pattern_examples(8)
    model = prepare_for_training(tiny_model(), "lora")
    train(model, data, None, quick_args(tmp_path, iters=4, steps_per_save=2))
    # A later iteration in the file, as an interrupted run after its last save leaves it.
    history_file = tmp_path / "loss_history.json"
    recorded = json.loads(history_file.read_text())
    recorded["train"].append([5, 9.9])
    history_file.write_text(json.dumps(recorded))

    resumed = prepare_for_training(tiny_model(), "lora")
    optimizer = optim.Adam(learning_rate=1e-2)
    start = resume_from(tmp_path / "adapters.safetensors", resumed, optimizer)
    train(resumed, data, None, quick_args(tmp_path, iters=6, steps_per_save=2, start_iteration=start), optimizer=optimizer)

    history = json.loads(history_file.read_text())
    assert start == 5
    assert [it for it, _ in history["train"]] == [1, 2, 3, 4, 5, 6]
    assert history["train"][4][1] != 9.9


def test_unreadable_loss_history_starts_fresh(tmp_path, caplog):
    (tmp_path / "loss_history.json").write_text("{not json")

    history = earlier_history(tmp_path / "loss_history.json", 3)

    assert history.train == []
    assert "cannot read the earlier losses" in caplog.text


def test_resume_rejects_other_mode(tmp_path):
    model = prepare_for_training(tiny_model(), "lora")
    train(model, pattern_examples(4), None, quick_args(tmp_path, iters=2))

    with pytest.raises(ValueError, match="is not trained in this run"):
        resume_from(tmp_path / "adapters.safetensors", prepare_for_training(tiny_model(), "state"))


class InterruptAt:
    """A training callback that raises KeyboardInterrupt at one iteration, like Ctrl-C."""

    def __init__(self, iteration):
        self.iteration = iteration

    def on_train_loss_report(self, info):
        if info["iteration"] == self.iteration:
            raise KeyboardInterrupt

    def on_val_loss_report(self, info):
        pass


def test_interrupt_keeps_last_checkpoint(tmp_path, caplog):
    model = prepare_for_training(tiny_model(), "lora")
    saved_at_two = None

    with caplog.at_level(logging.WARNING), pytest.raises(KeyboardInterrupt):
        train(model, pattern_examples(8), None, quick_args(tmp_path, iters=10), training_callback=InterruptAt(3))

    weights, metadata = mx.load(str(tmp_path / "adapters.safetensors"), return_metadata=True)
    saved_at_two = mx.load(str(tmp_path / "0000002_adapters.safetensors"))
    assert metadata["iteration"] == "2"
    assert all(mx.array_equal(weights[name], saved_at_two[name]) for name in weights)
    assert "interrupted at iteration 3" in caplog.text
    assert not list(tmp_path.glob(".*partial"))


def test_optimizer_file_names():
    assert optimizer_file_for("a/adapters.safetensors").name == "optimizer.safetensors"
    assert optimizer_file_for("a/0000010_adapters.safetensors").name == "0000010_optimizer.safetensors"


def test_loss_plot(tmp_path, caplog, monkeypatch):
    from rwkv_mlx.tuner import TrainingHistory, trainer

    monkeypatch.setattr(trainer, "_warned_no_matplotlib", False)
    history = TrainingHistory(train=[(1, 3.0), (2, 2.5)], valid=[(0, 3.2), (2, 2.6)])
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with caplog.at_level(logging.WARNING):
            assert plot_losses(history, tmp_path / "loss.png") is False
        assert "matplotlib is not installed" in caplog.text
        assert not (tmp_path / "loss.png").exists()
    else:
        assert plot_losses(history, tmp_path / "loss.png") is True
        assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_grad_checkpoint_lowers_peak_memory():
    import mlx.nn as nn

    from random_models import random_model
    from rwkv_mlx.tuner.trainer import batch_loss_and_grad, sequence_loss

    config = dict(
        model_type="rwkv7", vocab_size=256, hidden_size=128, intermediate_size=512, norm_eps=1e-5, head_dim=64,
        num_hidden_layers=4, a_low_rank_dim=16, v_low_rank_dim=16, gate_low_rank_dim=16, decay_low_rank_dim=16,
    )  # fmt: skip
    model = prepare_for_training(random_model(config), "lora")
    value_and_grad = nn.value_and_grad(model, sequence_loss)
    batch = collate([make_example(np.random.default_rng(i).integers(1, 256, 257)) for i in range(2)])
    peaks = {}
    for checkpoint in (False, True):
        # Garbage cycles of earlier tests, freed during the step, would lower the baseline.
        gc.collect()
        mx.clear_cache()
        mx.reset_peak_memory()
        baseline = mx.get_active_memory()
        batch_loss_and_grad(model, batch, TrainingArgs(max_seq_length=256, grad_checkpoint=checkpoint), value_and_grad)
        peaks[checkpoint] = mx.get_peak_memory() - baseline

    assert peaks[True] < 0.7 * peaks[False]


def test_forward_hidden_equals_model():
    from rwkv_mlx.tuner.trainer import forward_hidden, initial_states

    model = tiny_model()
    ids = mx.array(np.random.default_rng(3).integers(1, 256, (2, 40)))
    cache = model.make_cache()
    expected = model.model(ids, cache=cache)

    hidden, states = forward_hidden(model, ids, initial_states(model, 2))

    assert mx.abs(hidden - expected).max().item() <= 1e-5
    for layer_cache, layer_state in zip(cache, states):
        for entry in range(3):
            assert mx.abs(layer_cache[entry] - layer_state[entry]).max().item() <= 1e-5


class PoisonAt:
    """A training callback that sets a LoRA weight to NaN when ``iteration`` is reported."""

    def __init__(self, model, iteration):
        self.model = model
        self.iteration = iteration

    def on_train_loss_report(self, info):
        if info["iteration"] == self.iteration:
            layer = self.model.model.layers[0].attn.r_proj
            layer.lora_b = mx.full(layer.lora_b.shape, float("nan"))

    def on_val_loss_report(self, info):
        pass


def test_nan_loss_stops_before_saving(tmp_path):
    model = prepare_for_training(tiny_model(), "lora")

    with pytest.raises(TrainingError) as error:
        train(model, pattern_examples(8), None, quick_args(tmp_path, iters=10), training_callback=PoisonAt(model, 3))

    message = str(error.value)
    assert "training diverged at iteration 4: the training loss is nan" in message
    assert f"the last checkpoint, iteration 2 in {tmp_path / 'adapters.safetensors'}, is unchanged" in message
    assert "Lower the learning rate (it is 0.01)" in message
    assert "--dtype" not in message
    _, metadata = mx.load(str(tmp_path / "adapters.safetensors"), return_metadata=True)
    assert metadata["iteration"] == "2"
    assert not (tmp_path / "0000004_adapters.safetensors").exists()


def test_non_finite_update_stops_training(tmp_path):
    # Unfrozen by hand, without prepare_for_training's cast to float32:
    # Adam's epsilon of 1e-8 is 0 in float16, so zero gradients give 0/0.
    model = tiny_model(dtype=mx.float16)
    model.freeze()
    model.model.layers[1].unfreeze()

    with pytest.raises(TrainingError) as error:
        train(model, pattern_examples(8), None, quick_args(tmp_path / "adapters", iters=4, learning_rate=1e-5))

    message = str(error.value)
    assert "training diverged at iteration 1: the optimizer update made some weights NaN or infinite" in message
    assert "the model's trained weights in memory are unusable now (reload the model" in message
    assert "no checkpoint of this run was saved" in message
    assert "python -m rwkv_mlx.convert --dtype float32, or --dtype bfloat16" in message
    assert not (tmp_path / "adapters").exists()


def test_non_finite_learning_rate_rejected(tmp_path):
    args = quick_args(tmp_path, iters=2, learning_rate=float("nan"))

    with pytest.raises(ValueError, match="the learning rate must be a finite number, 0 or more, got nan"):
        train(prepare_for_training(tiny_model(), "lora"), pattern_examples(4), None, args)


@pytest.mark.parametrize("version", ["7", "4", "5.2", "6"])
def test_full_fine_tune_float16_stays_finite(tmp_path, version):
    base = tiny_model(dtype=mx.float16) if version == "7" else older_model(version, dtype=mx.float16)
    model = prepare_for_training(base, "full")

    history = train(model, pattern_examples(8), None, quick_args(tmp_path, iters=3, learning_rate=1e-3))

    assert all(np.isfinite(loss) for _, loss in history.train)
    assert {value.dtype for _, value in tree_flatten(model.trainable_parameters())} == {mx.float32}
    assert model.model.embeddings.weight.dtype == mx.float16


def test_float32_layers_after_rescaled_float16():
    # Three layers, the residual stream halved after each in float16; the
    # last two train in float32, and must compute what the float32 model does.
    config = {**older_config("5.2"), "num_hidden_layers": 3, "rescale_every": 1}
    batch = random_batch(batch_size=2, length=40, seed=1)
    expected, _, _ = batch_loss_and_grad(random_older_model("5.2", config, seed=2), batch, TrainingArgs())
    model = prepare_for_training(random_older_model("5.2", config, seed=2, dtype=mx.float16), "full", num_layers=2)

    found, _, _ = batch_loss_and_grad(model, batch, TrainingArgs())

    assert model.model.layers[0].attn_norm.weight.dtype == mx.float16
    assert model.model.layers[1].attn_norm.weight.dtype == mx.float32
    assert abs(found - expected) <= 1e-2


def test_float32_layers_after_float16_in_model_call():
    # The model's own call, as generate makes it, agrees with the float32 model too.
    config = {**older_config("5.2"), "num_hidden_layers": 3, "rescale_every": 1}
    inputs = mx.array(np.random.default_rng(3).integers(0, 256, (1, 24)))
    expected = random_older_model("5.2", config, seed=2)(inputs)
    model = prepare_for_training(random_older_model("5.2", config, seed=2, dtype=mx.float16), "full", num_layers=2)

    found = model(inputs)

    assert found.dtype == mx.float32
    assert mx.abs(found - expected).max().item() <= 0.05 * mx.abs(expected).max().item()


def test_start_after_last_iteration_rejected(tmp_path):
    model = prepare_for_training(tiny_model(), "lora")

    with pytest.raises(ValueError, match="start_iteration 7 is above iters 6, so there is nothing to train"):
        train(model, pattern_examples(4), None, quick_args(tmp_path, iters=6, start_iteration=7))

    assert not list(tmp_path.iterdir())


def test_too_few_records_rejected_before_writing(tmp_path):
    model = prepare_for_training(tiny_model(), "lora")

    with pytest.raises(ValueError, match="the training data has 1 record, fewer than the batch size 2"):
        train(model, pattern_examples(1), None, quick_args(tmp_path / "adapters"), adapter_config={"fine_tune_type": "lora"})

    assert not (tmp_path / "adapters").exists()


def test_adapter_config_written_with_first_save(tmp_path):
    model = prepare_for_training(tiny_model(), "lora")

    with pytest.raises(KeyboardInterrupt):
        train(model, pattern_examples(8), None, quick_args(tmp_path / "a"), training_callback=InterruptAt(1), adapter_config={"x": 1})
    train(model, pattern_examples(8), None, quick_args(tmp_path / "b", iters=2), adapter_config={"x": 1})

    assert not (tmp_path / "a").exists()
    config = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    assert config == {"x": 1, "model_type": "rwkv7", "rwkv_version": "7"}


def test_state_file_saved_with_checkpoints(tmp_path):
    model = prepare_for_training(tiny_model(), "state")
    metadata = {"fine_tune_type": "state", "tokenizer": "bytes"}

    with pytest.raises(TrainingInterrupted) as interrupt:
        train(model, pattern_examples(8), None, quick_args(tmp_path, iters=10), training_callback=InterruptAt(3), metadata=metadata)

    assert interrupt.value.last_saved_iteration == 2
    assert interrupt.value.state_file == tmp_path / "state.safetensors"
    cache, state_metadata = load_state(tmp_path / "state.safetensors", tiny_model())
    expected = load_tuned_cache(tiny_model(), tmp_path / "0000002_adapters.safetensors")
    assert state_metadata["tokenizer"] == "bytes"
    for layer_cache, expected_cache in zip(cache, expected):
        assert mx.array_equal(layer_cache[1], expected_cache[1])


def test_interrupt_before_first_save(tmp_path, caplog):
    model = prepare_for_training(tiny_model(), "lora")

    with caplog.at_level(logging.WARNING), pytest.raises(TrainingInterrupted) as interrupt:
        train(model, pattern_examples(8), None, quick_args(tmp_path, iters=10), training_callback=InterruptAt(1))

    assert interrupt.value.last_saved_iteration == 0
    assert "before the first checkpoint, so nothing was saved" in caplog.text


def test_resume_records_and_checks_version(tmp_path):
    model = prepare_for_training(older_model("5.2"), "lora")
    train(model, pattern_examples(4), None, quick_args(tmp_path, iters=2))
    _, metadata = mx.load(str(tmp_path / "adapters.safetensors"), return_metadata=True)

    with pytest.raises(AdapterError, match=r"the adapters are for RWKV-5\.2 \(rwkv5\), but the model is RWKV-6 \(rwkv6\)"):
        resume_from(tmp_path / "adapters.safetensors", prepare_for_training(older_model("6"), "lora"))

    assert metadata["model_type"] == "rwkv5"
    assert metadata["rwkv_version"] == "5.2"
    assert resume_from(tmp_path / "adapters.safetensors", prepare_for_training(older_model("5.2"), "lora")) == 3


def test_resume_full_float16_keeps_float32(tmp_path):
    model = prepare_for_training(tiny_model(dtype=mx.float16), "full")
    config = {"fine_tune_type": "full", "num_layers": -1}
    train(model, pattern_examples(4), None, quick_args(tmp_path, iters=2, learning_rate=1e-3), adapter_config=config)
    resumed = prepare_for_training(tiny_model(dtype=mx.float16), "full")

    resume_from(tmp_path / "adapters.safetensors", resumed, optim.Adam(learning_rate=1e-3))

    for (name, a), (_, b) in zip(tree_flatten(model.trainable_parameters()), tree_flatten(resumed.trainable_parameters())):
        assert b.dtype == mx.float32, name
        assert mx.array_equal(a, b), name
    loaded = load_adapters(tiny_model(dtype=mx.float16), tmp_path)
    assert loaded.model.layers[0].attn_norm.weight.dtype == mx.float16


def test_missing_matplotlib_warns_once(tmp_path, caplog, monkeypatch):
    import sys

    from rwkv_mlx.tuner import TrainingHistory, trainer

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setattr(trainer, "_warned_no_matplotlib", False)
    history = TrainingHistory(train=[(1, 3.0)])

    with caplog.at_level(logging.WARNING):
        assert plot_losses(history, tmp_path / "loss.png") is False
        assert plot_losses(history, tmp_path / "loss.png") is False

    assert caplog.text.count("matplotlib is not installed") == 1


@pytest.mark.parametrize("training_type", ["lora", "state"])
def test_training_step_projects_once(training_type, monkeypatch):
    # With the head frozen, the training step takes the gradient of the
    # head's input in the forward pass: one product with the head per chunk
    # of logits, not a second one in the backward pass. The loss alone
    # (validation) needs no gradient product at all.
    import mlx.nn as nn

    from rwkv_mlx.tuner import losses
    from rwkv_mlx.tuner.trainer import sequence_loss

    model = prepare_for_training(tiny_model(), training_type)
    batch = random_batch(batch_size=2, length=30, seed=5)
    args = TrainingArgs(max_seq_length=64, loss_chunk_size=16)
    chunks = -(-int(batch.loss_mask[:, 1:].sum()) // 16)
    counts = {"forward": 0, "back": 0}
    project, project_back = losses._project, losses._project_back

    def counted(name, function):
        def wrapper(*args):
            counts[name] += 1
            return function(*args)

        return wrapper

    monkeypatch.setattr(losses, "_project", counted("forward", project))
    monkeypatch.setattr(losses, "_project_back", counted("back", project_back))

    batch_loss_and_grad(model, batch, args, nn.value_and_grad(model, sequence_loss))
    assert counts == {"forward": chunks, "back": chunks}

    counts.update(forward=0, back=0)
    batch_loss_and_grad(model, batch, args)
    assert counts == {"forward": chunks, "back": 0}


@pytest.mark.parametrize("fine_tune_type", ["lora", "dora", "state", "full"])
def test_trained_folder_loads_without_adapter_config(tmp_path, fine_tune_type):
    model = prepare_for_training(tiny_model(), fine_tune_type, num_layers=1, lora_parameters={"rank": 4})
    train(model, pattern_examples(8), None, quick_args(tmp_path, iters=2))
    model.eval()
    ids = mx.array([[40, 41, 42, 43]])

    loaded = load_adapters(tiny_model(), tmp_path)

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == fine_tune_type
    assert config["num_layers"] == 1
    assert mx.allclose(loaded(ids), model(ids), atol=1e-5).item()


def test_unprepared_model_records_no_adapter_config():
    from rwkv_mlx.tuner import prepared_adapter_config

    assert prepared_adapter_config(tiny_model()) is None
    assert prepared_adapter_config(prepare_for_training(tiny_model(), "lora"))["lora_parameters"]["keys"]


def test_bad_validation_example_named(tmp_path):
    model = prepare_for_training(tiny_model(), "lora")

    with pytest.raises(ValueError, match="validation example 1: token ids must be integers"):
        train(model, pattern_examples(4), [[1, 2, 3], [1.5, 2.0]], quick_args(tmp_path, iters=1))


def test_library_run_records_base_model(tmp_path):
    model = prepare_for_training(tiny_model(seed=0), "state")
    train(model, pattern_examples(4), None, quick_args(tmp_path, iters=2, steps_per_save=2))

    _, metadata = mx.load(str(tmp_path / "adapters.safetensors"), return_metadata=True)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert metadata["fine_tune_type"] == "state"
    assert metadata["base_model_fingerprint"] == config["base_model_fingerprint"]
    with pytest.raises(AdapterError, match="load the base model the state was tuned on"):
        load_adapters(tiny_model(seed=1), tmp_path)


def test_adapter_file_of_wrong_kind_rejected(tmp_path):
    (tmp_path / "afile").write_text("mine")
    model = prepare_for_training(tiny_model(), "lora")

    for adapter_file, message in [
        (str(tmp_path / "afile" / "a.safetensors"), "afile is a file, not a folder"),
        (str(tmp_path / "new") + "/", "names a folder; name the weights file"),
    ]:
        args = quick_args(tmp_path, iters=2)
        args.adapter_file = adapter_file
        with pytest.raises(ValueError, match=message):
            train(model, pattern_examples(4), None, args)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["afile"]


def test_resume_on_other_base_model(tmp_path, caplog):
    for kind in ("lora", "state"):
        folder = tmp_path / kind
        train(prepare_for_training(tiny_model(seed=0), kind), pattern_examples(4), None, quick_args(folder, iters=2))
        other = prepare_for_training(tiny_model(seed=1), kind)
        if kind == "state":
            with pytest.raises(AdapterError, match="resume the tuned state on the base model it was tuned on"):
                resume_from(folder / "adapters.safetensors", other)
        else:
            with caplog.at_level(logging.WARNING):
                resume_from(folder / "adapters.safetensors", other)
            assert "trained on a base model with fingerprint" in caplog.text


def test_evaluate_without_counted_tokens_rejected():
    with pytest.raises(ValueError, match="no token of the evaluation data counts in the loss"):
        evaluate(tiny_model(), [[5], [6]], batch_size=2)
    with pytest.raises(ValueError, match="num_batches must be at least 1, or -1 for all, got 0"):
        evaluate(tiny_model(), pattern_examples(2), batch_size=2, num_batches=0)


def test_one_token_example_named(tmp_path):
    with pytest.raises(ValueError, match="an example needs at least two tokens"):
        train(prepare_for_training(tiny_model(), "lora"), [[5]] * 4, None, quick_args(tmp_path, iters=2))


def test_resumed_validation_loss_recorded_once(tmp_path):
    data = pattern_examples(8)
    model = prepare_for_training(tiny_model(), "lora")
    train(model, data, data[:2], quick_args(tmp_path, iters=4, steps_per_save=2, steps_per_eval=2))

    resumed = prepare_for_training(tiny_model(), "lora")
    start = resume_from(tmp_path / "0000002_adapters.safetensors", resumed)
    train(resumed, data, data[:2], quick_args(tmp_path, iters=4, steps_per_save=2, steps_per_eval=2, start_iteration=start))

    history = json.loads((tmp_path / "loss_history.json").read_text())
    assert [it for it, _ in history["valid"]] == [0, 2, 4]


def test_resume_from_older_checkpoint_warns(tmp_path, caplog):
    data = pattern_examples(8)
    train(prepare_for_training(tiny_model(), "lora"), data, None, quick_args(tmp_path, iters=6, steps_per_save=2))

    resumed = prepare_for_training(tiny_model(), "lora")
    start = resume_from(tmp_path / "0000002_adapters.safetensors", resumed)
    with caplog.at_level(logging.WARNING):
        train(resumed, data, None, quick_args(tmp_path, iters=4, steps_per_save=2, start_iteration=start))

    assert "0000004_adapters.safetensors, 0000006_adapters.safetensors come from the run being resumed" in caplog.text


def test_wrong_training_files_named(tmp_path):
    from rwkv_mlx.io.errors import CheckpointError
    from rwkv_mlx.io.state import load_state
    from rwkv_mlx.loading import load_model

    train(prepare_for_training(tiny_model(), "lora"), pattern_examples(4), None, quick_args(tmp_path, iters=2))

    with pytest.raises(AdapterError, match="the optimizer state of a checkpoint; name the adapter weights file beside it"):
        resume_from(tmp_path / "optimizer.safetensors", prepare_for_training(tiny_model(), "lora"))
    with pytest.raises(CheckpointError, match="a file of a lora training run, not a state file; load the adapters with --adapter-path"):
        load_state(tmp_path / "adapters.safetensors", tiny_model())
    with pytest.raises(CheckpointError, match="a folder, not a state file; name the file, such as"):
        load_state(tmp_path, tiny_model())
    with pytest.raises(CheckpointError, match="an adapter folder, not a model; load it onto its base model"):
        load_model(str(tmp_path))


def test_state_run_weights_as_state_named(tmp_path):
    from rwkv_mlx.io.errors import CheckpointError
    from rwkv_mlx.io.state import load_state

    train(prepare_for_training(tiny_model(), "state"), pattern_examples(4), None, quick_args(tmp_path, iters=2))

    with pytest.raises(CheckpointError, match="a file of a state-tuning run, not a state file; its tuned state is .*state.safetensors"):
        load_state(tmp_path / "adapters.safetensors", tiny_model())
