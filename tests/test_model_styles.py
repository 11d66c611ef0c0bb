"""Models written the way people write them, each trained with `amptrain train`: nanoGPT's
two files, minGPT's package, a config-dataclass constructor with its layers beside it, and
Llama- and Qwen2-family Hugging Face directories saved locally."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from amptrain.adapter import forward_logits, next_token_loss, shifted_targets
from amptrain.cli import main
from amptrain.errors import ModelError
from amptrain.models import ModelSpec, build_model

STYLES = Path(__file__).parent / "model_styles"
FLAGS = ["--context", "16", "--batch-size", "4", "--max-steps", "3", "--eval-every", "3",
         "--precision", "fp32", "--no-progress"]  # fmt: skip


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("".join(chr(97 + (i * 7) % 26) for i in range(3000)))
    return path


@pytest.fixture
def nanogpt(tmp_path):
    """nanoGPT's layout: model.py, and a script beside it that imports it."""
    folder = tmp_path / "nanogpt"
    folder.mkdir()
    shutil.copy(STYLES / "nanogpt_model.py", folder / "model.py")
    shutil.copy(STYLES / "nanogpt_train.py", folder / "train_gpt.py")
    return folder


@pytest.fixture
def mingpt(tmp_path):
    """minGPT's layout: the mingpt package, and a script beside it."""
    folder = tmp_path / "mingpt_project"
    shutil.copytree(STYLES / "mingpt", folder / "mingpt")
    shutil.copy(STYLES / "mingpt_build.py", folder / "build.py")
    return folder


def _train(tmp_path, corpus, model, *extra):
    out = tmp_path / "runs"
    code = main(["train", "--model", model, "--data", str(corpus), "--out", str(out), *FLAGS,
                 *extra])  # fmt: skip
    assert code == 0
    (run,) = out.iterdir()
    return json.loads((run / "summary.json").read_text())


def test_nanogpt_model_file_trains_with_its_config_dataclass(tmp_path, corpus, nanogpt):
    kwargs = json.dumps({"n_layer": 1, "n_head": 2, "n_embd": 16, "bias": False})
    summary = _train(tmp_path, corpus, f"{nanogpt}/model.py:GPT", "--model-kwargs", kwargs)
    assert summary["steps"] == 3 and summary["final_val_loss"] < summary["initial_val_loss"]
    assert "model" not in sys.modules  # the sibling was taken out again


def test_nanogpt_script_imports_its_model_file(tmp_path, corpus, nanogpt):
    summary = _train(tmp_path, corpus, f"{nanogpt}/train_gpt.py:build")
    assert summary["steps"] == 3 and summary["final_val_loss"] < summary["initial_val_loss"]


def test_nanogpt_gets_full_logits_and_its_own_loss_agrees(nanogpt):
    model = build_model(ModelSpec(f"{nanogpt}/model.py:GPT", {"n_layer": 1, "n_head": 2,
                                                              "n_embd": 16}), 32, 8)  # fmt: skip
    assert model.config.vocab_size == 32 and model.config.block_size == 8  # filled
    ids = torch.randint(0, 32, (2, 8))
    logits = forward_logits(model, ids, ids)
    assert logits.shape == (2, 8, 32)  # not nanoGPT's inference shape [2, 1, 32]
    _, own_loss = model(ids, targets=shifted_targets(ids))
    ours = next_token_loss(logits, ids) / (2 * 7)
    torch.testing.assert_close(ours, own_loss)


def test_mingpt_package_beside_the_script_trains(tmp_path, corpus, mingpt):
    summary = _train(tmp_path, corpus, f"{mingpt}/build.py:build")
    assert summary["steps"] == 3 and summary["final_val_loss"] < summary["initial_val_loss"]
    assert not any(name == "mingpt" or name.startswith("mingpt.") for name in sys.modules)


def test_mingpt_default_config_is_filled_from_model_kwargs(mingpt, monkeypatch):
    monkeypatch.syspath_prepend(str(mingpt))  # the model file itself imports `mingpt.utils`
    kwargs = {"model_type": None, "n_layer": 1, "n_head": 2, "n_embd": 16}
    model = build_model(ModelSpec(f"{mingpt}/mingpt/model.py:GPT", kwargs), 40, 12)
    assert model.block_size == 12 and model.lm_head.out_features == 40
    with pytest.raises(ModelError, match=r"default config has no \['width'\].*n_embd"):
        build_model(ModelSpec(f"{mingpt}/mingpt/model.py:GPT", {"width": 3}), 40, 12)


def test_annotated_config_dataclass_and_layers_file(tmp_path, corpus):
    folder = tmp_path / "llama_ref"
    folder.mkdir()
    for name in ("llama_style.py", "layers.py"):
        shutil.copy(STYLES / name, folder / name)
    summary = _train(tmp_path, corpus, f"{folder}/llama_style.py:Transformer",
                     "--model-kwargs", '{"dim": 16}')  # fmt: skip
    assert summary["steps"] == 3 and summary["parameters"] > 0
    with pytest.raises(ModelError, match=r"ModelArgs, which has no field \['width'\]; its fields"):
        build_model(ModelSpec(f"{folder}/llama_style.py:Transformer", {"width": 3}), 32, 16)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_hugging_face_llama_and_qwen2_directories_train(family, tmp_path, corpus):
    transformers = pytest.importorskip("transformers")
    config_class = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[family]
    config = config_class(vocab_size=256, hidden_size=16, intermediate_size=32,
                          num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                          max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path / family)
    summary = _train(tmp_path, corpus, str(tmp_path / family))
    assert summary["steps"] == 3 and summary["final_val_loss"] < summary["initial_val_loss"]


def test_sys_path_is_restored_and_a_clashing_sibling_is_reported(tmp_path, caplog):
    folder = tmp_path / "clash"
    folder.mkdir()
    (folder / "json.py").write_text("VALUE = 1\n")
    (folder / "net.py").write_text(
        "import json\nfrom torch import nn\n\n"
        "def build(vocab_size):\n"
        "    return nn.Sequential(nn.Embedding(vocab_size, 4), nn.Linear(4, vocab_size))\n"
    )
    caplog.set_level("INFO", logger="amptrain")
    before = list(sys.path)
    build_model(ModelSpec(f"{folder}/net.py:build"), 32)
    assert sys.path == before
    assert f"{folder}/json has the name of the installed module json" in caplog.text
    import json as stdlib_json

    assert not hasattr(stdlib_json, "VALUE")


def test_two_model_files_keep_their_own_sibling(tmp_path):
    models = []
    for width in (4, 6):
        folder = tmp_path / f"w{width}"
        folder.mkdir()
        (folder / "layers.py").write_text(f"WIDTH = {width}\n")
        (folder / "net.py").write_text(
            "from torch import nn\nfrom layers import WIDTH\n\n"
            "def build(vocab_size):\n    return nn.Embedding(vocab_size, WIDTH)\n"
        )
        models.append(build_model(ModelSpec(f"{folder}/net.py:build"), 32))
    assert [m.embedding_dim for m in models] == [4, 6]
