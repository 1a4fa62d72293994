"""Check that generation memory stays constant as the context grows.

RWKV's state has a fixed size, so the peak memory after many generated
tokens should equal the peak after a few. This script generates
``--tokens`` tokens (4,000 by default) with the command line's default
sampling: top-p and the RWKV penalties, whose counts also have a fixed size.
It records MLX's peak and active memory after 100 tokens and at the end. It
fails when the final peak exceeds the early one by more than
``--tolerance`` (5% by default). It also reports the time per token of the
first and last 500 tokens, which would grow if the lazy graph grew from
step to step.

Usage:

    python bench/bench_generation_memory.py                    # random RWKV-7
    python bench/bench_generation_memory.py --model model.pth  # a real model

Results go to stdout and to ``bench/results/generation_memory.json``.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import rwkv_mlx  # noqa: F401  (loads the optimized BLAS before mlx.core)
import mlx.core as mx

from rwkv_mlx.generate import (
    DEFAULT_FREQUENCY_PENALTY,
    DEFAULT_PENALTY_DECAY,
    DEFAULT_PRESENCE_PENALTY,
    DEFAULT_TEMP,
    DEFAULT_TOP_P,
    generate_step,
)
from rwkv_mlx.models import rwkv7
from rwkv_mlx.sample import make_logits_processors, make_sampler

EARLY_TOKENS = 100
TIMING_WINDOW = 500


def random_model(hidden_size: int, layers: int, vocab_size: int) -> rwkv7.Model:
    """Build an RWKV-7 with MLX's default initialization (the tokens do not matter here)."""
    args = rwkv7.ModelArgs(
        model_type="rwkv7",
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        norm_eps=1e-5,
        head_dim=64,
        num_hidden_layers=layers,
        a_low_rank_dim=32,
        v_low_rank_dim=32,
        gate_low_rank_dim=64,
        decay_low_rank_dim=32,
    )
    model = rwkv7.Model(args)
    mx.eval(model.parameters())
    return model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a model rwkv_mlx.load_model accepts (default: a random RWKV-7)")
    parser.add_argument("--hidden-size", type=int, default=256, help="width of the random model")
    parser.add_argument("--layers", type=int, default=4, help="layers of the random model")
    parser.add_argument("--vocab-size", type=int, default=65536, help="vocabulary of the random model")
    parser.add_argument("--tokens", type=int, default=4000, help="tokens to generate")
    parser.add_argument("--tolerance", type=float, default=0.05, help="allowed relative growth of peak memory")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "generation_memory.json"))
    args = parser.parse_args()
    if args.tokens <= EARLY_TOKENS:
        parser.error(f"--tokens must be more than {EARLY_TOKENS}")

    if args.model:
        model = rwkv_mlx.load_model(args.model)[0]
    else:
        model = random_model(args.hidden_size, args.layers, args.vocab_size)
    vocab_size = model.args.vocab_size
    mx.random.seed(0)
    sampler = make_sampler(DEFAULT_TEMP, DEFAULT_TOP_P)
    processors = make_logits_processors(
        presence_penalty=DEFAULT_PRESENCE_PENALTY,
        frequency_penalty=DEFAULT_FREQUENCY_PENALTY,
        penalty_decay=DEFAULT_PENALTY_DECAY,
        vocab_size=vocab_size,
    )
    prompt = mx.array([t % vocab_size for t in range(1, 65)])

    mx.reset_peak_memory()
    step_times = []
    early = None
    last = time.perf_counter()
    for n, _ in enumerate(
        generate_step(prompt, model, max_tokens=args.tokens, sampler=sampler, logits_processors=processors), start=1
    ):
        now = time.perf_counter()
        step_times.append(now - last)
        last = now
        if n == EARLY_TOKENS:
            early = {"peak_bytes": mx.get_peak_memory(), "active_bytes": mx.get_active_memory()}
    final = {"peak_bytes": mx.get_peak_memory(), "active_bytes": mx.get_active_memory()}

    growth = final["peak_bytes"] / early["peak_bytes"] - 1
    window = min(TIMING_WINDOW, len(step_times) // 2)
    result = {
        "model": args.model or f"random RWKV-7 C={args.hidden_size} L={args.layers} V={args.vocab_size}",
        "device": str(mx.default_device()),
        "tokens": args.tokens,
        "early_tokens": EARLY_TOKENS,
        "early": early,
        "final": final,
        "peak_growth": growth,
        "tolerance": args.tolerance,
        "first_ms_per_token": 1000 * sum(step_times[1 : window + 1]) / window,
        "last_ms_per_token": 1000 * sum(step_times[-window:]) / window,
        "passed": growth <= args.tolerance,
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")

    print(f"peak memory after {EARLY_TOKENS} tokens: {early['peak_bytes'] / 2**20:.2f} MiB")
    print(f"peak memory after {args.tokens} tokens: {final['peak_bytes'] / 2**20:.2f} MiB ({100 * growth:+.2f}%)")
    print(f"active memory: {early['active_bytes'] / 2**20:.2f} MiB -> {final['active_bytes'] / 2**20:.2f} MiB")
    print(
        f"time per token: {result['first_ms_per_token']:.2f} ms (first {window}), "
        f"{result['last_ms_per_token']:.2f} ms (last {window})"
    )
    print(f"{'PASS' if result['passed'] else 'FAIL'}: growth {100 * growth:+.2f}%, allowed {100 * args.tolerance:.0f}%")
    print(f"results written to {output}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
