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


SAME_SETTINGS = {
    "yaml": "model: tiny-gpt\ncontext: 32\nlr: 3e-4\nmax-steps: 7\nfit:\n  batch_size: 4\n"
    "  betas: [0.9, 0.99]\nmodel_kwargs: {n_layer: 1}\nclip_norm: null\n",
    "toml": 'model = "tiny-gpt"\ncontext = 32\nlr = 3e-4\nmax_steps = 7\n'
    "[fit]\nbatch_size = 4\nbetas = [0.9, 0.99]\n[model_kwargs]\nn_layer = 1\n",
    "json": '{"model": "tiny-gpt", "context": 32, "fit": {"lr": 3e-4, "max_steps": 7, '
    '"batch_size": 4, "betas": [0.9, 0.99]}, "model_kwargs": {"n_layer": 1}}',
}


@pytest.mark.parametrize("kind", SAME_SETTINGS)
def test_yaml_toml_and_json_configs_give_the_same_settings_flat_keys_placed(tmp_path, kind):
    from argparse import Namespace

    from amptrain.cli.common import config_from_args

    config = tmp_path / f"settings.{kind}"
    config.write_text(SAME_SETTINGS[kind])
    cfg = config_from_args(Namespace(config=config))
    assert cfg.fit.lr == 3e-4 and isinstance(cfg.fit.lr, float)  # YAML 1.1 read 3e-4 as text
    assert cfg.fit.max_steps == 7 and cfg.fit.batch_size == 4 and cfg.fit.betas == (0.9, 0.99)
    assert cfg.context == 32 and cfg.model_kwargs == {"n_layer": 1}
    assert cfg.fit.clip_norm == (None if kind == "yaml" else 1.0)


def test_a_yaml_config_trains_and_a_flag_given_as_well_wins(tmp_path):
    import json

    config = tmp_path / "settings.yml"
    config.write_text("context: 16\nmax_steps: 2\nbatch_size: 2\nlr: 1e-3\n"
                      "model_kwargs: {n_layer: 1, n_embd: 32, n_head: 2}\n")  # fmt: skip
    out = tmp_path / "runs"
    code = main(["train", "--config", str(config), "--max-steps", "3", "--out", str(out),
                 "--no-progress", "--device", "cpu", "--precision", "fp32"])  # fmt: skip
    assert code == 0
    saved = json.loads(next(out.glob("*/config.json")).read_text())
    assert saved["fit"]["max_steps"] == 3 and saved["fit"]["lr"] == 1e-3
    assert saved["context"] == 16


# file name -> (contents, words of the one-line error)
MALFORMED_OTHER_FORMATS = {
    "bad.yaml": ("fit:\n  lr: [0.1\n", ["not valid YAML at line", "column"]),
    "alias.yaml": ("a: &x [1, 2]\nfit: *x\n", ["alias", "line 2"]),
    "bad.toml": ("lr = = 3\n", ["not valid TOML", "line 1"]),
    "list.yaml": ("- 1\n- 2\n", ["expected a JSON object", "a list"]),
    "misplaced.yaml": ("fit:\n  context: 64\n", ["['context'] belong at the top level"]),
    "twice.toml": ("lr = 0.1\n[fit]\nlr = 0.2\n", ["'lr' is given at the top level", "keep one"]),
    "typo.yaml": ("learning_rte: 0.1\n", ["unknown keys ['learning_rte']"]),
    "near.yaml": ("max_step: 3\n", ["unknown keys ['max_step']", "did you mean fit.max_steps?"]),
    "yaml lr text.yaml": ("lr: fast\n", ["lr='fast'", "a finite number > 0"]),
}


@pytest.mark.parametrize("name", MALFORMED_OTHER_FORMATS)
def test_a_malformed_yaml_or_toml_config_is_one_line_naming_the_place(tmp_path, capsys, name):
    text, words = MALFORMED_OTHER_FORMATS[name]
    config = tmp_path / name
    config.write_text(text)
    out = tmp_path / "runs"
    code = main(["train", "--config", str(config), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("amptrain: error: --config "), err
    assert str(config) in err and "Traceback" not in err
    for word in words:
        assert word in err, (word, err)
    assert not out.exists()


def test_a_billion_laughs_yaml_is_refused_before_it_expands(tmp_path, capsys):
    lines = ["a0: [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]" for i in range(1, 30)]
    lines[0] = "a0: &a0 [x, x, x, x, x, x, x, x, x]"
    config = tmp_path / "laughs.yaml"
    config.write_text("\n".join(lines) + "\n")
    code = main(["train", "--config", str(config), "--out", str(tmp_path / "r"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "alias" in err and err.count("\n") == 1, err
