"""The reference indexers against transformers' stock indexers and brute-force references (memory and query
chunks: test_reference_memory.py)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import DynamicCache, StaticCache

from conftest import (
    FAMILIES,
    assert_equal_visible_picks,
    assert_same_topk,
    assert_valid_topk,
    capture_calls,
    dense_scores,
    exact_fraction,
    exact_mode_options,
    indexer_inputs,
    indexers_of,
    left_padded_batch,
    make_patched_indexer,
    visible_keys,
)
from transformers_misa.ops import blocks, masks, reference
from transformers_misa.ops.reference import dsa_topk, hisa_topk, misa_hierarchical_topk, misa_topk, pooled_keys

# (sequence length, index_topk, mask kind): odd lengths, T not a multiple of any block size, T < topk; bool masks
# (sdpa), the model's additive finfo.min masks (eager) and additive masks with a true -inf.
CASES = [
    ("deepseek_v32", 37, 64, "bool"), ("deepseek_v32", 130, 16, "float_inf"), ("deepseek_v32", 257, 32, "float"),
    ("glm_moe_dsa", 37, 64, "float"), ("glm_moe_dsa", 130, 16, "bool"), ("glm_moe_dsa", 257, 32, "bool"),
    ("glm_moe_dsa", 37, 64, "float_inf"), ("deepseek_v32", 130, 16, "bool"),
]

def _model_inputs(make_model, family: str, seq_len: int, topk: int, mask_kind: str, layer: int = 0):
    """A stock indexer and the inputs it gets from its model, batch 2 with left padding."""
    impl = "eager" if mask_kind == "float" else "sdpa"
    model = make_model(family, index_topk=topk, attn_implementation=impl)
    ids, attn = left_padded_batch(2, seq_len, [0, 12])
    hidden, q_resid, pos_emb, mask = indexer_inputs(model, ids, attn, layer)
    if mask_kind == "float":
        assert mask.dtype == torch.float32 and float(mask.min()) == torch.finfo(torch.float32).min
    else:
        assert mask.dtype == torch.bool
    if mask_kind == "float_inf":  # an additive mask with true -inf
        mask = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    return indexers_of(model)[layer], (hidden, q_resid, pos_emb, mask)


# ---------------------------------------------------------------------------------- against the stock indexer


@pytest.mark.parametrize("family,seq_len,topk,mask_kind", CASES)
def test_modes_equal_stock_indexer(make_model, family, seq_len, topk, mask_kind):
    """dsa, misa with all heads and misa_hierarchical with every key a candidate select DSA's top-k."""
    stock, (hidden, q_resid, pos_emb, mask) = _model_inputs(make_model, family, seq_len, topk, mask_kind)
    expected = stock(hidden, q_resid, pos_emb, mask, None)
    assert expected.dtype == torch.int32 and expected.shape == (2, seq_len, min(topk, seq_len))

    patched = make_patched_indexer(stock, "dsa")
    q, keys, weights = patched.project(hidden, q_resid, pos_emb)
    scores = dense_scores(q, keys, weights, patched.softmax_scale, mask)
    assert_valid_topk(expected, scores)  # the checker agrees with transformers itself

    assert_equal_visible_picks(patched(hidden, q_resid, pos_emb, mask), expected, scores)  # bit-identical
    direct = dsa_topk(q, keys, weights, topk, softmax_scale=patched.softmax_scale, mask=mask, chunk_size=7)
    assert_same_topk(direct, expected, scores, min_exact=0.99)

    options = dict(exact_mode_options(stock.n_heads, topk, seq_len, block_size=16))
    misa = make_patched_indexer(stock, "misa", **options["misa"])(hidden, q_resid, pos_emb, mask)
    assert_equal_visible_picks(misa, expected, scores)  # all heads, summed in DSA's order: bit-identical
    hierarchical = make_patched_indexer(stock, "misa_hierarchical", **options["misa_hierarchical"])
    assert_same_topk(hierarchical(hidden, q_resid, pos_emb, mask), expected, scores, min_exact=0.98)


@pytest.mark.parametrize("family,seq_len,topk,mask_kind", CASES)
def test_hisa_all_blocks_equals_stock_indexer(request, make_model, family, seq_len, topk, mask_kind):
    stock, (hidden, q_resid, pos_emb, mask) = _model_inputs(make_model, family, seq_len, topk, mask_kind)
    expected = stock(hidden, q_resid, pos_emb, mask, None)
    patched = make_patched_indexer(stock, "hisa", **dict(exact_mode_options(stock.n_heads, topk, seq_len))["hisa"])
    scores = dense_scores(*patched.project(hidden, q_resid, pos_emb), patched.softmax_scale, mask)
    assert_same_topk(patched(hidden, q_resid, pos_emb, mask), expected, scores, min_exact=0.98)


def test_hisa_never_repeats_a_visible_key():
    """Minimal repro of the duplicate-index bug: T=20, one block of 16 plus a partial one, topk 20 > visible."""
    gen = torch.Generator().manual_seed(0)
    q, keys, weights = torch.randn(1, 1, 2, 8, generator=gen), torch.randn(1, 20, 8, generator=gen), torch.ones(1, 1, 2)
    mask = torch.ones(1, 1, 20, dtype=torch.bool)
    mask[..., :4] = False  # 4 left-padding keys: the query sees 16 < topk = 20 keys, key 19 among them
    got = hisa_topk(q, keys, weights, 20, softmax_scale=1.0, block_size=16, keep_blocks=2, mask=mask)
    visible_picks = got[0, 0][mask[0, 0][got[0, 0].long()]].tolist()
    assert len(got[0, 0].unique()) == 20, f"repeated indices: {got[0, 0].tolist()}"
    assert sorted(visible_picks) == list(range(4, 20))


@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
@pytest.mark.parametrize("family", FAMILIES)
def test_decode_with_cache_equals_stock_indexer(make_model, family, cache_kind):
    """Prefill, 1-token steps and a 3-token step: the patched indexer on its own cache vs the stock one on its."""
    topk, block = 16, 8
    model = make_model(family, index_topk=topk)
    stock = indexers_of(model)[-1]  # the last indexer: contextual hidden states
    ids, attn = left_padded_batch(2, 45, [0, 6])
    steps = [ids] + [torch.randint(2, 512, (2, n)) for n in (1, 1, 3, 1, 1)]

    def new_cache():
        if cache_kind == "dynamic":
            return DynamicCache(config=model.config)
        return StaticCache(config=model.config, max_cache_len=64)

    driving = new_cache()
    full_mask = attn
    with capture_calls(stock) as calls, torch.no_grad():
        for i, step in enumerate(steps):
            if i:
                full_mask = torch.cat([full_mask, torch.ones_like(step)], 1)
            model(input_ids=step, attention_mask=full_mask, past_key_values=driving, use_cache=True)
    assert [c[0][0].shape[1] for c in calls] == [45, 1, 1, 3, 1, 1]

    modes = exact_mode_options(stock.n_heads, topk, 64, block_size=block)
    patched = {mode: make_patched_indexer(stock, mode, **opts) for mode, opts in modes}
    caches = {mode: new_cache() for mode in ["stock", *patched]}
    for args, _ in calls:
        hidden, q_resid, pos_emb, mask = args[:4]
        expected = stock(hidden, q_resid, pos_emb, mask, None, past_key_values=caches["stock"])
        keys = caches["stock"].layers[stock.layer_idx].indexer_keys
        q, _, weights = patched["dsa"].project(hidden, q_resid, pos_emb)
        scores = dense_scores(q, keys, weights, stock.softmax_scale, mask)
        assert_valid_topk(expected, scores)
        for mode, indexer in patched.items():
            got = indexer(hidden, q_resid, pos_emb, mask, None, past_key_values=caches[mode])
            assert torch.equal(caches[mode].layers[stock.layer_idx].indexer_keys, keys)
            if mode in ("dsa", "misa"):
                assert_equal_visible_picks(got, expected, scores)
            else:
                assert_same_topk(got, expected, scores, min_exact=0.9)


# ---------------------------------------------------------------------------------- random tensors, brute force


def _random_problem(batch=2, num_queries=40, num_keys=40, heads=8, dim=16, pads=(0, 9), seed=0, shift=0.0):
    """Random q / keys / weights and a bool causal mask with left padding (queries at the last positions).

    shift > 0 moves q and keys away from 0 and makes the weights positive: every ReLU is active, so no two
    keys tie (ties at score 0 are otherwise common with few heads).
    """
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, num_queries, heads, dim, generator=gen) + shift
    keys = torch.randn(batch, num_keys, dim, generator=gen) + shift
    weights = torch.randn(batch, num_queries, heads, generator=gen)
    if shift:
        weights = weights.abs() + 0.1
    mask = visible_keys(None, batch, num_queries, num_keys).clone()
    for b, pad in enumerate(pads):
        mask[b, :, :pad] = False
    return q, keys, weights, mask, dim**-0.5


def _visible_pooled(keys, mask, num_queries, block_size):
    """Brute force: each block pooled over the keys each query sees, [B, S, M, D], and whether it sees any [B, S, M]
    (so a query's last block never includes a key after it)."""
    batch, num_keys, dim = keys.shape
    visible = visible_keys(mask, batch, num_queries, num_keys)
    num_blocks = math.ceil(num_keys / block_size)
    pooled = torch.zeros(batch, num_queries, num_blocks, dim)
    seen_any = torch.zeros(batch, num_queries, num_blocks, dtype=torch.bool)
    for b in range(batch):
        for s in range(num_queries):
            for m in range(num_blocks):
                sl = slice(m * block_size, (m + 1) * block_size)
                seen = keys[b, sl][visible[b, s, sl]]
                if len(seen):
                    pooled[b, s, m], seen_any[b, s, m] = seen.mean(0), True
    return pooled, seen_any


def _routed_dense(q, keys, weights, mask, scale, active, block_size):
    """Brute-force MISA routed token scores [B, S, T] (-inf masked) and the routed heads per query."""
    batch, num_queries, heads, _ = q.shape
    visible = visible_keys(mask, batch, num_queries, keys.shape[1])
    pooled, seen_any = _visible_pooled(keys, mask, num_queries, block_size)
    out = torch.full((batch, num_queries, keys.shape[1]), float("-inf"))
    routed = torch.empty(batch, num_queries, active, dtype=torch.long)
    for b in range(batch):
        for s in range(num_queries):
            per_block = torch.relu(q[b, s] @ pooled[b, s].T * scale) * seen_any[b, s]
            importance = per_block.sum(-1) * weights[b, s].abs()
            heads_ = importance.topk(active).indices.sort().values
            routed[b, s] = heads_
            token = (weights[b, s, heads_, None] * torch.relu(q[b, s, heads_] @ keys[b].T * scale)).sum(0)
            out[b, s] = token.masked_fill(~visible[b, s], float("-inf"))
    return out, routed


def test_misa_matches_brute_force():
    q, keys, weights, mask, scale = _random_problem()
    got = misa_topk(q, keys, weights, 10, softmax_scale=scale, active_heads=3, block_size=8, mask=mask)
    routed, _ = _routed_dense(q, keys, weights, mask, scale, 3, 8)
    assert_valid_topk(got, routed)
    # ...and it really differs from DSA somewhere (3 of 8 heads).
    full = dense_scores(q, keys, weights, scale, mask)
    assert exact_fraction(got, dsa_topk(q, keys, weights, 10, softmax_scale=scale, mask=mask), full) < 1.0


@pytest.mark.parametrize("num_queries, holes", [(40, False), (3, False), (40, True)])
def test_tail_block_pools_each_querys_last_block_over_what_it_sees(num_queries, holes):
    # 40 queries take the prefix-sum path, 3 queries (and masks with holes) the gathered block: same means.
    q, keys, weights, mask, scale = _random_problem(num_queries=num_queries, pads=(0, 13))
    if holes:
        mask[:, :, 22] = False
    chunk = masks.ChunkMask(mask, slice(0, num_queries), 2, num_queries, 40, q.device)
    tail = blocks.TailBlock(keys, chunk, 8)
    seen_pooled, seen_any = _visible_pooled(keys, mask, num_queries, 8)
    _, ke, _ = chunk.key_range
    last_block = ((ke.long() - 1) // 8).clamp_min(0)
    expected = seen_pooled.gather(2, last_block[..., None, None].expand(-1, -1, 1, 16)).squeeze(2)
    expected = expected * tail.present.unsqueeze(-1)  # a query ending on a block boundary has no tail
    torch.testing.assert_close(tail.means, expected)
    assert tail.present.any() and not tail.present.all()


def test_route_heads_picks_the_most_important_heads():
    q, keys, weights, mask, scale = _random_problem()
    _, expected = _routed_dense(q, keys, weights, mask, scale, 3, 8)
    pooled = pooled_keys(keys, mask, 8)
    chunk = masks.ChunkMask(mask, slice(0, q.shape[1]), q.shape[0], q.shape[1], keys.shape[1], q.device)
    tail = blocks.TailBlock(keys, chunk, 8)
    importance = reference.reference_head_importance(q, weights, pooled, chunk, 8, scale, tail=tail)
    heads = reference.route_heads(importance, 3)
    assert torch.equal(heads, expected)
    all_heads = reference.route_heads(importance, 8)
    assert torch.equal(all_heads, torch.arange(8).expand_as(all_heads))


def test_max_router_ranks_heads_by_their_best_visible_block():
    q, keys, weights, mask, scale = _random_problem()
    pooled = pooled_keys(keys, mask, 8)
    chunk = masks.ChunkMask(mask, slice(0, q.shape[1]), q.shape[0], q.shape[1], keys.shape[1], q.device)
    seen_pooled, seen_any = _visible_pooled(keys, mask, q.shape[1], 8)
    per_block = torch.relu(torch.einsum("bshd,bsmd->bshm", q, seen_pooled) * scale)
    per_block = per_block.masked_fill(~seen_any.unsqueeze(2), 0.0)
    tail = blocks.TailBlock(keys, chunk, 8)
    by_max = reference.reference_head_importance(q, weights, pooled, chunk, 8, scale, "max", tail=tail)
    by_sum = reference.reference_head_importance(q, weights, pooled, chunk, 8, scale, "sum", tail=tail)
    torch.testing.assert_close(by_max, per_block.amax(-1) * weights.abs())
    torch.testing.assert_close(by_sum, per_block.sum(-1) * weights.abs())
    assert not torch.equal(reference.route_heads(by_max, 3), reference.route_heads(by_sum, 3))
    got = misa_topk(q, keys, weights, 10, softmax_scale=scale, active_heads=3, block_size=8, mask=mask, router="max")
    heads = reference.route_heads(by_max, 3)
    routed = dense_scores(q.gather(2, heads.unsqueeze(-1).expand(-1, -1, -1, q.shape[-1])), keys,
                          weights.gather(2, heads), scale, mask)
    assert_valid_topk(got, routed)


def test_misa_hierarchical_matches_brute_force():
    q, keys, weights, mask, scale = _random_problem()
    topk, factor = 6, 2
    got = misa_hierarchical_topk(q, keys, weights, topk, softmax_scale=scale, active_heads=2, block_size=8,
                                 candidate_factor=factor, mask=mask)
    routed, _ = _routed_dense(q, keys, weights, mask, scale, 2, 8)
    candidates = routed.topk(topk * factor, dim=-1).indices
    in_candidates = torch.zeros(routed.shape, dtype=torch.bool).scatter_(-1, candidates, True)
    full = dense_scores(q, keys, weights, scale, mask)
    assert_valid_topk(got, full.masked_fill(~in_candidates, float("-inf")))


def _hisa_dense(q, keys, weights, mask, scale, block_size, keep):
    """Brute-force HISA: DSA scores restricted to each query's kept blocks (keep + 1: the local block on top)."""
    batch, num_queries, _, _ = q.shape
    num_keys = keys.shape[1]
    keep += 1
    num_blocks = math.ceil(num_keys / block_size)
    pooled = pooled_keys(keys, mask, block_size)
    full = dense_scores(q, keys, weights, scale, mask)
    visible = visible_keys(mask, batch, num_queries, num_keys)
    out = torch.full_like(full, float("-inf"))
    for b in range(batch):
        for s in range(num_queries):
            vis_blocks = [m for m in range(num_blocks) if visible[b, s, m * block_size:(m + 1) * block_size].any()]
            if not vis_blocks:
                continue
            block_score = (weights[b, s, :, None] * torch.relu(q[b, s] @ pooled[b].T * scale)).sum(0)
            ranked = sorted(vis_blocks, key=lambda m: -float(block_score[m]))
            kept = {vis_blocks[0], vis_blocks[-1]}
            for m in ranked:
                if len(kept) >= keep:
                    break
                kept.add(m)
            for m in kept:
                sl = slice(m * block_size, (m + 1) * block_size)
                out[b, s, sl] = full[b, s, sl]
    return out


@pytest.mark.parametrize("keep", [2, 3])
@pytest.mark.parametrize("num_keys", [44, 48])  # the cache ending in a partial block, and in a whole one
def test_hisa_matches_brute_force(keep, num_keys):
    q, keys, weights, mask, scale = _random_problem(num_queries=num_keys, num_keys=num_keys)
    got = hisa_topk(q, keys, weights, 8, softmax_scale=scale, block_size=8, keep_blocks=keep, mask=mask)
    assert_valid_topk(got, _hisa_dense(q, keys, weights, mask, scale, 8, keep))


def test_hisa_always_keeps_sink_and_local_block():
    q, keys, weights, _, scale = _random_problem(batch=1, num_queries=1, num_keys=64, pads=(0,))
    weights = weights.abs()
    keys[0, 16:48] = q[0, 0].mean(0) * 10  # the middle blocks win the coarse filter by far
    got = hisa_topk(q, keys, weights, 16, softmax_scale=scale, block_size=16, keep_blocks=1)
    dsa = dsa_topk(q, keys, weights, 16, softmax_scale=scale)
    assert ((dsa >= 16) & (dsa < 48)).all()  # DSA itself would take only middle keys
    blocks_hit = set((got // 16).flatten().tolist())
    assert blocks_hit == {0, 3}  # keep_blocks=1 (the sink) plus the local block


@pytest.mark.parametrize("num_queries,num_keys", [(1, 50), (3, 50), (50, 50), (5, 5)])
def test_default_causal_mask(num_queries, num_keys):
    """mask=None means causal with the queries at the last positions (decode)."""
    q, keys, weights, _, scale = _random_problem(batch=2, num_queries=num_queries, num_keys=num_keys)
    full = dense_scores(q, keys, weights, scale, None)
    topk = 8
    assert_valid_topk(dsa_topk(q, keys, weights, topk, softmax_scale=scale), full)
    kw = dict(softmax_scale=scale, block_size=8)
    for got in (misa_topk(q, keys, weights, topk, active_heads=8, **kw),
                misa_hierarchical_topk(q, keys, weights, topk, active_heads=1, candidate_factor=7, **kw),
                hisa_topk(q, keys, weights, topk, keep_blocks=7, **kw)):
        assert got.shape == (2, num_queries, min(topk, num_keys))
        assert_valid_topk(got, full)


@pytest.mark.parametrize("mode", ["dsa", "misa", "misa_hierarchical", "hisa"])
def test_query_chunking_does_not_change_results(mode):
    q, keys, weights, mask, scale = _random_problem(num_queries=37, num_keys=37, shift=2.0)
    fn, kw = {
        "dsa": (dsa_topk, {}),
        "misa": (misa_topk, dict(active_heads=2, block_size=8)),
        "misa_hierarchical": (misa_hierarchical_topk, dict(active_heads=2, block_size=8, candidate_factor=2)),
        "hisa": (hisa_topk, dict(block_size=8, keep_blocks=3)),
    }[mode]
    outs = [fn(q, keys, weights, 6, softmax_scale=scale, mask=mask, chunk_size=c, **kw) for c in (None, 1, 5, 64)]
    scores = dense_scores(q, keys, weights, scale, mask)
    for out in outs[1:]:
        assert_equal_visible_picks(out, outs[0], scores)


def test_pooled_keys_mean_of_real_keys_only():
    keys = torch.randn(2, 21, 4)
    mask = visible_keys(None, 2, 21, 21).clone()
    mask[1, :, :10] = False  # left padding of row 1
    pooled = pooled_keys(keys, mask, 8)
    assert pooled.shape == (2, 3, 4) and pooled.dtype == torch.float32
    torch.testing.assert_close(pooled[0, 2], keys[0, 16:21].mean(0))
    torch.testing.assert_close(pooled[1, 0], torch.zeros(4))  # all padding
    torch.testing.assert_close(pooled[1, 1], keys[1, 10:16].mean(0))
    # An additive mask gives the same result.
    additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    torch.testing.assert_close(pooled_keys(keys, additive, 8), pooled)


def test_wrong_pooled_block_count_is_rejected():
    q, keys, weights, mask, scale = _random_problem()
    with pytest.raises(ValueError, match="pooled keys have 4 blocks, the key cache needs 5"):
        misa_topk(q, keys, weights, 6, softmax_scale=scale, active_heads=2, block_size=8, mask=mask,
                  pooled=torch.zeros(2, 4, 16))


@pytest.mark.parametrize("rows,num_queries", [(slice(0, 40), 40), (slice(17, 40), 40), (slice(24, 33), 40),
                                              (slice(5, 30), 30)])
def test_tail_block_sums_only_the_keys_its_tails_span(rows, num_queries):
    """Without a mask a chunk's tails lie in a window of the cache known on the host: summing only that window gives
    the same means, bit for bit, as summing the whole cache (the block-local prefix sums restart at the same keys).
    The last case has 10 cached keys before its 30 queries."""
    generator = torch.Generator().manual_seed(3)
    keys = torch.randn(2, 40, 16, generator=generator)
    chunk = masks.ChunkMask(None, rows, 2, num_queries, 40, keys.device)
    assert blocks.TailBlock.uses_prefix_sums(chunk, 40, 8)
    low, high = chunk.tail_key_window(8)
    offset = 40 - num_queries
    assert low % 8 == 0 and low <= offset + rows.start + 1 and high == offset + rows.stop
    tail = blocks.TailBlock(keys, chunk, 8)
    ks, ke, _ = chunk.key_range
    start = ke.long() // 8 * 8
    whole = tail._means_from_prefix_sums(keys, ks.long(), ke.long(), start, 8)
    assert torch.equal(tail.means, whole)
    assert tail.present.any()
