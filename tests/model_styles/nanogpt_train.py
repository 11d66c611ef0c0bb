"""The second nanoGPT-style file: builds the model the way nanoGPT's train.py does,
importing it from the model file beside it."""

from model import GPT, GPTConfig


def build(vocab_size, n_layer=1, n_head=2, n_embd=16, block_size=64, dropout=0.0):
    model_args = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size,
                      bias=False, vocab_size=vocab_size, dropout=dropout)
    gptconf = GPTConfig(**model_args)
    return GPT(gptconf)
