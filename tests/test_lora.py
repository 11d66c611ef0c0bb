"""LoRA through PEFT: only the adapters train (the base's bytes unchanged), checkpoints hold the
adapters alone and resume bit for bit, the adapter folder loads in PEFT with amptrain's logits,
the merged model in Hugging Face, and refusals are one line before any run."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from amptrain import lora, run_setup
from amptrain.cli import main
from amptrain.config import TrainConfig

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TINY = ["--layers", "2", "--width", "32", "--heads", "2", "--context", "16", "--batch-size", "4",
        "--device", "cpu", "--no-progress", "--no-compile", "--eval-batches", "1"]  # fmt: skip
TEXT = "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n" * 40


def _run(out):
    (run,) = out.glob("train-*")
    return run


def test_only_the_adapters_train_and_the_base_keeps_its_bytes(corpus):
    import amptrain

    cfg = TrainConfig(data=str(corpus), context=16, lora=4, precision="fp32",
                      model_kwargs={"n_layer": 2, "n_embd": 32, "n_head": 2})  # fmt: skip
    model, train, val, precision = run_setup.prepare(cfg)
    assert lora.is_lora(model)
    names = lora.describe(model)
    assert names["adapter_dtype"] == ["float32"] and names["base_dtype"] == ["float32"]
    assert names["targets"] and all(t.startswith("blocks.") for t in names["targets"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = amptrain.fit(model, train, val, precision=precision, max_steps=30, batch_size=4,
                          lr=1e-2, eval_every=30, eval_batches=1, compile=False)  # fmt: skip
    assert result.final_val_loss < result.initial_val_loss
    for name, param in model.named_parameters():
        changed = not torch.equal(param, before[name])
        assert changed == ("lora_B" in name or "lora_A" in name), name  # A and B both move


def test_a_bf16_run_stores_the_base_in_bf16_and_the_adapters_in_fp32(corpus):
    cfg = TrainConfig(data=str(corpus), context=16, lora=4, precision="bf16", device="cpu",
                      model_kwargs={"n_layer": 2, "n_embd": 32, "n_head": 2})  # fmt: skip
    model, *_ = run_setup.prepare(cfg)
    said = lora.describe(model)
    assert said["adapter_dtype"] == ["float32"] and said["base_dtype"] == ["bfloat16"]
    assert all(b.dtype == torch.float32 for b in model.buffers() if b.is_floating_point())


def test_checkpoints_hold_the_adapters_and_a_resume_is_bit_equal(tmp_path, corpus):
    import shutil

    out = tmp_path / "runs"
    assert main(["train", "--data", str(corpus), "--lora", "4", "--precision", "fp32",
                 "--eval-every", "3", "--checkpoint-every", "3", "--max-steps", "6",
                 "--out", str(out), *TINY]) == 0  # fmt: skip
    run = _run(out)
    whole = (run / "model.safetensors").read_bytes()
    shutil.rmtree(run / "checkpoints" / "step-000000006")  # as if stopped after step 3
    (run / "model.safetensors").unlink()
    assert main(["train", "--resume", str(run), "--out", str(out), "--no-progress"]) == 0
    assert (run / "model.safetensors").read_bytes() == whole
    saved = torch.load(run / "checkpoints" / "step-000000003" / "model.pt", weights_only=True)
    assert saved and all("lora_" in key for key in saved), sorted(saved)[:4]
    full = sum(t.numel() for t in load_file(run / "model.safetensors").values())
    assert sum(t.numel() for t in saved.values()) < 0.2 * full
    summary = json.loads((run / "summary.json").read_text())
    assert summary["lora"]["rank"] == 4 and summary["lora"]["trainable_parameters"] > 0


def test_eval_generate_and_init_from_take_a_lora_run(tmp_path, corpus, capsys):
    out = tmp_path / "runs"
    assert main(["train", "--data", str(corpus), "--lora", "4", "--max-steps", "2",
                 "--precision", "fp32", "--out", str(out), *TINY]) == 0  # fmt: skip
    run = _run(out)
    assert main(["eval", "--model", str(run), "--out", str(out), "--no-progress"]) == 0
    assert main(["generate", "--model", str(run), "--prompt", "the", "--max-new-tokens", "4",
                 "--no-progress"]) == 0  # fmt: skip
    assert main(["train", "--data", str(corpus), "--init-from", str(run), "--max-steps", "1",
                 "--precision", "fp32", "--out", str(tmp_path / "again"), *TINY]) == 0  # fmt: skip
    (run / "model.safetensors").unlink()  # as if stopped before the merge: adapters only
    capsys.readouterr()
    assert main(["eval", "--model", str(run), "--out", str(out), "--no-progress"]) == 2
    assert "holds LoRA adapters only" in capsys.readouterr().err


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def hf_lora_run(request, tmp_path_factory):
    """(base directory, fp32 LoRA run) of a tiny Llama and a tiny GPT-2 (Conv1D layers)."""
    from conftest import save_tiny_gpt2
    from test_hf_export import save_tiny_llama

    root = tmp_path_factory.mktemp(f"lora-{request.param}")
    base = (save_tiny_llama if request.param == "llama" else lambda p: save_tiny_gpt2(p, TEXT))(
        root / "base"
    )
    return base, _train_lora(base, root, "fp32", "--lora-alpha", "8")


def _train_lora(base, root, precision, *extra):
    """A LoRA run of six steps on the Hugging Face model `base`, in `precision`."""
    corpus = root / "corpus.txt"
    corpus.write_text(TEXT)
    out = root / "runs"
    assert main(["train", "--model", str(base), "--data", str(corpus), "--lora", "4",
                 "--max-steps", "6", "--lr", "1e-2", "--precision", precision, "--device", "cpu",
                 "--context", "16", "--batch-size", "4", "--eval-every", "6", "--out", str(out),
                 "--no-progress", "--no-compile", *extra]) == 0  # fmt: skip
    return _run(out)


def test_the_adapter_folder_loads_in_peft_and_the_merged_hf_export_agrees(hf_lora_run):
    from transformers import AutoModelForCausalLM

    base_dir, run = hf_lora_run
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_val_loss"] < summary["initial_val_loss"]  # the adapters learn
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["task_type"] == "CAUSAL_LM"
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    adapted = peft.PeftModel.from_pretrained(base, run / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(run / "hf").eval()
    ids = torch.randint(
        0, base.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        want, got = adapted(ids).logits, merged(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(base_dir).eval()(ids).logits
    assert (got - want).abs().max() <= 1e-5
    assert (got - plain).abs().max() > 1e-4  # the adapters did change the model
    out = merged.generate(ids[:1, :4], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)


def test_a_bf16_base_merges_within_a_stated_tolerance(tmp_path):
    from test_hf_export import save_tiny_llama
    from transformers import AutoModelForCausalLM

    base_dir = save_tiny_llama(tmp_path / "base")
    run = _train_lora(base_dir, tmp_path, "bf16")
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    for param in base.parameters():  # the base as the run stored it: rounded to bf16
        param.data = param.data.bfloat16().float()
    adapted = peft.PeftModel.from_pretrained(base.eval(), run / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(run / "hf").eval()
    ids = torch.randint(
        0, base.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        assert (merged(ids).logits - adapted(ids).logits).abs().max() <= 1e-3


@pytest.mark.parametrize("extra, said", [
    (["--strategy", "fsdp"], "--lora with --strategy fsdp is not supported"),
    (["--lora-targets", "nonesuch"], "--lora-targets 'nonesuch': ['nonesuch'] matches no"),
    (["--lora-dropout", "1.5"], "lora_dropout=1.5 is invalid"),
    (["--checkpoint-format", "sharded"], "--lora with --checkpoint-format sharded"),
])  # fmt: skip
def test_lora_refusals_are_one_line_before_any_run(extra, said, tmp_path, corpus, capsys):
    out = tmp_path / "runs"
    code = main(["train", "--data", str(corpus), "--lora", "4", "--out", str(out), *TINY, *extra])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("amptrain:")]
    assert code == 2 and len(lines) == 1 and said in " ".join(err.split()), err
    assert not out.exists() or not list(out.iterdir())


def test_lora_targets_by_name(corpus):
    cfg = TrainConfig(data=str(corpus), context=16, lora=2, lora_targets="qkv",
                      model_kwargs={"n_layer": 2, "n_embd": 32, "n_head": 2})  # fmt: skip
    model, *_ = run_setup.prepare(cfg)
    assert lora.describe(model)["targets"] == ["qkv"]
    adapted = [n for n, _ in model.named_modules() if n.endswith(".lora_A")]
    assert adapted and all(".qkv." in n for n in adapted)


def test_a_search_tries_lora_ranks_and_alphas_and_writes_the_best_command(tmp_path, corpus):
    space = tmp_path / "space.yaml"
    space.write_text("lora: [2, 4]\nlora_alpha: {low: 2, high: 16}\nlr: {low: 1e-3, high: 1e-2}\n")
    out = tmp_path / "runs"
    assert main(["search", "--data", str(corpus), *TINY, "--precision", "fp32", "--out", str(out),
                 "--trials", "3", "--budget-steps", "2", "--space", str(space),
                 "--study-name", "s"]) == 0  # fmt: skip
    (run,) = out.glob("search-*")
    best = json.loads((run / "best.json").read_text())
    assert best["params"]["lora"] in (2, 4) and 2 <= best["params"]["lora_alpha"] <= 16
    assert f"--lora {best['params']['lora']}" in best["command"], best["command"]


def test_the_doctor_examines_the_adapters_of_a_lora_model(tmp_path, capsys):
    out = tmp_path / "runs"
    assert (
        main(
            [
                "doctor",
                "--lora",
                "4",
                "--layers",
                "2",
                "--width",
                "32",
                "--heads",
                "2",
                "--context",
                "16",
                "--device",
                "cpu",
                "--no-progress",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    report = next(out.glob("doctor-*/report.md")).read_text()
    assert "lora_A" in report and "lora_B" in report


@pytest.mark.slow
def test_lora_on_two_ddp_processes_matches_one(tmp_path, corpus):
    common = ["--data", str(corpus), "--lora", "4", "--lora-dropout", "0", "--precision", "fp32",
              "--max-steps", "4", "--lr", "1e-2", "--eval-every", "4", *TINY]  # fmt: skip
    common[common.index("--batch-size") + 1] = "2"  # per process: the global batch is 4
    assert main(["train", *common, "--nproc", "2", "--out", str(tmp_path / "two")]) == 0
    common[common.index("--batch-size") + 1] = "4"
    assert main(["train", *common, "--out", str(tmp_path / "one")]) == 0
    two = load_file(_run(tmp_path / "two") / "model.safetensors")
    one = load_file(_run(tmp_path / "one") / "model.safetensors")
    assert two.keys() == one.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=1e-5, rtol=0)
    assert (_run(tmp_path / "two") / "adapter" / "adapter_model.safetensors").is_file()


def test_the_bench_runs_a_lora_arm_beside_the_full_fine_tunes_and_keeps_it_out_of_the_verdict():
    from conftest import pattern_blocks, tiny_model

    from amptrain.bench import bench

    report = bench(tiny_model(), pattern_blocks(48), pattern_blocks(16, seed=1),
                   precisions=["bf16"], steps=6, warmup=2, repeats=1, batch_size=8, lr=1e-2,
                   eval_batches=2, compile=False,
                   adapters=lora.LoraSettings(rank=4))  # fmt: skip
    assert [a.precision for a in report.arms] == ["fp32", "bf16", "bf16+lora"]
    arm = report.arm("bf16+lora")
    assert arm.status == "ok" and arm.tokens_per_s > 0 and arm.mem_mb is not None
    assert arm.mfu_probe is None and arm.val_loss is not None
    assert arm.init_digest == report.arm("fp32").init_digest  # the same start, adapters added
    assert report.best != "bf16+lora"


def test_lora_trains_a_nanogpt_style_model_whose_forward_takes_targets(corpus):
    import sys
    from pathlib import Path

    import amptrain

    sys.path.insert(0, str(Path(__file__).parent / "model_styles"))
    from nanogpt_model import GPT, GPTConfig

    torch.manual_seed(0)
    base = GPT(GPTConfig(block_size=16, vocab_size=256, n_layer=2, n_head=2, n_embd=16))
    model = lora.apply(base, lora.LoraSettings(rank=4), torch.float32)
    from amptrain import data

    blocks = data.load(corpus, 16)
    train, val = data.split(blocks, 0.1, 0)
    result = amptrain.fit(model, train, val, precision="fp32", max_steps=10, batch_size=4,
                          lr=1e-2, eval_every=10, eval_batches=1, compile=False)  # fmt: skip
    assert result.final_val_loss < result.initial_val_loss


@pytest.mark.slow
def test_a_lora_model_trains_compiled(corpus):
    import amptrain

    cfg = TrainConfig(data=str(corpus), context=16, lora=4, precision="bf16", device="cpu",
                      model_kwargs={"n_layer": 2, "n_embd": 32, "n_head": 2})  # fmt: skip
    model, train, val, precision = run_setup.prepare(cfg)
    result = amptrain.fit(model, train, val, precision=precision, max_steps=6, batch_size=4,
                          lr=1e-2, eval_every=6, eval_batches=1, compile=True)  # fmt: skip
    assert result.fast_path["compiled"] and result.final_val_loss < result.initial_val_loss
