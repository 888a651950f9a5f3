"""bench.py's memory section (bench_model.memory_table): the bytes each rank holds for training under
DDP and FSDP2, against a count by hand from the model's shapes."""
import math

from bench_model import memory_table
from model import GPTConfig


def hand_shapes(V, T, C, L):
    """GPT's parameter shapes, written out: wte (also the lm_head: once), wpe, L blocks, ln_f."""
    block = [(C,), (C,),  # ln_1
             (3 * C, C), (3 * C,), (C, C), (C,),  # attn.c_attn, attn.c_proj
             (C,), (C,),  # ln_2
             (4 * C, C), (4 * C,), (C, 4 * C), (C,)]  # mlp.c_fc, mlp.c_proj
    return [(V, C), (T, C)] + block * L + [(C,), (C,)]


def test_per_rank_bytes_match_a_hand_count():
    """16 bytes a parameter (fp32 parameter, gradient, two AdamW moments); DDP: all of it on every rank;
    FSDP2: each parameter cut on dim 0 into N chunks, every rank holding the largest, ceil(dim0 / N) rows.
    block_size 33 and n_embd 64 do not divide by 2 and 3 ranks: the padding shows."""
    cfg = GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=33)
    V = (50257 + 63) // 64 * 64  # the vocabulary padded to a multiple of 64, as the model does
    assert V == 50304
    shapes = hand_shapes(V, 33, 64, 2)
    ddp = sum(math.prod(s) for s in shapes) * 16
    fsdp = {n: sum(-(-s[0] // n) * math.prod(s[1:]) for s in shapes) * 16 for n in (2, 3)}
    (row,) = memory_table({"small": cfg}, ranks=(2, 3))
    assert row["model"] == "small" and row["params"] * 16 == ddp
    assert row["ddp"] == ddp
    assert row["fsdp"] == fsdp
    assert fsdp[3] > ddp / 3  # (the padding is real)


def test_fsdp_at_8_ranks_holds_at_most_a_sixth_of_ddp_at_1_5b():
    (row,) = memory_table({"gpt2-xl": GPTConfig.from_preset("gpt2-xl")}, ranks=(8,))
    assert row["params"] > 1.5e9
    assert row["ddp"] / row["fsdp"][8] >= 6
