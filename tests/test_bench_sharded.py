"""`amptrain bench --nproc 2 --strategy fsdp`: the precisions compared under sharding.

The command starts its processes through torch's launcher (gloo on CPU), as `train --nproc`
does; bad input is refused in one line before any process starts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import pattern_blocks, tiny_model

from amptrain.bench import bench
from amptrain.cli import main
from amptrain.errors import ConfigError

SIZE = ["--layers", "2", "--width", "16", "--heads", "2", "--context", "16"]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    return path


@pytest.mark.slow
def test_two_sharded_processes_compare_the_precisions(tmp_path, corpus):
    cmd = [sys.executable, "-m", "amptrain", "bench", "--nproc", "2", "--strategy", "fsdp",
           "--data", str(corpus), *SIZE, "--batch-size", "4", "--steps", "4",
           "--warmup-steps", "1", "--repeats", "1", "--precisions", "bf16", "--out",
           str(tmp_path / "runs")]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    (run,) = (tmp_path / "runs").iterdir()  # rank 0 alone wrote a run directory
    report = json.loads((run / "bench.json").read_text())
    settings = report["settings"]
    assert (settings["processes"], settings["strategy"]) == (2, "fsdp")
    assert [a["precision"] for a in report["arms"]] == ["fp32", "bf16"]
    for arm in report["arms"]:
        assert arm["status"] == "ok", arm["error"]
        assert arm["sharding"]["strategy"] == "fsdp" and arm["sharding"]["sharded"]
        assert arm["allocator"]["allocator_reason"].startswith("sharded: FSDP frees")
        # tokens/s is the job's: both processes' batches of 4 x 15 targets per step
        assert arm["tokens_per_s"] == pytest.approx(2 * 4 * 15 / (arm["step_ms"] / 1e3))
        assert arm["mem_source"].endswith("the largest of 2 ranks") and arm["peak_mem_mb"] > 0
    assert report["arms"][1]["sharding"]["param_dtype"] == "bfloat16"
    bf16 = report["arms"][1]  # the quality comparison with fp32 still holds
    assert bf16["val_loss_rel_diff"] is not None and bf16["quality_ok"] is not None
    text = (run / "report.md").read_text()
    assert "2 processes, strategy fsdp" in text and "memory is per process, the largest" in text
    assert json.loads((run / "config.json").read_text())["bench"]["nproc"] == 2
    assert "x 2 processes (fsdp)" in " ".join(out.stdout.split())


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--strategy", "fsdp"], "strategy 'fsdp' on 1 process shards nothing"),
        (["--nproc", "2", "--strategy", "zero3"], "strategy='zero3' is invalid"),
        (["--nproc", "0"], "--nproc 0 is invalid"),
        (["--nproc", "2", "--strategy", "fsdp", "--steps", "2"], "steps >= warmup + 2"),
        (["--nproc", "2", "--strategy", "fsdp", "--model", "MODEL"], "cannot be sharded"),
    ],
)
def test_bad_input_is_one_line_and_exit_2_before_any_process(tmp_path, corpus, capsys, flags,
                                                             says):  # fmt: skip
    model_file = tmp_path / "flat.py"
    model_file.write_text(
        "from torch import nn\n\nclass Flat(nn.Module):\n    def __init__(self):\n"
        "        super().__init__()\n        self.emb, self.head = nn.Embedding(256, 8), "
        "nn.Linear(8, 256)\n\n    def forward(self, x):\n        return self.head(self.emb(x))\n"
    )
    size = SIZE[-2:] if "MODEL" in flags else SIZE  # a model file takes no tiny-gpt sizes
    flags = [f"{model_file}:Flat" if f == "MODEL" else f for f in flags]
    code = main(["bench", "--data", str(corpus), *size, "--out", str(tmp_path / "runs"),
                 *flags])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert says in err[-1] and err[-1].startswith("amptrain: error:"), err
    assert not any("Traceback" in line or "torch.distributed" in line for line in err), err
    assert not (tmp_path / "runs").exists()


def test_the_api_refuses_a_sharded_benchmark_in_one_process():
    with pytest.raises(ConfigError, match="strategy 'fsdp' on 1 process shards nothing"):
        bench(tiny_model(), pattern_blocks(16), pattern_blocks(8), strategy="fsdp")
    with pytest.raises(ConfigError, match="strategy='zero3' is invalid"):
        bench(tiny_model(), pattern_blocks(16), pattern_blocks(8), strategy="zero3")
