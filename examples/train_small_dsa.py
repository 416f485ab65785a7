"""Train a small DSA model from scratch on offline text: the project's built-in *trained* model.

    python examples/train_small_dsa.py --family deepseek_v32 \
        --haystack ../shared/data/haystack/paul_graham_essays --out trained/deepseek_v32

What it trains (seeded, one GPU, a few minutes; `--steps` fixes the work, `--max-minutes` is only a safety stop):
- a `deepseek_v32` (64 indexer heads) or `glm_moe_dsa` (32 indexer heads, one "shared" layer) model with the real
  indexer shape (head dim 128), a small main model (hidden 256, 4 layers, MLA with 4 heads, dense MLPs);
- on the Python standard library's source found on this machine (`--stdlib`, default: the running Python's) and
  the essays of `--haystack` (all but the last `--heldout-essays` essays, kept for held-out perplexity and
  calibration checks), tokenised by a byte-level BPE trained here with `tokenizers` on the same text;
- with retrieval tasks mixed in: needles in the NIAH format ("The best thing to do in <Place> is <span>." plus
  distractors; pass keys), answered after "Question: ...\\nAnswer:" by repeating the needle, and (--repeat-fraction)
  text in which earlier spans recur verbatim, for copying practice. The essays are only ~160K tokens, so a few
  minutes of training memorise them; `--needle-words random` (made-up places, spans of random words) and
  `--repeat-tokens random` make the retrieval tasks unanswerable by memory, only by copying from the context;
- indexer as DeepSeek trained it: a dense warm-up (main attention over every causal key) where the indexer learns,
  from inputs detached from the main model, the KL divergence to the main attention's distribution (summed over
  heads, L1-normalised), then sparse training where the main attention sees only the indexer's top-k and the KL
  is taken over the selected keys (a GLM-5 "shared" layer's attention is a second target of the indexer whose
  top-k it reuses). The LM loss trains the rest of the model.
Writes model.safetensors (bf16), config.json, the tokenizer and training.json (settings, losses, data, machine);
`--checkpoint-steps N,M` writes the same for the model after step N, M into OUT/step-N.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from transformers_misa.evaluation.niah import train_bpe_tokenizer
from transformers_misa.tiny import tiny_model

from small_dsa_data import Batches, load_text  # this folder's data module
from small_dsa_kl import (STATE, begin_kl_forward, kl_query_chunk_size, patch_for_kl_training,  # the indexer's KL
                          training_indexers, unpatch_kl_training)

MODEL_CONFIG: dict[str, Any] = dict(
    vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=4, q_lora_rank=96, kv_lora_rank=64, qk_rope_head_dim=32, qk_nope_head_dim=32, v_head_dim=32,
    head_dim=32, index_head_dim=128, index_topk=256, first_k_dense_replace=4, max_position_embeddings=16384,
    tie_word_embeddings=True, bos_token_id=0, pad_token_id=1, eos_token_id=2,
)
FAMILY_CONFIG: dict[str, dict[str, Any]] = {
    "deepseek_v32": dict(index_n_heads=64),
    "glm_moe_dsa": dict(index_n_heads=32, indexer_types=["full", "full", "shared", "full"]),
}


# ------------------------------------------------------------------------------------------------ training


# (fraction of the run, sequence length as a fraction of --context): short sequences are cheap, so most steps are
# spent there; the end of the run is at the full context.
CURRICULUM = ((0.6, 0.25), (0.25, 0.5), (0.15, 1.0))


def curriculum(step: int, steps: int, context: int) -> int:
    """Sequence length at `step` (see CURRICULUM)."""
    done = 0.0
    for fraction, scale in CURRICULUM:
        done += fraction
        if step < done * steps:
            return int(context * scale)
    return context


def training_step(model, optimizer, ids: torch.Tensor, weights: torch.Tensor, sparse: bool, rows: torch.Tensor,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimizer step: weighted LM loss (main model) + indexer KL (indexer only). Returns (lm, the KL terms in
    layer order, logits)."""
    begin_kl_forward(sparse, rows.to(device))
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = model(input_ids=ids, use_cache=False).logits
    nll = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    w = weights[:, 1:].flatten()
    lm = (nll * w).sum() / w.sum()
    kl_terms = torch.stack(STATE.losses)
    kl = kl_terms.mean()
    optimizer.zero_grad(set_to_none=True)
    (lm + kl).backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    if torch.isfinite(norm):  # a non-finite gradient (a loss spike) would turn every weight into NaN: skip the step
        optimizer.step()
    return lm.detach(), kl_terms.detach(), logits.detach()


def fit_steps(model, tokenizer, text: dict[str, Any], args: argparse.Namespace, seconds: float,
              device: torch.device) -> int:
    """Steps that fill `seconds` of training, timed with its own data and a zero-learning-rate optimizer (weights
    restored afterwards), so the run itself stays a function of --seed and the printed --steps."""
    saved = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)
    batches = Batches.from_args(tokenizer, text, args, seed=args.seed + 1)
    per_step = []
    for length, sparse in ((int(args.context * scale), True) for _, scale in CURRICULUM):
        times = []
        for _ in range(3):
            ids, weights = batches.batch(max(1, args.tokens_per_step // length), length, device)
            rows = torch.arange(length - min(args.kl_queries, length), length)
            if device.type == "cuda":
                torch.cuda.synchronize()
            tick = time.perf_counter()
            training_step(model, optimizer, ids, weights, sparse, rows, device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - tick)
        per_step.append(min(times[1:]))  # the first includes warm-up
    mean = sum(fraction * seconds for (fraction, _), seconds in zip(CURRICULUM, per_step))
    steps = max(10, int(seconds / mean))
    print(f"timed s/step {[round(t, 3) for t in per_step]}: --steps {steps} fills {seconds:.0f} s", flush=True)
    model.load_state_dict(saved)
    model.zero_grad(set_to_none=True)
    return steps


def build_training_model(args: argparse.Namespace, vocab_size: int, device: torch.device):
    """The model to train: the family's small config, patched with reference DSA indexers whose forward is
    `training_indexer_forward`, and attention that adds the indexer KL loss (`kl_attention`)."""
    overrides = {**MODEL_CONFIG, **FAMILY_CONFIG[args.family], "vocab_size": vocab_size, "index_topk": args.topk}
    if args.indexer_types:
        if args.family != "glm_moe_dsa":
            raise ValueError("--indexer-types is for --family glm_moe_dsa (DeepSeek-V3.2 has an indexer per layer)")
        overrides["indexer_types"] = args.indexer_types.split(",")
    if args.attention_heads is not None:  # the main attention's heads (the indexer's KL target sums over them)
        overrides.update(num_attention_heads=args.attention_heads, num_key_value_heads=args.attention_heads)
    if args.small:  # CPU smoke runs of the script itself
        overrides.update(num_hidden_layers=2, hidden_size=64, intermediate_size=128, q_lora_rank=32)
        if args.family == "glm_moe_dsa":
            overrides["indexer_types"] = ["full", "shared"]
    if args.q_lora_rank is not None:  # the latent that every indexer head's query (and the main attention's) comes from
        overrides["q_lora_rank"] = args.q_lora_rank
    overrides["first_k_dense_replace"] = overrides["num_hidden_layers"]
    model = tiny_model(args.family, seed=args.seed, dtype=torch.float32, attn_implementation="sdpa", **overrides)
    model.to(device).train()
    STATE.shared_grad = args.shared_kl_grad
    patch_for_kl_training(model, query_chunk_size=kl_query_chunk_size(device))
    return model


def parameter_groups(model, weight_decay: float, indexer_weight_decay: float | None) -> list[dict[str, Any]]:
    """AdamW's parameter groups: the indexers' projections with `indexer_weight_decay` (None: `weight_decay`, as the
    built-in models were trained), everything else with `weight_decay`."""
    indexer_ids = {id(p) for indexer in training_indexers(model) for p in indexer.parameters()}
    indexer_params = [p for p in model.parameters() if id(p) in indexer_ids]
    rest = [p for p in model.parameters() if id(p) not in indexer_ids]
    decay = weight_decay if indexer_weight_decay is None else indexer_weight_decay
    return [dict(params=rest, weight_decay=weight_decay), dict(params=indexer_params, weight_decay=decay)]


def train(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    text = load_text(Path(args.stdlib), Path(args.haystack), args.heldout_essays, args.code_bytes, args.seed)
    code_text = "\n".join(text["code"])
    if args.tokenizer_code_bytes is not None:  # less code, so English words get merges of their own
        code_text = code_text[: args.tokenizer_code_bytes]
    tokenizer = train_bpe_tokenizer(code_text + "\n" + "\n".join(text["essays"]), vocab_size=args.vocab_size)
    batches = Batches.from_args(tokenizer, text, args, seed=args.seed)
    print(f"data: {text['code_files']} code files, {len(text['train_essays'])} essays; tokens: code "
          f"{len(batches.sources['code'])}, essays {len(batches.sources['essays'])} "
          f"({time.perf_counter() - start:.1f} s)", flush=True)

    model = build_training_model(args, len(tokenizer), device)

    if args.fit_minutes:
        args.steps = fit_steps(model, tokenizer, text, args, 60 * args.fit_minutes, device)
    optimizer = torch.optim.AdamW(parameter_groups(model, args.weight_decay, args.indexer_weight_decay), lr=args.lr,
                                  betas=(0.9, 0.95))
    warmup = max(1, args.steps // 30)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * (
        0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))))
    dense_steps = int(args.steps * args.dense_fraction)
    copy_steps = int(args.steps * args.copy_warmup)
    history, done = [], 0
    checkpoints = {int(step) for step in args.checkpoint_steps.split(",") if step}
    generator = torch.Generator().manual_seed(args.seed)
    for step in range(args.steps):
        if time.perf_counter() - start > 60 * args.max_minutes:
            print(f"stopping at step {step}: --max-minutes {args.max_minutes} reached", flush=True)
            break
        length = curriculum(step, args.steps, args.context)
        batches.copy_only = step < copy_steps
        if batches.copy_only:  # short sequences: few distractors, so the induction plateau is short
            length = min(length, args.copy_length)
        ids, weights = batches.batch(max(1, args.tokens_per_step // length), length, device)
        low = min(length - 1, args.topk)
        rows = low + torch.randperm(length - low, generator=generator)[: args.kl_queries]
        lm, kl_terms, logits = training_step(model, optimizer, ids, weights, step >= dense_steps, rows.sort().values,
                                             device)
        schedule.step()
        done = step + 1
        if step % args.log_every == 0 or done == args.steps:
            hits = logits[:, :-1].argmax(-1).flatten() == ids[:, 1:].flatten()
            accuracy = lambda where: float(hits[where].float().mean()) if where.any() else None  # noqa: E731
            w = weights[:, 1:].flatten()
            row = dict(step=step, length=length, sparse=step >= dense_steps, lm=float(lm), kl=float(kl_terms.mean()),
                       kl_terms=[round(float(term), 4) for term in kl_terms],
                       answer_token_acc=accuracy(w > 5), copy_token_acc=accuracy(w == 2),
                       elapsed_s=round(time.perf_counter() - start, 1))
            history.append(row)
            print(json.dumps(row), flush=True)
        if done in checkpoints:  # the model as it is now, to follow e.g. the indexer heads' spread over training
            unpatch_kl_training(model)
            save_trained(model, tokenizer, out / f"step-{done}", args, done, dense_steps, start, history, text, batches)
            patch_for_kl_training(model, query_chunk_size=kl_query_chunk_size(device))

    unpatch_kl_training(model)
    info = save_trained(model, tokenizer, out, args, done, dense_steps, start, history, text, batches)
    print(f"wrote {out} ({done} steps, {info['wall_s']} s)", flush=True)
    return info


def save_trained(model, tokenizer, out: Path, args: argparse.Namespace, done: int, dense_steps: int, start: float,
                 history: list[dict], text: dict[str, Any], batches: Batches) -> dict[str, Any]:
    """Writes a bf16 copy of the (unpatched) model, as the built-in models ship, the tokenizer and training.json
    (settings, losses so far, data, machine) into `out`; returns training.json's content. The model itself is left
    as it is, so that training can go on after a checkpoint."""
    device = next(model.parameters()).device
    copy.deepcopy(model).eval().to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    info = dict(family=args.family, args=vars(args), steps_done=done, dense_steps=dense_steps,
                wall_s=round(time.perf_counter() - start, 1), history=history,
                data={k: text[k] for k in ("code_files", "train_essays", "heldout_essays")},
                tokens={k: len(v) for k, v in batches.sources.items()},
                parameters=sum(p.numel() for p in model.parameters()),
                machine=dict(python=platform.python_version(), torch=torch.__version__,
                             gpu=torch.cuda.get_device_name() if device.type == "cuda" else None))
    (out / "training.json").write_text(json.dumps(info, indent=2))
    return info


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", choices=sorted(FAMILY_CONFIG), default="deepseek_v32")
    parser.add_argument("--haystack", required=True, help="folder of .txt essays (../shared/data/haystack/...)")
    parser.add_argument("--stdlib", default=os.path.dirname(os.__file__), help="Python standard library folder")
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--fit-minutes", type=float, default=None,
                        help="time a few steps first and set --steps to fill this many minutes of training")
    parser.add_argument("--max-minutes", type=float, default=15.0, help="safety stop (wall clock, data included)")
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--tokens-per-step", type=int, default=32768)
    parser.add_argument("--topk", type=int, default=256)
    parser.add_argument("--dense-fraction", type=float, default=0.35)
    parser.add_argument("--retrieval-fraction", type=float, default=0.6)
    parser.add_argument("--repeat-fraction", type=float, default=0.0,
                        help="sequences with verbatim repeated spans (copying practice)")
    parser.add_argument("--needle-words", choices=["essay", "random"], default="essay",
                        help="needle places and spans from the essays, or made up (random: the model cannot "
                             "memorise them and must copy; the essays are only ~160K tokens)")
    parser.add_argument("--repeat-tokens", choices=["text", "random", "mixed"], default="text",
                        help="what --repeat-fraction sequences repeat: a span of the text, random tokens, or either "
                             "(mixed, half each: copying learned on random tokens must also win over the language "
                             "model's own guess on real words)")
    parser.add_argument("--repeat-alphabet", type=int, default=0,
                        help="half of the random-token repeat sequences draw all their spans from this many tokens "
                             "(0: off), so copying must match several tokens back, as BPE pieces of rare words need")
    parser.add_argument("--indexer-types", default=None,
                        help="glm_moe_dsa: comma-separated per-layer indexer types (default full,full,shared,full)")
    parser.add_argument("--copy-warmup", type=float, default=0.0,
                        help="fraction of the first steps trained on random spans and their copies only: induction "
                             "heads form there first (mixed in at 10%% of the tokens, they had not formed after "
                             "3685 steps), and retrieval reuses them")
    parser.add_argument("--copy-length", type=int, default=128, help="sequence length of the --copy-warmup steps")
    parser.add_argument("--essay-share", type=float, default=0.5,
                        help="share of essays (vs code) in text windows and needle backgrounds")
    parser.add_argument("--shared-kl-grad", action="store_true",
                        help="GLM-5: the KL term of a shared layer (which reuses the previous indexer's top-k) also "
                             "trains the layers below that indexer, not only the indexer")
    parser.add_argument("--kl-queries", type=int, default=512, help="query rows per sequence in the KL loss")
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--indexer-weight-decay", type=float, default=None,
                        help="AdamW's decay of the indexers' projections (default: --weight-decay)")
    parser.add_argument("--attention-heads", type=int, default=None,
                        help="heads of the main attention (default 4, head dim 32 whatever the count)")
    parser.add_argument("--q-lora-rank", type=int, default=None,
                        help="rank of the query latent that every indexer head's query (and the main attention's) "
                             "is projected from (default 96; DeepSeek-V3.2 has 1536)")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--code-bytes", type=int, default=6_000_000)
    parser.add_argument("--tokenizer-code-bytes", type=int, default=None,
                        help="code characters the BPE is trained on (default: all the code read)")
    parser.add_argument("--heldout-essays", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--small", action="store_true", help="a much smaller main model (CPU smoke test)")
    parser.add_argument("--checkpoint-steps", default="",
                        help="comma-separated step counts after which the model so far is also written to "
                             "OUT/step-N (same files as the final model), e.g. 1050,2000")
    return parser.parse_args(argv)


if __name__ == "__main__":
    train(parse_args(sys.argv[1:]))
