"""The second minGPT-style file: a script's way of building the model, from the package
folder beside it."""

from mingpt.model import GPT


def build(vocab_size, block_size=32, model_type="gpt-nano"):
    model_config = GPT.get_default_config()
    model_config.model_type = model_type
    model_config.vocab_size = vocab_size
    model_config.block_size = block_size
    return GPT(model_config)
