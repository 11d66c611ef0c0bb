"""base.json: a base model is identified by the sha256 of its files, hashed once per version.

The digest is remembered by each file's path, size, mtime_ns and inode; these tests change
one of them at a time (or, deliberately, none) and check whether the files are read again.
"""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from amptrain.errors import ModelError
from amptrain.models import digests, provenance

OLD_NS = 1_700_000_000 * 10**9  # long settled, so the digest may be remembered


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Each test remembers digests in a cache folder of its own."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("AMPTRAIN_CACHE_DIR", str(folder))
    return folder


def sha256_of(*files) -> str:
    """The documented digest, computed here independently: name, NUL, content, per file."""
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode() + b"\0" + f.read_bytes())
    return digest.hexdigest()


def write_settled(path, data: bytes, mtime_ns: int = OLD_NS) -> None:
    path.write_bytes(data)
    os.utime(path, ns=(mtime_ns, mtime_ns))


def rewrite_in_place(path, data: bytes) -> None:
    """New content of the same size in the same inode, with the mtime set back."""
    st = path.stat()
    assert len(data) == st.st_size
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.fixture
def hf_base(tmp_path):
    """A Hugging Face-style base: config.json and a weights file (contents never parsed)."""
    base = tmp_path / "base"
    base.mkdir()
    write_settled(base / "config.json", b'{"model_type": "gpt2"}')
    write_settled(base / "model.safetensors", b"weights-v1" * 1000)
    return base


def test_record_names_the_files_and_their_sha256(hf_base):
    base = provenance.record(str(hf_base))
    assert base["kind"] == "hf" and base["path"] == str(hf_base.resolve())
    assert base["files"] == ["config.json", "model.safetensors"]
    assert base["sha256"] == sha256_of(hf_base / "config.json", hf_base / "model.safetensors")


def test_a_repeat_uses_the_remembered_digest_without_reading_the_files(hf_base):
    weights = hf_base / "model.safetensors"
    first = provenance.record(str(hf_base))["sha256"]
    rewrite_in_place(weights, b"weights-v2" * 1000)  # size, mtime and inode all kept
    assert provenance.record(str(hf_base))["sha256"] == first  # not read again
    assert digests.hash_files(sorted(hf_base.iterdir())) != first  # though the bytes differ


def test_a_new_mtime_hashes_again(hf_base):
    weights = hf_base / "model.safetensors"
    first = provenance.record(str(hf_base))["sha256"]
    write_settled(weights, b"weights-v2" * 1000, OLD_NS + 1)
    again = provenance.record(str(hf_base))["sha256"]
    assert again != first
    assert again == sha256_of(hf_base / "config.json", weights)


def test_a_replaced_file_hashes_again_even_with_the_same_size_and_mtime(hf_base):
    weights = hf_base / "model.safetensors"
    first = provenance.record(str(hf_base))["sha256"]
    new = hf_base.parent / "download.tmp"
    write_settled(new, b"weights-v2" * 1000)  # same size, same mtime, another inode
    keep = new.stat().st_ino  # held open below, so the old inode cannot be reused for it
    with open(weights, "rb"):
        os.replace(new, weights)
        assert weights.stat().st_ino == keep
        assert provenance.record(str(hf_base))["sha256"] != first


def test_a_file_changed_just_now_is_not_remembered(hf_base):
    weights = hf_base / "model.safetensors"
    weights.write_bytes(b"weights-v2" * 1000)  # mtime: now
    first = digests.files_digest([weights])
    rewrite_in_place(weights, b"weights-v3" * 1000)  # a second write within the same tick
    assert digests.files_digest([weights]) != first
    assert digests.files_digest([weights]) == sha256_of(weights)


def test_base_source_refuses_a_base_whose_files_changed(hf_base, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / provenance.BASE_FILE).write_text(json.dumps(provenance.record(str(hf_base))))
    assert provenance.base_source(run, {"model": str(hf_base)}) == str(hf_base.resolve())
    write_settled(hf_base / "model.safetensors", b"weights-v2" * 1000, OLD_NS + 1)
    with pytest.raises(ModelError, match="sha256 differs"):
        provenance.base_source(run, {"model": str(hf_base)})


def test_an_unwritable_cache_only_costs_hashing_again(hf_base, tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder would be")
    monkeypatch.setenv("AMPTRAIN_CACHE_DIR", str(blocker / "cache"))
    files = [hf_base / "config.json", hf_base / "model.safetensors"]
    assert digests.files_digest(files) == sha256_of(*files)
    rewrite_in_place(files[1], b"weights-v2" * 1000)
    assert digests.files_digest(files) == sha256_of(*files)  # nothing remembered: read again


def test_the_cache_keeps_only_the_newest_digests(tmp_path, own_cache, monkeypatch):
    monkeypatch.setattr(digests, "KEEP", 2)
    files = [tmp_path / f"weights-{i}.bin" for i in range(3)]
    for i, f in enumerate(files):
        write_settled(f, bytes([i]) * 64)
        digests.files_digest([f])
    entries = json.loads((own_cache / digests.FILE_NAME).read_text())
    assert [e["files"] for e in entries.values()] == [[str(f.resolve())] for f in files[1:]]
