"""Safe loading (S1, S2), a lint for unsafe loads, paths inside the run (S7), modes (S8-lite)."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import pathlib
import pickle
import shutil
import stat
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import pattern_blocks, rewrite_manifest_entry, tiny_model

import amptrain
from amptrain import checkpoint, train
from amptrain.checkpoint import CheckpointError
from amptrain.cli import main
from amptrain.runs import create_run_dir

PACKAGE = Path(amptrain.__file__).resolve().parent
TENSOR_FILES = ("model.pt", "optimizer.pt", "scheduler.pt", "scaler.pt", "rng.pt")
CLI_ARGS = ["--layers", "1", "--width", "16", "--heads", "2", "--context", "16", "--batch-size",
            "4", "--max-steps", "3", "--eval-every", "3", "--precision", "fp32",
            "--no-progress"]  # fmt: skip


class _WritesMarker:
    """Unpickling this calls `Path.write_text(marker, "pwned")`: code runs, visibly."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.write_text, (pathlib.Path(self.marker), "pwned"))


def zip_payload(path: Path, marker: Path) -> None:
    # Hidden among real tensors, as in a tampered state dict.
    torch.save({"wte.weight": torch.zeros(2, 2), "evil": _WritesMarker(marker)}, path)


def _legacy_payload(path: Path, marker: Path) -> None:
    torch.save([_WritesMarker(marker)], path, _use_new_zipfile_serialization=False)


def _raw_pickle_payload(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps(_WritesMarker(marker), protocol=2))


PAYLOADS = {"zip": zip_payload, "legacy": _legacy_payload, "raw-pickle": _raw_pickle_payload}


def fit_checkpoints(root: Path, precision: str = "fp32", max_steps: int = 2) -> Path:
    amptrain.fit(tiny_model(n_layer=1), pattern_blocks(24), pattern_blocks(8, seed=1),
                 precision=precision, checkpoint_dir=root, max_steps=max_steps, batch_size=4,
                 eval_every=max_steps, eval_batches=1, checkpoint_every=1)  # fmt: skip
    return root


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A real checkpoint root written by `fit` (read-only use: copy before tampering)."""
    return fit_checkpoints(tmp_path_factory.mktemp("pristine") / "ck")


@pytest.fixture
def step_dir(pristine, tmp_path) -> Path:
    """A private copy of the newest checkpoint of `pristine`."""
    source = checkpoint.latest(pristine)
    assert source is not None
    return Path(shutil.copytree(source, tmp_path / "ck" / source.name))


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "MARKER"


@pytest.mark.parametrize("kind", PAYLOADS)
def test_the_payloads_really_run_code_when_unpickled_freely(tmp_path, marker, kind):
    # Guards the tests below: a payload that ran nothing would make them pass vacuously.
    path = tmp_path / "evil.pt"
    PAYLOADS[kind](path, marker)
    if kind == "raw-pickle":
        pickle.loads(path.read_bytes())
    else:
        torch.load(path, weights_only=False)
    assert marker.read_text() == "pwned"


def test_an_untampered_copy_loads(step_dir):
    ckpt = checkpoint.load(step_dir)
    assert set(ckpt.tensors) == {name[:-3] for name in TENSOR_FILES}
    assert ckpt.trainer["step"] == 2


@pytest.mark.parametrize("kind", PAYLOADS)
@pytest.mark.parametrize("name", TENSOR_FILES)
def test_s1_code_in_any_checkpoint_file_is_refused_not_run(step_dir, marker, name, kind):
    PAYLOADS[kind](step_dir / name, marker)
    rewrite_manifest_entry(step_dir, name)
    assert checkpoint.verify(step_dir) is None  # the manifest no longer protects us
    with pytest.raises(CheckpointError, match="weights_only") as info:
        checkpoint.load(step_dir)
    assert name in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("name", TENSOR_FILES)
def test_s1_a_swapped_file_without_a_matching_manifest_is_refused_as_corrupt(
    step_dir, marker, name
):
    zip_payload(step_dir / name, marker)
    with pytest.raises(CheckpointError, match="incomplete or corrupt") as info:
        checkpoint.load(step_dir)
    assert name in str(info.value)
    assert not marker.exists()


def _traversal_manifest(step_dir: Path) -> str:
    outside = step_dir.parent / "outside.bin"
    outside.write_bytes(b"not part of the checkpoint")
    manifest = json.loads((step_dir / "manifest.json").read_text())
    manifest["../outside.bin"] = {
        "size": outside.stat().st_size,
        "sha256": hashlib.sha256(outside.read_bytes()).hexdigest(),
    }
    return json.dumps(manifest)


MALFORMED_MANIFESTS = {
    "list": lambda d: "[]",
    "null": lambda d: "null",
    "entry-without-size": lambda d: '{"model.pt": {}}',
    "entry-not-an-object": lambda d: '{"model.pt": "x"}',
    "lists-no-file": lambda d: "{}",
    "names-a-file-outside": _traversal_manifest,
}


@pytest.mark.parametrize("kind", MALFORMED_MANIFESTS)
def test_a_malformed_manifest_is_reported_as_corrupt_not_crashing(step_dir, kind):
    (step_dir / "manifest.json").write_text(MALFORMED_MANIFESTS[kind](step_dir))
    assert isinstance(checkpoint.verify(step_dir), str)
    with pytest.raises(CheckpointError, match="incomplete or corrupt"):
        checkpoint.load(step_dir)


def test_s1_safe_torch_load_refuses_code_with_a_checkpoint_error(tmp_path, marker):
    path = tmp_path / "evil.pt"
    zip_payload(path, marker)
    with pytest.raises(CheckpointError, match="weights_only"):
        checkpoint.safe_torch_load(path)
    assert not marker.exists()


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory) -> Path:
    """A real `amptrain train` run directory with checkpoints (copy before tampering)."""
    base = tmp_path_factory.mktemp("cli")
    corpus = base / "corpus.txt"
    corpus.write_text("abcdefgh " * 400)
    out = base / "runs"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "MATPLOTLIB_AVAILABLE", False)  # loss.png costs a second, not tested
        assert main(["train", "--data", str(corpus), "--out", str(out), *CLI_ARGS]) == 0
    (run,) = out.iterdir()
    assert checkpoint.latest(run / "checkpoints") is not None
    return run


@pytest.mark.parametrize("target", ["checkpoint", "run", "auto"])
@pytest.mark.parametrize("name", ["model.pt", "rng.pt"])
def test_s1_cli_resume_of_a_tampered_checkpoint_exits_nonzero_without_running_it(
    cli_run, tmp_path, marker, capsys, target, name
):
    out = tmp_path / "runs"
    run = Path(shutil.copytree(cli_run, out / cli_run.name))
    step_dir = checkpoint.latest(run / "checkpoints")
    zip_payload(step_dir / name, marker)
    rewrite_manifest_entry(step_dir, name)
    resume = {"checkpoint": str(step_dir), "run": str(run), "auto": "auto"}[target]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    code = main(["train", "--resume", resume, "--out", str(out), "--no-progress"])
    assert code == 2
    assert "weights_only" in capsys.readouterr().err
    assert not marker.exists()
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def _unsafe_loads(source: str, filename: str = "<string>") -> list[str]:
    """`torch.load` calls without a literal `weights_only=True`, and any pickle-family load."""
    problems = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        owner = node.func.value
        owner_name = owner.id if isinstance(owner, ast.Name) else ast.unparse(owner)
        attr, where = node.func.attr, f"{filename}:{node.lineno}"
        if owner_name in ("torch", "torch.serialization") and attr == "load":
            safe = any(
                k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value
                is True for k in node.keywords
            )  # fmt: skip
            if not safe:
                problems.append(f"{where}: {ast.unparse(node)}")
        elif owner_name in ("pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib") and (
            attr in ("load", "loads", "Unpickler")
        ):
            problems.append(f"{where}: {ast.unparse(node)}")
    return problems


def test_the_load_lint_catches_what_it_should():
    bad = (
        "import torch, pickle\n"
        "torch.load('a')\n"
        "torch.load('a', weights_only=False)\n"
        "torch.load('a', weights_only=flag)\n"
        "pickle.load(f)\n"
        "pickle.loads(b)\n"
    )
    assert len(_unsafe_loads(bad)) == 5
    good = "torch.load('a', map_location='cpu', weights_only=True)\npickle.dumps(x)\n"
    assert _unsafe_loads(good) == []


def test_amptrain_never_loads_without_weights_only_nor_unpickles():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 10  # the walk found the package
    problems = []
    for path in files:
        problems += _unsafe_loads(path.read_text(encoding="utf-8"), str(path.relative_to(PACKAGE)))
    assert problems == []


def _only_torch_safe_globals() -> None:
    extra = [g for g in torch.serialization.get_safe_globals()
             if not getattr(g, "__module__", "").startswith("torch")]  # fmt: skip
    assert extra == [], f"someone registered safe globals: {extra}"


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_s2_every_checkpoint_file_loads_with_weights_only(tmp_path, precision):
    root = fit_checkpoints(tmp_path / "ck", precision)
    steps = checkpoint.list_checkpoints(root)
    assert [p.name for p in steps] == ["step-000000001", "step-000000002"]
    _only_torch_safe_globals()
    for step in steps:
        pts = sorted(p.name for p in step.glob("*.pt"))
        assert pts == sorted(TENSOR_FILES)
        loaded = {name: torch.load(step / name, weights_only=True) for name in pts}
        assert "wte.weight" in loaded["model.pt"]
        assert loaded["optimizer.pt"]["state"]
        assert "python" in loaded["rng.pt"]["ranks"][0]
    scaler = torch.load(steps[-1] / "scaler.pt", weights_only=True)
    assert bool(scaler.get("enabled")) == (precision == "fp16")


def test_s2_the_cli_run_files_load_with_weights_only(cli_run):
    _only_torch_safe_globals()
    pts = sorted(cli_run.rglob("*.pt"))
    assert len(pts) >= len(TENSOR_FILES)  # the checkpoints; the final weights are safetensors
    for path in pts:
        torch.load(path, weights_only=True)
    assert "wte.weight" in safetensors.torch.load_file(cli_run / "model.safetensors")


@pytest.mark.parametrize(
    "name",
    ["../evil", "train/../../evil", "/tmp/evil", "a/b", "a\x00b", "..", "train\\..\\x", "", "."],
)
def test_s7_run_names_that_leave_the_root_are_rejected(tmp_path, name):
    root = tmp_path / "root"
    root.mkdir()
    outside = sorted(tmp_path.parent.iterdir())
    with pytest.raises(ValueError, match="run command name"):
        create_run_dir(root, name)
    assert list(root.iterdir()) == []
    assert sorted(tmp_path.iterdir()) == [root]
    assert sorted(tmp_path.parent.iterdir()) == outside


def test_s7_a_good_run_name_is_a_direct_child_of_the_root(tmp_path):
    run = create_run_dir(tmp_path / "root", "train")
    assert run.parent == tmp_path / "root" and run.name.startswith("train-")


def test_s7_fit_writes_checkpoints_only_under_the_given_root(tmp_path):
    (tmp_path / "cwd").mkdir()
    cwd = os.getcwd()
    os.chdir(tmp_path / "cwd")  # relative writes would land here
    try:
        root = fit_checkpoints(tmp_path / "ck", max_steps=5)
    finally:
        os.chdir(cwd)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "cwd"]
    assert list((tmp_path / "cwd").iterdir()) == []
    # keep_last=3: three complete checkpoints, no temporaries left beside them.
    names = sorted(p.name for p in root.iterdir())
    assert names == ["step-000000003", "step-000000004", "step-000000005"]
    for step in root.iterdir():
        assert sorted(p.name for p in step.iterdir()) == sorted(
            [*TENSOR_FILES, "trainer.json", "manifest.json"]
        )


def _assert_not_world_writable(path: Path) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    assert not mode & stat.S_IWOTH, f"{path} is world-writable ({oct(mode)})"


def test_s8_checkpoint_directories_are_not_world_writable_even_with_umask_0(tmp_path):
    old = os.umask(0)  # the most permissive umask: only amptrain's own modes protect the dirs
    try:
        root = fit_checkpoints(tmp_path / "ck", max_steps=1)
    finally:
        os.umask(old)
    step = checkpoint.latest(root)
    assert step is not None
    for path in (root, step):
        _assert_not_world_writable(path)
        assert not stat.S_IMODE(path.stat().st_mode) & stat.S_IWGRP


def test_s8_the_cli_run_and_checkpoint_dirs_are_not_world_writable(cli_run):
    steps = checkpoint.list_checkpoints(cli_run / "checkpoints")
    assert steps
    for path in (cli_run, cli_run / "checkpoints", *steps):
        _assert_not_world_writable(path)
