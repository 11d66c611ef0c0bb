"""Two torchrun "machines" on this host run the multi-node line of the distributed guide.

The line is read from that page, so the documented command is the one tested: `head-node`
becomes 127.0.0.1 with a free port, `...` a small fp32 run, and the second machine gets
`--node-rank 1`. Both runs must equal one process with the same global batch.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from spawning import free_port

from amptrain.models.trained import WEIGHTS, read_weights

README = (Path(__file__).parent.parent / "docs" / "guides" / "distributed.md").read_text(
    encoding="utf-8"
)
SMALL = ("--data corpus.txt --precision fp32 --context 32 --layers 2 --width 32 --heads 2 "
         "--max-steps 6 --eval-every 3 --no-progress")  # fmt: skip


def readme_multinode_line() -> str:
    """The page's one `torchrun --nnodes 2` line, continuations joined."""
    text = README.replace("\\\n", " ")
    (line,) = [x.strip() for x in text.splitlines() if x.strip().startswith("torchrun --nnodes")]
    return re.sub(r"\s+", " ", line)


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _train(cwd: Path, argv: list[str], out: str) -> Path:
    subprocess.run([*argv, "--out", out], cwd=cwd, env=_env(), check=True, timeout=600,
                   capture_output=True)  # fmt: skip
    (run,) = (cwd / out).iterdir()
    return run


def _two_nodes(cwd: Path, line: str, out: str) -> Path:
    port = free_port()
    line = line.replace("head-node:29500", f"127.0.0.1:{port}").replace("...", SMALL)
    argv = shlex.split(line)
    assert argv[0] == "torchrun"
    argv = [sys.executable, "-m", "torch.distributed.run", *argv[1:], "--out", out]
    nodes = []
    for rank in (0, 1):
        node = [rank_arg if rank_arg != "0" or prev != "--node-rank" else str(rank)
                for prev, rank_arg in zip(["", *argv], argv)]  # fmt: skip
        nodes.append(subprocess.Popen(node, cwd=cwd, env=_env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))  # fmt: skip
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    for i, node in enumerate(nodes):
        assert node.returncode == 0, "\n".join(f"node {j}: {out[-2000:]}"
                                              for j, out in enumerate(outputs))  # fmt: skip
        assert "terminate called" not in outputs[i]
    (run,) = (cwd / out).iterdir()
    return run


def _assert_same_weights(a: Path, b: Path) -> None:
    x, y = (read_weights(p / WEIGHTS) for p in (a, b))
    assert x.keys() == y.keys()
    got, want = (torch.cat([s[k].flatten() for k in sorted(s)]) for s in (x, y))
    assert float((got - want).norm() / want.norm()) <= 1e-5
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_readme_multinode_line_with_fsdp_and_ddp_equals_one_process(tmp_path):
    (tmp_path / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog. " * 300)
    line = readme_multinode_line()
    assert "--strategy fsdp --batch-size 4" in line and "--node-rank 0" in line
    one = _train(tmp_path, [sys.executable, "-m", "amptrain", "train", *shlex.split(SMALL),
                            "--batch-size", "8"], "one")  # fmt: skip
    fsdp = _two_nodes(tmp_path, line, "fsdp")
    ddp = _two_nodes(tmp_path, line.replace("--strategy fsdp", "--strategy ddp"), "ddp")
    for run in (fsdp, ddp):
        _assert_same_weights(run, one)
    summary = json.loads((fsdp / "summary.json").read_text())
    assert summary["fast_path"]["sharding"]["world_size"] == 2
    assert summary["steps"] == 6
