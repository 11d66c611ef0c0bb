"""E1: the exit codes of `amptrain`, one meaning each, as the table of `amptrain train`'s page
(docs/commands/train.md) lists them."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from amptrain import checkpoint, run_opening, stepping, train
from amptrain.cli import main
from amptrain.errors import EXIT_CODES
from amptrain.runs import final_files

TINY = ["--layers", "1", "--width", "16", "--heads", "2", "--context", "16", "--batch-size",
        "4", "--eval-every", "2", "--eval-batches", "1", "--no-progress"]  # fmt: skip


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("".join(chr(97 + (i * 7) % 26) for i in range(3000)))
    return path


def _train(corpus, out, *extra):
    return main(["train", "--data", str(corpus), "--out", str(out), *TINY, *extra])


def signal_at_step_end(monkeypatch, step, signum):
    real = stepping.emit

    def emit(callbacks, hook, *args):
        real(callbacks, hook, *args)
        if hook == "on_step_end" and args[0].step == step:
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(stepping, "emit", emit)


def test_the_documented_table_lists_every_code_with_its_test():
    readme = (Path(__file__).parents[1] / "docs" / "commands" / "train.md").read_text()
    rows = dict(re.findall(r"^\| `(\d+)` \| [^|]+ \| `(tests/[^`]+)` \|$", readme, re.M))
    assert sorted(map(int, rows)) == sorted(EXIT_CODES)
    here = Path(__file__).read_text()
    for test in rows.values():
        path, _, name = test.partition("::")
        assert path == "tests/test_exit_codes.py" and f"def {name}(" in here, test


def test_exit_0_the_run_is_done(tmp_path, corpus, monkeypatch):
    monkeypatch.setattr(train, "MATPLOTLIB_AVAILABLE", False)  # plotting is tested elsewhere
    out = tmp_path / "runs"
    assert _train(corpus, out, "--max-steps", "2") == 0
    (run,) = out.iterdir()
    assert (run / "summary.json").exists() and (run / "model.safetensors").exists()


def test_exit_1_the_non_finite_policy_stopped_the_run(tmp_path, corpus, capsys):
    code = _train(corpus, tmp_path / "runs", "--max-steps", "6", "--lr", "1e308",
                  "--max-nonfinite", "1")  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and "amptrain: training stopped: " in err and "non-finite" in err, err
    assert "Traceback" not in err


def test_exit_2_the_input_was_refused_before_work(tmp_path, corpus, capsys):
    out = tmp_path / "runs"
    assert _train(corpus, out, "--lr", "-1") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "lr=-1.0" in err
    assert not out.exists()


@pytest.mark.slow
def test_exit_3_the_environment_failed_a_write(tmp_path, corpus):
    """A real failed write: the file-size limit makes the checkpoint's write fail (EFBIG)."""
    out = tmp_path / "runs"
    limit = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"  # a failing write, not a killed process
        "resource.setrlimit(resource.RLIMIT_FSIZE, (16384, 16384))\n"
        "from amptrain.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )  # fmt: skip
    argv = ["train", "--data", str(corpus), "--out", str(out), "--max-steps", "2", *TINY]
    done = subprocess.run([sys.executable, "-c", limit, *argv], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 3, done.stderr
    assert "amptrain: environment error: could not write checkpoint" in done.stderr
    assert "Traceback" not in done.stderr
    (run,) = out.iterdir()
    assert not list((run / "checkpoints").iterdir())  # nothing half-written is left


def _stopped_then_resumed(out, corpus, monkeypatch, capsys, signum) -> int:
    """Train 3 steps with `signum` after step 1; check the message and the resume; the code."""
    signal_at_step_end(monkeypatch, 1, signum)
    code = _train(corpus, out, "--max-steps", "3")
    name = signal.Signals(signum).name
    assert f"stopped by {name} after step 1" in capsys.readouterr().err
    monkeypatch.undo()
    assert main(["train", "--resume", "auto", "--out", str(out), "--no-progress"]) == 0
    return code


def test_exit_130_ctrl_c_checkpoints_and_is_resumable(tmp_path, corpus, monkeypatch, capsys):
    assert _stopped_then_resumed(tmp_path, corpus, monkeypatch, capsys, signal.SIGINT) == 130


def test_exit_143_sigterm_checkpoints_and_is_resumable(tmp_path, corpus, monkeypatch, capsys):
    assert _stopped_then_resumed(tmp_path, corpus, monkeypatch, capsys, signal.SIGTERM) == 143


def test_a_second_ctrl_c_aborts_with_one_line_and_no_temporary(
    tmp_path, corpus, monkeypatch, capsys
):
    out = tmp_path / "runs"
    signal_at_step_end(monkeypatch, 1, signal.SIGINT)
    real_write, writes = checkpoint.write_file, []

    def write(path, payload):
        writes.append(path)
        if len(writes) == 2:  # the second Ctrl-C lands in the middle of the checkpoint's save
            os.kill(os.getpid(), signal.SIGINT)
        return real_write(path, payload)

    monkeypatch.setattr(checkpoint, "write_file", write)
    assert _train(corpus, out, "--max-steps", "3") == 130
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if line.startswith("amptrain:")]
    assert len(said) == 1 and said[0].startswith("amptrain: aborted by Ctrl-C"), err
    assert "Traceback" not in err
    (run,) = out.iterdir()
    assert list((run / "checkpoints").iterdir()) == []  # no .tmp-step-* left behind


def test_a_plot_that_fails_is_a_warning_not_a_failed_run(tmp_path, corpus, capsys):
    """lr 1.7e308 is finite, but the lr axis of loss.png overflows: matplotlib raises."""
    out = tmp_path / "runs"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy's overflow on the way there
        code = _train(corpus, out, "--max-steps", "3", "--lr", "1.7e308")
    assert code == 0
    (run,) = out.iterdir()
    assert (run / "summary.json").exists() and (run / "model.safetensors").exists()
    assert checkpoint.latest(run / "checkpoints").name == "step-000000003"
    assert not (run / "loss.png").exists()
    err = " ".join(capsys.readouterr().err.split())
    assert "loss.png not drawn (ValueError" in err and "the run itself is complete" in err


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_before_training_is_one_line_and_leaves_no_run(
    signum, code, tmp_path, corpus, monkeypatch, capsys
):
    out = tmp_path / "runs"
    real = run_opening._write_sources

    def write_sources(run_dir, cfg):  # the run directory exists; nothing has trained
        real(run_dir, cfg)
        os.kill(os.getpid(), signum)

    monkeypatch.setattr(run_opening, "_write_sources", write_sources)
    assert _train(corpus, out, "--max-steps", "2") == code
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if line.startswith("amptrain:")]
    name = signal.Signals(signum).name
    assert said == [f"amptrain: stopped by {name}; nothing had trained; the new run directory "
                    "is removed"], err  # fmt: skip
    assert list(out.iterdir()) == []


def test_a_signal_before_a_resume_trains_leaves_the_run_as_it_was(
    tmp_path, corpus, monkeypatch, capsys
):
    out = tmp_path / "runs"
    assert _train(corpus, out, "--max-steps", "2", "--checkpoint-every", "1") == 0
    (run,) = out.iterdir()
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    real = run_opening.check_config_hash

    def check(*args):  # the checkpoint is loaded; no file of the run is edited yet
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args)

    monkeypatch.setattr(run_opening, "check_config_hash", check)
    capsys.readouterr()
    assert _train(corpus, out, "--max-steps", "4", "--resume", "auto") == 143
    assert "nothing had trained; the run is as it was" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_the_run_directory_removed_mid_run_stops_it_in_one_line(
    tmp_path, corpus, monkeypatch, capsys
):
    import shutil

    out = tmp_path / "runs"
    real = stepping.emit

    def emit(callbacks, hook, state, *args):
        real(callbacks, hook, state, *args)
        if hook == "on_step_end" and state.step == 2:  # someone removes the folder
            shutil.rmtree(next(out.iterdir()))

    monkeypatch.setattr(stepping, "emit", emit)
    assert _train(corpus, out, "--max-steps", "20", "--log-every", "1") == 3
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if line.startswith("amptrain:")]
    assert len(said) == 1 and "Traceback" not in err
    assert "was removed while the run trained (seen at step 2)" in " ".join(err.split())


@pytest.mark.parametrize("short", ["disk", "memory"])
def test_a_disk_or_memory_full_at_the_final_weights_names_the_file_and_the_checkpoint(
    short, tmp_path, corpus, monkeypatch, capsys
):
    import errno

    def full(weights, path):
        if short == "memory":
            raise MemoryError
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(final_files, "atomic_safetensors_save", full)
    out = tmp_path / "runs"
    assert _train(corpus, out, "--max-steps", "2") == 3
    err = capsys.readouterr().err
    assert len(re.findall(r"^amptrain: ", err, re.M)) == 1 and "Traceback" not in err, err
    err = " ".join(err.split())
    assert "could not write the final weights" in err and "model.safetensors" in err
    said = "No space left on device" if short == "disk" else "(out of memory); the trained"
    assert said in err and "in checkpoint step-000000002" in err


def test_out_of_memory_in_a_checkpoint_is_exit_3_in_one_line_and_the_last_one_kept(
    tmp_path, corpus, monkeypatch, capsys
):
    from amptrain import checkpoint

    real, calls = checkpoint.write_file, []

    def write_file(path, data):
        calls.append(path)
        if "step-000000004" in str(path) and path.name == "model.pt":
            raise MemoryError  # the second checkpoint
        return real(path, data)

    monkeypatch.setattr(checkpoint, "write_file", write_file)
    out = tmp_path / "runs"
    assert _train(corpus, out, "--max-steps", "6", "--checkpoint-every", "2") == 3
    err = capsys.readouterr().err
    assert len(re.findall(r"^amptrain: ", err, re.M)) == 1 and "Traceback" not in err, err
    assert "could not write checkpoint step-000000004" in err and "out of memory" in err
    (run,) = out.iterdir()
    kept = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert kept == ["step-000000002"], kept
    assert checkpoint.load(run / "checkpoints" / "step-000000002").trainer["step"] == 2
