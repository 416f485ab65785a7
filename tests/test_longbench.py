"""LongBench runner: metrics on hand-computed strings, jsonl loading, end-to-end runs on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from transformers_misa import patch_model
from transformers_misa.evaluation import longbench as lb
from transformers_misa.tiny import tiny_model

# ------------------------------------------------------------------------------------------------ metrics


def test_qa_f1_score() -> None:
    assert lb.normalize_answer("The  Eiffel-Tower, an icon!") == "eiffeltower icon"
    assert lb.qa_f1_score("The Eiffel Tower!", "eiffel tower") == 1.0
    # prediction {paris, france}, truth {paris}: P = 1/2, R = 1, F1 = 2/3
    assert lb.qa_f1_score("Paris, France", "paris") == pytest.approx(2 / 3)
    # repeated tokens count as a bag: pred [a1, a1, b], truth [a1, c] -> common 1, P 1/3, R 1/2, F1 0.4
    assert lb.qa_f1_score("x x y", "x z") == pytest.approx(0.4)
    assert lb.qa_f1_score("London", "Paris") == 0.0
    assert lb.qa_f1_score("the", "a") == 0.0  # both normalize to nothing


def test_qa_f1_zh_score_is_character_level() -> None:
    # characters 我 爱 北 京 vs 我 爱 上 海 (punctuation and spaces dropped): 2 common, P = R = 1/2
    assert lb.qa_f1_zh_score("我爱北京。", "我爱 上海") == pytest.approx(0.5)
    assert lb.qa_f1_zh_score("北京！", "北京") == 1.0
    assert lb.qa_f1_zh_score("，。", "北京") == 0.0


def test_rouge_score() -> None:
    # distinct words 5 and 5; LCS "the cat on the mat" -> distinct {the, cat, on, mat} = 4: P = R = 0.8
    assert lb.rouge_score("the cat sat on the mat", "the cat was on the mat") == pytest.approx(0.8, abs=1e-7)
    # the `rouge` package's summary level: sentences split at "." and the union of per-sentence LCS words
    # ref "a c" | "b d", hyp "a b" | "c d": unions {a, c} and {b, d} -> 4 of 4 words
    assert lb.rouge_score("a b. c d", "a c. b d") == pytest.approx(1.0, abs=1e-7)
    # 1 of 2 reference words, 1 of 4 prediction words: F = 2 * (1/4 * 1/2) / (3/4) = 1/3
    assert lb.rouge_score("x y z w", "x q") == pytest.approx(1 / 3, abs=1e-7)
    assert lb.rouge_score("", "x q") == 0.0
    assert lb.rouge_score("...", "x q") == 0.0  # no sentence left: the package raises, LongBench scores 0
    assert lb.rouge_score("k l", "x q") == 0.0


def test_rouge_zh_score_is_character_level() -> None:
    # 我 爱 北 京 vs 我 爱 上 海: LCS 我爱, P = R = 1/2
    assert lb.rouge_zh_score("我爱北京", "我爱上海") == pytest.approx(0.5, abs=1e-7)
    assert lb.rouge_zh_score("我 爱北京", "我爱北京") == pytest.approx(1.0, abs=1e-7)


def test_classification_score() -> None:
    classes = ["location", "abbreviation", "entity"]
    assert lb.classification_score("location", "location", all_classes=classes) == 1.0
    assert lb.classification_score("location or entity", "location", all_classes=classes) == 0.5
    assert lb.classification_score("entity", "location", all_classes=classes) == 0.0
    # a matched class inside the true class (and not it) is dropped: only "Fast food" counts
    assert lb.classification_score("Fast food", "Fast food", all_classes=["Food", "Fast food"]) == 1.0
    assert lb.classification_score("anything", "location", all_classes=None) == 0.0


def test_retrieval_and_count_scores() -> None:
    assert lb.retrieval_score("Paragraph 3", "Paragraph 3") == 1.0
    assert lb.retrieval_score("Paragraph 3, not Paragraph 5", "Paragraph 3") == 0.5
    assert lb.retrieval_score("Paragraph 13", "Paragraph 3") == 0.0  # whole numbers, not digits
    assert lb.retrieval_score("no idea", "Paragraph 3") == 0.0
    assert lb.retrieval_zh_score("段落2 和 段落7", "段落2") == 0.5
    assert lb.count_score("There are 4 unique paragraphs out of 10 4", "4") == pytest.approx(2 / 3)
    assert lb.count_score("four", "4") == 0.0


def test_code_sim_score() -> None:
    # "return x + 1" vs "return x+1": 10 matching characters of 12 + 10 -> 20/22 = 0.909 -> 0.91
    assert lb.code_sim_score("return x + 1\n", "return x+1") == 0.91
    # lines with ` or # or // are skipped; leading newlines are stripped
    assert lb.code_sim_score("\n```python\n# comment\n// c\nreturn x+1\n", "return x+1") == 1.0
    assert lb.code_sim_score("# only a comment", "return x+1") == 0.0
    assert lb.code_sim_score("abcd", "abce") == 0.75


def test_scorer_first_line_and_max_over_answers() -> None:
    # trec / triviaqa / samsum / lsht score the first line only
    assert lb.score_sample("trec", "\nlocation\nentity", ["location"], ["location", "entity"]) == 1.0
    assert lb.score_sample("triviaqa", "Paris\nLondon", ["London"]) == 0.0
    assert lb.score_sample("hotpotqa", "Paris\nLondon", ["London"]) == pytest.approx(2 / 3)
    # max over the answers
    assert lb.score_sample("hotpotqa", "Paris France", ["Rome", "paris", "Paris France"]) == 1.0
    # LongBench-E names are the same tasks
    assert lb.score_sample("qasper_e", "yes", ["yes"]) == 1.0
    # 100 * mean, 2 decimals: (1 + 0 + 0) / 3 -> 33.33
    assert lb.score_predictions("hotpotqa", ["a b c", "x", "y"], [["b c"], ["z"], ["w"]]) == 33.33


def test_task_table() -> None:
    expected = {
        "narrativeqa": "qa_f1_score", "qasper": "qa_f1_score", "multifieldqa_en": "qa_f1_score",
        "multifieldqa_zh": "qa_f1_zh_score", "hotpotqa": "qa_f1_score", "2wikimqa": "qa_f1_score",
        "musique": "qa_f1_score", "dureader": "rouge_zh_score", "gov_report": "rouge_score",
        "qmsum": "rouge_score", "multi_news": "rouge_score", "vcsum": "rouge_zh_score",
        "trec": "classification_score", "triviaqa": "qa_f1_score", "samsum": "rouge_score",
        "lsht": "classification_score", "passage_count": "count_score",
        "passage_retrieval_en": "retrieval_score", "passage_retrieval_zh": "retrieval_zh_score",
        "lcc": "code_sim_score", "repobench-p": "code_sim_score",
    }
    assert {task: metric.__name__ for task, metric in lb.TASK_METRICS.items()} == expected
    assert set(lb.TASK_MAX_NEW_TOKENS) == set(expected)
    with pytest.raises(ValueError, match="unknown LongBench task 'hotpot'"):
        lb.score_sample("hotpot", "x", ["x"])


def test_truncate_middle() -> None:
    assert lb.truncate_middle(range(5), 8) == [0, 1, 2, 3, 4]
    assert lb.truncate_middle(range(10), 4) == [0, 1, 8, 9]
    assert lb.truncate_middle(range(10), 5) == [0, 1, 8, 9]  # int(5 / 2) from each end, as LongBench


# ------------------------------------------------------------------------------------------------ loading

SAMPLES = [
    {"input": "Where is the tower?", "context": "The tower is in paris . " * 30, "answers": ["Paris"],
     "length": 180, "all_classes": None, "_id": "a"},
    {"input": "Which city is old?", "context": "The old city is rome . " * 40, "answers": ["Rome"],
     "length": 240, "all_classes": None, "_id": "b"},
    {"input": "What is blue?", "context": "The blue sky is over london . " * 10, "answers": ["the blue sky", "sky"],
     "length": 70, "all_classes": None, "_id": "c"},
]


def _write(path, lines: list[str]):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def data_file(tmp_path):
    return _write(tmp_path / "hotpotqa.jsonl", [json.dumps(sample) for sample in SAMPLES])


def test_load_longbench_jsonl(data_file, tmp_path) -> None:
    samples = lb.load_longbench_jsonl(data_file)
    assert [s["_id"] for s in samples] == ["a", "b", "c"] and samples[2]["answers"] == ["the blue sky", "sky"]
    count = _write(tmp_path / "count.jsonl", [json.dumps({**SAMPLES[0], "answers": [4]}), ""])
    assert lb.load_longbench_jsonl(count)[0]["answers"] == ["4"]  # numbers become strings, blank lines skipped


def test_load_missing_field_names_the_line(tmp_path) -> None:
    broken = {k: v for k, v in SAMPLES[2].items() if k != "answers"}
    path = _write(tmp_path / "bad.jsonl", [json.dumps(SAMPLES[0]), json.dumps(SAMPLES[1]), json.dumps(broken)])
    with pytest.raises(ValueError, match=r"bad\.jsonl: line 3: missing field 'answers'"):
        lb.load_longbench_jsonl(path)
    no_classes = {k: v for k, v in SAMPLES[0].items() if k != "all_classes"}
    path = _write(tmp_path / "bad2.jsonl", [json.dumps(no_classes)])
    with pytest.raises(ValueError, match="line 1: missing field 'all_classes'"):
        lb.load_longbench_jsonl(path)


def test_load_malformed_lines(tmp_path) -> None:
    lines = [json.dumps(SAMPLES[0]), '{"input": "x", "context": ', json.dumps(SAMPLES[1])]
    path = _write(tmp_path / "bad.jsonl", lines)
    with pytest.raises(ValueError, match=r"bad\.jsonl: line 2: malformed JSON"):
        lb.load_longbench_jsonl(path)
    path = _write(tmp_path / "list.jsonl", [json.dumps([1, 2])])
    with pytest.raises(ValueError, match="line 1: expected a JSON object"):
        lb.load_longbench_jsonl(path)
    path = _write(tmp_path / "answers.jsonl", [json.dumps({**SAMPLES[0], "answers": "Paris"})])
    with pytest.raises(ValueError, match="line 1: field 'answers' must be a non-empty list"):
        lb.load_longbench_jsonl(path)
    path = _write(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(ValueError, match="no samples"):
        lb.load_longbench_jsonl(path)


# ------------------------------------------------------------------------------------------------ runner


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    texts = [lb.DEFAULT_PROMPT_TEMPLATE.format(context=s["context"], input=s["input"]) for s in SAMPLES]
    texts += ["london paris rome sky blue city tower old the a is in over", "Answer : Question :"]
    # filler words up to the model's 512 ids, so every generated id decodes to a word
    texts += [" ".join(f"w{i}" for i in range(600))]
    raw = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator(texts, trainers.WordLevelTrainer(vocab_size=512, special_tokens=["[UNK]", "[PAD]"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", pad_token="[PAD]")
    assert len(tok) == 512 and tok.convert_tokens_to_ids("paris") != tok.unk_token_id
    return tok


class _RecordingGenerate:
    """Wraps model.generate: records the prompt ids of each call (and can answer with fixed texts instead)."""

    def __init__(self, model, tokenizer=None, answers=None):
        self.model, self.original, self.tokenizer, self.answers = model, model.generate, tokenizer, answers
        self.prompts: list[list[int]] = []

    def __call__(self, input_ids, **kwargs):
        self.prompts.append(input_ids[0].tolist())
        assert kwargs["do_sample"] is False and kwargs["num_beams"] == 1
        if self.answers is None:
            return self.original(input_ids=input_ids, **kwargs)
        new = self.tokenizer(self.answers[len(self.prompts) - 1])["input_ids"]
        return torch.cat([input_ids, torch.tensor([new], dtype=input_ids.dtype)], dim=1)


def _check_result(result, tokenizer, recorder, max_length: int, max_new_tokens: int) -> None:
    assert result["task"] == "hotpotqa" and result["metric"] == "qa_f1_score" and result["n"] == 3
    assert [p["_id"] for p in result["predictions"]] == ["a", "b", "c"]
    per_sample = [lb.qa_f1_score(p["pred"], p["answers"][0]) if len(p["answers"]) == 1
                  else max(lb.qa_f1_score(p["pred"], a) for a in p["answers"]) for p in result["predictions"]]
    assert [p["score"] for p in result["predictions"]] == per_sample
    assert result["score"] == round(100 * sum(per_sample) / 3, 2)
    assert result["score"] == lb.score_predictions("hotpotqa", [p["pred"] for p in result["predictions"]],
                                                   [p["answers"] for p in result["predictions"]])
    # prompts: first and last half kept when too long, untouched otherwise
    assert len(recorder.prompts) == 3
    for sample, prompt in zip(SAMPLES, recorder.prompts):
        full = tokenizer(lb.DEFAULT_PROMPT_TEMPLATE.format(context=sample["context"], input=sample["input"]))
        full = full["input_ids"]
        if len(full) > max_length:
            assert prompt == full[:max_length // 2] + full[-(max_length // 2):]
        else:
            assert prompt == full
    assert any(len(tokenizer(lb.DEFAULT_PROMPT_TEMPLATE.format(**{"context": s["context"], "input": s["input"]}))
                   ["input_ids"]) > max_length for s in SAMPLES)
    for p in result["predictions"]:
        assert isinstance(p["pred"], str) and len(p["pred"].split()) <= max_new_tokens


@pytest.mark.parametrize("patched", [False, True], ids=["dsa", "misa"])
def test_run_longbench_end_to_end(data_file, tokenizer, monkeypatch, patched: bool) -> None:
    model = tiny_model("deepseek_v32")
    if patched:
        patch_model(model, mode="misa", active_heads=8, block_size=32)
    recorder = _RecordingGenerate(model)
    monkeypatch.setattr(model, "generate", recorder)
    result = lb.run_longbench(model, tokenizer, data_file, "hotpotqa", max_length=160, max_new_tokens=4,
                              progress=False)
    _check_result(result, tokenizer, recorder, max_length=160, max_new_tokens=4)
    assert all(p["pred"] for p in result["predictions"])  # a random model still says something


def test_run_longbench_scores_known_predictions(data_file, tokenizer, monkeypatch) -> None:
    model = tiny_model("deepseek_v32")
    recorder = _RecordingGenerate(model, tokenizer, answers=["paris [PAD]", "london", "blue sky"])
    monkeypatch.setattr(model, "generate", recorder)
    result = lb.run_longbench(model, tokenizer, data_file, "hotpotqa", max_length=64, max_new_tokens=8,
                              progress=False)
    _check_result(result, tokenizer, recorder, max_length=64, max_new_tokens=8)
    assert [p["pred"] for p in result["predictions"]] == ["paris", "london", "blue sky"]
    # special tokens are not decoded; paris = Paris (1); london vs Rome (0); "blue sky" vs "the blue sky" (1) -> 66.67
    assert [p["score"] for p in result["predictions"]] == [1.0, 0.0, 1.0]
    assert result["score"] == 66.67

    monkeypatch.setattr(model, "generate", _RecordingGenerate(model, tokenizer, answers=["paris", "rome"]))
    limited = lb.run_longbench(model, tokenizer, data_file, "hotpotqa", max_length=64, max_new_tokens=8,
                               limit=2, progress=False)
    assert limited["n"] == 2 and len(limited["predictions"]) == 2 and limited["score"] == 100.0


def test_run_longbench_custom_template(data_file, tokenizer, monkeypatch) -> None:
    model = tiny_model("deepseek_v32")
    recorder = _RecordingGenerate(model, tokenizer, answers=["rome"] * 3)
    monkeypatch.setattr(model, "generate", recorder)
    result = lb.run_longbench(model, tokenizer, data_file, "hotpotqa_e", max_length=512, max_new_tokens=2,
                              prompt_template="Question : {input} {context} Answer :", progress=False)
    assert recorder.prompts[0] == tokenizer(f"Question : {SAMPLES[0]['input']} {SAMPLES[0]['context']} Answer :")[
        "input_ids"]
    assert result["task"] == "hotpotqa" and result["score"] == 33.33


def test_run_longbench_bad_input(data_file, tokenizer, monkeypatch, tmp_path) -> None:
    model = tiny_model("deepseek_v32")
    recorder = _RecordingGenerate(model, tokenizer, answers=["x"] * 3)
    monkeypatch.setattr(model, "generate", recorder)
    with pytest.raises(ValueError, match="unknown LongBench task 'hotpot_qa'"):
        lb.run_longbench(model, tokenizer, data_file, "hotpot_qa", max_length=64, max_new_tokens=2)
    broken = _write(tmp_path / "broken.jsonl", [json.dumps(SAMPLES[0]), json.dumps(SAMPLES[1]),
                                                json.dumps({k: v for k, v in SAMPLES[2].items() if k != "answers"})])
    with pytest.raises(ValueError, match="line 3: missing field 'answers'"):
        lb.run_longbench(model, tokenizer, broken, "hotpotqa", max_length=64, max_new_tokens=2)
    with pytest.raises(ValueError, match="prompt_template"):
        lb.run_longbench(model, tokenizer, data_file, "hotpotqa", max_length=64, max_new_tokens=2,
                         prompt_template="{question}")
    with pytest.raises(ValueError, match="limit"):
        lb.run_longbench(model, tokenizer, data_file, "hotpotqa", max_length=64, max_new_tokens=2, limit=0)
    assert recorder.prompts == []  # every check happens before the first generation
