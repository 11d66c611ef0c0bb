"""The shape of the package: imports point down, `--help` stays light, one flag table."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
WORKFLOWS = ("bench", "doctor", "compare", "search", "compat", "train")


def _lint(cwd: Path) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(cwd)}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=cwd, env=env,
                          capture_output=True, text=True)  # fmt: skip


def test_the_layer_contract_holds():
    out = _lint(ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 kept, 0 broken" in out.stdout


def test_an_import_that_points_up_breaks_the_contract(tmp_path):
    shutil.copytree(ROOT / "amptrain", tmp_path / "amptrain",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    loop = tmp_path / "amptrain" / "loop.py"
    loop.write_text(loop.read_text() + "\nfrom amptrain.cli import main  # noqa\n")
    out = _lint(tmp_path)
    assert out.returncode == 1
    assert "amptrain.loop -> amptrain.cli" in out.stdout


def test_help_imports_no_workflow_and_answers_fast():
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "amptrain", "--help"],
                         capture_output=True, text=True, check=True)  # fmt: skip
    seconds = time.perf_counter() - start
    imported = set(re.findall(r"\|\s+([\w.]+)\s*$", out.stderr, flags=re.M))
    ours = sorted(m for m in imported if m.split(".")[:2][-1] in WORKFLOWS)
    assert "train" in out.stdout and "demo" in out.stdout
    assert ours == [], f"--help imported workflow modules {ours}"
    heavy = {"wandb", "optuna", "lightning", "transformers", "matplotlib", "pandas"}
    assert not {m.split(".")[0] for m in imported} & heavy
    # A loose budget: torch's own import is most of it; a workflow import would add seconds.
    assert seconds < 20, f"amptrain --help took {seconds:.1f} s"


def test_every_train_flag_comes_from_a_config_field():
    from amptrain.config import FitOptions, TrainConfig
    from amptrain.flags import train_flags

    for f in train_flags():
        owner = FitOptions() if f.field.startswith("fit.") else TrainConfig()
        assert getattr(owner, f.field.removeprefix("fit.")) == f.default
        assert f.help and f.flag == "--" + f.field.removeprefix("fit.").replace("_", "-")


def _option_blocks(help_text: str) -> dict[str, str]:
    """Each option's flag -> its whole help entry, as one line."""
    blocks: dict[str, str] = {}
    flag = None
    for line in help_text.splitlines():
        start = re.match(r"^  (--[\w-]+)( [A-Z_]+)?", line)
        if start:
            flag = start.group(1) if start.group(2) else None  # flags without a value: no default
            blocks[flag or ""] = line
        elif flag and line.startswith("   "):
            blocks[flag] += " " + line.strip()
    blocks.pop("", None)
    return blocks


@pytest.mark.parametrize("command", ["train", "bench", "doctor", "compare", "search", "demo"])
def test_every_command_documents_its_defaults(command):
    out = subprocess.run([sys.executable, "-m", "amptrain", command, "--help"],
                         capture_output=True, text=True, check=True)  # fmt: skip
    blocks = _option_blocks(out.stdout)
    assert blocks, out.stdout
    # Options with no default value: absent means "not given", and their help says what happens.
    optional = {"--config", "--resume", "--study-name", "--storage", "--space", "--budget-steps",
                "--budget-tokens", "--reference-layers", "--precisions", "--wandb"}  # fmt: skip
    for flag, entry in blocks.items():
        if flag not in optional:
            assert "default" in entry, f"amptrain {command} {flag} shows no default: {entry}"
