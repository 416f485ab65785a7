"""Query chunks taken in turn by several CUDA streams, so that one chunk's last kernels (its top-k) can run beside the
next chunk's first ones (its routing and logits) instead of the GPU draining between them.

Only the order of independent work changes: each chunk reads the shared inputs and writes its own rows of the
output, so the selection is the same as on one stream. A no-op off CUDA, with one stream, and while a CUDA graph is
being captured (a decode step is one chunk anyway).
"""

from __future__ import annotations

import contextlib
import functools

import torch


@functools.lru_cache(maxsize=None)
def _side_streams(device: torch.device, count: int) -> tuple[torch.cuda.Stream, ...]:
    """`count` side streams of `device`, made once per process (a stream costs a driver call to create)."""
    return tuple(torch.cuda.Stream(device=device) for _ in range(count))


class ChunkStreams:
    """`with ChunkStreams(streams, device) as turns:` then `with turns.turn(i):` around chunk i's work.

    Chunk i runs on stream i mod `streams` (stream 0: the caller's current stream). On entry every side stream waits
    for the work queued so far on the current stream (the inputs); on exit the current stream waits for every side
    stream (the output), so the caller sees one ordered stream before and after.

    Memory: a tensor a chunk allocates belongs to its stream, whose later chunks reuse the block only after it in
    stream order; up to `streams` chunks' scratch is alive at once.
    """

    def __init__(self, streams: int, device: torch.device) -> None:
        if streams < 1:
            raise ValueError(f"chunk streams must be at least 1, got {streams}")
        device = torch.device(device)
        concurrent = streams > 1 and device.type == "cuda" and not torch.cuda.is_current_stream_capturing()
        self.device = device
        self.side = _side_streams(_with_index(device), streams - 1) if concurrent else ()
        self.main: torch.cuda.Stream | None = None

    def __enter__(self) -> ChunkStreams:
        if self.side:
            self.main = torch.cuda.current_stream(self.device)
            for stream in self.side:
                stream.wait_stream(self.main)
        return self

    def turn(self, index: int) -> contextlib.AbstractContextManager:
        """The context chunk `index` runs in: its stream made current (the caller's own for every `streams`-th)."""
        slot = index % (len(self.side) + 1)
        return torch.cuda.stream(self.side[slot - 1]) if slot else contextlib.nullcontext()

    def __exit__(self, *exc_info) -> None:
        for stream in self.side:
            self.main.wait_stream(stream)


def _with_index(device: torch.device) -> torch.device:
    """`cuda` -> `cuda:N` (the current device), so that the stream cache has one entry per GPU."""
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())
