"""The Hugging Face round trip and self-contained run directories.

A run fine-tuned from a local Hugging Face directory writes `hf/`, which transformers loads
and generates with, giving amptrain's logits; every run writes `model.safetensors`; a run
moved to another folder still loads; a base that is gone or changed, and weights files that
are damaged, crafted or missing, are one line and exit 2.
"""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch
from conftest import save_tiny_gpt2

from amptrain.adapter import forward_logits
from amptrain.cli import main
from amptrain.models import ModelSpec, build_model
from amptrain.models.trained import read_weights, weights

transformers = pytest.importorskip("transformers")

TEXT = "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n" * 40
FLAGS = ["--context", "16", "--batch-size", "4", "--max-steps", "2", "--eval-every", "2",
         "--precision", "fp32", "--no-progress"]  # fmt: skip
TINY = ["--layers", "1", "--width", "16", "--heads", "2"]


def save_tiny_llama(path):
    """A tiny Llama with a BPE tokenizer that adds BOS, saved as the Hub lays it out."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=280, special_tokens=["<s>", "</s>"],
                                  show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    bpe.train_from_iterator([TEXT], trainer)
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>",
                                                     eos_token="</s>")  # fmt: skip
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
        bos_token_id=0, eos_token_id=1, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def train(base, out, *extra):
    corpus = out.parent / "corpus.txt"
    corpus.write_text(TEXT)
    assert main(["train", "--model", str(base), "--data", str(corpus), "--out", str(out),
                 *FLAGS, *extra]) == 0  # fmt: skip
    (run,) = out.glob("train-*")
    return run


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def hf_run(request, tmp_path_factory):
    """(base directory, run directory) of a fine-tuned tiny Llama (untied) and GPT-2 (tied)."""
    root = tmp_path_factory.mktemp(request.param)
    save = save_tiny_llama if request.param == "llama" else lambda p: save_tiny_gpt2(p, TEXT)
    base = save(root / f"tiny-{request.param}")
    return base, train(base, root / "runs")


@pytest.mark.slow
def test_hf_export_loads_in_transformers_with_amptrain_logits_and_generates(hf_run):
    base, run = hf_run
    export = run / "hf"
    names = {p.name for p in export.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= names  # fmt: skip
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(export).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(export)
    ids = hf_tokenizer("def add(a, b):", return_tensors="pt")["input_ids"]
    from tokenizers import Tokenizer

    assert ids[0].tolist() == Tokenizer.from_file(str(base / "tokenizer.json")).encode(
        "def add(a, b):").ids  # the export encodes as the run trained  # fmt: skip
    ours = build_model(ModelSpec(str(run)), hf_tokenizer.vocab_size).eval()
    with torch.no_grad():
        assert torch.equal(hf_model(ids).logits, forward_logits(ours, ids, ids))
        fresh = transformers.AutoModelForCausalLM.from_pretrained(base)(ids).logits
    assert not torch.equal(fresh, hf_model(ids).logits)  # the trained weights, not the base's
    tied = hf_model.config.tie_word_embeddings
    assert (hf_model.lm_head.weight is hf_model.get_input_embeddings().weight) == tied
    out = hf_model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 4
    assert isinstance(hf_tokenizer.decode(out[0]), str)


@pytest.mark.slow
def test_a_moved_hf_run_generates_from_another_folder(hf_run, tmp_path, monkeypatch, capsys):
    base, run = hf_run
    moved = tmp_path / "b" / run.name
    shutil.copytree(run, moved)
    shutil.copytree(base, tmp_path / "base-copy")
    shutil.move(base, tmp_path / "base-gone")  # the run no longer needs its base
    try:
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        monkeypatch.chdir(elsewhere)
        assert main(["generate", "--model", str(moved), "--prompt", "def", "--max-new-tokens",
                     "5", "--seed", "1", "--precision", "fp32"]) == 0  # fmt: skip
        assert capsys.readouterr().out.startswith("def")
    finally:
        shutil.move(tmp_path / "base-gone", base)


def test_a_moved_tiny_gpt_run_generates_from_another_folder(tmp_path, monkeypatch, capsys):
    (tmp_path / "a").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    run = train("tiny-gpt", tmp_path / "a" / "runs", *TINY)
    moved = tmp_path / "b" / "run"
    shutil.move(run, moved)
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["generate", "--model", str(moved), "--prompt", "def", "--max-new-tokens", "5",
                 "--seed", "1", "--precision", "fp32"]) == 0  # fmt: skip
    assert capsys.readouterr().out.startswith("def")


@pytest.fixture
def file_run(tmp_path, monkeypatch):
    """A run trained from a model file given by a relative path, as people type it."""
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "net.py").write_text(
        "from torch import nn\n\n"
        "def build(vocab_size):\n"
        "    return nn.Sequential(nn.Embedding(vocab_size, 8), nn.Linear(8, vocab_size))\n"
    )
    monkeypatch.chdir(tmp_path / "a")
    run = train("net.py:build", tmp_path / "a" / "runs", "--tokenizer", str(_tokenizer(tmp_path)))
    base = json.loads((run / "base.json").read_text())
    assert base["path"] == str(tmp_path / "a" / "net.py") and len(base["sha256"]) == 64
    monkeypatch.chdir(tmp_path)
    return run


def _tokenizer(tmp_path):
    """A bare tokenizer.json given by a relative path, which the run must carry with it."""
    save_tiny_gpt2(tmp_path / "a" / "tok", TEXT)
    return "tok/tokenizer.json"


def test_a_run_records_its_base_absolutely_and_loads_from_elsewhere(file_run, tmp_path):
    moved = tmp_path / "b" / "run"
    shutil.move(file_run, moved)
    shutil.rmtree(tmp_path / "a" / "tok")  # its tokenizer travels with it
    assert main(["generate", "--model", str(moved), "--prompt", "d", "--max-new-tokens", "2",
                 "--precision", "fp32"]) == 0  # fmt: skip


@pytest.mark.parametrize("change", ["gone", "changed"])
def test_a_base_gone_or_changed_is_one_line_naming_it(file_run, tmp_path, change, capsys):
    base = tmp_path / "a" / "net.py"
    if change == "gone":
        base.unlink()
    else:
        base.write_text(base.read_text().replace("8", "12"))
    capsys.readouterr()
    assert main(["generate", "--model", str(file_run), "--prompt", "d"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(base) in err
    assert ("is gone" if change == "gone" else "changed") in err and "--init-from" in err


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return train("tiny-gpt", tmp_path_factory.mktemp("tiny") / "runs", *TINY)


def test_every_run_writes_safetensors_that_read_back_with_tied_weights(tiny_run):
    run = tiny_run
    assert (run / "model.safetensors").is_file() and not (run / "model.pt").exists()
    model = build_model(ModelSpec(str(run)), 256)
    state = read_weights(run / "model.safetensors")
    assert set(state) == set(model.state_dict())  # the tied name comes back from the metadata
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    from safetensors import safe_open

    with safe_open(str(run / "model.safetensors"), "pt") as f:
        assert len(list(f.keys())) < len(state)  # a tied tensor is stored once


def test_an_old_run_with_model_pt_still_loads(tiny_run, tmp_path):
    run = tmp_path / "old-run"
    shutil.copytree(tiny_run, run)
    state = read_weights(run / "model.safetensors")
    torch.save(state, run / "model.pt")
    (run / "model.safetensors").unlink()
    (run / "base.json").unlink()
    model = build_model(ModelSpec(str(run)), 256)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert weights(run)[1] == run / "model.pt"
    fresh = tmp_path / "init"
    assert main(["train", "--data", str(tiny_run.parent.parent / "corpus.txt"), "--init-from",
                 str(run / "model.pt"), "--out", str(fresh), *FLAGS, *TINY]) == 0  # fmt: skip


def _crafted_safetensors(path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [10**6], "data_offsets": [0, 4 * 10**6]}})
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode() + b"xx")


class _Exploit:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned",))


def _pickle_that_runs_code(path):
    torch.save({"wte.weight": _Exploit()}, path)


BROKEN = {
    "text-as-model.pt": lambda run: (run / "model.pt").write_text("hello\n"),
    "text-as-safetensors": lambda run: (run / "model.safetensors").write_text("hello\n"),
    "crafted-safetensors": lambda run: _crafted_safetensors(run / "model.safetensors"),
    "pickle-running-code": lambda run: _pickle_that_runs_code(run / "model.pt"),
    "a-list": lambda run: torch.save([1, 2], run / "model.pt"),
    "strings": lambda run: torch.save({"wte.weight": "x"}, run / "model.pt"),
    "folder-as-weights": lambda run: (run / "model.pt").mkdir(),
    "no-weights": lambda run: shutil.rmtree(run / "checkpoints"),
    "both": lambda run: torch.save(read_weights(run / "model.safetensors"), run / "model.pt"),
}


# Every damage through eval; the other commands share its loading, so a few kinds each.
CASES = [("eval", damage) for damage in sorted(BROKEN)] + [
    (command, damage)
    for command in ("generate", "init-from", "model-run")
    for damage in ("text-as-model.pt", "crafted-safetensors", "no-weights", "both")
]


@pytest.mark.parametrize(("command", "damage"), CASES)
def test_broken_weights_are_one_line_exit_2(tiny_run, tmp_path, damage, command, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    if damage != "both":
        (run / "model.safetensors").unlink()
    BROKEN[damage](run)
    corpus = tiny_run.parent.parent / "corpus.txt"
    out = tmp_path / "out"
    argv = {
        "eval": ["eval", "--model", str(run), "--data", str(corpus), "--precision", "fp32"],
        "generate": ["generate", "--model", str(run), "--prompt", "d"],
        "init-from": ["train", "--data", str(corpus), "--init-from", str(run), *FLAGS, *TINY],
        "model-run": ["train", "--model", str(run), "--data", str(corpus), *FLAGS],
    }[command]
    capsys.readouterr()
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert str(run) in err
    assert not out.exists()  # refused before any run directory


@pytest.mark.slow
def test_a_run_fine_tuned_from_an_hf_run_exports_too(hf_run, tmp_path):
    base, run = hf_run
    if base.name != "tiny-llama":
        pytest.skip("one family shows it; the export itself is tested for both")
    again = train(run, tmp_path / "runs")
    export = again / "hf"
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(export)
    assert hf_tokenizer.bos_token == "<s>"  # the base's special tokens, through the first run
    ids = hf_tokenizer("def add", return_tensors="pt")["input_ids"]
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(export).eval()
    ours = build_model(ModelSpec(str(again)), hf_tokenizer.vocab_size).eval()
    with torch.no_grad():
        assert torch.equal(hf_model(ids).logits, forward_logits(ours, ids, ids))
    assert json.loads((again / "base.json").read_text())["path"] == str(run.resolve())
