"""Peak memory of loading a large corpus: a ~1 GB JSONL text file and a ~1 GB uint16 `.bin`.

Each file is made in a temporary folder, then loaded in a fresh process through amptrain's data
path as `train` runs it (`data.load`, the seeded split, the id check `fit` makes, a first
batch). Per file: the peak RSS of that process, the RSS it had before loading (torch and
amptrain imported), and the seconds. Memory is the figure here; the machine's load changes the
seconds only, and the load average is recorded with them.

With `--before REV` the same is measured on a smaller text file for the data module of an
older git revision (one that held the corpus as int64), to compare bytes per token.

    python benchmarks/data_streaming.py                     # 1 GB files (about 2 GB of disk)
    python benchmarks/data_streaming.py --quick             # 4 MB files: does it run?
    python benchmarks/data_streaming.py --before 8f1f9da    # also the older data module

Each run writes a new results/data-streaming-<cpu>-<isa>-t<threads>-torch<version>-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np

CONTEXT = 1024


def make_jsonl(path: Path, mb: int) -> None:
    """Records of about 1 KB of word text, written until the file holds `mb` MiB."""
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
             for _ in range(5000)]  # fmt: skip
    lines = [json.dumps({"id": i, "text": " ".join(rng.choices(words, k=170))}) + "\n"
             for i in range(2000)]  # fmt: skip
    block = "".join(lines).encode("utf-8")
    with open(path, "wb") as f:
        for _ in range(max(1, mb * 2**20 // len(block))):
            f.write(block)


def make_bin(path: Path, mb: int) -> None:
    """uint16 ids below GPT-2's 50,257, as nanoGPT's prepare.py writes train.bin."""
    rng = np.random.default_rng(0)
    with open(path, "wb") as f:
        for _ in range(mb):
            rng.integers(0, 50257, 2**19, dtype=np.uint16).tofile(f)


def child(path: Path, before: str | None) -> dict:
    """Load `path` as `train` would, in this process; return peak RSS and seconds."""
    import torch

    from amptrain import data, hardware

    cpu = torch.device("cpu")

    if before:  # the older revision's data module, as it was
        source = subprocess.run(["git", "show", f"{before}:amptrain/data.py"], check=True,
                                capture_output=True, text=True).stdout  # fmt: skip
        old = types.ModuleType("old_data")
        sys.modules["old_data"] = old  # dataclasses look their module up there
        exec(compile(source, f"{before}:amptrain/data.py", "exec"), old.__dict__)
        load, split, batches = old.load, old.split, old.batches
    else:
        load, split, batches = data.load, data.split, data.batches
    base, start = hardware.reset_peak_memory(cpu), time.perf_counter()
    blocks = load(str(path), CONTEXT)
    train, val = split(blocks, 0.1, 0)
    del blocks
    if not before:
        for part in (train, val):
            data.check_ids(part, 65536, -100)
    x, _ = next(batches(train, 16, 0))
    seconds = time.perf_counter() - start
    tokens = (len(train) + len(val)) * CONTEXT
    return {"file": path.name, "file_mb": path.stat().st_size / 2**20, "tokens": tokens,
            "revision": before or "this one", "batch": list(x.shape), "batch_dtype": str(x.dtype),
            "rss_before_load_mb": base, "peak_rss_mb": hardware.peak_memory_mb(cpu)[0],
            "seconds": seconds,
            "threads": torch.get_num_threads()}  # fmt: skip


def measure(path: Path, before: str | None = None) -> dict:
    """Run `child` in a fresh process, so each file's peak is its own."""
    cmd = [sys.executable, __file__, "--child", str(path)] + (
        ["--before", before] if before else []
    )
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    if done.returncode != 0:
        return {"file": path.name, "error": done.stderr.strip().splitlines()[-1:]}
    row = json.loads(done.stdout.strip().splitlines()[-1])
    row["bytes_per_token"] = (
        (row["peak_rss_mb"] - row["rss_before_load_mb"]) * 2**20 / max(row["tokens"], 1)
    )
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=int, default=1024, help="size of each file in MiB")
    parser.add_argument("--before", help="also measure this git revision's data module")
    parser.add_argument("--before-mb", type=int, default=64, help="its text file's size in MiB")
    parser.add_argument("--dir", default=None, help="where the files are made (default: temp)")
    parser.add_argument("--quick", action="store_true", help="4 MB files: does it run?")
    parser.add_argument("--out", type=Path, default=None, help="default: a new results/ file")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.before)))
        return
    if args.quick:
        args.mb = 4
    sys.path.insert(0, str(Path(__file__).parent))
    import provenance

    meta, rows = provenance.start("data_streaming"), []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        jsonl, tokens = Path(tmp) / "corpus.jsonl", Path(tmp) / "train.bin"
        make_jsonl(jsonl, args.mb)
        make_bin(tokens, args.mb)
        rows += [measure(jsonl), measure(tokens)]
        if args.before:
            small = Path(tmp) / "small.jsonl"
            make_jsonl(small, args.before_mb)
            rows += [measure(small), measure(small, args.before)]
    meta.update({"context": CONTEXT, "mb": args.mb,
                 "note": "peak_rss_mb - rss_before_load_mb is what loading cost; a .bin's pages "
                         "are file-backed and stay on disk until batches read them"})  # fmt: skip
    out = args.out or provenance.result_file("data-streaming", args.quick)
    provenance.write(out, meta, {"results": rows})


if __name__ == "__main__":
    main()
