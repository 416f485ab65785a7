"""LongBench-format runner on local jsonl files, with LongBench's metric per task, in pure Python.

    from transformers_misa.evaluation.longbench import run_longbench
    result = run_longbench(model, tokenizer, "data/hotpotqa.jsonl", "hotpotqa", max_length=31500, max_new_tokens=32)
    result["score"]        # 0-100, like LongBench's eval.py

Nothing is downloaded: each file is one jsonl in LongBench's format (fields `input`, `context`, `answers`,
`length`, `all_classes`, optional `_id`), e.g. the `data/*.jsonl` of LongBench's data.zip.

The metrics mirror THUDM/LongBench `metrics.py` and the scoring of `eval.py` (`scorer`: first line of the
prediction for trec/triviaqa/samsum/lsht, max over the answers, `round(100 * mean, 2)`), with these deviations
(no new dependencies):

- `qa_f1_zh_score`, `rouge_zh_score`: LongBench segments Chinese text into words with jieba; jieba is not
  available here, so both work on characters (every non-whitespace character a token; for F1 also without
  punctuation, as LongBench's `normalize_zh_answer`). Character-level scores are usually higher than word-level.
- `rouge_score`: a re-implementation of the `rouge` package's (pltrdy, 1.0.1) "rouge-l" "f", which LongBench
  calls: the texts are split into sentences at ".", words at " ", and the summary-level union LCS is counted over
  *distinct* words (that package's sets), F = 2PR/(P+R+1e-8). It matches that package, quirks included, except
  that it never fails on very long sentences (the package's recursive LCS reconstruction can hit Python's
  recursion limit, which LongBench turns into a score of 0).
- `code_sim_score`: LongBench uses `fuzzywuzzy.fuzz.ratio(...) / 100`; here it is
  `round(100 * difflib.SequenceMatcher(None, a, b).ratio()) / 100`, which is what fuzzywuzzy computes without
  python-Levenshtein (with it, the Levenshtein ratio can differ by a point or so).
- The runner: LongBench's `pred.py` decodes the kept first and last halves of an over-long prompt to text and
  tokenizes that text again; here the token ids themselves are kept, so the model sees at most `max_length` prompt
  tokens exactly. No chat template is applied (LongBench's `build_chat` is model-specific: put it in
  `prompt_template`), and samsum's extra stop rule (newline as EOS, `min_length`) is not applied.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from tqdm.auto import tqdm

# --------------------------------------------------------------------------------------------------- metrics


_ASCII_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(s: str) -> str:
    """LongBench `normalize_answer`: lower case, no punctuation, no articles (a/an/the), single spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _ASCII_PUNCTUATION)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


_CN_PUNCTUATION = ("！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—"
                   "‘’‛“”„‟…‧﹏.")
_ALL_PUNCTUATION = _ASCII_PUNCTUATION | frozenset(_CN_PUNCTUATION)


def normalize_zh_answer(s: str) -> str:
    """LongBench `normalize_zh_answer`: lower case, no (ASCII or Chinese) punctuation, no whitespace."""
    return "".join("".join(ch for ch in s.lower() if ch not in _ALL_PUNCTUATION).split())


def _f1(prediction_tokens: Sequence[str], ground_truth_tokens: Sequence[str]) -> float:
    """LongBench `f1_score`: bag-of-tokens F1."""
    num_same = sum((Counter(prediction_tokens) & Counter(ground_truth_tokens)).values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(prediction_tokens)
    recall = num_same / len(ground_truth_tokens)
    return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """Token F1 of the normalized answers (SQuAD style)."""
    return _f1(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def qa_f1_zh_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """Character F1 after `normalize_zh_answer` (LongBench: jieba words; see the module docstring)."""
    return _f1(list(normalize_zh_answer(prediction)), list(normalize_zh_answer(ground_truth)))


def _lcs_words(x: Sequence[str], y: Sequence[str]) -> list[str]:
    """One longest common subsequence of x and y, with the `rouge` package's `_recon_lcs` tie-breaking."""
    n, m = len(x), len(y)
    table = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        row, above, xi = table[i], table[i - 1], x[i - 1]
        for j in range(1, m + 1):
            row[j] = above[j - 1] + 1 if xi == y[j - 1] else max(above[j], row[j - 1])
    out: list[str] = []
    i, j = n, m
    while i > 0 and j > 0:
        if x[i - 1] == y[j - 1]:
            out.append(x[i - 1])
            i -= 1
            j -= 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return out[::-1]


def _sentences(text: str) -> list[str]:
    return [" ".join(part.split()) for part in text.split(".") if len(part) > 0]


def _words(sentences: Sequence[str]) -> list[str]:
    return [word for sentence in sentences for word in sentence.split(" ")]


def rouge_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """ROUGE-L F as `Rouge().get_scores([prediction], [ground_truth], avg=True)["rouge-l"]["f"]` (0 on failure)."""
    hyp, ref = _sentences(prediction), _sentences(ground_truth)
    if not hyp or not ref:  # the package raises ("Hypothesis is empty."); LongBench scores 0
        return 0.0
    m, n = len(set(_words(ref))), len(set(_words(hyp)))
    union: set[str] = set()
    for ref_sentence in ref:
        ref_words = ref_sentence.split(" ")
        for hyp_sentence in hyp:
            union.update(_lcs_words(ref_words, hyp_sentence.split(" ")))
    r, p = len(union) / m, len(union) / n
    return 2.0 * (p * r) / (p + r + 1e-8)


def rouge_zh_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """`rouge_score` on characters (LongBench: on jieba words; see the module docstring)."""
    return rouge_score(" ".join("".join(prediction.split())), " ".join("".join(ground_truth.split())))


def classification_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """LongBench: 1/len(matches) if the true class is among the classes named in the prediction, else 0.

    A matched class that is a substring of the true class (and not the true class) is dropped first; the list is
    edited while iterating, exactly as LongBench does.
    """
    all_classes = kwargs.get("all_classes") or []
    em_match_list = [class_name for class_name in all_classes if class_name in prediction]
    for match_term in em_match_list:  # noqa: B007 - mirrors LongBench, removal while iterating included
        if match_term in ground_truth and match_term != ground_truth:
            em_match_list.remove(match_term)
    return 1.0 / len(em_match_list) if ground_truth in em_match_list else 0.0


def _number_match(prediction: str, target: str) -> float:
    numbers = re.findall(r"\d+", prediction)
    return 0.0 if not numbers else sum(str(number) == str(target) for number in numbers) / len(numbers)


def retrieval_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """Share of the numbers in the prediction equal to N of the ground truth "Paragraph N"."""
    return _number_match(prediction, re.findall(r"Paragraph (\d+)", ground_truth)[0])


def retrieval_zh_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """Share of the numbers in the prediction equal to N of the ground truth "段落N"."""
    return _number_match(prediction, re.findall(r"段落(\d+)", ground_truth)[0])


def count_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """Share of the numbers in the prediction equal to the ground truth count."""
    return _number_match(prediction, ground_truth)


def code_sim_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """Similarity (0-1, 2 decimals) of the first prediction line without ` # // to the ground truth."""
    line = ""
    for candidate in prediction.lstrip("\n").split("\n"):
        if "`" not in candidate and "#" not in candidate and "//" not in candidate:
            line = candidate
            break
    if not line or not ground_truth:  # fuzzywuzzy: 0 for an empty string
        return 0.0
    return round(100 * difflib.SequenceMatcher(None, line, ground_truth).ratio()) / 100


Metric = Callable[..., float]

TASK_METRICS: dict[str, Metric] = {
    "narrativeqa": qa_f1_score,
    "qasper": qa_f1_score,
    "multifieldqa_en": qa_f1_score,
    "multifieldqa_zh": qa_f1_zh_score,
    "hotpotqa": qa_f1_score,
    "2wikimqa": qa_f1_score,
    "musique": qa_f1_score,
    "dureader": rouge_zh_score,
    "gov_report": rouge_score,
    "qmsum": rouge_score,
    "multi_news": rouge_score,
    "vcsum": rouge_zh_score,
    "trec": classification_score,
    "triviaqa": qa_f1_score,
    "samsum": rouge_score,
    "lsht": classification_score,
    "passage_retrieval_en": retrieval_score,
    "passage_count": count_score,
    "passage_retrieval_zh": retrieval_zh_score,
    "lcc": code_sim_score,
    "repobench-p": code_sim_score,
}

# LongBench's config/dataset2maxlen.json: its max_new_tokens per task (a convenience; run_longbench takes its own).
TASK_MAX_NEW_TOKENS: dict[str, int] = {
    "narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "multifieldqa_zh": 64, "hotpotqa": 32,
    "2wikimqa": 32, "musique": 32, "dureader": 128, "gov_report": 512, "qmsum": 512, "multi_news": 512,
    "vcsum": 512, "trec": 64, "triviaqa": 32, "samsum": 128, "lsht": 64, "passage_count": 32,
    "passage_retrieval_en": 32, "passage_retrieval_zh": 32, "lcc": 64, "repobench-p": 64,
}

# Few-shot tasks whose prediction is cut to its first line before scoring (LongBench eval.py).
FIRST_LINE_TASKS = frozenset({"trec", "triviaqa", "samsum", "lsht"})

DEFAULT_PROMPT_TEMPLATE = (
    "Read the text below and answer the question.\n\n{context}\n\n"
    "Question: {input}\nAnswer:"
)


def resolve_task(task: str) -> str:
    """The LongBench task name of `task` ("qasper_e" of LongBench-E is "qasper"); ValueError if unknown."""
    name = task[:-2] if task.endswith("_e") and task[:-2] in TASK_METRICS else task
    if name not in TASK_METRICS:
        raise ValueError(f"unknown LongBench task {task!r}; choose one of {sorted(TASK_METRICS)}")
    return name


def score_sample(task: str, prediction: str, answers: Sequence[str],
                 all_classes: Sequence[str] | None = None) -> float:
    """One sample's score (0-1) as LongBench `scorer`: first-line cut where due, max over `answers`."""
    task = resolve_task(task)
    if task in FIRST_LINE_TASKS:
        prediction = prediction.lstrip("\n").split("\n")[0]
    metric = TASK_METRICS[task]
    score = 0.0
    for ground_truth in answers:
        score = max(score, metric(prediction, ground_truth, all_classes=all_classes))
    return score


def score_predictions(task: str, predictions: Sequence[str], answers: Sequence[Sequence[str]],
                      all_classes: Sequence[str] | None = None) -> float:
    """The task score (0-100, 2 decimals) as LongBench `scorer`."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions but {len(answers)} answer lists")
    if not predictions:
        raise ValueError("no predictions to score")
    total = sum(score_sample(task, p, a, all_classes) for p, a in zip(predictions, answers))
    return round(100 * total / len(predictions), 2)


# --------------------------------------------------------------------------------------------------- data

REQUIRED_FIELDS = ("input", "context", "answers", "length", "all_classes")


def load_longbench_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The samples of a LongBench jsonl file (blank lines skipped).

    Raises:
        ValueError: a line is not a JSON object, lacks a field of `REQUIRED_FIELDS` (`all_classes` may be null),
            has `answers` that is not a non-empty list of strings (numbers are turned into strings), or the file
            holds no sample; the message names the file and the line ("data.jsonl: line 3: missing field 'answers'").
    """
    path = os.fspath(path)
    samples: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}: line {number}"
            try:
                sample = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: malformed JSON ({error.msg} at column {error.colno})") from None
            if not isinstance(sample, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(sample).__name__}")
            for field in REQUIRED_FIELDS:
                if field not in sample:
                    raise ValueError(f"{where}: missing field {field!r}")
            for field in ("input", "context"):
                if not isinstance(sample[field], str):
                    raise ValueError(f"{where}: field {field!r} must be a string, got {type(sample[field]).__name__}")
            answers = sample["answers"]
            if (not isinstance(answers, list) or not answers
                    or not all(isinstance(a, (str, int, float)) and not isinstance(a, bool) for a in answers)):
                raise ValueError(f"{where}: field 'answers' must be a non-empty list of strings, got {answers!r:.80}")
            sample["answers"] = [a if isinstance(a, str) else str(a) for a in answers]  # e.g. a count as a number
            classes = sample["all_classes"]
            if classes is not None and not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
                raise ValueError(f"{where}: field 'all_classes' must be null or a list of strings")
            samples.append(sample)
    if not samples:
        raise ValueError(f"{path}: no samples")
    return samples


# --------------------------------------------------------------------------------------------------- runner


def truncate_middle(input_ids: Sequence[int], max_length: int) -> list[int]:
    """LongBench's truncation: an over-long prompt keeps its first and last `max_length // 2` tokens."""
    ids = list(input_ids)
    if len(ids) <= max_length:
        return ids
    half = int(max_length / 2)
    return ids[:half] + ids[-half:]


def run_longbench(model: Any, tokenizer: Any, path: str | os.PathLike[str], task: str, *, max_length: int,
                  max_new_tokens: int, prompt_template: str | None = None, limit: int | None = None,
                  progress: bool = True) -> dict[str, Any]:
    """Greedy-generates an answer for each sample of a LongBench jsonl file and scores it as LongBench does.

    Args:
        model: a causal LM (patched or not) with `generate`.
        tokenizer: its tokenizer (called on the prompt text, decodes the new tokens with special tokens skipped).
        path: local jsonl file in LongBench's format (see `load_longbench_jsonl`).
        task: LongBench task name (a key of `TASK_METRICS`; a LongBench-E "<task>_e" means the same task).
        max_length: prompt tokens at most; longer prompts keep their first and last halves (LongBench).
        max_new_tokens: generated tokens at most (LongBench's per task: `TASK_MAX_NEW_TOKENS`).
        prompt_template: `str.format` template with `{context}` and `{input}` (e.g. LongBench's
            dataset2prompt entry); default `DEFAULT_PROMPT_TEMPLATE`.
        limit: score only the first `limit` samples.
        progress: show a tqdm bar.

    Returns:
        {"task", "metric", "score" (0-100, 2 decimals), "n", "predictions": [{"_id", "pred", "answers",
        "all_classes", "length", "score" (0-1)} per sample]}.
    """
    name = resolve_task(task)
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    template = DEFAULT_PROMPT_TEMPLATE if prompt_template is None else prompt_template
    try:
        template.format(context="", input="")
    except (KeyError, IndexError, ValueError) as error:
        raise ValueError(f"prompt_template must use only {{context}} and {{input}} fields: {error!r}") from None

    import torch

    samples = load_longbench_jsonl(path)
    if limit is not None:
        samples = samples[:limit]
    device = next(model.parameters()).device
    pad_token_id = tokenizer.pad_token_id
    if pad_token_id is None:
        pad_token_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    predictions: list[dict[str, Any]] = []
    for sample in tqdm(samples, desc=f"LongBench {name}", disable=not progress):
        prompt = template.format(context=sample["context"], input=sample["input"])
        ids = truncate_middle(tokenizer(prompt)["input_ids"], max_length)
        input_ids = torch.tensor([ids], dtype=torch.long, device=device)
        with torch.no_grad():
            output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                    max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                    pad_token_id=pad_token_id)
        pred = tokenizer.decode(output[0, input_ids.shape[1]:].tolist(), skip_special_tokens=True)
        predictions.append({
            "_id": sample.get("_id"), "pred": pred, "answers": sample["answers"],
            "all_classes": sample["all_classes"], "length": sample["length"],
            "score": score_sample(name, pred, sample["answers"], sample["all_classes"]),
        })
    score = round(100 * sum(p["score"] for p in predictions) / len(predictions), 2)
    return {"task": name, "metric": TASK_METRICS[name].__name__, "score": score, "n": len(predictions),
            "predictions": predictions}
