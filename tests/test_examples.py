"""Instruction and chat data: the prompt read, the completion scored (counted position by
position), one example a row, malformed records reported by their line, and eval over
completions only."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from amptrain import data
from amptrain.cli import main
from amptrain.data import chat
from amptrain.data.examples import ExampleFields
from amptrain.errors import DataError

IGNORE = -100
TINY = ["--layers", "1", "--width", "32", "--heads", "2", "--batch-size", "4", "--precision",
        "fp32", "--device", "cpu", "--no-progress", "--no-compile",
        "--eval-batches", "2"]  # fmt: skip


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _scored(blocks):
    """Each row's scored targets (positions 1 on: position 0 is never predicted)."""
    return [[int(t) for t in row[1:] if int(t) != IGNORE] for row in blocks.labels]


def test_instruction_records_score_the_completion_and_its_end_only(tmp_path):
    path = _jsonl(
        tmp_path / "sft.jsonl",
        [
            {"prompt": "Q: 2+2?\nA: ", "completion": "4"},
            {"prompt": "Q: hi\nA: ", "completion": "hello"},
        ]
        * 5,
    )
    blocks = data.load(path, context=32)
    assert len(blocks) == 10 and blocks.context == 32
    first = blocks.inputs[0].tolist()
    assert bytes(first[:12]) == b"Q: 2+2?\nA: 4" and first[12] == 0  # NUL ends the example
    assert _scored(blocks)[:2] == [[ord("4"), 0], [*b"hello", 0]]  # completion + EOS, no prompt
    assert blocks.inputs[0, 13:].eq(0).all()  # padded with EOS, padding never scored


def test_the_prompt_and_completion_fields_can_be_named(tmp_path):
    path = _jsonl(tmp_path / "sft.jsonl", [{"question": "a", "answer": "b"}] * 4)
    blocks = data.load(path, 8, fields=ExampleFields(prompt="question", completion="answer"))
    assert _scored(blocks)[0] == [ord("b"), 0]


def test_chat_records_without_a_template_use_the_plain_one(tmp_path):
    turns = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Yo"}, {"role": "user", "content": "Bye"},
             {"role": "assistant", "content": "Ciao"}]  # fmt: skip
    blocks = data.load(_jsonl(tmp_path / "chat.jsonl", [{"messages": turns}] * 3), context=96)
    row = bytes(t for t in blocks.inputs[0].tolist() if t)  # the NULs (EOS, padding) taken out
    assert row == b"system: Be terse.\nuser: Hi\nassistant: Yo\nuser: Bye\nassistant: Ciao\n"
    assert _scored(blocks)[0] == [*b"Yo", 0, *b"Ciao", 0]


CHATML = ("{% for m in messages %}<s>{{ m.role }}\n{{ m.content }}</s>\n{% endfor %}"
          "{% if add_generation_prompt %}<s>assistant\n{% endif %}")  # fmt: skip


@pytest.fixture
def llama_dir(tmp_path):
    pytest.importorskip("transformers")
    from test_hf_export import save_tiny_llama

    path = save_tiny_llama(tmp_path / "tiny-llama")
    settings = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**settings, "chat_template": CHATML}))
    return path


def test_chat_records_with_the_tokenizers_template_score_the_assistant_turns(tmp_path, llama_dir):
    tokenizer = data.JsonTokenizer(llama_dir)
    assert tokenizer.chat_template == CHATML and tokenizer.eos_token == "</s>"
    turns = [
        {"role": "user", "content": "the quick"},
        {"role": "assistant", "content": "brown"},
        {"role": "user", "content": "fox"},
        {"role": "assistant", "content": "jumps"},
    ]
    blocks = data.load(_jsonl(tmp_path / "chat.jsonl", [{"messages": turns}] * 2), 64, tokenizer)
    scored = _scored(blocks)[0]
    assert tokenizer.decode(scored, special=True) == "brown</s>\njumps</s>\n"
    used = blocks.inputs[0, : int((blocks.labels[0] != IGNORE).nonzero().max()) + 1]
    assert tokenizer.decode(used.tolist(), special=True) == chat.render(tokenizer, turns)
    ids = chat.prompt_ids("the quick", tokenizer)  # generate --chat starts the same way
    assert blocks.inputs[0, : len(ids)].tolist() == ids


def test_a_template_that_rewrites_earlier_turns_is_refused_not_scored_wrongly(tmp_path, llama_dir):
    settings = json.loads((llama_dir / "tokenizer_config.json").read_text())
    rewrites = "{% for m in messages %}{{ m.role }}{{ messages|length }}{% endfor %}"
    (llama_dir / "tokenizer_config.json").write_text(
        json.dumps({**settings, "chat_template": rewrites})
    )
    turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    path = _jsonl(tmp_path / "chat.jsonl", [{"messages": turns}])
    with pytest.raises(DataError, match="renders earlier turns differently"):
        data.load(path, 64, data.JsonTokenizer(llama_dir))


def test_malformed_records_are_counted_and_named_by_line(tmp_path, caplog):
    path = _jsonl(tmp_path / "sft.jsonl", [
        {"prompt": "a", "completion": "b"}, {"prompt": "a"}, {"prompt": "a", "completion": " "},
        {"prompt": "a", "completion": "b"}, "a string", {"prompt": "a", "completion": 5},
    ])  # fmt: skip
    with caplog.at_level(logging.INFO, logger="amptrain"):
        blocks = data.load(path, 16)
    assert len(blocks) == 2
    said = " ".join(r.getMessage() for r in caplog.records)
    assert f"2 without a text 'completion' (first: {path} line 2)" in said, said
    assert f"1 with an empty completion (first: {path} line 3)" in said
    assert f"1 records that are not objects (first: {path} line 5)" in said


def test_long_examples_are_cut_from_the_prompt_side_or_dropped(tmp_path):
    records = [{"prompt": "p" * 30, "completion": "done"}, {"prompt": "x", "completion": "ok"}]
    path = _jsonl(tmp_path / "sft.jsonl", records)
    cut = data.load(path, 16)
    assert bytes(cut.inputs[0].tolist()) == b"p" * 11 + b"done\0"  # the end kept whole
    assert _scored(cut)[0] == [*b"done", 0]
    dropped = data.load(path, 16, fields=ExampleFields(long_examples="drop"))
    with pytest.raises(DataError, match="no usable instruction example"):
        data.load(_jsonl(tmp_path / "long.jsonl", records[:1]), 16,
                  fields=ExampleFields(long_examples="drop"))  # fmt: skip
    assert len(dropped) == 1 and _scored(dropped)[0] == [*b"ok", 0]


def test_a_file_with_no_usable_example_is_one_line_exit_2_and_no_run(tmp_path, capsys):
    path = _jsonl(tmp_path / "sft.jsonl", [{"prompt": "a", "completion": ""}] * 3)
    out = tmp_path / "runs"
    assert main(["train", "--data", str(path), "--out", str(out), *TINY]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("amptrain:")]
    assert len(lines) == 1 and "no usable instruction example" in lines[0], err
    assert "3 with an empty completion" in lines[0] and not out.exists()


def test_records_with_a_text_field_still_train_as_text(tmp_path):
    path = _jsonl(tmp_path / "t.jsonl", [{"text": "abc", "prompt": "p", "completion": "c"}] * 20)
    blocks = data.load(path, 8)
    assert blocks.store_labels is None  # packed text: every position scored


def test_chat_data_trains_with_the_prompt_masked_and_eval_scores_completions(tmp_path, capsys):
    import random

    rng = random.Random(0)
    records = [
        {
            "messages": [
                {"role": "user", "content": "".join(rng.choice("abcdefgh") for _ in range(12))},
                {"role": "assistant", "content": "OK!"},
            ]
        }
        for _ in range(64)
    ]
    path = _jsonl(tmp_path / "chat.jsonl", records)
    out = tmp_path / "runs"
    assert (
        main(
            [
                "train",
                "--data",
                str(path),
                "--context",
                "32",
                "--max-steps",
                "40",
                "--lr",
                "3e-3",
                "--eval-every",
                "40",
                "--out",
                str(out),
                *TINY,
            ]
        )
        == 0
    )
    (run,) = out.glob("train-*")
    about = json.loads((run / "summary.json").read_text())["examples"]
    assert about["kind"] == "chat" and about["examples"] == 64
    assert about["layout"] == "one example per row, padded to 32 tokens"
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [h["val/loss"] for h in history if "val/loss" in h]
    assert losses[-1] < 0.5 * losses[0], losses  # a fixed answer is learnt; random prompts not
    capsys.readouterr()
    assert main(["eval", "--model", str(run), "--out", str(out), "--no-progress"]) == 0
    figures = json.loads(next(out.glob("eval-*/eval.json")).read_text())
    val_rows = figures["blocks"]
    assert figures["tokens"] == val_rows * 4  # "OK!" and its EOS, nothing of the prompt
    assert torch.isfinite(torch.tensor(figures["loss"]))


def test_templates_compile_as_transformers_compiles_them_and_broken_ones_are_one_line(
    tmp_path, llama_dir
):
    settings = json.loads((llama_dir / "tokenizer_config.json").read_text())
    hf_style = ("{% for m in messages %}{% if loop.index > 9 %}{% break %}{% endif %}"
                "<s>{{ m.role }}\n{% if m.role == 'assistant' %}{% generation %}{{ m.content }}"
                "</s>\n{% endgeneration %}{% else %}{{ m.content }}</s>\n{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}<s>assistant\n{% endif %}")  # fmt: skip
    (llama_dir / "tokenizer_config.json").write_text(
        json.dumps({**settings, "chat_template": hf_style})
    )
    tokenizer = data.JsonTokenizer(llama_dir)
    assert tokenizer.eos_id in tokenizer.stop_ids
    turns = [{"role": "user", "content": "the"}, {"role": "assistant", "content": "fox"}]
    path = _jsonl(tmp_path / "chat.jsonl", [{"messages": turns}] * 2)
    blocks = data.load(path, 64, tokenizer)
    assert tokenizer.decode(_scored(blocks)[0], special=True) == "fox</s>\n"
    (llama_dir / "tokenizer_config.json").write_text(
        json.dumps({**settings, "chat_template": "{% for %}"})
    )
    with pytest.raises(DataError, match="no usable chat example .*TemplateSyntaxError"):
        data.load(path, 64, data.JsonTokenizer(llama_dir))
