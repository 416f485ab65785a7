"""MISA's routing step in one TileLang program (`kernels.router` with `active_heads`): it compiles for sm_90a
everywhere (CI), `route_queries` takes it when the scorer offers it and its own steps otherwise, and on a Hopper GPU
(marked gpu) it scores, picks and gathers as the stepwise reference does."""

from __future__ import annotations

import pytest
import torch

from transformers_misa import backend
from transformers_misa.ops import reference
from transformers_misa.ops.blocks import TailBlock
from transformers_misa.ops.masks import ChunkMask

from kernel_helpers import _inputs, _padded_causal_mask, _tilelang_or_skip, gpu

SCALE = 128**-0.5


@pytest.mark.parametrize("heads,active_heads", [(64, 8), (32, 8), (64, 16)])
def test_routing_kernel_compiles_for_sm90a(heads, active_heads):
    _tilelang_or_skip()
    from transformers_misa.kernels.router import build_head_importance

    source = build_head_importance(heads, 128, 128, active_heads=active_heads, arch="sm_90a")().get_kernel_source()
    assert "wgmma" in source and ("QRouted[" in source or "QRouted +" in source)
    assert "Keys" in source, "the tail block is read from the key cache inside the program"


def test_wide_routing_kernel_compiles_for_sm90a():
    """The prefill shape (`routing.WIDE_ROUTER`: 256 query rows, registers capped for two CTAs per SM), with the tail
    means a prefill hands it; tiles every query sees whole skip the visibility test (a branch per tile); its 32-block
    tiles multiply on wgmma with the query rows as M (with the blocks as M they would take mma.sync)."""
    _tilelang_or_skip()
    from transformers_misa.kernels import routing
    from transformers_misa.kernels.router import build_head_importance

    kernel = build_head_importance(64, 128, 128, active_heads=8, arch="sm_90a", tail_means=True,
                                   **routing.WIDE_ROUTER)()
    source = kernel.get_kernel_source()
    assert f"__launch_bounds__(384, {routing.WIDE_ROUTER['min_ctas_per_sm']})" in source
    assert "whole_from" in source and "whole_to" in source, "no split between whole and tested tiles"
    assert "wgmma" in source
    blocks_as_m = build_head_importance(64, 128, 128, active_heads=8, arch="sm_90a", tail_means=True, rows_as_m=False,
                                        **routing.WIDE_ROUTER)().get_kernel_source()
    assert "wgmma" not in blocks_as_m and "mma_sync" in blocks_as_m


def test_wide_routing_kernel_sums_each_tile_at_once():
    """The wide prefill shape sums each tile's scores per row at once (`reduce_per_tile`): a quad-lane reduction per
    tile and no running [rows, block_m] fragment; the former program keeps it."""
    _tilelang_or_skip()
    from transformers_misa.kernels import routing
    from transformers_misa.kernels.router import build_head_importance

    assert routing.WIDE_ROUTER["reduce_per_tile"]
    source = build_head_importance(64, 128, 128, active_heads=8, arch="sm_90a", tail_means=True,
                                   **routing.WIDE_ROUTER)().get_kernel_source()
    assert "AllReduce<tl::SumOp, 4, 1" in source and "running" not in source
    before = build_head_importance(64, 128, 128, active_heads=8, arch="sm_90a", tail_means=True,
                                   **dict(routing.WIDE_ROUTER, reduce_per_tile=False))().get_kernel_source()
    assert "running" in before


def test_tail_means_are_for_the_routing_program():
    pytest.importorskip("tilelang", reason="TileLang is not installed")
    from transformers_misa.kernels.router import build_head_importance

    with pytest.raises(ValueError, match="tail_means is an input of the routing program"):
        build_head_importance(8, 128, 64, tail_means=True)


@pytest.mark.parametrize("rows,sync_free,masked,expected", [
    (slice(0, 300), False, False, True),  # a causal prefill chunk
    (slice(298, 300), True, False, False),  # a graph-safe decode step
    (slice(298, 300), False, False, False),  # a few queries
    (slice(0, 300), False, True, False),  # a padded batch's mask
])
def test_route_hands_causal_prefill_chunks_their_tail_means(monkeypatch, rows, sync_free, masked, expected):
    """A causal prefill chunk's tails go in as mean keys (one launch over the chunk's keys), elsewhere the program
    reads its tail keys itself (nothing launched before it: decode steps stay graph-safe and cheap)."""
    pytest.importorskip("tilelang", reason="TileLang is not installed")
    from transformers_misa.kernels import routing

    seen = {}

    def means_program(dim, block_size, segments=1):
        def run(keys, first_end, means):
            seen["first_end"] = first_end
            means.copy_(TailBlock(keys.float(), chunk, block_size).means)
        return lambda: run

    def routing_program(heads, dim, block_size, active_heads, tail_means, split_tiles, **shape):
        def run(q_rows, pooled, tails, weights, scale, ks, ke):
            seen.update(tail_means=tail_means, tails=tails)
            batch, queries = weights.shape[:2]
            return (torch.zeros(batch, queries * active_heads, dim), torch.zeros(batch, queries, active_heads),
                    None, None)
        return lambda: run

    monkeypatch.setattr(routing, "build_causal_tail_means", means_program)
    monkeypatch.setattr(routing, "build_head_importance", routing_program)
    monkeypatch.setattr(routing, "_sm_count", lambda device: 132)
    generator = torch.Generator().manual_seed(0)
    keys, count = torch.randn(1, 300, 128, generator=generator), rows.stop - rows.start
    q, weights = torch.randn(1, count, 8, 128, generator=generator), torch.randn(1, count, 8, generator=generator)
    mask = None
    if masked:  # causal, the first 7 keys padding
        mask = torch.ones(300, 300).tril().bool().unsqueeze(0)
        mask[..., :7] = False
    chunk = ChunkMask(mask, rows, 1, 300, 300, keys.device, sync_free=sync_free)
    routing.tilelang_route(q, weights, keys, reference.pooled_keys(keys, mask, 16), chunk, 16, 2, SCALE)
    assert seen["tail_means"] is expected
    if expected:
        assert seen["first_end"] == rows.start + 1
        expected_means = TailBlock(keys.bfloat16().float(), chunk, 16).means.bfloat16()
        assert torch.equal(seen["tails"], expected_means)
    else:
        assert "first_end" not in seen and torch.equal(seen["tails"], keys.bfloat16())


def test_causal_tail_means_program_compiles_for_sm90a():
    _tilelang_or_skip()
    from transformers_misa.kernels.tail_means import build_causal_tail_means

    source = build_causal_tail_means(128, 128, arch="sm_90a")().get_kernel_source()
    assert "Means[" in source and "first_end" in source
    segmented = build_causal_tail_means(128, 128, segments=8, arch="sm_90a")().get_kernel_source()
    assert "__launch_bounds__(1024" in segmented and "totals" in segmented and "__syncthreads" in segmented
    with pytest.raises(ValueError, match="segments must divide block_size"):
        build_causal_tail_means(128, 128, segments=3)


@pytest.mark.parametrize("dim,block_size,segments", [
    (128, 128, 8),  # the default: 1024 threads
    (128, 20, 5),  # the most runs that divide the block
    (256, 128, 4),  # wider keys: fewer runs, still 1024 threads
    (64, 96, 8),
    (2048, 128, 1),  # keys wider than a CTA's threads: one run
])
def test_tail_mean_runs_divide_the_block_and_fit_one_cta(dim, block_size, segments):
    from transformers_misa.kernels.routing import tail_mean_segments

    assert tail_mean_segments(dim, block_size) == segments
    assert tail_mean_segments(dim, block_size, wanted=1) == 1


def test_routing_kernel_refuses_more_active_heads_than_heads():
    pytest.importorskip("tilelang", reason="TileLang is not installed")
    from transformers_misa.kernels.router import build_head_importance

    with pytest.raises(ValueError, match="active_heads must lie in"):
        build_head_importance(8, 128, 64, active_heads=9)


def test_router_shape_is_wide_only_where_it_fills_the_gpu(monkeypatch):
    pytest.importorskip("tilelang", reason="TileLang is not installed")
    from transformers_misa.kernels import routing

    monkeypatch.setattr(routing, "_sm_count", lambda device: 132)
    cpu = torch.device("cpu")
    assert routing.router_shape(64, 1, 65536, cpu) == routing.WIDE_ROUTER  # a prefill chunk
    assert routing.router_shape(64, 32, 4, cpu) == {}  # a decode step: 32 CTAs either way
    assert routing.router_shape(512, 1, 65536, cpu) == {}  # more heads than one wide CTA holds


def test_router_refuses_a_cta_wider_than_one_wgmma():
    pytest.importorskip("tilelang", reason="TileLang is not installed")
    from transformers_misa.kernels.router import build_head_importance

    with pytest.raises(ValueError, match="at most 256 query rows"):
        build_head_importance(64, 128, 128, rows_per_cta=512)


def _cpu_case():
    generator = torch.Generator().manual_seed(0)
    q, keys = torch.randn(2, 6, 8, 16, generator=generator), torch.randn(2, 20, 16, generator=generator)
    weights = torch.randn(2, 6, 8, generator=generator)
    chunk = ChunkMask(None, slice(14, 20), 2, 20, 20, q.device)
    pooled = reference.pooled_keys(keys, None, 4)
    return q, weights, keys, chunk, pooled


def test_route_queries_takes_the_scorers_fused_routing():
    q, weights, keys, chunk, pooled = _cpu_case()
    calls = []

    def fused(*args):
        calls.append(args)
        return q[:, :, :3], weights[:, :, :3]

    scorer = reference.Scorer("fused", reference.reference_token_logits, reference.top_indices,
                              lambda h, t: 4 * t, route=fused)
    q_routed, w_routed = reference.route_queries(q, weights, keys, chunk, pooled, 4, 3, SCALE, scorer)
    assert len(calls) == 1 and q_routed is not None and torch.equal(w_routed, weights[:, :, :3])


def test_route_queries_steps_through_where_the_fused_routing_declines():
    q, weights, keys, chunk, pooled = _cpu_case()
    declining = reference.Scorer("declines", reference.reference_token_logits, reference.top_indices,
                                 lambda h, t: 4 * t, route=lambda *args: None)
    ours = reference.route_queries(q, weights, keys, chunk, pooled, 4, 3, SCALE, declining)
    expected = reference.route_queries(q, weights, keys, chunk, pooled, 4, 3, SCALE)
    assert all(torch.equal(a, b) for a, b in zip(ours, expected))


def test_failing_fused_routing_falls_back_to_the_steps(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated launch failure")

    monkeypatch.setattr(backend, "_broken_kernels", set())
    q, weights, keys, chunk, pooled = _cpu_case()
    guarded = backend._guarded(reference.Scorer("breaks", reference.reference_token_logits, reference.top_indices,
                                                lambda h, t: 4 * t, route=broken))
    with pytest.warns(RuntimeWarning, match="breaks routing kernel failed"):
        ours = reference.route_queries(q, weights, keys, chunk, pooled, 4, 3, SCALE, guarded)
    expected = reference.route_queries(q, weights, keys, chunk, pooled, 4, 3, SCALE)
    assert all(torch.equal(a, b) for a, b in zip(ours, expected))


# ----------------------------------------------------------------------------------------------- GPU


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("batch,num_queries,num_keys,heads,block_size,pads,scaled", [
    (1, 1, 1, 64, 128, [0], False),  # a first token: its tail block is its only key
    (2, 37, 37, 64, 16, [0, 5], False),  # prefill, padding, small blocks
    (2, 200, 1000, 64, 128, [0, 300], True),  # a chunk of a longer prefill, calibrated head scales
    (32, 4, 8200, 64, 128, [0] * 32, False),  # decode: 4 new queries per sequence, T not a multiple of a block
    (3, 5, 4099, 32, 64, [0, 1, 4000], True),  # GLM-5's 32 heads
])
@pytest.mark.parametrize("wide", [False, True], ids=["default", "wide"])
@pytest.mark.parametrize("options", [
    {}, {"tail_means": True}, {"split_tiles": False}, {"rows_as_m": False}, {"reduce_per_tile": True},
    {"reduce_per_tile": False, "tail_means": True}, {"reduce_per_tile": True, "split_tiles": False},
], ids=["tail-keys", "tail-means", "every-tile-tested", "blocks-as-m", "reduce-per-tile", "running-sum-tail-means",
        "reduce-per-tile-every-tile-tested"])
def test_routing_kernel_matches_the_stepwise_routing(batch, num_queries, num_keys, heads, block_size, pads, scaled,
                                                     wide, options):
    from transformers_misa.kernels import routing
    from transformers_misa.kernels.router import build_head_importance

    shape = routing.WIDE_ROUTER if wide else {}  # the prefill shape, or the default (decode)
    active_heads = 8
    q, keys, weights = _inputs(batch, num_queries, num_keys, heads, seed=4)
    mask = _padded_causal_mask(batch, num_queries, num_keys, pads)
    pooled = reference.pooled_keys(keys, mask, block_size)
    head_scale = torch.rand(heads, device="cuda") + 0.5 if scaled else torch.ones(heads, device="cuda")
    chunk = ChunkMask(mask, slice(0, num_queries), batch, num_queries, num_keys, q.device)
    ks, ke, _ = chunk.key_range
    tail = TailBlock(keys, chunk, block_size)
    tails = tail.means.bfloat16() if options.get("tail_means") else keys
    program = build_head_importance(heads, 128, block_size, active_heads, **{**shape, **options})
    q_routed, w_routed, picked, importance = program()(
        q.reshape(batch, -1, 128).contiguous(), pooled.bfloat16().contiguous(), tails.contiguous(),
        weights.contiguous(), head_scale, ks.contiguous(), ke.contiguous())
    expected = reference.reference_head_importance(q, weights, pooled, chunk, block_size, SCALE,
                                                   tail=tail) * head_scale
    torch.testing.assert_close(importance * SCALE, expected, rtol=3e-2, atol=3e-2)
    # The pick on the program's own scores: the top heads, ties to the lowest head, ascending.
    order = torch.sort(importance, dim=-1, descending=True, stable=True).indices[..., :active_heads]
    assert torch.equal(picked.long(), order.sort(-1).values)
    picked = picked.long()
    assert torch.equal(q_routed.view(batch, num_queries, active_heads, 128),
                       q.gather(2, picked.unsqueeze(-1).expand(-1, -1, -1, 128)))
    assert torch.equal(w_routed, weights.gather(2, picked))
    stepwise = reference.route_heads(expected, active_heads)
    agree = (picked.unsqueeze(-1) == stepwise.unsqueeze(-2)).any(-1).float().mean()
    assert agree > 0.97, f"the program and the stepwise router agree on only {agree:.3f} of the heads"


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("batch,num_queries,num_keys,rows,block_size", [
    (1, 1000, 1000, slice(0, 1000), 128),  # a whole prefill, T not a multiple of the block
    (2, 700, 900, slice(130, 517), 64),  # a chunk starting inside a block, queries at the last positions
    (1, 4096, 4096, slice(3968, 4096), 128),  # the last chunk, starting on a block boundary
])
@pytest.mark.parametrize("segments", [1, 8])
def test_causal_tail_means_program_matches_the_tail_block(batch, num_queries, num_keys, rows, block_size, segments):
    from transformers_misa.kernels.routing import causal_tail_means

    _, keys, _ = _inputs(batch, num_queries, num_keys, 8, seed=7)
    chunk = ChunkMask(None, rows, batch, num_queries, num_keys, keys.device)
    means = causal_tail_means(keys.contiguous(), chunk, block_size, segments)
    expected = TailBlock(keys, chunk, block_size).means
    assert means is not None and means.shape == expected.shape
    torch.testing.assert_close(means.float(), expected, rtol=1e-2, atol=1e-2)
    assert torch.equal(means == 0, expected.bfloat16() == 0)  # no tail exactly where the reference has none


@gpu
@pytest.mark.gpu
def test_fused_routing_replays_in_a_cuda_graph():
    """A decode step's routing has no host sync: captured once, replayed on new inputs, it routes as run eagerly."""
    from transformers_misa.kernels.routing import tilelang_route

    q, keys, weights = _inputs(4, 2, 3000, 64, seed=5)
    pooled = reference.pooled_keys(keys, None, 128)
    chunk = ChunkMask(None, slice(2998, 3000), 4, 3000, 3000, q.device, sync_free=True)
    static_q = q.clone()
    tilelang_route(static_q, weights, keys, pooled, chunk, 128, 8, SCALE)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        routed = tilelang_route(static_q, weights, keys, pooled, chunk, 128, 8, SCALE)
    fresh = _inputs(4, 2, 3000, 64, seed=6)[0]
    static_q.copy_(fresh)
    graph.replay()
    eager = tilelang_route(fresh, weights, keys, pooled, chunk, 128, 8, SCALE)
    assert all(torch.equal(a, b) for a, b in zip(routed, eager))
