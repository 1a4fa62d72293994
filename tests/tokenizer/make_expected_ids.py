"""Write corpus/expected_ids.npz: the reference tokenizer's ids for the corpus.

The reference is the pure-Python trie tokenizer in BlinkDL's ``rwkv`` package
(version 0.8.32 on PyPI). Its module ``rwkv/rwkv_tokenizer.py`` needs no
torch, so it is imported from its file and never from the package::

    python -m venv /tmp/reference && /tmp/reference/bin/pip install --no-deps rwkv==0.8.32
    python tests/tokenizer/make_expected_ids.py /tmp/reference/lib/python3.11/site-packages/rwkv

Run it with the project's Python (it imports rwkv_mlx and this folder's
corpus module) after changing the corpus; commit the output file.

The .npz contains ``names`` (str), ``is_text`` (bool), ``sha256`` (hex of each
document's bytes), ``offsets`` (int64, one more than documents) and ``ids``
(uint16, all documents' ids concatenated).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tokenizer_corpus import EXPECTED_IDS_FILE, build_documents  # noqa: E402

from rwkv_mlx.tokenizer import read_world_vocab, world_vocab_path  # noqa: E402


def load_reference(package_dir: Path):
    """Import ``rwkv_tokenizer.py`` from the reference package directory and
    build its tokenizer from the vocabulary file next to it."""
    module_path = package_dir / "rwkv_tokenizer.py"
    vocab_path = package_dir / "rwkv_vocab_v20230424.txt"
    for path in (module_path, vocab_path):
        if not path.is_file():
            raise SystemExit(f"error: {path} not found; pass the directory of the installed rwkv package")
    if vocab_path.read_bytes() != world_vocab_path().read_bytes():
        raise SystemExit(f"error: {vocab_path} differs from the vocabulary shipped in rwkv_mlx/data")

    spec = importlib.util.spec_from_file_location("reference_rwkv_tokenizer", module_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TRIE_TOKENIZER(str(vocab_path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reference_dir", type=Path, help="directory of the installed rwkv package (rwkv 0.8.32)")
    parser.add_argument("--output", type=Path, default=EXPECTED_IDS_FILE, help="the .npz file to write")
    args = parser.parse_args()

    reference = load_reference(args.reference_dir)
    documents = build_documents(read_world_vocab(world_vocab_path()))

    all_ids, offsets = [], [0]
    start = time.perf_counter()
    for name, data, _ in documents:
        ids = reference.encodeBytes(data)
        assert max(ids, default=0) < 65536
        all_ids.extend(ids)
        offsets.append(len(all_ids))
        print(f"{name}: {len(data)} bytes, {len(ids)} ids")
    print(f"encoded {sum(len(d) for _, d, _ in documents)} bytes in {time.perf_counter() - start:.1f} s")

    np.savez_compressed(
        args.output,
        names=np.array([name for name, _, _ in documents]),
        is_text=np.array([is_text for _, _, is_text in documents]),
        sha256=np.array([hashlib.sha256(data).hexdigest() for _, data, _ in documents]),
        offsets=np.array(offsets, np.int64),
        ids=np.array(all_ids, np.uint16),
    )
    print(f"wrote {args.output} ({args.output.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
