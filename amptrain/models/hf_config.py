"""A Hugging Face model directory checked before transformers loads it.

transformers meets a `config.json` with a wrong type, or weights of other shapes than the config
makes, with a traceback from deep inside its loader. These checks read the config and the
safetensors headers first and refuse in one line that names the file, the field and the fix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from amptrain.errors import ModelError

SIZE_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "max_position_embeddings", "n_embd", "n_layer", "n_head",
    "n_positions", "n_inner",
)  # fmt: skip
"""Config fields that size the model: each, where present, a positive whole number."""

FIX = "use the config.json saved with these weights"


def read_config(path: Path) -> Any:
    """The `PretrainedConfig` of the directory `path`, after checking its `config.json`.

    Raises:
        ModelError: For a config.json that is not a JSON object, a size field that is not a
            positive whole number, or a config transformers refuses; naming the file and field.
    """
    from transformers import AutoConfig

    file = path / "config.json"
    try:
        values = json.loads(file.read_bytes())
    except RecursionError:
        raise ModelError(f"{file} is JSON nested deeper than Python reads; {FIX}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{file} is not JSON ({exc}); {FIX}") from None
    if not isinstance(values, dict):
        raise ModelError(f"{file} holds a JSON {type(values).__name__}, not an object; {FIX}")
    for name in SIZE_FIELDS:
        value = values.get(name)
        if value is not None and (type(value) is not int or value <= 0):
            raise ModelError(f"{file}: {name} is {value!r}; it must be a positive whole number")
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # transformers and huggingface_hub raise many kinds here
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise ModelError(f"{file} is not a config transformers reads ({reason}); {FIX}") from None


def check_weight_shapes(path: Path, config: Any) -> None:
    """Refuse safetensors weights whose shapes differ from the model `config` makes.

    Only the headers are read, and the model is built on the meta device (no memory). Weights
    that cannot be read here are left to the loader, which refuses them in its own words.

    Raises:
        ModelError: Naming the tensor, both shapes and the file.
    """
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    stored: dict[str, tuple[str, list[int]]] = {}
    try:
        for file in sorted(path.glob("*.safetensors")):
            with safe_open(str(file), "pt") as handle:
                for key in handle.keys():  # noqa: SIM118 - a safe_open handle is no dict
                    stored[key] = (file.name, list(handle.get_slice(key).get_shape()))
        if not stored:
            return
        with torch.device("meta"):
            expected = AutoModelForCausalLM.from_config(config).state_dict()
    except Exception:  # noqa: BLE001 - unreadable here: the loader's own checks refuse it
        return
    for key, tensor in expected.items():
        if key in stored and list(tensor.shape) != stored[key][1]:
            name, shape = stored[key]
            raise ModelError(
                f"{path / 'config.json'} makes {key} {list(tensor.shape)}, but {name} holds "
                f"{shape}: the config and the weights disagree; {FIX}"
            )
