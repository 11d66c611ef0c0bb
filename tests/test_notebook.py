"""examples/quickstart.ipynb runs top to bottom on CPU with small settings (AMPTRAIN_QUICK=1)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "quickstart.ipynb"


def test_the_notebook_is_valid_and_colab_friendly():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    sources = [c.source for c in nb.cells if c.cell_type == "code"]
    assert "except ImportError:\n" in sources[0] and "%pip install" in sources[0]
    assert "colab.research.google.com/)" not in nb.cells[0].source  # no link to nowhere
    assert any("class CustomTransformer(nn.Module)" in s for s in sources)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")  # stored clean


def _install_cell(spec: str, cwd: Path, monkeypatch) -> list[str]:
    """Run the notebook's install cell as IPython would, amptrain not importable; the %pip
    commands it asks for."""
    from IPython.core.inputtransformer2 import TransformerManager

    nb = nbformat.read(NOTEBOOK, as_version=4)
    source = [c.source for c in nb.cells if c.cell_type == "code"][0]
    source = source.replace('AMPTRAIN_SPEC = ""', f"AMPTRAIN_SPEC = {spec!r}")
    asked: list[str] = []

    class Shell:
        def run_line_magic(self, name, line):
            asked.append(f"%{name} " + line.format(**namespace))  # IPython expands {names}
            raise SystemExit  # stop here: nothing is installed by the test

    namespace = {"get_ipython": Shell}
    monkeypatch.chdir(cwd)
    monkeypatch.setitem(__import__("sys").modules, "amptrain", None)  # import raises ImportError
    with pytest.raises(SystemExit):
        exec(TransformerManager().transform_cell(source), namespace)  # noqa: S102
    return asked


def test_the_install_cell_installs_the_clone_it_sits_in(monkeypatch, capsys):
    root = NOTEBOOK.parents[1]
    assert _install_cell("", NOTEBOOK.parent, monkeypatch) == [f'%pip install -q "{root}[plot]"']
    assert f"installing {root}[plot]" in capsys.readouterr().out  # says where it installs from
    url = "git+https://example.org/amptrain.git"
    assert _install_cell(url, Path("/"), monkeypatch) == [
        f'%pip install -q "amptrain[plot] @ {url}"'
    ]


def test_the_install_cell_outside_the_repository_says_what_to_set(tmp_path, monkeypatch):
    with pytest.raises(RuntimeError, match="set AMPTRAIN_SPEC"):
        _install_cell("", tmp_path, monkeypatch)


@pytest.mark.slow
def test_the_notebook_executes_top_to_bottom(tmp_path, monkeypatch):
    monkeypatch.setenv("AMPTRAIN_QUICK", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError, with the cell and traceback, on any error
    print(f"notebook executed in {time.perf_counter() - start:.1f} s")
    text = "\n".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
    )
    assert "amptrain 0." in text and "precision" in text and "verdict:" in text
    import amptrain

    assert f"from {Path(amptrain.__file__).parent}" in text  # the cell says which amptrain ran
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if "image/png" in o.get("data", {})]  # fmt: skip
    run_dir = tmp_path / "runs" / "quickstart"
    written = {p.name for p in run_dir.iterdir()}
    assert written >= {"loss.png", "bench.png", "bench.json", "report.md"}
    assert (run_dir / "doctor" / "doctor.json").is_file()
    assert len(images) == 3  # training curves, benchmark, fp16 headroom
