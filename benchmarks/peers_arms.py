"""The arms of `benchmarks/peers.py`: one training run each, written the way each tool is used.

Every arm trains the same seeded GPT on the same seeded token stream with the same learning
rate, clipping at 1.0 and a constant schedule, and returns the time stamp of the end of every
step plus the trained model. The plain loop takes its levers one at a time, so the ablation
table can say what each of amptrain's kernels buys on its own. `expert` is the loop a
performance-minded user writes (nanoGPT's recipe): the forward and the loss compiled together
by `torch.compile`, and fused AdamW; its compile time falls in the warm-up steps.

amptrain is told the run is `PLANNED_STEPS` long (its `max_steps`; the schedule is constant,
so only decisions that depend on the run's length, such as `compile="auto"`, see it) and is
stopped after the job's steps: the timed steps are the first steps of a long run, as a user
who trains for 2,000 steps gets them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import amptrain
from amptrain.data import Blocks
from amptrain.losses import next_token_cross_entropy
from amptrain.models import GPTConfig, TinyGPT


@dataclasses.dataclass(frozen=True)
class Job:
    """The model, the data and the steps of one benchmark job."""

    name: str
    n_layer: int
    n_embd: int
    n_head: int
    vocab: int
    context: int
    batch: int
    steps: int
    lr: float = 1e-3
    seed: int = 0

    @property
    def tokens_per_step(self) -> int:
        return self.batch * (self.context - 1)  # scored next-token targets


JOBS = {
    "gpt": Job("gpt", n_layer=4, n_embd=256, n_head=4, vocab=8192, context=128, batch=8, steps=30),
    "tiny-gpt": Job(
        "tiny-gpt", n_layer=4, n_embd=256, n_head=4, vocab=256, context=128, batch=16, steps=30
    ),  # fmt: skip
    "quick": Job("quick", n_layer=2, n_embd=64, n_head=2, vocab=512, context=32, batch=4, steps=8),
    # Llama 3's vocabulary: the fused head and loss's job (fp32 logits of a batch: 525 MB).
    "gpt-v128k": Job(
        "gpt-v128k", n_layer=4, n_embd=256, n_head=4, vocab=128256, context=128, batch=8, steps=12
    ),  # fmt: skip
}
PLANNED_STEPS = 2000
"""The run length amptrain is told (`max_steps`); it is stopped after the job's steps."""


def make_model(job: Job) -> TinyGPT:
    torch.manual_seed(job.seed)
    return TinyGPT(GPTConfig(vocab_size=job.vocab, n_layer=job.n_layer, n_embd=job.n_embd,
                             n_head=job.n_head, block_size=job.context))  # fmt: skip


def token_blocks(job: Job, rows: int, seed: int) -> torch.Tensor:
    """A learnable seeded stream: each row counts up by its own stride modulo the vocabulary."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, job.vocab, (rows, 1), generator=g)
    stride = torch.randint(1, 7, (rows, 1), generator=g)
    noise = (torch.rand(rows, job.context, generator=g) < 0.1) * torch.randint(
        0, job.vocab, (rows, job.context), generator=g
    )  # 10 % random tokens, so the loss does not reach zero
    return (start + stride * torch.arange(job.context) + noise) % job.vocab


def train_rows(job: Job) -> torch.Tensor:
    return token_blocks(job, job.steps * job.batch, job.seed)


def heldout_loss(model: torch.nn.Module, job: Job) -> float:
    """The same fp32 measurement for every arm: mean next-token loss on 64 held-out rows."""
    ids = token_blocks(job, 64, job.seed + 1)
    model.eval()
    with torch.no_grad():
        logits = model(ids).float()
    return F.cross_entropy(logits[:, :-1].reshape(-1, job.vocab), ids[:, 1:].reshape(-1)).item()


def _plain_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1)
    )


def plain(
    job: Job, precision: str, fused: bool = False, chunked: bool = False, math_attn: bool = False
):
    """The hand-written loop with torch's defaults; each keyword turns on one amptrain lever."""
    model, rows, stamps = make_model(job), train_rows(job), []
    optimizer = torch.optim.AdamW(model.parameters(), lr=job.lr, fused=fused or None)
    autocast = _autocast(precision)
    for step in range(job.steps):
        ids = rows[step * job.batch : (step + 1) * job.batch]
        attention = sdpa_kernel([SDPBackend.MATH]) if math_attn else contextlib.nullcontext()
        with autocast, attention:
            logits = model(ids)
            if chunked:
                loss = next_token_cross_entropy(logits, ids) / job.tokens_per_step
            else:
                loss = _plain_loss(logits, ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        stamps.append(time.perf_counter())
    return stamps, model


def _autocast(precision: str) -> torch.autocast:
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


def clip_and_step(params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer) -> None:
    """The step's epilogue: clip the gradients' norm at 1.0, then step the optimizer."""
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()


def expert(job: Job, precision: str, compiled_epilogue: bool = False):
    """nanoGPT's recipe: model and loss compiled as one function, fused AdamW, nothing else.

    `compiled_epilogue` compiles the clipping and the optimizer step as well, torch's
    "compiling the optimizer" recipe: a foreach AdamW (dynamo makes it capturable on CUDA),
    whose update inductor fuses across parameters. dynamo traces it as two graphs, the clipping
    and the update: torch's optimizer breaks the graph around its step on purpose (its
    `_use_grad_for_differentiable`, pytorch/pytorch#104053), so that the update traces as
    in-place under no_grad.
    """
    model, rows, stamps = make_model(job), train_rows(job), []
    params = list(model.parameters())
    if compiled_epilogue:
        optimizer = torch.optim.AdamW(params, lr=job.lr, foreach=True)
        epilogue = torch.compile(clip_and_step)
    else:
        optimizer, epilogue = torch.optim.AdamW(params, lr=job.lr, fused=True), clip_and_step

    @torch.compile
    def forward_loss(ids: torch.Tensor) -> torch.Tensor:
        with _autocast(precision):
            return _plain_loss(model(ids), ids)

    for step in range(job.steps):
        ids = rows[step * job.batch : (step + 1) * job.batch]
        forward_loss(ids).backward()
        epilogue(params, optimizer)
        optimizer.zero_grad(set_to_none=True)
        stamps.append(time.perf_counter())
    return stamps, model


class _Stamp(amptrain.Callback):
    """Stamps every step's end, and stops the run after `steps` steps."""

    def __init__(self, steps: int) -> None:
        self.steps, self.times = steps, []

    def on_step_end(self, state, metrics) -> None:
        self.times.append(time.perf_counter())
        state.should_stop = state.step >= self.steps


def amptrain_fit(job: Job, precision: str, **options):
    """`amptrain.fit` with its defaults, but torch's AdamW hyperparameters and a constant lr."""
    model, stamp = make_model(job), _Stamp(job.steps)
    rows = train_rows(job)
    amptrain.fit(
        model, Blocks(rows, rows.clone(), "stream"), precision=precision, callbacks=[stamp],
        max_steps=PLANNED_STEPS, batch_size=job.batch, lr=job.lr, warmup=0.0, min_lr_ratio=1.0,
        betas=(0.9, 0.999), weight_decay=0.01, log_every=job.steps, seed=job.seed, **options,
    )  # fmt: skip
    return stamp.times, model


def lightning(job: Job, precision: str):
    import lightning as L

    model, rows = make_model(job), train_rows(job)
    stamps: list[float] = []

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def training_step(self, batch, batch_idx):
            (ids,) = batch
            return _plain_loss(self.model(ids), ids)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=job.lr)

        def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
            stamps.append(time.perf_counter())

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(rows), batch_size=job.batch)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=job.steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0,
        precision="bf16-mixed" if precision == "bf16" else "32-true",
    )  # fmt: skip
    trainer.fit(Module(), loader)
    return stamps, model


def accelerate(job: Job, precision: str):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, mixed_precision="bf16" if precision == "bf16" else "no")
    model, rows, stamps = make_model(job), train_rows(job), []
    optimizer = torch.optim.AdamW(model.parameters(), lr=job.lr)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(rows), batch_size=job.batch)
    wrapped, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    for (ids,) in loader:
        loss = _plain_loss(wrapped(ids), ids)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(wrapped.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        stamps.append(time.perf_counter())
    return stamps, model


def transformers_trainer(job: Job, precision: str):
    import transformers

    model, rows = make_model(job), train_rows(job)
    stamps: list[float] = []

    class WithLoss(torch.nn.Module):  # the Trainer wants the loss from the model
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, labels=None):
            logits = self.model(input_ids)
            return {"loss": _plain_loss(logits, labels), "logits": logits}

    class Stamp(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

    data = [{"input_ids": r, "labels": r} for r in rows]
    with tempfile.TemporaryDirectory() as out:
        args = transformers.TrainingArguments(
            output_dir=out, max_steps=job.steps, per_device_train_batch_size=job.batch,
            learning_rate=job.lr, lr_scheduler_type="constant", warmup_steps=0, use_cpu=True,
            bf16=precision == "bf16", logging_strategy="no", save_strategy="no", report_to=[],
            disable_tqdm=True, dataloader_num_workers=0, seed=job.seed, max_grad_norm=1.0,
        )  # fmt: skip
        trainer = transformers.Trainer(
            model=WithLoss(), args=args, train_dataset=data, callbacks=[Stamp()]
        )
        trainer.train()
    return stamps, model


ARMS = {
    "plain": plain,
    "expert": expert,
    "amptrain": amptrain_fit,
    "lightning": lightning,
    "accelerate": accelerate,
    "transformers": transformers_trainer,
    # ablation: the plain loop with one lever of amptrain's, and amptrain with one lever off
    "plain+fused-adamw": lambda job, p: plain(job, p, fused=True),
    "plain+chunked-ce": lambda job, p: plain(job, p, chunked=True),
    "plain+math-attention": lambda job, p: plain(job, p, math_attn=True),
    "plain+all": lambda job, p: plain(job, p, fused=True, chunked=True, math_attn=True),
    "expert+compiled-epilogue": lambda job, p: expert(job, p, compiled_epilogue=True),
    "amptrain-for-loop-adamw": lambda job, p: amptrain_fit(job, p, optimizer_impl="for-loop"),
    "amptrain-default-attention": lambda job, p: amptrain_fit(job, p, attention="default"),
    "amptrain-compile": lambda job, p: amptrain_fit(job, p, compile=True),
    "amptrain-no-compile": lambda job, p: amptrain_fit(job, p, compile=False),
    "amptrain-fused-loss": lambda job, p: amptrain_fit(job, p, loss="fused"),
    "amptrain-unfused-loss": lambda job, p: amptrain_fit(job, p, loss="unfused"),
    "amptrain-system-allocator": lambda job, p: amptrain_fit(job, p, allocator="system"),
    "amptrain-math-attention": lambda job, p: amptrain_fit(job, p, attention="math"),
}
PEERS = ("plain", "expert", "amptrain", "lightning", "accelerate", "transformers")
ABLATION = tuple(a for a in ARMS if a not in PEERS)
