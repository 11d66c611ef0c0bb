"""Checkpoints and final weights saved under a real address-space cap (`resource.setrlimit`):
with 1 MiB of room above what the process already holds, far less than one of the model's
tensors (48 MiB), the second checkpoint and the final weights are still written whole, since a
save streams each tensor to disk instead of building the file in memory (a save that built it
in memory first was seen failing here)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from amptrain import checkpoint

SCRIPT = """
import resource, sys
from amptrain import checkpoint
from amptrain.cli import main
real = checkpoint.write_file
def write_file(path, payload):
    if ".tmp-step-000000004" in str(path) and path.name == "model.pt":  # the second save
        held = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (held + (1 << 20), resource.RLIM_INFINITY))
    return real(path, payload)
checkpoint.write_file = write_file
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="/proc/self/statm")
def test_saves_under_a_memory_cap_of_one_mib_above_the_process(tmp_path):
    from safetensors.torch import load_file

    args = ["train", "--layers", "1", "--width", "2048", "--heads", "4", "--context", "16",
            "--batch-size", "2", "--max-steps", "4", "--checkpoint-every", "2",
            "--precision", "fp32", "--no-compile", "--no-progress", "--out", "runs"]  # fmt: skip
    done = subprocess.run([sys.executable, "-c", SCRIPT, *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = (tmp_path / "runs").glob("train-*")
    saved = checkpoint.list_checkpoints(run / "checkpoints")
    assert [p.name for p in saved] == ["step-000000002", "step-000000004"]
    assert all(checkpoint.verify(p) is None for p in saved)
    weights = load_file(run / "model.safetensors")
    biggest = max(t.numel() * t.element_size() for t in weights.values())
    assert biggest > 32 * (1 << 20)  # a save that held a whole tensor's copy would not fit
