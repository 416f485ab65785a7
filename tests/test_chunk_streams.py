"""Query chunks over several CUDA streams (`ops.chunk_streams`, `Scorer.chunk_streams`): the same selection as on one
stream, the chunks really alternating streams on a GPU, and nothing changed on the CPU or under graph capture."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kernel_helpers import _inputs, gpu
from transformers_misa.ops import reference
from transformers_misa.ops.chunk_streams import ChunkStreams


def test_chunk_streams_do_nothing_off_cuda_and_refuse_fewer_than_one():
    with ChunkStreams(2, torch.device("cpu")) as streams:
        assert streams.side == ()
        for index in range(3):
            with streams.turn(index):
                pass
    with pytest.raises(ValueError, match="at least 1"):
        ChunkStreams(0, torch.device("cpu"))


@pytest.mark.parametrize("mode", ["dsa", "misa"])
def test_reference_selects_the_same_with_chunk_streams_on_the_cpu(mode):
    """The chunk loop with `chunk_streams=2` on the CPU (one stream there) runs every chunk, in order."""
    generator = torch.Generator().manual_seed(1)
    q, keys, weights = torch.randn(1, 300, 8, 16, generator=generator), torch.randn(1, 300, 16, generator=generator), \
        torch.randn(1, 300, 8, generator=generator)
    small = dataclasses.replace(reference.REFERENCE, chunk_budget=2**18)  # ~20 chunks
    select = _selector(mode, active_heads=2, block_size=16)
    expected = select(q, keys, weights, 32, softmax_scale=0.25, scorer=small)
    got = select(q, keys, weights, 32, softmax_scale=0.25, scorer=dataclasses.replace(small, chunk_streams=2))
    assert torch.equal(got, expected)


def _selector(mode: str, active_heads: int, block_size: int):
    """(q, keys, weights, topk, **options) -> indices, for DSA or MISA with these routing settings."""
    if mode == "dsa":
        return reference.dsa_topk
    return lambda *args, **options: reference.misa_topk(*args, active_heads=active_heads, block_size=block_size,
                                                        **options)


def _recording(scorer: reference.Scorer, streams: list[int]) -> reference.Scorer:
    """`scorer` whose fused select notes the stream it runs on."""
    fused = scorer.fused_select

    def select(*args, **kwargs):
        streams.append(torch.cuda.current_stream().stream_id)
        return fused(*args, **kwargs)

    return dataclasses.replace(scorer, fused_select=select)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("mode,heads", [("dsa", 64), ("misa", 64), ("dsa", 32)])
def test_kernels_select_the_same_with_two_chunk_streams(mode, heads):
    """A causal prefill in several chunks on the kernels selects exactly the same keys with the chunks alternating two
    streams as on one, and its chunks did alternate; the caller's stream sees the finished output."""
    from transformers_misa.kernels.scorer import TILELANG_SCORER

    q, keys, weights = _inputs(1, 6000, 6000, heads, seed=5)
    one_stream, two_streams = [], []
    small = dataclasses.replace(TILELANG_SCORER, chunk_budget=3 * 6000 * 4 * 1100)  # ~6 chunks
    select = _selector(mode, active_heads=8, block_size=128)
    expected = select(q, keys, weights, 2048, softmax_scale=128**-0.5, scorer=_recording(small, one_stream))
    got = select(q, keys, weights, 2048, softmax_scale=128**-0.5,
                 scorer=_recording(dataclasses.replace(small, chunk_streams=2), two_streams))
    assert len(two_streams) == len(one_stream) >= 3
    assert len(set(one_stream)) == 1 and two_streams[0::2] == one_stream[0::2]
    assert len(set(two_streams)) == 2 and len(set(two_streams[1::2])) == 1
    assert torch.equal(got.sort(-1).values, expected.sort(-1).values)


@gpu
@pytest.mark.gpu
def test_chunk_streams_stay_on_the_capturing_stream_in_a_cuda_graph():
    """Under graph capture every chunk stays on the capturing stream (a decode step is one chunk anyway)."""
    graph = torch.cuda.CUDAGraph()
    out = torch.zeros(4, device="cuda")
    with torch.cuda.graph(graph):
        with ChunkStreams(2, out.device) as streams:
            assert streams.side == ()
            with streams.turn(1):
                out.add_(1)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, torch.ones(4, device="cuda"))
