"""The instruments calibrated against known values: memory, time, FLOPs and the probe.

Every figure amptrain reports is read by one of these meters, so each is checked against a
workload whose answer is known in advance: a buffer of a known number of MiB, a step of a known
duration, a model whose FLOPs are counted by hand, a matmul of known FLOPs and known time.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, pattern_blocks, tiny_model
from spawning import spawn
from torch import nn

import amptrain
from amptrain import capability, hardware, matmul_timing
from amptrain.bench import bench, ranks
from amptrain.compare import compare
from amptrain.flops import causal_fraction, train_flops_per_token
from amptrain.models import GPTConfig, TinyGPT

MIB = 2**20
KNOWN_MB = 192  # large next to what a tiny model's step needs (a few MB)


def allocate(mb: int) -> torch.Tensor:
    """A buffer of `mb` MiB with every page written (resident, not merely reserved)."""
    return torch.ones(mb * MIB // 4)


def rss_mb() -> float:
    """This process's resident memory now, read here rather than through amptrain."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


class KnownCost(nn.Module):
    """A tiny language model whose forward also holds `mb` MiB and sleeps `seconds`."""

    def __init__(self, mb: int = 0, seconds: float = 0.0) -> None:
        super().__init__()
        self.mb, self.seconds = mb, seconds
        self.emb = nn.Embedding(VOCAB, 8)
        self.head = nn.Linear(8, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        held = allocate(self.mb) if self.mb else None
        if self.seconds:
            time.sleep(self.seconds)
        del held
        return self.head(self.emb(ids))


# --- memory -----------------------------------------------------------------------------------


def test_measure_memory_reads_a_known_allocation_on_the_cpu():
    peak, delta, source = hardware.measure_memory(torch.device("cpu"), lambda: allocate(KNOWN_MB))
    assert delta == pytest.approx(KNOWN_MB, rel=0.1) and peak >= delta
    assert source.startswith("process-rss")


def fit_known(mb: int = 0, seconds: float = 0.0, steps: int = 3) -> amptrain.FitResult:
    return amptrain.fit(KnownCost(mb, seconds), pattern_blocks(32), max_steps=steps,
                        batch_size=4, precision="fp32", compile=False, log_every=1)  # fmt: skip


def test_fit_reports_the_peak_of_its_own_run():
    """`FitResult.peak_mem_mb` and `mem/peak_mb` are this run's peak: what the process held
    when it started plus what the run added (a known buffer), not an earlier run's peak.

    The first run in a process also loads what every later run shares (about 90 MB here:
    libraries, thread pools), so a first run warms the process up.
    """
    fit_known()
    hardware.reset_peak_memory(torch.device("cpu"))
    big = allocate(3 * KNOWN_MB)  # an earlier peak of this process, freed before the run
    del big
    before = rss_mb()
    result = fit_known(mb=KNOWN_MB)
    assert result.peak_mem_mb - before == pytest.approx(KNOWN_MB, rel=0.1)
    logged = [r["mem/peak_mb"] for r in result.history if "mem/peak_mb" in r]
    assert logged and max(logged) - before == pytest.approx(KNOWN_MB, rel=0.1)


def bench_known(mb: int = 0, seconds: float = 0.0, **options) -> amptrain.bench.ArmResult:
    settings = dict(precisions=["fp32"], steps=3, warmup=1, repeats=1, batch_size=4,
                    eval_batches=1, compile=False)  # fmt: skip
    report = bench(KnownCost(mb, seconds), pattern_blocks(32), pattern_blocks(8, seed=1),
                   **{**settings, **options})  # fmt: skip
    (arm,) = report.arms
    return arm


def test_a_bench_arm_reports_a_known_allocation():
    """An arm's memory is its run's: the training machinery (about 30 MB for a tiny model)
    plus what its steps hold, so a known buffer more is reported as that much more."""
    bare, held = bench_known(), bench_known(mb=KNOWN_MB)
    assert held.mem_mb - bare.mem_mb == pytest.approx(KNOWN_MB, rel=0.1), (held, bare)
    assert 0 < bare.mem_mb < KNOWN_MB / 2


def compare_known(mb: int) -> float:
    report = compare(lambda: KnownCost(mb), KnownCost, train=pattern_blocks(32),
                     val=pattern_blocks(16, seed=1), steps=2, batch_size=4, eval_batches=1,
                     precision="fp32", memory=True)  # fmt: skip
    (custom,) = [m for m in report.models if m.role == "custom"]
    return custom.mem_mb


def test_compare_reports_a_known_allocation():
    """compare's memory is a short training run's, measured as the bench measures an arm."""
    assert compare_known(KNOWN_MB) - compare_known(0) == pytest.approx(KNOWN_MB, rel=0.1)


def _case_ranks_measure(rank: int, tmp: str) -> None:
    peak, delta, source = ranks.measure_memory(torch.device("cpu"),
                                               lambda: allocate(KNOWN_MB * (rank + 1)))  # fmt: skip
    assert delta == pytest.approx(2 * KNOWN_MB, rel=0.1), (rank, delta)  # the larger rank's
    assert source.endswith("the largest of 2 ranks")


@pytest.mark.slow
def test_the_sharded_bench_reads_the_largest_ranks_known_allocation(tmp_path):
    spawn("test_instruments", "ranks_measure", tmp_path)


class FakeCudaAllocator:
    """torch.cuda's memory statistics over a counted allocator: `allocate(mb)` and `free(mb)`."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, allocated_mb: float) -> None:
        self.allocated = self.peak = allocated_mb * MIB
        self.devices: list[torch.device] = []
        for name, fn in {
            "reset_peak_memory_stats": self._reset, "memory_allocated": self._allocated,
            "max_memory_allocated": self._peak, "max_memory_reserved": self._peak,
            "empty_cache": lambda: None,
        }.items():  # fmt: skip
            monkeypatch.setattr(torch.cuda, name, fn)

    def _reset(self, device: torch.device) -> None:
        self.devices.append(device)
        self.peak = self.allocated

    def _allocated(self, device: torch.device) -> int:
        self.devices.append(device)
        return int(self.allocated)

    def _peak(self, device: torch.device) -> int:
        self.devices.append(device)
        return int(self.peak)

    def allocate(self, mb: float) -> None:
        self.allocated += mb * MIB
        self.peak = max(self.peak, self.allocated)

    def free(self, mb: float) -> None:
        self.allocated -= mb * MIB


def test_measure_memory_on_cuda_reads_the_increment_of_a_known_allocation(monkeypatch):
    cuda = FakeCudaAllocator(monkeypatch, allocated_mb=500)  # the model, already on the GPU
    cuda.allocate(300)  # an earlier run's peak, freed
    cuda.free(300)
    gpu = torch.device("cuda", 1)

    def work() -> None:
        cuda.allocate(KNOWN_MB)
        cuda.free(KNOWN_MB)

    peak, delta, source = hardware.measure_memory(gpu, work)
    assert (peak, delta) == (500 + KNOWN_MB, KNOWN_MB) and source.startswith("cuda-allocator")
    assert set(cuda.devices) == {gpu}  # that GPU's statistics, not the current device's


@pytest.mark.gpu
def test_measure_memory_on_a_real_gpu_reads_a_known_allocation():
    gpu = torch.device("cuda")
    _, delta, _ = hardware.measure_memory(gpu, lambda: torch.ones(KNOWN_MB * MIB // 4, device=gpu))
    assert delta == pytest.approx(KNOWN_MB, rel=0.01)


# --- time -------------------------------------------------------------------------------------

STEP_S = 0.1  # each forward sleeps this long; the rest of a tiny step takes about a millisecond


def test_fit_reports_the_time_of_a_step_of_known_duration():
    result = fit_known(seconds=STEP_S, steps=6)
    times = [r["perf/step_time_s"] for r in result.history if "perf/step_time_s" in r]
    assert len(times) == 6 and statistics.median(times) == pytest.approx(STEP_S, rel=0.1)


def test_the_bench_reports_the_time_of_a_step_of_known_duration():
    arm = bench_known(seconds=STEP_S, steps=6, memory=False)
    assert arm.step_ms == pytest.approx(STEP_S * 1e3, rel=0.1), arm
    assert arm.tokens_per_s == pytest.approx(4 * 15 / (arm.step_ms / 1e3))


# --- FLOPs ------------------------------------------------------------------------------------


def causal_pairs(t: int) -> int:
    """Scores a causal mask lets through in a t x t attention matrix: 1 + 2 + ... + t."""
    return t * (t + 1) // 2


def test_causal_fraction_counts_the_scores_a_causal_mask_allows():
    assert causal_fraction(4, 4) == 10 / 16
    assert causal_fraction(2, 4) == 3 / 8  # top-left aligned, as SDPA's is_causal
    assert causal_fraction(1, 1) == 1.0


def test_tiny_gpt_flops_per_target_token_equal_a_hand_count():
    layers, width, vocab, t, b = 2, 32, 64, 16, 3
    model = TinyGPT(GPTConfig(vocab_size=vocab, block_size=t, n_layer=layers, n_head=2,
                              n_embd=width))  # fmt: skip
    ids = torch.randint(0, vocab, (b, t))
    # matmuls: per layer qkv 3w^2, proj w^2, MLP 8w^2; the head w*V; x 2 (multiply-add) x 3
    # (forward, and the input and weight gradients)
    linear = 6 * b * t * (layers * 12 * width**2 + width * vocab)
    # attention per layer: q.k and a.v over the allowed pairs, 2 FLOPs each per channel, x 3
    attention = layers * 3 * (2 * 2 * b * width * causal_pairs(t))
    flops, how = train_flops_per_token(model, ids)
    assert flops == (linear + attention) / (b * (t - 1))  # per target token: t - 1 a row
    assert "causal attention as causal" in how


class LlamaBlockLM(nn.Module):
    """A Llama-shaped language model written out: RMSNorm, grouped-query attention (4 query
    heads, 2 key/value heads) with SDPA, a SwiGLU MLP, no biases, untied head."""

    def __init__(self, vocab=48, width=32, heads=4, kv_heads=2, hidden=80, mask=False) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.mask = heads, kv_heads, mask
        head_dim = width // heads
        self.emb = nn.Embedding(vocab, width)
        self.norm1, self.norm2, self.norm = nn.RMSNorm(width), nn.RMSNorm(width), nn.RMSNorm(width)
        self.q = nn.Linear(width, width, bias=False)
        self.kv = nn.Linear(width, 2 * kv_heads * head_dim, bias=False)
        self.o = nn.Linear(width, width, bias=False)
        self.gate_up = nn.Linear(width, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, width, bias=False)
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)
        b, t, w = x.shape
        h = self.norm1(x)
        q = self.q(h).view(b, t, self.heads, -1).transpose(1, 2)
        k, v = self.kv(h).view(b, t, 2 * self.kv_heads, -1).transpose(1, 2).chunk(2, dim=1)
        k, v = (z.repeat_interleave(self.heads // self.kv_heads, dim=1) for z in (k, v))
        if self.mask:  # an explicit boolean mask, as Hugging Face passes one
            allowed = torch.ones(t, t, dtype=torch.bool).tril()
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(y.transpose(1, 2).reshape(b, t, w))
        gate, up = self.gate_up(self.norm2(x)).chunk(2, dim=-1)
        x = x + self.down(F.silu(gate) * up)
        return self.head(self.norm(x))


@pytest.mark.parametrize("mask", [False, True], ids=["is_causal", "boolean-mask"])
def test_a_llama_style_block_flops_equal_a_hand_count(mask):
    vocab, width, kv_width, hidden, t, b = 48, 32, 16, 80, 12, 2
    model = LlamaBlockLM(mask=mask)
    ids = torch.randint(0, vocab, (b, t))
    weights = width * width + width * 2 * kv_width + width * width + 3 * width * hidden
    linear = 6 * b * t * (weights + width * vocab)
    attention = 3 * (2 * 2 * b * width * causal_pairs(t))  # 4 query heads x 8 channels = width
    flops, _ = train_flops_per_token(model, ids)
    assert flops == pytest.approx((linear + attention) / (b * (t - 1)), rel=1e-12)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kernel", ["flash", "efficient", "cudnn"])
def test_the_cuda_attention_kernels_are_counted_as_masked(kernel, causal):
    """The CUDA kernels, run on meta tensors (their shapes, no GPU): forward and backward,
    each argument found by name in its own schema."""
    from torch.utils.flop_counter import FlopCounterMode

    from amptrain.flops import attention_flops, attention_formulas

    aten = torch.ops.aten
    calls = {
        "flash": lambda q, k, v: aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal),
        "efficient": lambda q, k, v: aten._scaled_dot_product_efficient_attention(
            q, k, v, None, True, 0.0, causal),
        "cudnn": lambda q, k, v: aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, causal),
    }  # fmt: skip
    shape = (2, 4, 16, 8)
    q, k, v = (torch.empty(shape, device="meta", dtype=torch.float16, requires_grad=True)
               for _ in range(3))  # fmt: skip
    counter = FlopCounterMode(display=False, custom_mapping=attention_formulas())
    with counter:
        calls[kernel](q, k, v)[0].sum().backward()
    allowed = causal_fraction(16, 16) if causal else 1.0
    assert counter.get_total_flops() == 3 * attention_flops(shape, shape, shape, allowed)


def test_ignored_labels_are_not_target_tokens():
    model, ids = tiny_model(), pattern_blocks(2).take(slice(2))[0]
    labels = ids.clone()
    labels[:, :8] = -100  # a masked prompt: positions 1..7 are not scored
    everything, _ = train_flops_per_token(model, ids)
    scored, _ = train_flops_per_token(model, ids, labels)
    assert scored == pytest.approx(everything * (2 * 15) / (2 * 8))


def test_a_hugging_face_llama_counts_as_its_hand_count():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=80,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=32,
                                   attn_implementation="sdpa")  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg)
    b, t, width, vocab = 2, 12, 32, 48
    ids = torch.randint(0, vocab, (b, t))
    weights = 2 * width * width + 2 * width * 16 + 3 * width * 80
    linear = 6 * b * t * (2 * weights + width * vocab)
    attention = 2 * 3 * (2 * 2 * b * width * causal_pairs(t))
    flops, _ = train_flops_per_token(model, ids)
    assert flops == pytest.approx((linear + attention) / (b * (t - 1)), rel=1e-12)


# --- the probe --------------------------------------------------------------------------------


def test_a_matmul_rate_is_its_flops_over_its_time():
    shape = (256, 128, 64)

    def timer(precision: str, shape: tuple[int, int, int], repeats: int) -> float:
        return repeats * 0.002  # every matmul takes exactly 2 ms by this clock

    rate = matmul_timing.rate(timer, "fp32", shape, budget_s=0.02)
    assert rate == pytest.approx(2 * 256 * 128 * 64 / 0.002 / 1e12)


def test_the_probes_fp32_rate_agrees_with_a_matmul_timed_here():
    """The probe's fp32 TFLOP/s against a batch of its own shape timed by this test: the same
    CPU-time clock on one thread, times the thread count (what the probe reports)."""
    caps = capability.measure(torch.device("cpu"))
    n, k, m = caps.shape
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    a, b = torch.randn(n, k), torch.randn(k, m)
    a @ b
    rates = []
    for _ in range(5):
        start = time.thread_time()
        for _ in range(20):
            a @ b
        rates.append(2 * n * k * m * 20 / (time.thread_time() - start) * threads / 1e12)
    torch.set_num_threads(threads)
    assert caps.tflops["fp32"] == pytest.approx(max(rates), rel=0.35)
