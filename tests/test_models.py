from __future__ import annotations

import sys

import pytest
import torch
from conftest import pattern_blocks

import amptrain
from amptrain.errors import ModelError
from amptrain.models import ModelSpec, build_model

MODEL_FILE = """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self, vocab_size, width=8):
        super().__init__()
        self.emb = nn.Embedding(vocab_size, width)
        self.out = nn.Linear(width, vocab_size)

    def forward(self, input_0_tokens, mask=None):
        return {"logits": self.out(self.emb(input_0_tokens))}

def make_net(width=4):
    return Net(vocab_size=32, width=width)

class Flat(nn.Module):
    def __init__(self, vocab_size):
        super().__init__()
        self.emb = nn.Embedding(vocab_size, 4)

    def forward(self, ids):
        return self.emb(ids).sum(-1)

NOT_A_MODEL = 3

class Plain:
    def __init__(self, vocab_size):
        self.vocab_size = vocab_size

class IntLogits(nn.Module):
    def __init__(self, vocab_size):
        super().__init__()
        self.emb = nn.Embedding(vocab_size, 4)

    def forward(self, ids):
        return torch.zeros(ids.size(0), ids.size(1), 32, dtype=torch.long)
"""


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "model.py"
    path.write_text(MODEL_FILE)
    return path


def test_class_gets_vocab_size_from_the_data_and_kwargs(model_file):
    model = build_model(ModelSpec(f"{model_file}:Net", {"width": 6}), vocab_size=32)
    assert model.emb.num_embeddings == 32 and model.emb.embedding_dim == 6
    result = amptrain.fit(model, pattern_blocks(16), precision="bf16", max_steps=2, batch_size=4)
    assert result.steps == 2


def test_factory_function_is_called_with_kwargs(model_file):
    model = build_model(ModelSpec(f"{model_file}:make_net", {"width": 5}), vocab_size=999)
    assert model.emb.embedding_dim == 5


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.py"):
        build_model(ModelSpec(f"{tmp_path}/nowhere.py:Net"), 32)


def test_missing_symbol_lists_what_the_file_has(model_file):
    with pytest.raises(ModelError, match=r"no symbol .Missing.*Flat, IntLogits, Net, make_net"):
        build_model(ModelSpec(f"{model_file}:Missing"), 32)


def test_symbol_that_is_not_a_model(model_file):
    with pytest.raises(ModelError, match="not a class or function"):
        build_model(ModelSpec(f"{model_file}:NOT_A_MODEL"), 32)


def test_a_class_that_is_not_a_module_is_refused(model_file):
    with pytest.raises(ModelError, match=r"Plain returned a Plain, not a torch nn.Module"):
        build_model(ModelSpec(f"{model_file}:Plain"), 32)


def test_integer_logits_are_refused_with_their_dtype(model_file):
    spec = f"{model_file}:IntLogits"
    with pytest.raises(ModelError, match=rf"{spec} returned logits of dtype torch.int64"):
        amptrain.fit(build_model(ModelSpec(spec), 32), pattern_blocks(8), source=spec,
                     max_steps=1, batch_size=4)  # fmt: skip


def test_wrong_output_shape_names_file_symbol_and_shape(model_file):
    spec = f"{model_file}:Flat"
    model = build_model(ModelSpec(spec), 32)
    with pytest.raises(ModelError, match=rf"{spec} returned logits of shape \[1, 16\]"):
        amptrain.fit(model, pattern_blocks(8), source=spec, max_steps=1, batch_size=4)


def test_import_error_keeps_the_users_traceback(tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("import torch\nraise RuntimeError('boom in user code')\n")
    with pytest.raises(ModelError, match="importing model file .*broken.py failed.*boom") as err:
        build_model(ModelSpec(f"{broken}:Net"), 32)
    assert isinstance(err.value.__cause__, RuntimeError)


def test_unknown_model_spec_explains_the_forms():
    with pytest.raises(ModelError, match="tiny-gpt.*file.py:Name.*Hugging Face"):
        build_model(ModelSpec("gpt-5"), 32)


def test_model_file_is_logged_with_its_sha256(model_file, caplog):
    import hashlib

    caplog.set_level("INFO", logger="amptrain")
    build_model(ModelSpec(f"{model_file}:Net"), 32)
    digest = hashlib.sha256(model_file.read_bytes()).hexdigest()
    assert digest in caplog.text and str(model_file) in caplog.text
    caplog.clear()  # a search or compare builds it again per trial or seed: said once
    build_model(ModelSpec(f"{model_file}:Net"), 32)
    assert "importing model file" not in caplog.text


def test_local_hugging_face_directory_trains(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "hf")
    model = build_model(ModelSpec(str(tmp_path / "hf")), vocab_size=32)
    result = amptrain.fit(model, pattern_blocks(16), precision="bf16", max_steps=2, batch_size=4)
    assert result.steps == 2 and math_finite(result.final_train_loss)


def math_finite(x):
    return torch.isfinite(torch.tensor(x)).item()


def test_directory_without_config_is_not_a_model(tmp_path):
    pytest.importorskip("transformers")
    with pytest.raises(ModelError, match="no config.json"):
        build_model(ModelSpec(str(tmp_path)), 32)


def test_tiny_gpt_rejects_bad_sizes():
    with pytest.raises(ValueError, match="not divisible by heads 3"):
        build_model(ModelSpec("tiny-gpt", {"n_embd": 16, "n_head": 3}), 32)


def test_user_modules_are_not_left_behind_on_import_failure(tmp_path):
    broken = tmp_path / "broken2.py"
    broken.write_text("raise ImportError('x')\n")
    before = set(sys.modules)
    with pytest.raises(ModelError):
        build_model(ModelSpec(f"{broken}:Net"), 32)
    assert set(sys.modules) == before
