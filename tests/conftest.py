"""Shared fixtures: tiny models and data, deterministic single-threaded CPU runs."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import itertools
import json
import logging
import os
import sys
from pathlib import Path

import pytest
import torch
from pg_server import PgServer, find_bindir

from amptrain import checkpoint
from amptrain.data import Blocks
from amptrain.models import GPTConfig, TinyGPT

VOCAB = 32
CONTEXT = 16


@pytest.fixture(autouse=True)
def _restore_amptrain_logger():
    """Each test starts with the library's own "amptrain" logger: no handler, propagating.

    The CLI sets it up for a terminal (a RichHandler, no propagation). A module-scoped fixture
    that runs the CLI does so before any function-scoped fixture, so restoring what was there
    would keep that set-up for every later test of the process, and caplog (which attaches to
    a logger that does not propagate) would then see records twice.
    """
    logger = logging.getLogger("amptrain")
    logger.handlers[:], logger.propagate, logger.level = [], True, logging.NOTSET
    yield
    logger.handlers[:], logger.propagate, logger.level = [], True, logging.NOTSET


@pytest.fixture(scope="session", autouse=True)
def _session_cache_dir(tmp_path_factory):
    """The session's `auto` decisions go to a cache of its own, never the user's; shared, as on
    a user's machine, by every run of the session, subprocesses and module fixtures included."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AMPTRAIN_CACHE_DIR", str(tmp_path_factory.mktemp("amptrain-cache")))
        yield


@contextlib.contextmanager
def importable(folder: Path):
    """`folder` importable for a block, leaving no module imported meanwhile behind.

    The model styles' `layers.py` must not stay in `sys.modules`: a later test imports a model
    file whose own sibling is also called `layers` (dynamo, tracing a model, imports the
    modules of the functions it meets by name, so build_model's own clean-up is not enough).
    """
    sys.path.insert(0, str(folder))
    before = set(sys.modules)
    try:
        yield
    finally:
        sys.path.remove(str(folder))
        for name in set(sys.modules) - before:  # only the folder's: torch's own stay loaded
            origin = getattr(sys.modules[name], "__file__", None) or ""
            if origin and Path(origin).resolve().is_relative_to(folder.resolve()):
                del sys.modules[name]


def model_styles_importable():
    """tests/model_styles importable for a block (see `importable`)."""
    return importable(Path(__file__).parent / "model_styles")


@pytest.fixture
def model_styles():
    """The model-style files importable in one test (see `model_styles_importable`)."""
    with model_styles_importable():
        yield


@pytest.fixture(autouse=True)
def _deterministic_cpu():
    dtype = torch.get_default_dtype()
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    yield
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _fresh_process_state():
    """Each test starts from what a new process knows: no measured attention plan, no fast-path
    line said, no model file announced, no emulated-precision warning given, no freed memory
    kept; so no test passes or fails by the order the tests ran in. The capability probe's
    table stays: it is the machine's, and measuring it for every test would cost minutes."""
    from amptrain import allocator, attention, fast_path, precision
    from amptrain.models import user_file

    for module in (attention, fast_path, user_file, allocator):
        module.reset()
    precision.reset_warnings()
    yield


@pytest.fixture
def fake_probe(monkeypatch):
    """Stand a capability table in for this machine's probe: `fake_probe(Capabilities(...))`."""
    from amptrain import capability, precision

    def use(table):
        monkeypatch.setattr(capability, "probe", lambda device="cpu": table)
        precision.reset_warnings()  # the fake machine warns afresh
        return table

    yield use
    precision.reset_warnings()  # and this machine after it


def pytest_configure(config):
    # A session that leaves the GPU tests out runs on the CPU on a GPU machine too: CPU tests
    # (and the processes they start) see no GPU, as on the CPU machines they were written on.
    marks = config.option.markexpr or ""
    if "gpu" not in marks or "not gpu" in marks:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def corpus(tmp_path):
    """A small English text file."""
    path = tmp_path / "corpus.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    return path


@pytest.fixture(scope="session")
def pg_server():
    """A real PostgreSQL server for the session, stopped and removed at the end in any case."""
    bindir = find_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install "
                    "postgresql, or set AMPTRAIN_PG_BIN to their folder")  # fmt: skip
    if importlib.util.find_spec("psycopg") is None:
        pytest.skip("the PostgreSQL driver is missing: pip install 'amptrain[search]'")
    server = PgServer(bindir)
    try:
        yield server.start()
    finally:
        server.stop()


_databases = itertools.count()


@pytest.fixture
def pg_url(pg_server):
    """The URL (with its password) of a new, empty database on the session's server."""
    return pg_server.create_database(f"test_{next(_databases)}")


def tiny_model(seed: int = 0, **overrides) -> TinyGPT:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=VOCAB, n_layer=2, n_embd=16, n_head=2, block_size=CONTEXT)
    return TinyGPT(GPTConfig(**{**cfg, **overrides}))


def pattern_blocks(n: int = 48, context: int = CONTEXT, seed: int = 0) -> Blocks:
    """A learnable task: each row counts up by a row-specific stride modulo VOCAB."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (n, 1), generator=g)
    stride = torch.randint(1, 4, (n, 1), generator=g)
    ids = (start + stride * torch.arange(context)) % VOCAB
    return Blocks(ids, ids.clone(), "pattern")


@pytest.fixture
def model():
    return tiny_model()


@pytest.fixture
def train_val():
    return pattern_blocks(48, seed=0), pattern_blocks(16, seed=1)


def save_tiny_gpt2(path, text: str):
    """Save a tiny GPT-2 and its own byte-level BPE tokenizer (trained on `text`) to `path`,
    laid out like a Hugging Face Hub download. Needs transformers and tokenizers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    bpe.train_from_iterator([text], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe)
    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=len(tokenizer), n_positions=64,
                        bos_token_id=None, eos_token_id=None)  # fmt: skip
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def rewrite_manifest_entry(ckpt_dir, name: str) -> None:
    """Make a checkpoint's manifest agree with an edited file, as whoever can write the folder
    (a bug, or an attacker) could."""
    manifest_path = ckpt_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    data = (ckpt_dir / name).read_bytes()
    manifest[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest_path.write_text(json.dumps(manifest, indent=2))


def step_name(step: int) -> str:
    """The directory name of a checkpoint of `step`."""
    return f"step-{step:09d}"


def checkpoint_payload(step: int) -> dict:
    """All five tensor files `checkpoint.load` reads, small and recognisable by `step`."""
    return {
        "model": {"w": torch.full((8,), float(step))},
        "optimizer": {"state": {}, "param_groups": []},
        "scheduler": {"last_epoch": step},
        "scaler": {"enabled": False},
        "rng": {"torch": torch.get_rng_state()},
    }


def checkpoint_names(root: Path) -> list[str]:
    """The complete checkpoints under `root`, oldest first."""
    return [p.name for p in checkpoint.list_checkpoints(root)]


class HostReads:
    """Counts host reads of tensors (`item`, `tolist`, `bool`, `float`, `int`) while on."""

    NAMES = ("item", "tolist", "__bool__", "__float__", "__int__")

    def __init__(self, monkeypatch=None) -> None:
        """`monkeypatch` undoes the spies after the test; a worker process passes none.

        torch's for-loop and foreach optimizers keep their `step` counters on the host (unless
        capturable) and read them each step: those reads sync nothing, and are not counted.
        """
        self.on, self.count = False, 0
        patch = monkeypatch.setattr if monkeypatch is not None else setattr
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)

            def spy(tensor, *args, _original=original, **kwargs):
                self.count += self.on and not self._torch_optim_host_counter(tensor)
                return _original(tensor, *args, **kwargs)

            patch(torch.Tensor, name, spy)

    @staticmethod
    def _torch_optim_host_counter(tensor) -> bool:
        caller = sys._getframe(2).f_code.co_filename
        return tensor.device.type == "cpu" and tensor.dim() == 0 and "torch/optim/" in caller


def word_tokenizer(path: Path, words: list[str]) -> Path:
    """A word-level Hugging Face tokenizer.json of `words` (the first is the unknown token)."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers

    tok = tokenizers.Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)},
                                                unk_token=words[0]))  # fmt: skip
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return path
