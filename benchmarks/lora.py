"""LoRA against a full fine-tune on a 0.5 B Qwen2-shaped model, and what prompt masking buys.

Part 1, the configurations, each in a fresh process (so one's memory never counts in another's),
in interleaved rounds:

- `full fp32`: every weight trained, fp32 throughout (fp32 master weights and AdamW state);
- `full bf16`: every weight trained under bf16 autocast (fp32 masters and AdamW state);
- `lora r16 bf16`: `--lora 16` (alpha 32, the default targets) on a frozen base stored in bf16,
  adapters in fp32, under bf16 autocast.

The model is Qwen2-0.5B's shape (24 layers, width 896, 14 heads, 2 KV heads, MLP 4864, a
151,936-token vocabulary, tied embeddings: 494 M parameters), random weights, nothing
downloaded. Each run: `amptrain.fit` for `--steps` steps of batch 2 x 128 random tokens, the
first `--warmup` untimed. Figures: peak memory (the process's peak RSS while training, above the
idle process before the model was built: the model, its gradients, the optimizer state and the
activations), tokens/s, trainable parameters, and the size on disk of the checkpoint `fit`
writes at the end. Speed ratios are the ratio of medians with the per-round min-max
(`rounds.ratio`); memory and sizes barely move between rounds and are medians.

Part 2, prompt masking (`--part sft`): the built-in model trained 300 steps on instruction data
whose prompts are random letters and whose completion is a fixed sentence, once with the
prompt masked (only the completion scored, as amptrain trains such data) and once on whole
rows (the same text as plain records): the completion loss of the first, the whole-row loss of
the second.

    python benchmarks/lora.py                 # both parts (the first takes about 15 minutes)
    python benchmarks/lora.py --part lora --rounds 3
    python benchmarks/lora.py --quick         # tiny: does it run?

Each run writes a new results/lora-<cpu>-<isa>-t<threads>-torch<version>-<time>.json.
Run it alone: other jobs on the machine move the speed figures (the memory ones hold).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import fresh  # noqa: E402
import provenance  # noqa: E402
import rounds  # noqa: E402

QWEN2_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                 num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 max_position_embeddings=512, tie_word_embeddings=True)  # fmt: skip
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            tie_word_embeddings=True)  # fmt: skip
CONFIGS = {"full fp32": ("fp32", 0), "full bf16": ("bf16", 0), "lora r16 bf16": ("bf16", 16)}
BATCH, CONTEXT = 2, 128


def worker(name: str, shape: dict, steps: int, warmup: int) -> dict:
    """One configuration in this (fresh) process: its figures as a dict."""
    import transformers

    import amptrain
    from amptrain import lora

    transformers.logging.set_verbosity_error()
    precision, rank = CONFIGS[name]
    idle = fresh.idle_mb()
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**shape))
    params = sum(p.numel() for p in model.parameters())
    if rank:
        model = lora.apply(model, lora.LoraSettings(rank), torch.bfloat16)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    gen = torch.Generator().manual_seed(1)
    train = torch.randint(0, shape["vocab_size"], (BATCH * steps, CONTEXT), generator=gen)
    val = torch.randint(0, shape["vocab_size"], (BATCH, CONTEXT), generator=gen)
    clock = fresh.Clock()
    with tempfile.TemporaryDirectory() as tmp:
        result = amptrain.fit(model, train, val, precision=precision, max_steps=steps,
                              batch_size=BATCH, eval_every=steps, eval_batches=1, log_every=1,
                              compile=False, checkpoint_dir=tmp, callbacks=[clock],
                              allocator="system")  # fmt: skip
        ckpt = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())
    step_s = clock.step_s(warmup)
    return {"parameters": params, "trainable": trainable, "precision": result.precision,
            "peak_mb": result.peak_mem_mb - idle, "tokens_per_s": BATCH * (CONTEXT - 1) / step_s,
            "checkpoint_mb": ckpt / 2**20, "loss": result.final_val_loss}  # fmt: skip


def run_worker(name: str, args: argparse.Namespace) -> dict:
    return fresh.run(__file__, "--worker", name, "--steps", str(args.steps), "--warmup",
                     str(args.warmup), *(["--quick"] if args.quick else []))  # fmt: skip


def part_lora(args: argparse.Namespace) -> dict:
    runs = rounds.interleave({name: (lambda n=name: run_worker(n, args)) for name in CONFIGS},
                             args.rounds)  # fmt: skip
    rows = {}
    for name, results in runs.items():
        rows[name] = {k: statistics.median(r[k] for r in results)
                      for k in ("peak_mb", "checkpoint_mb", "tokens_per_s")}  # fmt: skip
        rows[name].update(parameters=results[0]["parameters"], trainable=results[0]["trainable"],
                          peak_mb_range=[min(r["peak_mb"] for r in results),
                                         max(r["peak_mb"] for r in results)],
                          tokens_per_s_range=[min(r["tokens_per_s"] for r in results),
                                              max(r["tokens_per_s"] for r in results)])  # fmt: skip
    base = runs["full bf16"]
    for name, results in runs.items():
        quiet = all(rounds.summary([r["tokens_per_s"] for r in x])["spread"] <= rounds.WIDE_SPREAD
                    for x in (results, base))  # fmt: skip
        rows[name]["speed_vs_full_bf16"] = rounds.ratio(
            [r["tokens_per_s"] for r in results], [r["tokens_per_s"] for r in base], quiet
        )
    lora_row, full = rows["lora r16 bf16"], rows["full bf16"]
    targets = {
        "peak_memory_vs_full_bf16": lora_row["peak_mb"] / full["peak_mb"],
        "peak_memory_target": 0.35,
        "checkpoint_vs_full": lora_row["checkpoint_mb"] / full["checkpoint_mb"],
        "checkpoint_target": 0.05,
    }
    print(
        "| configuration | parameters (trained) | peak MB above idle | tokens/s median "
        "(min-max) | x full bf16 (rounds) | checkpoint MB |\n|---|---|---:|---|---|---:|"
    )
    for name, r in rows.items():
        pair = r["speed_vs_full_bf16"]
        print(
            f"| {name} | {r['parameters'] / 1e6:,.0f} M ({r['trainable'] / 1e6:,.2f} M) "
            f"| {r['peak_mb']:,.0f} | {r['tokens_per_s']:,.0f} "
            f"({r['tokens_per_s_range'][0]:,.0f}-{r['tokens_per_s_range'][1]:,.0f}) "
            f"| {pair['ratio_of_medians']:.2f} ({pair['ratio_range'][0]:.2f}-"
            f"{pair['ratio_range'][1]:.2f}): {pair['verdict']} | {r['checkpoint_mb']:,.0f} |"
        )
    print(
        f"targets: LoRA peak {targets['peak_memory_vs_full_bf16']:.2f}x full bf16 (<= 0.35); "
        f"checkpoint {targets['checkpoint_vs_full']:.1%} of full (<= 5%)"
    )
    return {"configurations": rows, "targets": targets}


def part_sft(args: argparse.Namespace) -> dict:
    from amptrain.cli import main

    rng = random.Random(0)
    answer = "The answer is forty-two."
    records = [{"prompt": "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(40))
                + "\n", "completion": answer} for _ in range(2000)]  # fmt: skip
    steps = 4 if args.quick else 300
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        masked, whole = Path(tmp) / "sft.jsonl", Path(tmp) / "rows.jsonl"
        masked.write_text("".join(json.dumps(r) + "\n" for r in records))
        whole.write_text("".join(json.dumps({"text": r["prompt"] + r["completion"]}) + "\n"
                                 for r in records))  # fmt: skip
        for name, data, context in (("prompt masked", masked, 96), ("whole rows", whole, 96)):
            runs = Path(tmp) / name.replace(" ", "-")
            code = main(["train", "--data", str(data), "--context", str(context), "--max-steps",
                         str(steps), "--eval-every", str(steps), "--batch-size", "16",
                         "--precision", "fp32", "--device", "cpu", "--no-progress", "--out",
                         str(runs), "--seed", "0", "--lr", "3e-3"])  # fmt: skip
            if code != 0:
                raise RuntimeError(f"{name}: amptrain train exited {code}")
            summary = json.loads(next(runs.glob("train-*/summary.json")).read_text())
            out[name] = {"final_val_loss": summary["final_val_loss"], "steps": summary["steps"],
                         "scored": "completion tokens" if name == "prompt masked" else
                         "every token"}  # fmt: skip
    print(
        f"prompt masked: completion loss {out['prompt masked']['final_val_loss']:.4f} nats "
        f"after {steps} steps (target < 0.1); whole rows: loss "
        f"{out['whole rows']['final_val_loss']:.4f} nats over every token"
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    rounds.round_options(parser, steps=8)
    parser.add_argument("--part", choices=("both", "lora", "sft"), default="both")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.set_defaults(rounds=3)  # memory barely moves between rounds; speed is a side figure
    args = parser.parse_args()
    if args.worker:
        shape = TINY if args.quick else QWEN2_05B
        print(json.dumps(worker(args.worker, shape, args.steps, args.warmup)))
        return
    if args.quick:
        args.rounds, args.steps, args.warmup = 1, 5, 1
    meta = provenance.start("lora")
    payload: dict = {"shape": "tiny" if args.quick else QWEN2_05B, "batch": BATCH,
                     "context": CONTEXT, "steps": args.steps, "warmup": args.warmup,
                     "rounds": args.rounds}  # fmt: skip
    if args.part in ("both", "lora"):
        payload["lora"] = part_lora(args)
    if args.part in ("both", "sft"):
        payload["sft"] = part_sft(args)
    out = args.out or provenance.result_file("lora", args.quick)
    provenance.write(out, meta, payload)
    print(f"result: {out}")


if __name__ == "__main__":
    main()
