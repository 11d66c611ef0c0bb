from torch import nn

from amptrain.blocks import repeated_blocks
from amptrain.models import GPTConfig, TinyGPT


def test_the_built_in_model_s_blocks_are_found_in_order():
    model = TinyGPT(GPTConfig(vocab_size=32, block_size=16, n_layer=3, n_head=2, n_embd=16))
    found = repeated_blocks(model)
    assert found.path == "blocks" and found.block_class == "Block"
    assert list(found.blocks) == list(model.blocks)


def test_nanogpt_and_llama_styles_find_their_stacks(model_styles):
    from llama_style import ModelArgs, Transformer
    from nanogpt_model import GPT
    from nanogpt_model import GPTConfig as NanoConfig

    nano = GPT(NanoConfig(block_size=16, vocab_size=32, n_layer=2, n_head=2, n_embd=16))
    assert repeated_blocks(nano).path == "transformer.h"
    llama = Transformer(ModelArgs(dim=16, n_layers=2, n_heads=2, vocab_size=32, max_seq_len=16))
    assert repeated_blocks(llama).path == "layers"


def test_the_stack_with_most_parameters_wins_and_mixed_lists_are_not_blocks():
    model = nn.Module()
    model.norms = nn.ModuleList([nn.LayerNorm(4), nn.LayerNorm(4), nn.LayerNorm(4)])
    model.layers = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32))
    model.mixed = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    assert repeated_blocks(model).path == "layers"


def test_a_model_without_a_stack_has_no_blocks():
    assert repeated_blocks(nn.Linear(4, 4)) is None
    assert repeated_blocks(nn.ModuleList([nn.Linear(4, 4)])) is None
