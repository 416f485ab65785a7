"""The training data of examples/train_small_dsa.py: standard-library code and essays read from disk, and seeded
training sequences (plain text windows, needles with a question, text whose spans recur verbatim)."""

from __future__ import annotations

import argparse
import random
import re
from pathlib import Path
from typing import Any

import torch

from transformers_misa.evaluation.niah import QUESTION_TEMPLATE

TEMPLATES = [  # (needle, question); the answer repeats the needle
    ("The best thing to do in {place} is {span}.", "What is the best thing to do in {place}?"),
    ("The most important thing about {place} is {span}.", "What is the most important thing about {place}?"),
    ("The secret of {place} is {span}.", "What is the secret of {place}?"),
]


def load_text(stdlib: Path, haystack: Path, heldout_essays: int, code_bytes: int, seed: int) -> dict[str, Any]:
    """Code (standard-library .py files, seeded order, up to `code_bytes`) and essays (training / held-out split)."""
    essays = sorted(p for p in haystack.iterdir() if p.suffix == ".txt")
    if len(essays) <= heldout_essays:
        raise ValueError(f"{haystack} has {len(essays)} .txt files; need more than --heldout-essays={heldout_essays}")
    files = sorted(p for p in stdlib.rglob("*.py") if not {"site-packages", "test", "tests"} & set(p.parts))
    if not files:
        raise ValueError(f"no .py files under --stdlib {stdlib}")
    random.Random(seed).shuffle(files)
    code, size = [], 0
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        code.append(text)
        size += len(text)
        if size >= code_bytes:
            break
    read = lambda paths: [p.read_text(encoding="utf-8", errors="replace").strip() for p in paths]  # noqa: E731
    return dict(code=code, essays=read(essays[:-heldout_essays]), code_files=len(code),
                train_essays=[p.name for p in essays[:-heldout_essays]],
                heldout_essays=[p.name for p in essays[-heldout_essays:]])


class Batches:
    """Seeded training sequences: plain text windows, or background text with needles and a question."""

    def __init__(self, tokenizer: Any, text: dict[str, Any], seed: int, retrieval_fraction: float,
                 repeat_fraction: float = 0.0, essay_share: float = 0.5, needle_words: str = "essay",
                 repeat_tokens: str = "text", repeat_alphabet: int = 0) -> None:
        self.tokenizer, self.rng = tokenizer, random.Random(seed)
        self.retrieval_fraction, self.repeat_fraction, self.essay_share = retrieval_fraction, repeat_fraction, essay_share
        self.needle_words, self.repeat_tokens, self.repeat_alphabet = needle_words, repeat_tokens, repeat_alphabet
        self.copy_only = False  # induction warm-up (--copy-warmup): every sequence is random spans and their copies
        encode = lambda parts: torch.tensor(  # noqa: E731
            [i for ids in tokenizer(parts, add_special_tokens=False)["input_ids"] for i in ids + [tokenizer.eos_token_id]])
        self.sources = {"code": encode(text["code"]), "essays": encode(text["essays"])}
        essay_text = "\n".join(text["essays"])
        self.places = sorted(set(re.findall(r"\b[A-Z][a-z]{3,11}\b", essay_text)))
        self.sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", essay_text) if 6 <= len(s.split()) <= 40]
        self.words = sorted(set(re.findall(r"\b[a-z]{2,12}\b", essay_text)))

    @classmethod
    def from_args(cls, tokenizer: Any, text: dict[str, Any], args: argparse.Namespace, seed: int) -> "Batches":
        """The data mix the command line asks for."""
        return cls(tokenizer, text, seed, args.retrieval_fraction, args.repeat_fraction, args.essay_share,
                   args.needle_words, args.repeat_tokens, args.repeat_alphabet)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _window(self, length: int) -> list[int]:
        ids = self.sources["essays" if self.rng.random() < self.essay_share else "code"]
        start = self.rng.randrange(0, len(ids) - length - 1)
        return ids[start: start + length].tolist()

    def _needle(self) -> tuple[str, str, str]:
        if self.rng.random() < 0.3:
            key = str(self.rng.randrange(10000, 100000))
            return (f"The pass key is {key}. Remember it. {key} is the pass key.", "What is the pass key?",
                    f"The pass key is {key}.")
        needle, question = self.rng.choice(TEMPLATES)
        if self.needle_words == "random":  # nothing to memorise: only copying from the context predicts them
            span = " ".join(self.rng.choice(self.words) for _ in range(self.rng.randrange(5, 13)))
            place = " ".join(self._pseudo_word() for _ in range(self.rng.choice([1, 1, 2])))
        else:  # a piece of an essay sentence and capitalised essay words
            words = self.rng.choice(self.sentences).rstrip(".!?").split()
            cut = self.rng.randrange(0, max(1, len(words) - 12))
            span = " ".join(words[cut: cut + self.rng.randrange(5, 13)])
            span = span[0].lower() + span[1:]
            place = " ".join(self.rng.sample(self.places, self.rng.choice([1, 1, 2])))
        sentence = needle.format(place=place, span=span)
        return sentence, question.format(place=place), sentence

    def _pseudo_word(self) -> str:
        """A capitalised made-up name of 2-4 syllables ("Tavoremi")."""
        syllables = [self.rng.choice("bdfgklmnprstvz") + self.rng.choice("aeiou")
                     for _ in range(self.rng.randrange(2, 5))]
        return "".join(syllables).capitalize()

    def sequence(self, length: int) -> tuple[list[int], list[float]]:
        """`length` token ids starting with bos, and a loss weight per id (answer tokens weigh 10)."""
        bos = [self.tokenizer.bos_token_id]
        if self.copy_only:
            return self._random_repeats(bos + self._window(length - 1), [1.0] * length, cover=0.45)
        draw = self.rng.random()
        if draw < self.repeat_fraction:
            return self._repeat(length)
        if draw >= self.repeat_fraction + self.retrieval_fraction:
            return bos + self._window(length - 1), [1.0] * length
        needle, question, answer = self._needle()
        inserts = [self._encode(" " + needle)] + [self._encode(" " + self._needle()[0])
                                                  for _ in range(self.rng.randrange(0, 3))]
        tail = self._encode(QUESTION_TEMPLATE.format(question=question))
        answer_ids = self._encode(" " + answer) + [self.tokenizer.eos_token_id]
        budget = lambda: length - 1 - sum(map(len, inserts)) - len(tail) - len(answer_ids)  # noqa: E731
        while budget() < length // 4 and len(inserts) > 1:
            inserts.pop()  # short sequences: fewer distractors
        if budget() < length // 4:
            return bos + self._window(length - 1), [1.0] * length
        hay = self._window(budget())
        for ids in inserts:
            at = self.rng.randrange(0, len(hay) + 1)
            hay = hay[:at] + ids + hay[at:]
        ids = bos + hay + tail + answer_ids
        return ids, [1.0] * (len(ids) - len(answer_ids)) + [10.0] * len(answer_ids)

    def _repeat(self, length: int) -> tuple[list[int], list[float]]:
        """Background text in which a few earlier spans (16-128 tokens) recur verbatim later: dense copying
        signal, from which induction (and so retrieval) is learned much sooner than from needles alone."""
        ids = [self.tokenizer.bos_token_id] + self._window(length - 1)
        weights = [1.0] * length
        if self.repeat_tokens == "random" or (self.repeat_tokens == "mixed" and self.rng.random() < 0.5):
            few = self.repeat_alphabet > 0 and self.rng.random() < 0.5
            return self._random_repeats(ids, weights, alphabet=self.repeat_alphabet if few else 0)
        for _ in range(self.rng.randrange(1, 4)):
            span = self.rng.randrange(16, min(128, length // 4) + 1)
            source = self.rng.randrange(1, length - 2 * span)
            target = self.rng.randrange(source + span, length - span + 1)
            ids[target: target + span] = ids[source: source + span]
            weights[target + 1: target + span] = [2.0] * (span - 1)
        return ids, weights

    def _random_repeats(self, ids: list[int], weights: list[float], cover: float = 1 / 3,
                        alphabet: int = 0) -> tuple[list[int], list[float]]:
        """Spans of random tokens (8-128), each recurring once later, none overlapping, until the copies cover about
        `cover` of the sequence: only induction predicts them, and densely (a run whose copies covered ~5% of its
        tokens never learned to copy in 1444 steps). `alphabet` > 0: every span draws from the same `alphabet`
        tokens, so one token recurs often and only the tokens before it tell where a copy continues (drawn from the
        whole vocabulary, a model learned to copy by the last token alone and lost rare words that BPE splits into
        common pieces: "sandw" + "ich")."""
        length, taken, covered = len(ids), [False] * len(ids), 0
        taken[0] = True
        first_plain = len(self.tokenizer.all_special_ids)  # the special tokens have the lowest ids
        symbols = (self.rng.sample(range(first_plain, len(self.tokenizer)), alphabet) if alphabet
                   else range(first_plain, len(self.tokenizer)))
        for _ in range(64 if cover <= 1 / 3 else 256):  # placement tries
            if covered >= int(length * cover + 1e-9):
                break
            span = self.rng.randrange(8, max(9, min(128, length // 8) + 1))
            source = self.rng.randrange(1, length - 2 * span)
            target = self.rng.randrange(source + span, length - span + 1)
            if any(taken[source: source + span]) or any(taken[target: target + span]):
                continue
            piece = [self.rng.choice(symbols) for _ in range(span)]
            ids[source: source + span] = ids[target: target + span] = piece
            taken[source: source + span] = taken[target: target + span] = [True] * span
            weights[target + 1: target + span] = [2.0] * (span - 1)
            covered += span
        return ids, weights

    def batch(self, size: int, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.sequence(length) for _ in range(size)]
        ids = torch.tensor([r[0] for r in rows], device=device)
        return ids, torch.tensor([r[1] for r in rows], device=device)
