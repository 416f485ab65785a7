"""End to end: prefill a long prompt, then generate, patched vs unpatched, on a small DSA model.

The model has DeepSeek-V3.2's real attention and indexer dimensions (hidden 7168, 128 heads, q/kv LoRA ranks
1536/512, 64 indexer heads x 128, topk 2048) but only a few layers and a small dense MLP, random bf16 weights.
Prints a table and writes JSON under benchmarks/results/.

    python benchmarks/bench_e2e.py                          # GPU: 4 layers, 32K prompt, 256 new tokens
    python benchmarks/bench_e2e.py --cuda-graph             # also decode from a static cache through a CUDA graph
    python benchmarks/bench_e2e.py --tiny --context 256     # CPU smoke test with the tiny test model
"""

import argparse
import datetime
import json
import pathlib
import platform
import time

import torch
from transformers import DeepseekV32Config, DeepseekV32ForCausalLM, DynamicCache

from gpu_timing import outside_capture  # this folder's
from transformers_misa import patch_model
from transformers_misa.indexer import MisaIndexer
from transformers_misa.registry import family_of
from transformers_misa.tiny import tiny_model

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
MODES = {
    "unpatched": None,
    "dsa": {},
    "misa8": {"active_heads": 8},
    "misa8_hier": {"active_heads": 8},
    "hisa": {},
}


def patched(model, name: str):
    """`model` patched as mode `name` of MODES says (unpatched: as it is)."""
    if MODES[name] is not None:
        patch_model(model, mode={"misa8": "misa", "misa8_hier": "misa_hierarchical"}.get(name, name), **MODES[name])
    return model


def chosen_modes(parser: argparse.ArgumentParser, text: str, allowed: list[str], refused: str = "unknown") -> list[str]:
    """`--modes` as a list, each among `allowed`; otherwise a parser error naming the `refused` ones and the choices."""
    modes = text.split(",")
    unknown = sorted(set(modes) - set(allowed))
    if unknown:
        parser.error(f"{refused} modes {unknown}; choose from {allowed}")
    return modes


def run_device(tiny: bool) -> str:
    """Where a benchmark runs: the GPU when there is one, the CPU for the tiny smoke test or without one."""
    return "cpu" if tiny or not torch.cuda.is_available() else "cuda"


def results_file(out: pathlib.Path, script: str, tiny: bool, device: str) -> tuple[pathlib.Path, dict]:
    """(the JSON path of this run under `out`, the environment it records)."""
    environment = {"device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
                   "torch": torch.__version__, "date": datetime.datetime.now(datetime.timezone.utc).isoformat()}
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return out / f"{script}-{'tiny-' if tiny else ''}{stamp}.json", environment


def real_dims_model(layers: int, device: str) -> DeepseekV32ForCausalLM:
    config = DeepseekV32Config(
        vocab_size=129280, hidden_size=7168, intermediate_size=2048, num_hidden_layers=layers,
        num_attention_heads=128, num_key_value_heads=128, q_lora_rank=1536, kv_lora_rank=512,
        qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, index_n_heads=64, index_head_dim=128,
        index_topk=2048, first_k_dense_replace=layers, max_position_embeddings=163840, eos_token_id=None,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        return DeepseekV32ForCausalLM(config).to(torch.bfloat16).eval()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class IndexerTimer:
    """Time spent inside the model's indexers (stock or patched) while active, from forward hooks: CUDA events on
    the GPU (read once at the end, no sync per call), perf_counter on the CPU. Tells the indexer's share of a step
    from the rest of the model (attention, KV expansion, MLPs)."""

    def __init__(self, model, device: str) -> None:
        self.device = device
        self.indexers = [m for m in model.modules() if isinstance(m, MisaIndexer) or family_of(m) is not None]
        self.spans: list[tuple] = []
        self._open: dict[int, object] = {}
        self._handles: list = []

    def _stamp(self):
        if self.device == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def __enter__(self) -> "IndexerTimer":
        for module in self.indexers:
            self._handles.append(module.register_forward_pre_hook(
                lambda mod, args: self._open.__setitem__(id(mod), self._stamp())))
            self._handles.append(module.register_forward_hook(
                lambda mod, args, out: self.spans.append((self._open.pop(id(mod)), self._stamp()))))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def seconds(self) -> float:
        if self.device == "cuda":
            torch.cuda.synchronize()
            return sum(start.elapsed_time(end) for start, end in self.spans) / 1e3
        return sum(end - start for start, end in self.spans)


@torch.no_grad()
def greedy(model, prompt, new_tokens: int, device: str) -> dict:
    """Prefill and decode (the remaining new_tokens - 1 steps) wall times, the indexers' share of each, and the
    greedy tokens."""
    sync(device)
    start = time.perf_counter()
    past = DynamicCache(config=model.config)  # filled in place (outputs name it differently across versions)
    with IndexerTimer(model, device) as prefill_indexer:
        out = model(input_ids=prompt, past_key_values=past, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
    sync(device)
    prefill_s = time.perf_counter() - start
    tokens = [int(token)]
    start = time.perf_counter()
    with IndexerTimer(model, device) as decode_indexer:
        for _ in range(new_tokens - 1):
            out = model(input_ids=token, past_key_values=past, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            tokens.append(int(token))
    sync(device)
    return dict(prefill_s=prefill_s, decode_s=time.perf_counter() - start, tokens=tokens,
                prefill_indexer_s=prefill_indexer.seconds(), decode_indexer_s=decode_indexer.seconds())


class StaticDecodeStep:
    """The inputs of a 1-token decode step from a static cache that holds `context` tokens: the token, its position
    and a prepared 4D mask over the cache's `length` slots, at fixed addresses, so that a captured CUDA graph replays
    whatever `advance` writes into them."""

    def __init__(self, cache, context: int, length: int, token: torch.Tensor) -> None:
        self.at = context  # the step's position, on the host
        self.position = torch.full((1, 1), context, device=token.device)
        self.visible = torch.zeros(1, 1, 1, length, dtype=torch.bool, device=token.device)
        self.visible[..., : context + 1] = True
        self.inputs = dict(input_ids=token.view(1, 1).clone(), position_ids=self.position,
                           attention_mask={"indexed_attention": self.visible}, past_key_values=cache)

    def advance(self, token: torch.Tensor) -> None:
        """In place: the next step's inputs, reading `token` one position further."""
        self.inputs["input_ids"].copy_(token.view(1, 1))
        self.at += 1
        self.position += 1
        self.visible[..., self.at] = True


@torch.no_grad()
def greedy_cuda_graph(model, prompt, new_tokens: int, cache_len: int | None = None, replay: bool = True) -> dict:
    """Prefill into a static cache, then decode with each 1-token step replayed from one captured CUDA graph (no
    Python, no kernel launches per step: what a serving loop with static caches pays). The first decode step runs
    eagerly (warm-up), the rest are replays. `replay=False`: every step runs eagerly on the same inputs (the same
    tokens expected: a graph-safe step replays bit for bit what it computes eagerly)."""
    from transformers import StaticCache

    length = cache_len or prompt.shape[1] + new_tokens
    cache = StaticCache(config=model.config, max_cache_len=length)
    torch.cuda.synchronize()
    start = time.perf_counter()
    token = model(input_ids=prompt, past_key_values=cache).logits[:, -1:].argmax(-1)
    torch.cuda.synchronize()
    prefill_s = time.perf_counter() - start
    step = StaticDecodeStep(cache, prompt.shape[1], length, token)
    tokens = [int(token)]
    start = time.perf_counter()
    next_token = outside_capture(lambda: model(**step.inputs).logits[:, -1:].argmax(-1))  # warm-up step (eager)
    tokens.append(int(next_token))
    step.advance(next_token)
    if replay:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = model(**step.inputs).logits[:, -1:].argmax(-1)
    for _ in range(new_tokens - 2):
        if replay:
            graph.replay()
        else:
            captured = model(**step.inputs).logits[:, -1:].argmax(-1)
        tokens.append(int(captured))
        step.advance(captured)
    torch.cuda.synchronize()
    return dict(prefill_s=prefill_s, decode_s=time.perf_counter() - start, tokens=tokens[:new_tokens])


def first_difference(tokens: list[int], others: list[int]) -> int | None:
    """Index of the first generated token where two runs differ (None: none within the shorter run)."""
    return next((i for i, (a, b) in enumerate(zip(tokens, others)) if a != b), None)


def run_mode(name: str, args, device: str) -> dict:
    model = tiny_model("deepseek_v32") if args.tiny else real_dims_model(args.layers, device)
    model = patched(model.to(device), name)
    prompt = torch.randint(2, model.config.vocab_size, (1, args.context), device=device,
                           generator=torch.Generator(device=device).manual_seed(1))
    row = {"mode": name, "context": args.context, "new_tokens": args.new_tokens}
    # Warm-up on the same prompt first, as many tokens as the timed run: kernel JIT compilation (each kernel variant
    # the prefill chunks and the decode steps of this length use), library start-up and the caching allocator's
    # growth (a dynamic cache takes a new size every step; with a 6-token warm-up the first mode of a process decoded
    # ~3x slower than the next, whichever mode came first) stay out of the timings.
    try:
        greedy(model, prompt, args.new_tokens, device)
    except torch.OutOfMemoryError as error:
        row["error"] = f"out of memory: {str(error).splitlines()[0]}"
        return row
    try:
        timings = greedy(model, prompt, args.new_tokens, device)
    except torch.OutOfMemoryError as error:
        row["error"] = f"out of memory: {str(error).splitlines()[0]}"
        return row
    row.update(timings, decode_tokens_per_s=(args.new_tokens - 1) / timings["decode_s"])
    if args.cuda_graph and device == "cuda":
        try:
            # Warm-up with the timed run's cache length: the kernel variants it picks (e.g. staged stores) compile here.
            greedy_cuda_graph(model, prompt, 6, cache_len=args.context + args.new_tokens)
            graphed = greedy_cuda_graph(model, prompt, args.new_tokens)
            static_eager = greedy_cuda_graph(model, prompt, args.new_tokens, replay=False)
        except Exception as error:  # report and go on with the other modes
            row["graph_error"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        else:
            # Against the dynamic cache's tokens the graph may part ways (the two caches' attention reduces in a
            # different order); against the same static cache run eagerly it must not.
            row.update(graph_prefill_s=graphed["prefill_s"], graph_decode_s=graphed["decode_s"],
                       graph_decode_tokens_per_s=(args.new_tokens - 1) / graphed["decode_s"],
                       graph_tokens_match=graphed["tokens"] == timings["tokens"],
                       graph_first_difference=first_difference(graphed["tokens"], timings["tokens"]),
                       static_eager_decode_tokens_per_s=(args.new_tokens - 1) / static_eager["decode_s"],
                       graph_matches_static_eager=graphed["tokens"] == static_eager["tokens"],
                       static_eager_first_difference=first_difference(graphed["tokens"], static_eager["tokens"]))
    if device == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--new-tokens", type=int, default=256, help="greedy tokens after the prompt (>= 2)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {list(MODES)}")
    parser.add_argument("--tiny", action="store_true", help="the tiny test model on the CPU (smoke test)")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="GPU: also decode from a static cache with each step replayed from a CUDA graph")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.new_tokens < 2:
        parser.error("--new-tokens must be >= 2 (one prefill token, then decode steps)")
    modes = chosen_modes(parser, args.modes, list(MODES))
    device = run_device(args.tiny)
    path, environment = results_file(args.out, "bench_e2e", args.tiny, device)
    rows = []
    for name in modes:
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        row = run_mode(name, args, device)
        rows.append(row)
        speed = (f"prefill {row['prefill_s']:.2f} s (indexers {row['prefill_indexer_s']:.2f} s), decode "
                 f"{row['decode_tokens_per_s']:.1f} tok/s (indexers {row['decode_indexer_s']:.2f} of "
                 f"{row['decode_s']:.2f} s)" if "error" not in row else row["error"])
        if "graph_decode_tokens_per_s" in row:
            speed += (f"; static cache + CUDA graph: decode {row['graph_decode_tokens_per_s']:.1f} tok/s, same tokens: "
                      f"{row['graph_tokens_match']} (first difference at {row['graph_first_difference']}); "
                      f"static cache run eagerly: decode {row['static_eager_decode_tokens_per_s']:.1f} tok/s, same "
                      f"tokens as the graph: {row['graph_matches_static_eager']}")
        elif "graph_error" in row:
            speed += f"; CUDA graph decode failed: {row['graph_error']}"
        print(f"{name:>11}: {speed}", flush=True)
        path.write_text(json.dumps({"environment": environment, "results": rows}, indent=1))  # after every mode
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
