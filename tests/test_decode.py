"""Tests for decode.py: the KV-cache decode steps, generate_stream and the static decoder give
model.generate()'s tokens. Everything runs on CPU with tiny configs (test_model.py's)."""
import math
import os

import pytest
import torch
from conftest import perturb_

import decode
from decode import StaticDecoder
from test_model import SAMPLING, _sample, make_ours, rand_idx


def test_per_row_positions_decode_matches_single_row_decode():
    """One batched decode step over rows at different positions (pos a (B,) tensor, as serve.py's
    continuous batching runs it) gives each row the logits of its own one-row KV-cache decode."""
    m = make_ours(seed=11, n_head=4)
    perturb_(m, 78, scale=0.5)
    lengths = [3, 17, 9, 40]  # each row's prompt length; its next token goes at that position
    prompts = [rand_idx(1, n, 101, seed=n) for n in lengths]
    nxt = rand_idx(len(lengths), 1, 101, seed=5)
    bs = m.config.block_size
    with torch.no_grad():
        head_t = decode.decode_head(m)
        batch = decode.new_kv_caches(m, len(lengths), bs, "cpu")
        expected = []
        for b, p in enumerate(prompts):
            # reference: prefill this row alone, then one single-row decode step (generate's path)
            own = decode.new_kv_caches(m, 1, bs, "cpu")
            decode.next_logits(m, p, own, 0, head_t)
            expected.append(decode.next_logits(m, nxt[b : b + 1], own, p.size(1), head_t))
            # the batch's cache row b gets the same prefill; stale garbage beyond it must be masked
            for (k, v), (ko, vo) in zip(batch, own):
                k[b].normal_(), v[b].normal_()
                k[b, :, : p.size(1)], v[b, :, : p.size(1)] = ko[0, :, : p.size(1)], vo[0, :, : p.size(1)]
        got = decode.next_logits(m, nxt, batch, torch.tensor(lengths), head_t)
    torch.testing.assert_close(got, torch.cat(expected), atol=1e-5, rtol=1e-5)
    # and each row's new key was written at its own position
    with torch.no_grad():
        for b, n in enumerate(lengths):
            own = decode.new_kv_caches(m, 1, bs, "cpu")
            decode.next_logits(m, torch.cat([prompts[b], nxt[b : b + 1]], dim=1), own, 0, head_t)
            torch.testing.assert_close(batch[0][0][b, :, : n + 1], own[0][0][0, :, : n + 1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch, sampling", [
    (1, dict(temperature=0)),
    (1, dict(temperature=0.9, top_k=50, top_p=0.9)),
    (3, dict(temperature=1.0)),
    (3, dict(temperature=0.7, top_k=20, top_p=0.95)),
])
def test_static_decoder_gives_the_tokens_of_the_dynamic_path(batch, sampling):
    """generate_stream on a StaticDecoder (whole-context caches, masked, padded to a bucket of rows)
    samples exactly the tokens of model.generate (the default CPU path) for a seed, also past
    block_size (the window slides) and on a second call (the decoder and its caches are reused)."""
    m = make_ours(seed=5, vocab_size=101)
    idx = rand_idx(batch, 9, 101, seed=batch)
    new = m.config.block_size + 20  # past the context
    dec = StaticDecoder(m, StaticDecoder.bucket(batch))
    for seed in (0, 1):
        want = m.generate(idx, new, seed=seed, **sampling)
        got = decode.generate(m, idx, new, seed=seed, decoder=dec, **sampling)
        assert torch.equal(got, want), (seed, (got != want).nonzero()[:3])
    # and the head follows the weights: a decoder made before an update uses the new ones
    with torch.no_grad():
        m.transformer.wte.weight.mul_(1.5)
    assert torch.equal(decode.generate(m, idx, 8, seed=0, decoder=dec, **sampling),
                       m.generate(idx, 8, seed=0, **sampling))


def test_static_decoder_step_matches_per_row_decode_at_ragged_positions():
    """One StaticDecoder step over rows at different positions (3 rows padded to a bucket of 4) gives
    the logits of the per-row next_logits path, and writes each row's key at its own position."""
    m = make_ours(seed=12, n_head=4)
    lengths = [3, 17, 40]
    prompts = [rand_idx(1, n, 101, seed=n) for n in lengths]
    nxt = rand_idx(3, 1, 101, seed=6)
    dec = StaticDecoder(m, 4)
    ref_caches = decode.new_kv_caches(m, 3, m.config.block_size, "cpu", zeroed=True)
    head_t = decode.decode_head(m)
    with torch.no_grad():
        for b, p in enumerate(prompts):  # the same prefill into both
            decode.next_logits(m, p, [(k[b : b + 1], v[b : b + 1]) for k, v in dec.caches], 0, head_t)
            decode.next_logits(m, p, [(k[b : b + 1], v[b : b + 1]) for k, v in ref_caches], 0, head_t)
        want = decode.next_logits(m, nxt, ref_caches, torch.tensor(lengths), head_t)
    got = dec.step(nxt[:, 0], torch.tensor(lengths))
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    for b, n in enumerate(lengths):
        torch.testing.assert_close(dec.caches[0][0][b, :, n], ref_caches[0][0][b, :, n], atol=1e-6, rtol=1e-6)
    assert [StaticDecoder.bucket(n) for n in (1, 3, 16, 17, 256, 257, 600)] == [1, 4, 16, 32, 256, 512, 768]


@pytest.mark.skipif(not os.environ.get("RUN_SLOW"),
                    reason="compiles the decode step (about a minute on CPU); RUN_SLOW=1")
def test_compiled_static_decoder_gives_the_same_greedy_tokens():
    m = make_ours(seed=5, vocab_size=101)
    idx = rand_idx(2, 9, 101, seed=2)
    want = m.generate(idx, 30, temperature=0)
    assert torch.equal(decode.generate(m, idx, 30, temperature=0, decoder=StaticDecoder(m, 2, compile=True)), want)


def test_compiled_decode_step_is_ready_for_cuda_graphs(monkeypatch):
    """What CUDA graphs need, checked on the CPU: StaticDecoder(compile=True) is compiled as under
    "reduce-overhead" on CUDA (inductor's cudagraphs switch on, its CPU-device veto and graph cache
    off), and inductor finds no reason to skip the graph (no incompatible op, in-place cache writes
    only into static inputs), and no big tensor (weights, caches, head) is an input that a replay
    would copy: only the step's tokens and positions are. Two graphs serve every bucket."""
    import torch._inductor.config as inductor_config
    from torch._inductor import cudagraph_utils, output_code
    monkeypatch.setattr(cudagraph_utils, "check_lowering_disable_cudagraph", lambda device_nodes: None)
    seen, post_compile = [], output_code.CompiledFxGraph.post_compile

    def spy(graph, example_inputs, constants, graph_kwargs):
        static = set(graph.fx_kwargs["static_input_idxs"])
        seen.append(dict(skip=graph.disabled_cudagraphs_reason, fail=graph.cudagraph_info.cudagraph_fail_reasons,
                         copied=[tuple(t.shape) for i, t in enumerate(example_inputs)
                                 if torch.is_tensor(t) and i not in static]))
        graph_kwargs["cudagraphs"].value = False  # and run it as plain CPU code from here
        return post_compile(graph, example_inputs, constants, graph_kwargs)

    monkeypatch.setattr(output_code.CompiledFxGraph, "post_compile", spy)
    settings = {"triton.cudagraphs": True, "fx_graph_cache": False,
                "triton.cudagraph_support_input_mutation": False}  # (so that it is checked at compile time)
    torch._dynamo.reset()
    try:
        with inductor_config.patch(settings):
            m = make_ours(seed=3, n_layer=2, vocab_size=101)
            dec, ref = StaticDecoder(m, 8, compile=True), StaticDecoder(m, 8)
            for B in (1, 2, 3, 5):  # buckets 1, 2, 4, 8: one row, then any number of rows
                tokens, pos = torch.arange(B) + 5, torch.arange(B) * 2
                torch.testing.assert_close(dec.step(tokens, pos), ref.step(tokens, pos), atol=1e-5, rtol=1e-5)
    finally:
        torch._dynamo.reset()
    assert len(seen) == 2, seen  # compiled twice, not once per bucket
    for graph in seen:
        assert graph["skip"] is None and graph["fail"] == [], graph
        assert all(math.prod(shape) <= 8 for shape in graph["copied"]), graph["copied"]


def test_compiled_static_decoder_compiles_more_buckets_than_dynamos_recompile_limit():
    """A new bucket of rows may compile decode_step again (one row, then a dynamic number of rows,
    and every decoder of every model in the process shares dynamo's default limit of 8 graphs per
    function; here it is lowered to 1), which fullgraph=True would turn into an error. Same logits
    as uncompiled."""
    torch._dynamo.reset()
    try:
        m = make_ours(seed=4, n_layer=1, vocab_size=101)
        dec, ref = StaticDecoder(m, 8, compile=True), StaticDecoder(m, 8)
        with torch._dynamo.config.patch(recompile_limit=1):
            for B in (1, 2, 3, 5, 1):
                tokens, pos = torch.arange(B) + 1, torch.arange(B) * 3
                torch.testing.assert_close(dec.step(tokens, pos), ref.step(tokens, pos), atol=1e-5, rtol=1e-5)
        assert dec.compiled == {1, 2, 4, 8}
    finally:
        torch._dynamo.reset()


def test_a_warm_static_decoder_compiles_nothing_more():
    """StaticDecoder.warm_up (serve.py and generate.py --compile call it before they time or serve
    anything) compiles what every later step needs: generating on it then compiles nothing new,
    though generate_stream passes views of its tokens (with strides of their own) to the decoder."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    try:
        m = make_ours(seed=7, n_layer=1, vocab_size=101)
        for rows in (3, 1):  # (a decoder per bucket of rows: 4, then 1)
            dec = StaticDecoder(m, StaticDecoder.bucket(rows), compile=True)
            dec.warm_up()
            graphs = counters["stats"]["unique_graphs"]
            decode.generate(m, rand_idx(rows, 6, 101), 5, decoder=dec)
            decode.generate(m, rand_idx(rows, 9, 101), 5, decoder=dec)
            assert counters["stats"]["unique_graphs"] == graphs, rows
    finally:
        torch._dynamo.reset()


def test_interleaved_static_generations_each_get_their_own_tokens():
    """Two static generations on one model, each on a decoder of its own, advanced alternately (two
    streams of one --compile process), each yield the tokens they give alone: a decoder's caches are
    its own, and nothing of a generation is kept on the model."""
    m = make_ours(seed=8, vocab_size=101)
    a, b = rand_idx(2, 7, 101, seed=1), rand_idx(2, 4, 101, seed=2)
    n = m.config.block_size + 5  # (past the context: the window slides)
    dec_a, dec_b = StaticDecoder(m, 2), StaticDecoder(m, 2)
    want_a = decode.generate(m, a, n, seed=3, decoder=dec_a, top_k=20)[:, 7:]
    want_b = decode.generate(m, b, n, seed=4, decoder=dec_b, temperature=0)[:, 4:]
    assert torch.equal(want_a, m.generate(a, n, seed=3, top_k=20)[:, 7:])  # premise: alone is right
    assert torch.equal(want_b, m.generate(b, n, seed=4, temperature=0)[:, 4:])
    attributes = set(vars(m))
    gen_a = decode.generate_stream(m, a, n, seed=3, decoder=dec_a, top_k=20)
    gen_b = decode.generate_stream(m, b, n, seed=4, decoder=dec_b, temperature=0)
    got_a, got_b = [], []
    for ta, tb in zip(gen_a, gen_b):
        got_a.append(ta)
        got_b.append(tb)
    assert torch.equal(torch.stack(got_a, 1), want_a)
    assert torch.equal(torch.stack(got_b, 1), want_b)
    assert set(vars(m)) == attributes


def test_the_static_cache_comes_with_compile_by_default(monkeypatch):
    """Uncompiled, the static cache does more work per step than the dynamic path, so the scripts
    (generate.py, serve.py's engine) take it only when asked or under compile (the CUDA graphs are
    what make it fast); model.generate and generate_stream without a decoder never make one."""
    made = []
    monkeypatch.setattr(StaticDecoder, "__init__", lambda self, *a, **kw: made.append(kw))
    m, idx = make_ours(seed=6, vocab_size=101), rand_idx(2, 5, 101)
    m.generate(idx, 3)
    decode.generate(m, idx, 3)
    assert not made
    assert [StaticDecoder.wanted(None, False), StaticDecoder.wanted(None, True)] == [False, True]
    assert [StaticDecoder.wanted(True, False), StaticDecoder.wanted(False, True)] == [True, False]


def test_generate_stream_matches_generate():
    """generate_stream yields (B,) tensors that concatenate to generate()'s new tokens."""
    m = make_ours(seed=9)
    idx = rand_idx(2, 6, 101)
    full = _sample(m, idx, 15, seed=5, use_cache=True, **SAMPLING)
    g = torch.Generator().manual_seed(5)
    steps = list(decode.generate_stream(m, idx, 15, generator=g, **SAMPLING))
    assert len(steps) == 15
    for s in steps:
        assert s.shape == (2,)
    assert torch.equal(torch.stack(steps, dim=1), full[:, 6:])
