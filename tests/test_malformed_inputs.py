"""Files and values a user hands us that are malformed: each refused in one line, exit 2, before
any run directory exists (a table: what is handed over, what the line must say)."""

from __future__ import annotations

import pytest

from amptrain.cli import main

TINY = ["--layers", "1", "--width", "16", "--heads", "2", "--context", "16", "--batch-size",
        "4", "--max-steps", "1", "--no-progress"]  # fmt: skip

# name: (files to write {name: text}, extra arguments, what the one line says)
CASES = {
    "device mps": ({}, ["--device", "mps"], "--device mps is not supported"),
    "device meta": ({}, ["--device", "meta"], "--device meta is not supported"),
    "device xpu": ({}, ["--device", "xpu"], "--device xpu is not supported"),
    "a missing GPU index": ({}, ["--device", "cuda:3"], "CUDA is not available"),
    "config nested too deep": ({"deep.json": "[" * 100_000 + "]" * 100_000},
                               ["--config", "deep.json"], "nested deeper than Python reads"),
    "tokenizer a list": ({"tok.json": "[1, 2, 3]"}, ["--tokenizer", "tok.json"],
                         "is not a tokenizer.json"),
    "tokenizer not JSON": ({"tok.json": "not json"}, ["--tokenizer", "tok.json"],
                           "is not a tokenizer.json"),
    "tokenizer empty": ({"tok.json": ""}, ["--tokenizer", "tok.json"], "is not a tokenizer.json"),
    "tokenizer of an unknown model": ({"tok.json": '{"model": {"type": "Nonesuch", "vocab": {}}}'},
                                      ["--tokenizer", "tok.json"], "is not a tokenizer.json"),
    "tokenizer vocabulary a string": (
        {"tok.json": '{"version": "1.0", "model": {"type": "WordLevel", "vocab": "abc", '
                     '"unk_token": "x"}}'},
        ["--tokenizer", "tok.json"], "is not a tokenizer.json"),
    "tokenizer nested too deep": ({"tok.json": '{"model": ' + "[" * 100_000 + "]" * 100_000 + "}"},
                                  ["--tokenizer", "tok.json"], "is not a tokenizer.json"),
    "litgpt header cut short": ({"short.bin": "LITPKDS"}, ["--data", "short.bin"],
                                "a litgpt token file cut short"),
    "model kwargs a list, sized": ({}, ["--model-kwargs", "[1]"],
                                   "model_kwargs must be a JSON object"),
    "seed past 64 bits": ({}, ["--seed", "99999999999999999999"], "from 0 to 2**63 - 1"),
    "jsonl not utf-8": ({"bad.jsonl": None}, ["--data", "bad.jsonl"],
                        "bad.jsonl line 2 is not UTF-8"),
    "jsonl nested too deep": ({"deep.jsonl": "[" * 100_000 + "]" * 100_000 + "\n"},
                              ["--data", "deep.jsonl"], "nested deeper than Python reads"),
    "json nested too deep": ({"deep.json": "[" * 100_000 + "]" * 100_000},
                             ["--data", "deep.json"], "nested deeper than Python reads"),
    "parquet damaged": ({"bad.parquet": "PAR1" + "x" * 3000 + "PAR1"}, ["--data", "bad.parquet"],
                        "bad.parquet is not a readable Parquet file"),
    "csv in latin-1": ({"latin.csv": ("text\n" + "un café crème\n" * 300).encode("latin-1")},
                       ["--data", "latin.csv"], "latin.csv is not UTF-8 (byte 0xe9"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_input_is_one_line_and_no_run(case, tmp_path, corpus, monkeypatch, capsys):
    files, extra, said = CASES[case]
    monkeypatch.chdir(tmp_path)
    for name, text in files.items():
        if text is None:  # bytes that are not UTF-8 on line 2
            (tmp_path / name).write_bytes(b'{"text": "ok"}\n{"text": "bad \xff\xfe"}\n' * 50)
        elif isinstance(text, bytes):
            (tmp_path / name).write_bytes(text)
        else:
            (tmp_path / name).write_text(text)
    out = tmp_path / "runs"
    code = main(["train", "--data", str(corpus), *TINY, "--out", str(out), *extra])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("amptrain:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert said in " ".join(err.split())
    assert not out.exists() or not list(out.iterdir())


def test_a_csv_with_a_byte_order_mark_reads_its_text_field(tmp_path, monkeypatch):
    path = tmp_path / "data.csv"
    rows = "\n".join(f"the quick brown fox, row {i}" for i in range(200))
    path.write_text("text\n" + rows.replace(",", "") + "\n", encoding="utf-8-sig")  # Excel's
    assert path.read_bytes()[:3] == b"\xef\xbb\xbf"
    assert main(["train", "--data", str(path), *TINY, "--out", str(tmp_path / "runs")]) == 0


@pytest.mark.parametrize("name", ["corpus.txt.gz", "corpus.jsonl.gz", "corpus.csv.gz"])
def test_a_gzip_file_cut_short_past_its_start_is_one_line(name, tmp_path, capsys):
    import gzip
    import json

    lines = [json.dumps({"text": f"line {i} of a long corpus"}) if "jsonl" in name
             else f"line {i} of a long corpus" for i in range(40_000)]  # fmt: skip
    if name.endswith(".csv.gz"):
        lines = ["text", *lines]
    whole = gzip.compress(("\n".join(lines) + "\n").encode())
    (tmp_path / name).write_bytes(whole[: len(whole) * 2 // 3])  # its first 8 KB are fine
    out = tmp_path / "runs"
    assert main(["train", "--data", str(tmp_path / name), *TINY, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if line.startswith("amptrain:")]
    assert len(said) == 1 and "Traceback" not in err
    assert "cut short or corrupt part-way" in " ".join(err.split())
    assert not out.exists() or not list(out.iterdir())


@pytest.mark.parametrize("trainer", ["[1, 2]", '{"step": -3}', '{"step": "7"}', "not json"])
def test_a_hand_edited_trainer_json_is_one_line(trainer, tmp_path, corpus, capsys):
    from conftest import rewrite_manifest_entry

    out = tmp_path / "runs"
    args = ["train", "--data", str(corpus), *TINY, "--checkpoint-every", "1", "--out", str(out)]
    assert main(args) == 0
    (ckpt,) = out.glob("*/checkpoints/step-*")
    (ckpt / "trainer.json").write_text(trainer)
    rewrite_manifest_entry(ckpt, "trainer.json")  # as someone who can write the folder would
    capsys.readouterr()
    assert main([*args, "--resume", "auto"]) == 2
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if line.startswith("amptrain:")]
    assert len(said) == 1 and "Traceback" not in err and "trainer.json" in said[0]


def test_a_checkpoint_file_holding_the_wrong_thing_is_one_line(tmp_path, corpus, capsys):
    import torch
    from conftest import rewrite_manifest_entry

    out = tmp_path / "runs"
    args = ["train", "--data", str(corpus), *TINY, "--checkpoint-every", "1", "--out", str(out)]
    assert main(args) == 0
    (ckpt,) = out.glob("*/checkpoints/step-*")
    torch.save(torch.ones(3), ckpt / "scaler.pt")  # a tensor where a dict of state belongs
    rewrite_manifest_entry(ckpt, "scaler.pt")
    capsys.readouterr()
    assert main([*args, "--resume", str(ckpt)]) == 2
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if line.startswith("amptrain:")]
    assert len(said) == 1 and "scaler.pt holds a Tensor" in said[0] and "Traceback" not in err


def _one_line(code: int, err: str) -> str:
    said = [line for line in err.splitlines() if line.startswith("amptrain:")]
    assert code == 2 and len(said) == 1 and "Traceback" not in err, err
    return " ".join(err.split())


def test_text_that_is_not_utf8_is_refused_with_a_tokenizer_not_replaced(tmp_path, capsys):
    from conftest import word_tokenizer

    word_tokenizer(tmp_path / "tok.json", ["<unk>", "un", "café"])
    (tmp_path / "latin.txt").write_bytes("un café crème\n".encode("latin-1") * 300)
    args = ["train", "--data", str(tmp_path / "latin.txt"), "--tokenizer",
            str(tmp_path / "tok.json"), *TINY, "--out", str(tmp_path / "runs")]  # fmt: skip
    said = _one_line(main(args), capsys.readouterr().err)
    assert "latin.txt is not UTF-8 at byte 6 (byte 0xe9" in said


def test_an_arrow_file_cut_short_is_one_line_naming_it(tmp_path, capsys):
    pa = pytest.importorskip("pyarrow")
    table = pa.table({"text": [f"line {i} of a long corpus" for i in range(20_000)]})
    with (
        pa.OSFile(str(tmp_path / "whole.arrow"), "wb") as sink,
        pa.ipc.new_file(sink, table.schema) as writer,
    ):
        writer.write_table(table, max_chunksize=1000)
    whole = (tmp_path / "whole.arrow").read_bytes()
    (tmp_path / "cut.arrow").write_bytes(whole[: len(whole) // 2])
    args = ["train", "--data", str(tmp_path / "cut.arrow"), *TINY, "--out", str(tmp_path / "runs")]
    said = _one_line(main(args), capsys.readouterr().err)
    assert "cut.arrow is not a readable Arrow file" in said


@pytest.mark.parametrize("damage", ["arrow cut short", "state.json not JSON"])
def test_a_damaged_datasets_folder_is_one_line_naming_the_file(damage, tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": [f"record {i} of a corpus" for i in range(3000)]}
                               ).save_to_disk(str(folder))  # fmt: skip
    if damage == "arrow cut short":
        part = next(folder.glob("*.arrow"))
        part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    else:
        part = folder / "state.json"
        part.write_text("{not json")
    args = ["train", "--data", str(folder), *TINY, "--out", str(tmp_path / "runs")]
    said = _one_line(main(args), capsys.readouterr().err)
    assert f"{part}, a file of the datasets folder {folder}, cannot be read" in said, said


def test_an_empty_file_in_a_data_folder_is_skipped_and_said(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.csv").write_text("text\n" + "the quick brown fox\n" * 300)
    (tmp_path / "data" / "empty.csv").write_text("")
    args = ["train", "--data", str(tmp_path / "data"), *TINY, "--out", str(tmp_path / "runs")]
    assert main(args) == 0
    unwrapped = "".join(capsys.readouterr().err.split())  # the console wraps long paths
    assert f"skipped{tmp_path / 'data' / 'empty.csv'}:empty" in unwrapped


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    pytest.importorskip("transformers")
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("hf") / "llama"
    config = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=64)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(path)
    return path


HF_CASES = {
    "a size as text": ({"hidden_size": "32"}, "config.json: hidden_size is '32'; it must be"),
    "a negative depth": ({"num_hidden_layers": -1}, "num_hidden_layers is -1"),
    "a vocabulary the weights lack": (
        {"vocab_size": 300}, "makes model.embed_tokens.weight [300, 32], but model.safetensors "
        "holds [256, 32]: the config and the weights disagree"),
    "another field of the wrong type": ({"rms_norm_eps": "small"},
                                        "config.json is not a config transformers reads"),
    "a list": (["a list"], "config.json holds a JSON list, not an object"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_a_hugging_face_config_json_that_is_wrong_is_one_line(case, hf_dir, tmp_path, capsys):
    import json
    import shutil

    edit, expected = HF_CASES[case]
    model = tmp_path / "model"
    shutil.copytree(hf_dir, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, **edit} if isinstance(edit, dict)
                                                  else edit))  # fmt: skip
    args = ["train", "--model", str(model), "--context", "16", "--batch-size", "4",
            "--max-steps", "1", "--no-progress", "--out", str(tmp_path / "runs")]  # fmt: skip
    said = _one_line(main(args), capsys.readouterr().err)
    assert expected in said and str(model) in said
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())


@pytest.mark.parametrize("protocol", [4, 5])
def test_weights_pickled_with_a_newer_protocol_are_one_line_without_torch_warning(
    protocol, tmp_path, capsys
):
    import torch

    torch.save({"w": torch.ones(2)}, tmp_path / "w.pt", pickle_protocol=protocol)
    args = ["train", "--init-from", str(tmp_path / "w.pt"), *TINY, "--out", str(tmp_path / "r")]
    code = main(args)
    err = capsys.readouterr().err
    assert f"saved with pickle protocol {protocol}" in _one_line(code, err)
    assert "UserWarning" not in err  # torch's two-line warning is kept off the console
