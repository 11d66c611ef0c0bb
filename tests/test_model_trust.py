"""A run directory from elsewhere runs no code: its model file is imported only when this
machine trained from that very file, or when the command says `--trust-model-code`."""

from __future__ import annotations

import pytest
from test_resume import NET

from amptrain.cli import main
from amptrain.errors import ModelError
from amptrain.models import ModelSpec, build_model, trust

# The model file of a run received from someone else: importing it leaves a mark.
MARKING = "from pathlib import Path\nPath(__file__).with_name('ran').write_text('code ran')\n"


@pytest.fixture
def received(tmp_path, corpus, monkeypatch):
    """A run trained from `net.py` on "another machine" (another cache folder)."""
    net, out = tmp_path / "net.py", tmp_path / "runs"
    net.write_text(MARKING + NET.format(width=8))
    monkeypatch.setenv("AMPTRAIN_CACHE_DIR", str(tmp_path / "their-cache"))
    assert main(["train", "--model", f"{net}:Net", "--data", str(corpus), "--context", "16",
                 "--batch-size", "4", "--max-steps", "2", "--checkpoint-every", "1",
                 "--precision", "fp32", "--out", str(out), "--no-progress"]) == 0  # fmt: skip
    (tmp_path / "ran").unlink()
    monkeypatch.setenv("AMPTRAIN_CACHE_DIR", str(tmp_path / "our-cache"))  # this machine
    (run,) = out.iterdir()
    yield run
    trust.permit(False)


def _eval(run, corpus, tmp_path, *extra):
    return main(["eval", "--model", str(run), "--data", str(corpus), "--precision", "fp32",
                 "--out", str(tmp_path / "ev"), *extra])  # fmt: skip


def test_a_received_run_directory_imports_no_code_without_trust(received, corpus, tmp_path,
                                                                 capsys):  # fmt: skip
    assert _eval(received, corpus, tmp_path) == 2
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if line.startswith("amptrain:")]
    assert len(said) == 1 and "Traceback" not in err
    assert "net.py" in said[0] and "--trust-model-code" in said[0] and "--init-from" in said[0]
    assert not (tmp_path / "ran").exists()  # not a line of it ran
    with pytest.raises(ModelError, match="this machine has not trained from"):
        build_model(ModelSpec(str(received)), 256)  # the library refuses it too


def test_trusting_it_says_so_and_runs_it(received, corpus, tmp_path):
    assert _eval(received, corpus, tmp_path, "--trust-model-code") == 0
    assert (tmp_path / "ran").exists()


def test_a_received_run_is_not_resumed_into_its_code(received, tmp_path, capsys):
    resume = ["train", "--resume", str(received), "--max-steps", "3", "--no-progress"]
    before = sorted(p.name for p in received.rglob("*"))
    assert main(resume) == 2
    assert "--trust-model-code" in capsys.readouterr().err
    assert not (tmp_path / "ran").exists() and sorted(p.name for p in received.rglob("*")) == before
    assert main([*resume, "--trust-model-code"]) == 0


def test_this_machines_own_runs_need_no_flag(received, corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("AMPTRAIN_CACHE_DIR", str(tmp_path / "their-cache"))  # where it trained
    assert _eval(received, corpus, tmp_path) == 0
