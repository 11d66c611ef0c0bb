"""S10: security refusals in our own words; resume warnings that name what they skip and use."""

from __future__ import annotations

import logging

import pytest
from conftest import save_tiny_gpt2
from test_security import fit_checkpoints, zip_payload

from amptrain import checkpoint
from amptrain.cli import main


def test_a_crafted_pytorch_model_bin_is_one_line_exit_2_and_never_advises_unsafe_loading(
    tmp_path, capsys
):
    pytest.importorskip("transformers")
    model_dir = save_tiny_gpt2(tmp_path / "hf", "the quick brown fox " * 50)
    for weights in model_dir.glob("*.safetensors"):
        weights.unlink()
    marker = tmp_path / "pwned"
    zip_payload(model_dir / "pytorch_model.bin", marker)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox " * 50)
    out = tmp_path / "runs"
    code = main(["train", "--model", str(model_dir), "--data", str(corpus), "--context", "16",
                 "--max-steps", "1", "--out", str(out), "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if line.startswith("amptrain:")]
    assert code == 2 and len(said) == 1, err
    assert "refusing to load" in said[0] and "pytorch_model.bin" in said[0]
    assert "could run code" in said[0]
    assert "weights_only=False" not in err and "will likely succeed" not in err
    assert "Traceback" not in err
    assert not marker.exists() and not out.exists()


def test_a_refused_checkpoint_file_is_described_in_our_words(tmp_path):
    path = tmp_path / "evil.pt"
    zip_payload(path, tmp_path / "pwned")
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.safe_torch_load(path)
    message = str(info.value)
    assert "weights_only=False" not in message and "likely succeed" not in message
    assert "(getattr)" in message  # the refused object is named: the payload calls getattr


def test_resume_warnings_name_every_skipped_checkpoint_and_the_one_used(tmp_path, caplog):
    root = fit_checkpoints(tmp_path / "ck", max_steps=3)  # keeps steps 1, 2, 3
    for step in (2, 3):
        model_pt = root / f"step-{step:09d}" / "model.pt"
        model_pt.write_bytes(model_pt.read_bytes()[:-10])
    logging.getLogger("amptrain").propagate = True
    with caplog.at_level(logging.WARNING, logger="amptrain"):
        caplog.clear()  # only what latest() says: fitting may warn about the precision
        assert checkpoint.latest(root) == root / "step-000000001"
    (record,) = [r for r in caplog.records if r.name == "amptrain"]
    message = record.getMessage()
    assert "step-000000003 incomplete/corrupt" in message
    assert "step-000000002 incomplete/corrupt" in message
    assert message.endswith("using step-000000001")
    assert "using step-000000002" not in message
