"""The reference indexers' memory: never a [B, S, H, T] tensor, query chunks within the scratch budget (causal chunks
growing where rows are narrow), and chunking that never changes a selection."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from test_reference_ops import _random_problem  # this folder's brute-force problems
from transformers_misa.ops import blocks, masks, reference
from transformers_misa.ops.reference import dsa_topk, hisa_topk, misa_hierarchical_topk, misa_topk, pooled_keys


class _MaxNumel(TorchDispatchMode):
    """Largest tensor any aten op returns while active."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.calls += 1
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


@pytest.mark.parametrize("mode,num_queries", [("dsa", 2048), ("misa", 512), ("misa_hierarchical", 512),
                                              ("hisa", 512)])
def test_never_builds_a_query_head_key_tensor(mode, num_queries):
    num_keys, heads, dim, chunk, topk = 2048, 64, 16, 64, 64
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, num_queries, heads, dim, generator=gen)
    keys = torch.randn(1, num_keys, dim, generator=gen)
    weights = torch.randn(1, num_queries, heads, generator=gen)

    fn, kw = {
        "dsa": (dsa_topk, {}),
        "misa": (misa_topk, dict(active_heads=8, block_size=64)),
        "misa_hierarchical": (misa_hierarchical_topk, dict(active_heads=8, block_size=64, candidate_factor=4)),
        "hisa": (hisa_topk, dict(block_size=64, keep_blocks=8)),
    }[mode]
    tracker = _MaxNumel()
    with tracker:
        out = fn(q, keys, weights, topk, softmax_scale=dim**-0.5, chunk_size=chunk, **kw)
    assert out.shape == (1, num_queries, topk)
    # No aten op at all (head scores, their weighted sum, masks, gathers) returns more than one chunk's
    # [c, H, T] worth of elements, far below the [S, H, T] of an unchunked implementation.
    assert tracker.max_numel <= chunk * heads * num_keys
    assert tracker.max_numel * 8 <= num_queries * heads * num_keys


def test_default_chunk_respects_the_scratch_budget():
    """No chunk size given: chunks are sized from the default scratch budget (256 MiB), not the whole input."""
    num_queries, heads, num_keys = 512, 64, 2048  # [S, H, T] fp32 would be 256 MiB, above the budget
    q = torch.randn(1, num_queries, heads, 8)
    keys = torch.randn(1, num_keys, 8)
    weights = torch.randn(1, num_queries, heads)
    tracker = _MaxNumel()
    with tracker:
        out = dsa_topk(q, keys, weights, 16, softmax_scale=8**-0.5)
    assert out.shape == (1, num_queries, 16)
    assert tracker.max_numel * 4 <= masks.DEFAULT_CHUNK_BYTES
    assert tracker.max_numel * 2 <= num_queries * heads * num_keys


@pytest.mark.parametrize("num_queries,num_keys,rows", [(10, 10, slice(0, 4)), (3, 50, slice(1, 3)), (7, 20, slice(0, 7))])
def test_visible_end_is_known_on_the_host_without_a_mask(num_queries, num_keys, rows):
    """Causal chunks without a mask get their last visible key without reading the GPU back (decode stays sync-free);
    it agrees with the device-side key ranges, and with a mask it is read from them."""
    chunk = masks.ChunkMask(None, rows, 2, num_queries, num_keys, torch.device("cpu"))
    assert chunk.visible_end() == int(chunk.key_range[1].max())
    mask = torch.ones(2, num_queries, num_keys, dtype=torch.bool).tril(diagonal=num_keys - num_queries)
    mask[:, :, -1] = False  # the last key hidden from every query
    masked = masks.ChunkMask(mask, rows, 2, num_queries, num_keys, torch.device("cpu"))
    assert masked.visible_end() == int(masked.key_range[1].max()) <= num_keys - 1


@pytest.mark.parametrize("router", ["sum", "max"])
def test_router_never_sees_a_key_after_the_query(router):
    """Prefill: changing the keys after query t (inside its own block too) leaves t's routed heads and tokens as
    they were; with a block pooled over all its keys, t's router saw the rest of its block."""
    q, keys, weights, mask, scale = _random_problem()
    t, block_size = 21, 8  # block 2 = keys 16..23: t sees 16..21 of it
    later = keys.clone()
    later[:, t + 1:] = torch.randn(later[:, t + 1:].shape, generator=torch.Generator().manual_seed(7)) * 3
    got = [misa_topk(q, k, weights, 10, softmax_scale=scale, active_heads=3, block_size=block_size, mask=mask,
                     router=router)[:, t] for k in (keys, later)]
    assert torch.equal(got[0], got[1])
    importance = []
    for k in (keys, later):
        chunk = masks.ChunkMask(mask, slice(t, t + 1), q.shape[0], q.shape[1], k.shape[1], q.device)
        importance.append(reference.reference_head_importance(
            q[:, t:t + 1], weights[:, t:t + 1], pooled_keys(k, mask, block_size), chunk, block_size, scale, router,
            tail=blocks.TailBlock(k, chunk, block_size)))
    torch.testing.assert_close(importance[0], importance[1], rtol=0, atol=0)


def test_candidate_logits_in_query_slices_equal_one_pass(monkeypatch):
    # As a kernel's fallback it may get a chunk sized for on-chip gathering: it slices the queries instead.
    q, keys, weights, mask, scale = _random_problem(num_queries=40, num_keys=40)
    positions = torch.randint(0, 40, (2, 40, 12), generator=torch.Generator().manual_seed(1))
    whole = reference.reference_candidate_logits(q, weights, keys, positions, scale)
    monkeypatch.setattr(reference, "DEFAULT_CHUNK_BYTES", 2 * 2 * 12 * (16 + 8) * 4 * 3)  # 3 queries per slice
    torch.testing.assert_close(reference.reference_candidate_logits(q, weights, keys, positions, scale), whole,
                               rtol=0, atol=0)
    expected = (weights.unsqueeze(-1) * torch.relu(torch.einsum("bshd,bscd->bshc", q,
                keys.gather(1, positions.reshape(2, -1, 1).expand(-1, -1, 16)).view(2, 40, 12, 16)) * scale)).sum(2)
    torch.testing.assert_close(whole, expected)


@pytest.fixture
def per_query(monkeypatch) -> list[int]:
    """The per-query scratch of every `query_chunks` call the reference makes, in call order."""
    sizes = []
    real_query_chunks = reference.query_chunks
    monkeypatch.setattr(reference, "query_chunks",
                        lambda num, bytes_per_query, *rest: sizes.append(bytes_per_query)
                        or real_query_chunks(num, bytes_per_query, *rest))
    return sizes


@pytest.mark.parametrize("mode", ["misa_hierarchical", "hisa"])
def test_query_chunks_follow_the_scorers_candidate_scratch(mode, per_query):
    # Kernels gather candidates on chip and declare less scratch per candidate, so their query chunks are larger
    # (sized for the reference's gathered keys they were launch-bound); the selection does not change.
    q, keys, weights, mask, scale = _random_problem()
    on_chip = dataclasses.replace(reference.REFERENCE, candidate_scratch_bytes=lambda heads, dim, candidates: 0)
    got = []
    for scorer in (reference.REFERENCE, on_chip):
        if mode == "hisa":
            got.append(hisa_topk(q, keys, weights, 6, softmax_scale=scale, block_size=8, keep_blocks=1, mask=mask,
                                 scorer=scorer))
            candidates = 2 * 8
        else:
            got.append(misa_hierarchical_topk(q, keys, weights, 6, softmax_scale=scale, active_heads=2, block_size=8,
                                              candidate_factor=2, mask=mask, scorer=scorer))
            candidates = 12
    assert torch.equal(got[0], got[1])
    assert per_query[0] - per_query[1] == q.shape[0] * 2 * candidates * (16 + 8) * 4  # the gathered keys + scores


@pytest.mark.parametrize("mode", ["misa", "misa_hierarchical"])
def test_misa_chunks_take_the_fused_routings_scratch_only_where_it_runs(mode, per_query):
    """A scorer whose routing program keeps the block scores and the tail block on chip (`route_scratch_bytes`) sizes
    MISA's chunks by what that program writes, but only where it routes every chunk: no mask and router "sum"; with a
    mask or router "max" the step-by-step routing's scratch stays in the estimate. The selection does not change."""
    q, keys, weights, mask, scale = _random_problem(pads=(0, 0))
    fused = dataclasses.replace(reference.REFERENCE, route_scratch_bytes=lambda heads, active, dim: 7)
    extra = dict(candidate_factor=2) if mode == "misa_hierarchical" else {}
    select = misa_hierarchical_topk if mode == "misa_hierarchical" else misa_topk
    for scorer, call_mask, router in ((reference.REFERENCE, None, "sum"), (fused, None, "sum"),
                                      (fused, mask, "sum"), (fused, None, "max")):
        select(q, keys, weights, 6, softmax_scale=scale, active_heads=2, block_size=8, mask=call_mask, scorer=scorer,
               router=router, **extra)
    step_by_step = (2 * 8 * 5 + 2 * 8 * 16) * 4  # every head's scores against 5 pooled blocks, the tail block (fp32)
    assert [per_query[0] - bytes_ for bytes_ in per_query] == [0, q.shape[0] * (step_by_step - 7), 0, 0]
    assert torch.equal(select(q, keys, weights, 6, softmax_scale=scale, active_heads=2, block_size=8, scorer=fused,
                              **extra),
                       select(q, keys, weights, 6, softmax_scale=scale, active_heads=2, block_size=8, **extra))


@pytest.mark.parametrize("num_queries,num_keys,min_width,block_size", [(1000, 1000, 0, 1), (300, 5000, 64, 128),
                                                                       (4, 131072, 2048, 128), (700, 700, 0, 1)])
@pytest.mark.parametrize("fixed_bytes", [0, 30])
@pytest.mark.parametrize("multiple", [1, 64])
def test_causal_query_chunks_grow_where_chunks_are_narrow(num_queries, num_keys, min_width, block_size, fixed_bytes,
                                                          multiple):
    """Contiguous cover of the queries; each chunk's scratch (size x the per-query bytes at its own width, which may
    have a part that does not shrink with the width: candidate lists) within the budget unless it is a single
    query; a chunk never smaller than the one after it (widths only grow); every chunk but the last a whole number
    of `multiple`s where it holds at least one."""
    from transformers_misa.ops.masks import causal_query_chunks

    budget = 40_000 * (1 + fixed_bytes)

    def bytes_per_query(width):
        return width + fixed_bytes * num_keys

    chunks = list(causal_query_chunks(num_queries, num_keys, bytes_per_query, budget, min_width, block_size,
                                      multiple))
    assert chunks[0].start == 0 and chunks[-1].stop == num_queries
    assert all((c.stop - c.start) % multiple == 0 or c.stop - c.start < multiple for c in chunks[:-1])
    assert all(a.stop == b.start for a, b in zip(chunks, chunks[1:]))
    for chunk in chunks:
        width = min(num_keys, -(-max(num_keys - num_queries + chunk.stop, min_width) // block_size) * block_size)
        size = chunk.stop - chunk.start
        assert size == 1 or size * bytes_per_query(width) <= budget
    sizes = [c.stop - c.start for c in chunks]
    assert all(a >= b for a, b in zip(sizes[:-2], sizes[1:-1])), sizes  # the last one takes what is left


@pytest.mark.parametrize("num_queries,multiple", [(1000, 64), (32768, 4224), (131072, 4224), (4100, 4224), (640, 64)])
def test_causal_query_chunks_put_the_remainder_first(num_queries, multiple):
    """`remainder_first`: the first chunk holds the queries past whole multiples (S mod multiple) beside whole
    multiples, every later chunk whole multiples, each within the budget; as many chunks as without it, or one more.
    Fewer queries than one multiple, or none left over: the same chunks as without it."""
    from transformers_misa.ops.masks import causal_query_chunks

    def bytes_per_query(width):
        return 12 * width

    budget = 12 * num_queries * num_queries // 5
    plain = list(causal_query_chunks(num_queries, num_queries, bytes_per_query, budget, 0, 1, multiple))
    chunks = list(causal_query_chunks(num_queries, num_queries, bytes_per_query, budget, 0, 1, multiple,
                                      remainder_first=True))
    assert chunks[0].start == 0 and chunks[-1].stop == num_queries
    assert all(a.stop == b.start for a, b in zip(chunks, chunks[1:]))
    assert all((c.stop - c.start) * bytes_per_query(c.stop) <= budget for c in chunks)  # width: the last query + 1
    if num_queries <= multiple or num_queries % multiple == 0:
        assert chunks == plain
        return
    sizes = [c.stop - c.start for c in chunks]
    assert sizes[0] % multiple == num_queries % multiple and all(size % multiple == 0 for size in sizes[1:]), sizes
    assert len(plain) <= len(chunks) <= len(plain) + 1


def test_causal_query_chunks_cost_one_bisection_per_chunk():
    """Cutting the chunks runs on the host before the first launch, with the GPU idle: each chunk costs one bisection
    over its size (~log2 S evaluations), nothing more. Balancing them by bisecting over the limit as well (4731579)
    cost ~10x that, 10 ms of GPU idle per MISA-8 call at 128K on an H200."""
    import math

    from transformers_misa.ops.masks import causal_query_chunks

    calls = []

    def bytes_per_query(width):
        calls.append(width)
        return 4 * width + 512

    chunks = list(causal_query_chunks(131072, 131072, bytes_per_query, 2**30, 2048, 128))
    assert len(chunks) > 10
    assert len(calls) <= len(chunks) * (math.ceil(math.log2(131072)) + 1), (len(calls), len(chunks))


@pytest.mark.parametrize("mode", ["dsa", "misa", "misa_hierarchical", "hisa"])
def test_causal_chunks_keep_selections(mode, monkeypatch):
    """A scorer that narrows keys takes causally sized chunks when there is no mask; the selection equals one chunk's,
    and the chunks are uneven (more queries where they see fewer keys)."""
    import dataclasses

    from transformers_misa.ops import masks

    q, keys, weights, _, scale = _random_problem(batch=1, num_queries=96, num_keys=96, pads=(0,), shift=1.0)
    sizes = []
    real = masks.causal_query_chunks
    monkeypatch.setattr(reference, "causal_query_chunks",
                        lambda *args: [sizes.append(c.stop - c.start) or c for c in real(*args)])
    narrowing = dataclasses.replace(reference.REFERENCE, narrow_keys=True)
    run = {
        "dsa": lambda **kw: dsa_topk(q, keys, weights, 8, softmax_scale=scale, **kw),
        "misa": lambda **kw: misa_topk(q, keys, weights, 8, softmax_scale=scale, active_heads=2, block_size=8, **kw),
        "misa_hierarchical": lambda **kw: misa_hierarchical_topk(q, keys, weights, 8, softmax_scale=scale,
                                                                 active_heads=2, block_size=8, candidate_factor=2,
                                                                 **kw),
        "hisa": lambda **kw: hisa_topk(q, keys, weights, 8, softmax_scale=scale, block_size=8, keep_blocks=2, **kw),
    }[mode]
    whole = run(scorer=dataclasses.replace(narrowing, chunk_budget=2**40))
    assert sizes == [96]
    sizes.clear()
    chunked = run(scorer=dataclasses.replace(narrowing, chunk_budget=100_000))  # a few chunks
    assert len(sizes) > 2 and sizes[0] > sizes[-2], sizes
    sizes.clear()
    aligned = run(scorer=dataclasses.replace(narrowing, chunk_budget=100_000, query_multiple=16))  # whole blocks
    assert len(sizes) > 2 and sizes[0] >= 16, sizes
    assert all(size % 16 == 0 or size < 16 for size in sizes[:-1]), sizes  # under one block: as many as fit
    sizes.clear()
    waves = []  # whole waves of the token logits' CTAs: asked for with the heads each query's logits score
    in_waves = run(scorer=dataclasses.replace(narrowing, chunk_budget=100_000, query_multiple=4,
                                              wave_queries=lambda heads, batch, device: waves.append(heads) or 6))
    # HISA's token stage scores gathered candidates (no logits launch to fill): whole multiples of 4 only
    multiple = 4 if mode == "hisa" else 12  # lcm(4, 6)
    assert len(sizes) > 2 and all(size % multiple == 0 or size < multiple for size in sizes[:-1]), sizes
    assert set(waves) == {"dsa": {8}, "misa": {2}, "misa_hierarchical": {2}, "hisa": set()}[mode], waves
    sizes.clear()
    remainder_first = run(scorer=dataclasses.replace(narrowing, chunk_budget=100_000, query_multiple=20,
                                                     remainder_first=True))  # 96 = 16 + 4 x 20
    assert len(sizes) > 2 and sizes[0] >= 16 and all(size % 20 == 0 or size < 20 for size in sizes[1:]), sizes
    monkeypatch.setattr(reference, "causal_query_chunks", real)

    def visible(picked):  # the first queries see fewer than k keys: which masked keys fill up carries no meaning
        return torch.where(picked <= torch.arange(96).view(1, -1, 1), picked, -1).sort(-1).values

    assert torch.equal(visible(chunked), visible(whole))
    assert torch.equal(visible(aligned), visible(whole))
    assert torch.equal(visible(in_waves), visible(whole))
    assert torch.equal(visible(remainder_first), visible(whole))


@pytest.mark.parametrize("mode", ["dsa", "misa"])
@pytest.mark.parametrize("batch", [1, 2])
def test_fused_select_fills_each_chunks_slice_in_place(mode, batch):
    """A fused select gets its chunk's slice of the output (contiguous for one sequence, as the radix kernel needs
    to write it in place); what it writes there is the result: the selection equals the reference's."""
    import dataclasses

    q, keys, weights, _, scale = _random_problem(batch=batch, num_queries=96, num_keys=96, pads=(0,) * batch,
                                                 shift=1.0)
    slices = []

    def fused_select(q_c, w_c, keys_c, chunk, softmax_scale, k, out=None):
        slices.append(out)
        out.copy_(reference.REFERENCE.select_tokens(q_c, w_c, keys_c, chunk, softmax_scale, k))
        return out

    run = {
        "dsa": lambda scorer: dsa_topk(q, keys, weights, 8, softmax_scale=scale, scorer=scorer),
        "misa": lambda scorer: misa_topk(q, keys, weights, 8, softmax_scale=scale, active_heads=2, block_size=8,
                                         scorer=scorer),
    }[mode]
    narrowing = dataclasses.replace(reference.REFERENCE, narrow_keys=True, chunk_budget=100_000)
    expected = run(narrowing)
    got = run(dataclasses.replace(narrowing, fused_select=fused_select))
    assert len(slices) > 1 and all(s.dtype == torch.int32 and s.shape[0] == batch for s in slices)
    assert all(s.is_contiguous() for s in slices) == (batch == 1)
    assert sum(s.shape[1] for s in slices) == 96
    assert torch.equal(got, expected)
