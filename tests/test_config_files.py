"""B9: a `--config` file of any JSON shape is refused in one line, exit 2, before any run."""

from __future__ import annotations

import pytest

from amptrain.cli import main

# name -> (file contents, words the one-line error must hold besides the file's name)
MALFORMED = {
    "a string": ('"just a string"', ["expected a JSON object", "a string"]),
    "a list": ("[1, 2, 3]", ["expected a JSON object", "a list"]),
    "null": ("null", ["expected a JSON object", "null"]),
    "a number": ("42", ["expected a JSON object", "a number"]),
    "fit a list": ('{"fit": [1, 2]}', ["key 'fit'", "a list"]),
    "fit a string": ('{"fit": "abc"}', ["key 'fit'", "a string"]),
    "fit null": ('{"fit": null}', ["key 'fit'", "null"]),
    "betas a number": ('{"fit": {"betas": 5}}', ["betas=5", "two numbers in [0, 1)"]),
    "lr a string": ('{"fit": {"lr": "fast"}}', ["lr='fast'", "a finite number > 0"]),
    "lr NaN": ('{"fit": {"lr": NaN}}', ["lr=nan", "a finite number > 0"]),
    "lr Infinity": ('{"fit": {"lr": Infinity}}', ["lr=inf", "a finite number > 0"]),
    "max_steps a float": ('{"fit": {"max_steps": 2.5}}', ["max_steps=2.5", "integer >= 0"]),
    "unknown key": ('{"learning_rate": 0.1}', ["unknown keys ['learning_rate']"]),
    "unknown fit key": ('{"fit": {"steps": 3}}', ["fit has unknown keys ['steps']"]),
    "model a number": ('{"model": 5}', ["model=5", "a non-empty string"]),
    "out null": ('{"out": null}', ["out=None", "a non-empty string"]),
    "model_kwargs a list": ('{"model_kwargs": [1]}', ["model_kwargs must be a JSON object"]),
    "width a string": ('{"model_kwargs": {"n_embd": "wide"}}', ["n_embd='wide'", "positive"]),
    "unknown model kwarg": ('{"model_kwargs": {"width": 8}}', ["width", "tiny-gpt takes"]),
    "absurd width": (
        '{"model_kwargs": {"n_embd": 100000000000, "n_head": 1}}',
        ["parameters", "GiB", "choose a smaller"],
    ),  # fmt: skip
    "absurd depth": ('{"model_kwargs": {"n_layer": 1000000000}}', ["parameters", "GiB"]),
    "absurd context": ('{"context": 100000000000}', ["parameters", "--context"]),
    "syntax error": ('{"fit": {"lr": 0.1,}}', ["not valid JSON at line 1, column"]),
    "not UTF-8": (b"\xff\xfe{}", ["cannot read it"]),
}


@pytest.mark.parametrize("name", MALFORMED)
def test_a_malformed_config_file_is_one_line_exit_2_and_no_run_directory(tmp_path, capsys, name):
    text, words = MALFORMED[name]
    config = tmp_path / "bad.json"
    config.write_bytes(text if isinstance(text, bytes) else text.encode())
    out = tmp_path / "runs"
    code = main(["train", "--config", str(config), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("amptrain: error: --config "), err
    assert str(config) in err
    for word in words:
        assert word in err, (word, err)
    assert "Traceback" not in err
    assert not out.exists()


def test_an_absurd_width_on_the_command_line_is_refused_before_allocation(tmp_path, capsys):
    out = tmp_path / "runs"
    code = main(["train", "--width", "4000000", "--heads", "1", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "tiny-gpt would have" in err and "GiB" in err, err
    assert not out.exists()


def test_a_valid_partial_config_file_is_accepted(tmp_path):
    from argparse import Namespace

    from amptrain.cli.common import config_from_args

    config = tmp_path / "ok.json"
    config.write_text('{"fit": {"lr": 0.01}, "context": 32}')
    cfg = config_from_args(Namespace(config=config))
    assert cfg.fit.lr == 0.01 and cfg.context == 32 and cfg.fit.max_steps == 200
