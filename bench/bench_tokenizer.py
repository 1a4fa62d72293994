"""Encode throughput of the World tokenizer against the reference trie tokenizer.

Measures, on English and on Chinese text in one run:

- the reference: the pure-Python trie in BlinkDL's ``rwkv`` package
  (``rwkv/rwkv_tokenizer.py``, version 0.8.32, which needs no torch);
- ``rwkv_mlx``: ``load_tokenizer("world").encode``;
- the exported ``tokenizer.json`` run by the ``tokenizers`` library, which is
  exact but not what ``encode`` uses (skip it with ``--no-tokenizers-json``).

Each result is the best of ``--repeats`` runs, with the implementations
taking turns so that load from other processes hits them alike. By default
the runs are timed by the CPU time of the process, which waiting for a core
that other processes hold does not inflate. The ids of
all implementations are checked to be identical. The script exits with
status 1 if ``rwkv_mlx`` is less than ``--min-speedup`` times faster than
the reference on either text.

The texts default to the English and Chinese corpus files of the tests
(written for this project), repeated to ``--size`` bytes.

Usage::

    pip install --no-deps rwkv==0.8.32     # or pass --reference DIR
    python bench/bench_tokenizer.py
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CORPUS_DIR = REPO_ROOT / "tests" / "tokenizer" / "corpus"


def find_reference_dir(reference_dir: Path | None) -> Path:
    """Return ``reference_dir``, or else the directory of the installed ``rwkv`` package."""
    if reference_dir is not None:
        return reference_dir
    spec = importlib.util.find_spec("rwkv")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "error: the reference tokenizer is not installed; run pip install --no-deps rwkv==0.8.32 "
            "or pass --reference with the directory of the rwkv package"
        )
    return Path(list(spec.submodule_search_locations)[0])


def load_reference(package_dir: Path):
    """Build the reference tokenizer from ``rwkv_tokenizer.py`` and its vocabulary file."""
    module_path = package_dir / "rwkv_tokenizer.py"
    vocab_path = package_dir / "rwkv_vocab_v20230424.txt"
    for path in (module_path, vocab_path):
        if not path.is_file():
            raise SystemExit(f"error: {path} not found; --reference must be the rwkv package directory")
    spec = importlib.util.spec_from_file_location("reference_rwkv_tokenizer", module_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TRIE_TOKENIZER(str(vocab_path))


def repeat_to_size(text: str, size: int) -> str:
    """Repeat ``text`` until its UTF-8 encoding has at least ``size`` bytes."""
    copies = -(-size // len(text.encode("utf-8")))
    return text * copies


def best_times(functions: dict, text: str, repeats: int, clock) -> tuple[dict, dict]:
    """Run each function ``repeats`` times in turns; return the best seconds
    on ``clock`` and the ids of each."""
    best = {name: float("inf") for name in functions}
    ids = {}
    for _ in range(repeats):
        for name, function in functions.items():
            start = clock()
            ids[name] = function(text)
            best[name] = min(best[name], clock() - start)
    return best, ids


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", type=Path, help="directory of the installed rwkv package (default: find it)")
    parser.add_argument("--english", type=Path, default=CORPUS_DIR / "english.txt", help="English text file")
    parser.add_argument("--chinese", type=Path, default=CORPUS_DIR / "chinese.txt", help="Chinese text file")
    parser.add_argument("--size", type=int, default=1 << 20, help="bytes of each text, by repetition (default 1 MiB)")
    parser.add_argument("--repeats", type=int, default=5, help="runs per implementation; the best counts")
    parser.add_argument("--min-speedup", type=float, default=10.0, help="required speedup over the reference")
    parser.add_argument(
        "--clock",
        choices=("cpu", "wall"),
        default="cpu",
        help="cpu: time the process ran (default, steadier where other processes share the cores); wall: elapsed time",
    )
    parser.add_argument("--no-tokenizers-json", action="store_true", help="skip the exported tokenizer.json")
    args = parser.parse_args()

    sys.path.insert(0, str(REPO_ROOT))
    from rwkv_mlx.tokenizer import load_tokenizer

    start = time.perf_counter()
    reference = load_reference(find_reference_dir(args.reference))
    reference_load = time.perf_counter() - start
    start = time.perf_counter()
    world = load_tokenizer("world")
    world_load = time.perf_counter() - start

    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    functions = {"reference": reference.encode, "rwkv_mlx": world.encode}
    if not args.no_tokenizers_json:
        exported = world.to_tokenizers()
        functions["tokenizers json"] = lambda text: exported.encode(text).ids

    print(f"machine: {platform.machine()}, {platform.processor() or 'unknown processor'}, Python {platform.python_version()}")
    print(f"load: reference {reference_load:.2f} s, rwkv_mlx {world_load:.2f} s (wall time)")
    print(f"clock: {args.clock}, best of {args.repeats} runs")
    print()
    header = "| text | bytes | tokens | reference MB/s | rwkv_mlx MB/s | speedup |"
    if not args.no_tokenizers_json:
        header += " tokenizers json MB/s |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))

    failed = False
    for label, path in (("English", args.english), ("Chinese", args.chinese)):
        text = repeat_to_size(path.read_text(encoding="utf-8"), args.size)
        size = len(text.encode("utf-8"))
        best, ids = best_times(functions, text, args.repeats, clock)
        for name, result in ids.items():
            if result != ids["reference"]:
                print(f"error: {name} ids differ from the reference on {label}", file=sys.stderr)
                return 1

        speedup = best["reference"] / best["rwkv_mlx"]
        failed |= speedup < args.min_speedup
        row = (
            f"| {label} | {size:,} | {len(ids['reference']):,} | {size / best['reference'] / 1e6:.1f} | "
            f"{size / best['rwkv_mlx'] / 1e6:.1f} | {speedup:.1f}x |"
        )
        if not args.no_tokenizers_json:
            row += f" {size / best['tokenizers json'] / 1e6:.2f} |"
        print(row)

    print()
    print(f"target: at least {args.min_speedup:g}x on both texts: {'FAILED' if failed else 'met'}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
