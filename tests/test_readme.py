"""The documentation's code runs: every `amptrain` command line and every Python block of the
README and of each page of the documentation site (`docs/`), made small.

The placeholders are made real in a scratch folder (`my_corpus/`, `path/to/model.py` with
`MyTransformer`, `m.py:Net`, a `model` in Python ...), and step counts are cut down, so the
test checks that each snippet is a working use of the current API, not its speed.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import save_tiny_gpt2

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

MODEL_FILE = """
import torch
from torch import nn


class MyTransformer(nn.Module):
    def __init__(self, vocab_size, d_model=32):
        super().__init__()
        self.emb = nn.Embedding(vocab_size, d_model)
        layer = nn.TransformerEncoderLayer(d_model, 2, 2 * d_model, batch_first=True)
        self.body = nn.TransformerEncoder(layer, 1)
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, idx):
        mask = nn.Transformer.generate_square_subsequent_mask(idx.size(1), device=idx.device)
        return self.head(self.body(self.emb(idx), mask=mask, is_causal=True))


Net = MyTransformer
"""
# `model.py:GPT` stands for the model a run was trained as: the built-in model at the test's size.
GPT_FILE = """
from amptrain.models import GPTConfig, TinyGPT


def GPT(vocab_size):
    return TinyGPT(GPTConfig(vocab_size=vocab_size, n_layer=1, n_embd=32, n_head=2, block_size=32))
"""
# Cut-downs: (pattern, replacement) applied to every command line and Python block.
SMALLER = [
    (r"--max-steps \d+", "--max-steps 2"), (r"--trials \d+", "--trials 2"),
    (r"--steps \d+", "--steps 3"), (r"--repeats \d+", "--repeats 1"),
    (r"--workers \d+", "--workers 1"), (r"--seeds [\d,]+", "--seeds 0,1,2"),
    (r"max_steps=\d+", "max_steps=2"), (r"n_epochs=\d+", "n_epochs=1"),
    (r"context=128", "context=32"), (r'"d_model": \d+', '"d_model": 32'),
    (r"\bsteps=\d+", "steps=7"), (r"repeats=\d+", "repeats=1"),
]  # fmt: skip
# Small settings added where a line does not give its own.
SMALL = {
    "train": ["--max-steps", "2"],
    "bench": ["--steps", "3", "--warmup-steps", "1", "--repeats", "1"],
    "search": ["--trials", "2", "--budget-steps", "2"], "doctor": ["--batches", "1"],
    "compare": ["--steps", "2", "--latency-iters", "1", "--eval-bytes", "2000"],
}  # fmt: skip


def blocks(language: str, page: Path) -> list[str]:
    """The page's fenced code blocks in `language`."""
    text = page.read_text(encoding="utf-8")
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


def command_blocks() -> list[list[str]]:
    """Each bash block's runnable `amptrain ...` lines (continuations joined), in order."""
    found = []
    for block in (b for page in PAGES for b in blocks("bash", page)):
        lines = []
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            runnable = re.match(r"^([A-Z_]+=\S+ )*(python -m )?amptrain ", line)
            demo = re.match(r"^(python -m )?amptrain demo\b", line)  # tests/test_cli.py runs it
            if runnable and "..." not in line and not demo:
                lines.append(line)
        if lines:
            found.append(lines)
    return _merged(found)


def _merged(found: list[list[str]]) -> list[list[str]]:
    """Blocks that start with the same line (pages that train the same run, then use it) as
    one sequence, each line once: the run is trained once for all of them."""
    merged: dict[str, list[str]] = {}
    for lines in found:
        into = merged.setdefault(lines[0], [])
        into += [line for line in lines if line not in into]
    return list(merged.values())


def smaller(text: str) -> str:
    for pattern, replacement in SMALLER:
        text = re.sub(pattern, replacement, text)
    return text


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    """A folder holding what the README's snippets name."""
    text = "the quick brown fox jumps over the lazy dog. " * 300
    (tmp_path / "held_out.txt").write_text(text[:2000])
    (tmp_path / "model.py").write_text(GPT_FILE)
    for folder in ("my_corpus", "corpus", "more_text"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "a.txt").write_text(text)
    (tmp_path / "path" / "to").mkdir(parents=True)
    for name in ("path/to/model.py", "m.py", "my_model.py"):
        (tmp_path / name).write_text(MODEL_FILE)
    save_tiny_gpt2(tmp_path / "path" / "to" / "hf-model", text)
    (tmp_path / "space.toml").write_text("lr = {low = 1e-4, high = 1e-2, log = true}\n")
    records = [text[i : i + 400] for i in range(0, len(text), 400)]
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in records))
    (tmp_path / "reviews.csv").write_text("id,body\n" + "".join(f"{i},{r}\n" for i, r in
                                                               enumerate(records)))  # fmt: skip
    (np.arange(20_000) * 7919 % 50257).astype(np.uint16).tofile(tmp_path / "train.bin")  # nanoGPT
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _newest_run(scratch: Path, command: str) -> str:
    runs = sorted((scratch / "runs").glob(f"{command}-*"), key=lambda p: p.stat().st_mtime)
    return str(runs[-1].relative_to(scratch)) if runs else f"runs/{command}-missing"


def run_line(scratch: Path, line: str) -> subprocess.CompletedProcess:
    """Run one README command line, made small, with a real run directory where it names one."""
    line = re.sub(r"runs/(\w+)-(\d{8}-\d{6}|XYZ)", lambda m: _newest_run(scratch, m.group(1)),
                  line)  # fmt: skip
    argv = shlex.split(smaller(line))
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB")}
    env["WANDB_MODE"] = "offline"
    for name in re.findall(r"env:(\w+)", line):  # a study storage named by a variable: SQLite
        env[name] = f"sqlite:///{scratch / 'optuna.db'}"
    while "=" in argv[0]:  # VAR=value prefixes
        key, value = argv.pop(0).split("=", 1)
        env[key] = value
    if argv[:3] == ["python", "-m", "amptrain"]:
        argv = argv[2:]
    assert argv[0] == "amptrain", line
    command = argv[1]
    argv = [sys.executable, "-m", "amptrain", *argv[1:], "--no-progress"]
    for flag, value in zip(SMALL.get(command, [])[::2], SMALL.get(command, [])[1::2]):
        if flag not in argv and "--resume" not in argv and "--config" not in argv:
            argv += [flag, value]
    own_settings = "--resume" in line or "--config" in line or "--model runs/" in line
    if "--model" not in line and not own_settings and command != "demo":
        argv += ["--layers", "1", "--width", "32", "--heads", "2"]
    if "--context" not in line and not own_settings and command not in ("demo", "generate"):
        argv += ["--context", "32"]
    return subprocess.run(argv, cwd=scratch, env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("lines", command_blocks(), ids=lambda lines: lines[0][:40])
def test_readme_commands_run(scratch, lines):
    for line in lines:
        out = run_line(scratch, line)
        assert out.returncode == 0, f"{line}\n{out.stderr[-3000:]}"


def _name(page: Path) -> str:
    return str(page.relative_to(ROOT))


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in PAGES if blocks("python", p)], ids=_name)
def test_python_blocks_run_in_order(scratch, monkeypatch, page):
    """A page's Python blocks share one namespace, as in a notebook, seeded with what they
    assume."""
    import types

    import torch

    monkeypatch.setenv("WANDB_MODE", "offline")
    namespace: dict = {"torch": torch}
    exec(MODEL_FILE, namespace)  # noqa: S102 - the test's own model file
    namespace["model"] = namespace["MyTransformer"](256)  # byte tokens
    namespace["config"] = types.SimpleNamespace(vocab_size=256, max_seq_len=32)
    for name, value in _SEEDS.items():  # what a page assumes from an earlier page
        namespace.setdefault(name, value(namespace))
    for block in blocks("python", page):
        code = compile(smaller(block), _name(page), "exec")
        exec(code, namespace)  # noqa: S102 - the documentation's own snippets


def _blocks_of(namespace: dict):
    from amptrain import data

    return data.split(data.load("my_corpus/", context=32), val_fraction=0.1, seed=0)


# Names the guides use as set up on the getting-started page: the data, a resolved precision.
_SEEDS = {
    "amptrain": lambda ns: __import__("amptrain"),
    "train": lambda ns: _blocks_of(ns)[0],
    "val": lambda ns: _blocks_of(ns)[1],
    "prec": lambda ns: __import__("amptrain").resolve("auto", "cpu"),
}
