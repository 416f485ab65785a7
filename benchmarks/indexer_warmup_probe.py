"""Does more indexer training make a trained model's heads more routable? Continues DeepSeek's dense warm-up on a
built-in model: the indexers alone learn the KL to the main attention (the rest frozen), and `router_oracle`'s
per-layer report (router recall, greedy best-8 bound, the heads' concentration) is printed before and every
`--report-every` steps. `--reinit` starts the indexers afresh instead (DeepSeek's warm-up as it was: a new indexer on a
trained model), so that recipe choices such as `--weight-decay` can be compared on a fixed main model. `--sparse`
continues the training's sparse phase instead: the whole model learns (LM loss, and the indexers' KL over the keys
they select, as `train_small_dsa.training_step` takes it), to see whether that phase is what concentrates the heads.

    python benchmarks/indexer_warmup_probe.py --family deepseek_v32 --haystack ../shared/data/haystack/... \
        [--steps 100 --length 1024 --tokens-per-step 4096 --lr 3e-4 --weight-decay 0 --reinit | --sparse]

CPU is enough (about 5 s a step on 2 cores at the defaults; --sparse about 10). Uses the training script's data,
step, indexer forward and KL attention (examples/train_small_dsa.py, small_dsa_data.py, small_dsa_kl.py), with the
settings the model was trained with (its training.json).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))  # the training script's modules
import train_small_dsa as training  # noqa: E402
from small_dsa_kl import patch_for_kl_training, unpatch_kl_training  # noqa: E402  (the training's indexer KL)
from router_oracle import capture_indexer_inputs, layer_report, WINDOW  # noqa: E402  (this folder)
from small_dsa_data import Batches, load_text  # noqa: E402

from transformers_misa import unpatch_model  # noqa: E402
from transformers_misa.trained import TRAINED_FAMILIES, load_trained, trained_model_dir, training_info  # noqa: E402


def report(model, eval_ids: torch.Tensor, tag: str) -> None:
    """`router_oracle`'s lines for every indexer layer on `eval_ids`; leaves the model unpatched."""
    model.eval()
    for layer, inputs in sorted(capture_indexer_inputs(model, eval_ids).items()):
        print(f"{tag} L{layer}: {layer_report(*inputs)}", flush=True)
    unpatch_model(model)


def reinitialize(indexer: torch.nn.Module, std: float) -> None:
    """Fresh weights for an indexer's projections (normal, `std`, as the model's own init) and unit key norm."""
    with torch.no_grad():
        for module in indexer.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0.0, std)
            elif isinstance(module, torch.nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()


def make_optimizer(model, indexers: list, lr: float, weight_decay: float, sparse: bool) -> torch.optim.Optimizer:
    """AdamW over what the probe trains, with gradients on for exactly that: every weight with `sparse` (the
    training's groups), else the indexers alone (the rest frozen)."""
    for parameter in model.parameters():
        parameter.requires_grad_(sparse)
    if sparse:
        groups = training.parameter_groups(model, weight_decay, None)
    else:
        groups = [p for indexer in indexers for p in indexer.parameters()]
        for parameter in groups:
            parameter.requires_grad_(True)
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", choices=TRAINED_FAMILIES, default="deepseek_v32")
    parser.add_argument("--haystack", required=True, help="folder of the essays the model was trained on")
    parser.add_argument("--stdlib", default=os.path.dirname(os.__file__), help="Python standard library folder")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--report-every", type=int, default=100)
    parser.add_argument("--length", type=int, default=1024, help="sequence length")
    parser.add_argument("--tokens-per-step", type=int, default=4096)
    parser.add_argument("--kl-queries", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--code-bytes", type=int, default=4_000_000)
    parser.add_argument("--weight-decay", type=float, default=0.0, help="AdamW's decay of the indexers' weights")
    parser.add_argument("--reinit", action="store_true",
                        help="start the indexers from fresh random weights, as DeepSeek's warm-up started its new "
                             "indexer on a trained dense model (default: continue the trained indexers)")
    parser.add_argument("--sparse", action="store_true",
                        help="continue the sparse phase (whole model, LM loss + the KL over the selected keys; "
                             "--weight-decay then applies to every weight) instead of the indexers' dense warm-up")
    args = parser.parse_args()
    if args.sparse and args.reinit:
        parser.error("--sparse continues the trained model as it is: leave out --reinit")
    torch.manual_seed(0)
    model, tokenizer = load_trained(args.family)
    info = training_info(trained_model_dir(args.family))
    held_out = "\n".join((Path(args.haystack) / name).read_text() for name in info["data"]["heldout_essays"])
    eval_ids = torch.tensor([[tokenizer.bos_token_id]
                             + tokenizer(held_out, add_special_tokens=False)["input_ids"][:WINDOW - 1]])
    report(model, eval_ids, "step 0")

    trained_with = argparse.Namespace(**{**info["args"], "haystack": args.haystack})
    text = load_text(Path(args.stdlib), Path(args.haystack), trained_with.heldout_essays, args.code_bytes, seed=1)
    batches = Batches.from_args(tokenizer, text, trained_with, seed=1)  # not the training run's seed
    indexers = patch_for_kl_training(model)
    if args.reinit:
        for indexer in indexers:
            reinitialize(indexer, model.config.initializer_range)
    optimizer = make_optimizer(model, indexers, args.lr, args.weight_decay, args.sparse)
    generator, start = torch.Generator().manual_seed(0), time.perf_counter()
    low = min(args.length - 1, info["args"]["topk"])
    for step in range(1, args.steps + 1):
        model.train()
        ids, weights = batches.batch(max(1, args.tokens_per_step // args.length), args.length, torch.device("cpu"))
        rows = (low + torch.randperm(args.length - low, generator=generator)[: args.kl_queries]).sort().values
        # The training's own step in either phase (clipping and the non-finite skip included): in the dense
        # warm-up the frozen main model leaves the KL as the only loss with a gradient, so the indexers alone learn.
        lm, kl_terms, _ = training.training_step(model, optimizer, ids, weights, args.sparse, rows, ids.device)
        if step % 10 == 0:
            print(f"step {step} ({time.perf_counter() - start:.0f} s): LM {float(lm):.4f}, KL per layer "
                  f"{[round(float(term), 4) for term in kl_terms]}", flush=True)
        if step % args.report_every == 0 or step == args.steps:
            unpatch_kl_training(model)
            report(model, eval_ids, f"step {step}")
            if step < args.steps:
                patch_for_kl_training(model)


if __name__ == "__main__":
    main()
