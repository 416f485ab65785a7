"""The benchmark scripts run (their CPU smoke paths); the speed numbers themselves come from GPU runs."""

import importlib
import json
import shutil

import pytest
import torch

from script_helpers import ROOT, load_script

BENCHMARKS = ROOT / "benchmarks"


def _load(name: str):
    return load_script("benchmarks", name)


def test_e2e_benchmark_smoke(tmp_path):
    rows = _load("bench_e2e").main(["--tiny", "--context", "160", "--new-tokens", "3", "--modes",
                                    "unpatched,dsa,misa8", "--out", str(tmp_path)])
    by_mode = {row["mode"]: row for row in rows}
    assert by_mode["dsa"]["tokens"] == by_mode["unpatched"]["tokens"]  # the exact mode changes nothing
    assert all(row["prefill_s"] > 0 and row["decode_tokens_per_s"] > 0 for row in rows)
    # The indexers' share is timed in every mode, the stock indexer of the unpatched model included.
    assert all(0 < row["prefill_indexer_s"] <= row["prefill_s"] and 0 < row["decode_indexer_s"] <= row["decode_s"]
               for row in rows)
    assert len(list(tmp_path.glob("bench_e2e-tiny-*.json"))) == 1


def test_graph_replay_check_records_every_indexer_field_and_names_the_first_difference(monkeypatch, tmp_path):
    """benchmarks/graph_replay_check.py on the CPU (eager against eager: no graph): every step records each indexer's
    inputs, projections and top-k, two runs agree, and a difference planted in one field is reported at its step and
    layer as the first differing field (what precedes it in the computation being equal)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # it imports its folder's bench_e2e by name
    check = _load("graph_replay_check")
    report = check.main(["--tiny", "--mode", "misa8", "--context", "300", "--steps", "3", "--out", str(tmp_path)])
    assert report["steps"] == 3 and report["replayed_vs_eager"] == [] and report["eager_vs_eager"] == []
    assert report["prefill_cache_differs"] == {"replayed_run_vs_eager": [], "eager_vs_eager": []}
    assert report["selection_faults"] == {"eager": [], "replayed": []}
    assert len(list(tmp_path.glob("graph_replay_check-tiny-*.json"))) == 1
    # Under deterministic algorithms (warn-only, NaN-filled torch.empty) the runs agree too; the settings come back.
    report = check.main(["--tiny", "--mode", "dsa", "--context", "300", "--steps", "2", "--deterministic",
                         "--out", str(tmp_path)])
    assert report["deterministic"] and report["eager_vs_eager"] == [] and report["nondeterministic_ops"] == []
    assert not torch.are_deterministic_algorithms_enabled()

    from transformers_misa.tiny import tiny_model

    model = check.patched(tiny_model("deepseek_v32"), "dsa")
    prompt = torch.randint(2, 500, (1, 200), generator=torch.Generator().manual_seed(0))
    prefill, records = check.decode_records(model, prompt, torch.tensor([5, 6, 7]), replay=False)
    # every layer's main keys / values and indexer keys, fingerprinted bit for bit
    assert {f"layer {layer} {name}" for layer in range(model.config.num_hidden_layers)
            for name in ("keys", "values", "indexer_keys")} <= set(prefill)
    values = torch.randn(4, 5, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0))
    fingerprint = check.bit_fingerprint(values)
    assert check.bit_fingerprint(values.clone()) == fingerprint
    values.view(-1)[3] = values.view(-1)[3].item() + 1
    assert check.bit_fingerprint(values) != fingerprint
    assert check.bit_fingerprint(values.flip(0)) != check.bit_fingerprint(values)  # the same elements elsewhere
    layers = model.config.num_hidden_layers
    assert len(records) == 2 and all(set(r) == {"logits"} | {(layer, field) for layer in range(layers)
                                                             for field in check.FIELDS} for r in records)
    planted = [dict(r) for r in records]
    planted[1][1, "wk"] = planted[1][1, "wk"] + 1
    planted[1][1, "topk"] = planted[1][1, "topk"].flip(-1)
    assert check.first_differences(planted, records) == [
        {"step": 2, "logits_max_diff": 0.0, "first_differing_field": {"1": "wk"}}]
    # Step 1 (after the warm-up step at position 200) decodes position 201 and sees keys 0..201: a repeated key and a
    # key of the future are faults.
    faulty = [dict(r) for r in records]
    faulty[0][0, "topk"] = torch.tensor([[[3.0, 3.0, 202.0]]])
    assert check.selection_faults(faulty, 200) == [{"step": 1, "layer": 0, "distinct": 2, "of": 3, "unseen_keys": 1}]


def test_e2e_benchmark_rejects_unknown_modes(tmp_path):
    with pytest.raises(SystemExit):
        _load("bench_e2e").main(["--tiny", "--modes", "misa9", "--out", str(tmp_path)])


def test_indexer_in_model_benchmark_smoke(tmp_path):
    """The indexer call captured from a prefill runs with the model's mask and without, selecting the same keys."""
    rows = _load("bench_indexer_in_model").main(["--tiny", "--context", "96", "--reps", "1", "--profile",
                                                 "--out", str(tmp_path)])
    assert [row["mode"] for row in rows] == ["dsa", "misa8"]
    assert all(row["same_picks"] and min(row["first_layer_ms"], row["with_mask_ms"], row["no_mask_ms"]) > 0
               for row in rows)
    assert all(row["mask"]["shape"][-1] == 96 and row["profile_top_ms"] for row in rows)
    assert len(list(tmp_path.glob("bench_indexer_in_model-tiny-*.json"))) == 1
    padded = _load("bench_indexer_in_model").main(["--tiny", "--context", "96", "--pad", "20", "--reps", "1",
                                                   "--modes", "misa8", "--out", str(tmp_path)])
    assert padded[0]["same_picks"] and padded[0]["mask"]["shape"][0] == 2
    with pytest.raises(SystemExit):
        _load("bench_indexer_in_model").main(["--tiny", "--modes", "unpatched", "--out", str(tmp_path)])


def test_indexer_benchmark_keeps_each_row_as_it_is_measured(tmp_path):
    """A run cut short (a device call's time limit) leaves the rows it measured, marked incomplete."""
    import json

    bench = _load("bench_indexer")
    path = tmp_path / "results" / "bench_indexer-x.json"
    results = bench.ResultsFile(path, {"topk": 2048})
    assert json.loads(path.read_text()) == {"topk": 2048, "complete": False, "results": []}
    results.append({"context": 32768})
    assert json.loads(path.read_text())["results"] == [{"context": 32768}]
    results.append({"context": 65536})
    results.finish()
    saved = json.loads(path.read_text())
    assert saved["complete"] is True and [row["context"] for row in saved["results"]] == [32768, 65536]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_gpu_only_probe_imports_and_refuses_the_cpu(tmp_path):
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        _load("host_probe").main(["--out", str(tmp_path)])


def test_sweeps_compile_every_variant_and_report_the_failures(tmp_path, monkeypatch):
    """The sweeps' shared step: each variant compiles in a worker process; a variant that cannot build is reported
    in one line and the others go on."""
    pytest.importorskip("tilelang", reason="TileLang is not installed")
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is absent: TileLang cannot compile CUDA here")
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the spawned workers import `sweeps` by name
    sweeps = importlib.import_module("sweeps")
    errors = sweeps.compile_variants({
        "builds": ("transformers_misa.kernels.topk:build_radix_topk", (2048,), dict(arch="sm_90a")),
        "too_wide": ("transformers_misa.kernels.router:build_head_importance", (64, 128, 128),
                     dict(rows_per_cta=512, arch="sm_90a")),
    }, workers=2)
    assert errors["builds"] == ""
    assert errors["too_wide"].startswith("ValueError: a router CTA holds at most 256 query rows")
    path = sweeps.write_results(tmp_path, "sweep_test", {"results": [1]})
    assert path.parent == tmp_path and path.name.startswith("sweep_test-") and path.read_text().startswith("{")


def test_sweeps_run_the_variants_asked_for(monkeypatch):
    """--variants picks variants by name in the table's order; a misspelt name stops the sweep before any compile."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    sweeps = importlib.import_module("sweeps")
    table = {"default": {}, "wide": {"rows": 256}, "deep": {"stages": 3}}
    assert sweeps.chosen(table, "") == ["default", "wide", "deep"]
    assert sweeps.chosen(table, "deep,default") == ["default", "deep"]
    with pytest.raises(SystemExit, match=r"unknown variants \['wdie'\]"):
        sweeps.chosen(table, "wide,wdie")
    args = sweeps.sweep_parser("doc", reps=3, workers=2).parse_args(["--variants", "wide"])
    assert (args.variants, args.reps, args.workers) == ("wide", 3, 2)


def test_logits_sweep_refuses_a_context_over_one_tma_descriptor(monkeypatch, capsys):
    """Staged stores (few heads) write a call's logits through one TMA descriptor of < 2^31 elements; the sweep does
    not split calls as the scorer does, so it says which context fits before compiling anything."""
    pytest.importorskip("tilelang", reason="TileLang is not installed")
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the sweep imports its siblings by name
    with pytest.raises(SystemExit):
        _load("sweep_logits").main(["--context", "65536", "--heads", "64,16", "--variants", "default"])
    assert "[16] heads store through one TMA descriptor" in capsys.readouterr().err


def test_deepseek_reference_kernel_loads_under_this_tilelang(tmp_path):
    """--deepseek-ref reads the user's DeepSeek-V3.2-Exp checkout; a pass config that this TileLang renamed (fast math
    became opt-in) is spelled as it is now, with the same meaning, and the checkout's file is left as it was."""
    tilelang = pytest.importorskip("tilelang")
    inference = tmp_path / "inference"
    inference.mkdir()
    written = ("import tilelang\n"
               "pass_configs = {tilelang.PassConfigKey.TL_DISABLE_FAST_MATH: True}\n"
               "def fp8_index(q, q_s, k, k_s):\n    return 'called'\n")
    (inference / "kernel.py").write_text(written)
    module = _load("deepseek_reference").load_deepseek_kernel(tmp_path)
    if hasattr(tilelang.PassConfigKey, "TL_ENABLE_FAST_MATH"):
        assert module.pass_configs == {tilelang.PassConfigKey.TL_ENABLE_FAST_MATH: False}
    assert module.fp8_index(None, None, None, None) == "called"
    assert (inference / "kernel.py").read_text() == written


def test_indexer_benchmark_reports_a_failing_method_and_times_the_others(monkeypatch, tmp_path, capsys):
    """A method that raises (DeepSeek's kernel refused a 64K launch on 2026-12-03 and ended the run) is recorded as
    an error in its row; the other methods of the row are still timed and the row is kept."""
    bench = _load("bench_indexer")

    def refused(q, keys, weights):
        raise RuntimeError("CUDALaunch Error: CUDA_ERROR_INVALID_VALUE")

    monkeypatch.setattr(bench, "methods", lambda heads, kernel: {"dsa64_kernel": lambda q, k, w: q.sum(),
                                                                 "deepseek_fp8_index": refused})
    monkeypatch.setattr(bench, "inputs", lambda batch, queries, keys, heads: (torch.zeros(1), torch.zeros(1),
                                                                              torch.zeros(1)))
    monkeypatch.setattr(bench, "fits", lambda *args: True)
    monkeypatch.setattr(bench, "cuda_time_ms",
                        lambda fn, reps, host_hidden=False: (fn(), 1.25 if host_hidden else 1.5)[1])
    monkeypatch.setattr(bench, "peak_extra_gib", lambda fn: (fn(), 0.25)[1])
    monkeypatch.setattr(bench, "scoring_tflops", lambda *args, **kwargs: {"ms": 1.0, "tflops": 1.0})
    results = bench.ResultsFile(tmp_path / "bench_indexer-x.json", {"topk": 2048})
    bench.run_prefill([4096], 64, None, 1, results)
    (row,) = results
    assert row["dsa64_kernel_ms"] == 1.5 and row["dsa64_kernel_gpu_ms"] == 1.25
    assert row["dsa64_kernel_peak_gib"] == 0.25
    assert "deepseek_fp8_index_ms" not in row and "deepseek_fp8_index_gpu_ms" not in row
    assert "CUDA_ERROR_INVALID_VALUE" in row["deepseek_fp8_index_error"]
    assert "deepseek_fp8_index failed at 4096 tokens" in capsys.readouterr().err


def test_indexer_benchmark_times_the_methods_in_turn_over_rounds(monkeypatch, tmp_path, capsys):
    """Each round times every method once (A B, A B, A B), the row keeps the medians and each round's host-hidden
    time, and the printed row gives the per-round speed-up range against the DSA kernel."""
    bench = _load("bench_indexer")
    order = []
    times = {"dsa64_kernel": iter([10.0, 10.0, 12.0, 12.0, 11.0, 11.0]), "misa8": iter([2.0, 2.0, 2.0, 2.0, 4.0, 4.0])}

    def timed(fn, reps, host_hidden=False):
        name = fn()
        order.append(name)
        return next(times[name])

    monkeypatch.setattr(bench, "methods", lambda heads, kernel: {"dsa64_kernel": lambda q, k, w: "dsa64_kernel",
                                                                 "misa8": lambda q, k, w: "misa8"})
    monkeypatch.setattr(bench, "inputs", lambda batch, queries, keys, heads: (torch.zeros(1), torch.zeros(1),
                                                                              torch.zeros(1)))
    monkeypatch.setattr(bench, "fits", lambda *args: True)
    monkeypatch.setattr(bench, "cuda_time_ms", timed)
    monkeypatch.setattr(bench, "peak_extra_gib", lambda fn: 0.5)
    monkeypatch.setattr(bench, "scoring_tflops", lambda *args, **kwargs: {"ms": 1.0, "tflops": 1.0})
    results = bench.ResultsFile(tmp_path / "bench_indexer-x.json", {"topk": 2048})
    bench.run_prefill([4096], 64, None, 1, results, rounds=3)
    (row,) = results
    assert order == ["dsa64_kernel", "dsa64_kernel", "misa8", "misa8"] * 3  # eager, then host hidden, per round
    assert row["rounds"] == 3 and row["dsa64_kernel_gpu_rounds"] == [10.0, 12.0, 11.0]
    assert row["dsa64_kernel_ms"] == row["dsa64_kernel_gpu_ms"] == 11.0 and row["misa8_gpu_ms"] == 2.0
    report = _load("bench_report")
    assert report.round_ratio_ranges(row, 64) == [("misa8", "dsa64_kernel", 2.75, 6.0)]
    assert "misa8/dsa64_kernel=2.75-6.00x" in capsys.readouterr().out
    variants = {"dsa64_kernel_gpu_rounds": [10.0, 12.0], "misa8_x_gpu_rounds": [2.0, 3.0],
                "dsa64_x_gpu_rounds": [9.0, 8.0]}
    assert report.round_ratio_ranges(variants, 64) == [("misa8_x", "dsa64_kernel", 4.0, 5.0),  # also its own DSA's
                                                      ("misa8_x", "dsa64_x", 2.6666666666666665, 4.5)]


def test_decode_benchmark_times_its_three_methods_eager_and_graph_replayed(monkeypatch, tmp_path):
    """A decode row times the DSA kernel, MISA-8 and its stepwise routing, eager and replayed from a CUDA graph."""
    bench = _load("bench_indexer")
    monkeypatch.setattr(bench, "inputs", lambda batch, queries, keys, heads: (
        torch.zeros(batch, queries, heads, 4), torch.zeros(batch, keys, 4), torch.zeros(batch, queries, heads)))
    monkeypatch.setattr(bench, "cuda_time_ms", lambda call, reps: 1.0)  # nothing runs: the calls are only counted
    monkeypatch.setattr(bench, "graph_time_ms", lambda call, reps: 0.5)
    monkeypatch.setattr(bench, "stage_ms", lambda call: {})
    monkeypatch.setattr(bench, "print_row", lambda row, heads: None)
    rows = []
    bench.run_decode([256], [1], [1], 64, 1, rows)
    (row,) = rows
    methods = ("dsa64_kernel", "misa8", "misa8_stepwise_routing")
    assert {key for key in row if key.endswith("_ms")} == {f"{name}{timing}_ms" for name in methods
                                                          for timing in ("", "_graph")}


def test_timeline_finds_the_idle_stretches_between_kernels(monkeypatch):
    """benchmarks/timeline.py: kernels laid on the GPU's timeline, overlaps merged, the gaps between them named."""
    pytest.importorskip("tilelang", reason="TileLang is not installed")  # bench_indexer imports it
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # it imports its folder's bench_indexer and sweeps by name
    timeline = _load("timeline")
    trace = {"traceEvents": [
        {"name": timeline.CALL, "ph": "X", "cat": "user_annotation", "ts": 100.0, "dur": 500.0},
        {"name": timeline.CALL, "ph": "X", "cat": "gpu_user_annotation", "ts": 90.0, "dur": 5.0},
        {"name": "route_heads_kernel", "ph": "X", "cat": "kernel", "ts": 150.0, "dur": 50.0},
        {"name": "weighted_relu_logits_kernel", "ph": "X", "cat": "kernel", "ts": 190.0, "dur": 100.0},  # overlaps
        {"name": "radix_topk_kernel", "ph": "X", "cat": "kernel", "ts": 330.0, "dur": 70.0},
        {"name": "cudaLaunchKernel", "ph": "X", "cat": "cuda_runtime", "ts": 120.0, "dur": 3.0},
        {"name": "Memcpy DtoD", "ph": "X", "cat": "gpu_memcpy", "ts": 410.0, "dur": 10.0},
    ]}
    call_start, kernels = timeline.kernel_intervals(trace)
    assert call_start == 100.0 and [name for *_, name in kernels][0] == "route_heads_kernel" and len(kernels) == 4
    busy, gaps = timeline.idle_stretches(kernels)
    assert busy == 140.0 + 70.0 + 10.0
    assert [gap["us"] for gap in gaps] == [40.0, 10.0]
    assert gaps[0]["after"] == "weighted_relu_logits_kernel" and gaps[0]["before"] == "radix_topk_kernel"


def test_topk_phases_average_the_usual_path_rows(monkeypatch):
    """benchmarks/topk_probe.py --phases: a row's cycles per phase from its clock marks; rows that took the re-reading
    path (later marks 0) are counted out."""
    pytest.importorskip("tilelang", reason="TileLang is not installed")  # the probe builds TileLang programs
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    probe = _load("topk_probe")
    clock = torch.tensor([[100, 300, 310, 500, 520, 530],  # usual path: 200, 10, 190, 20, 10 cycles
                          [1000, 1400, 1410, 1610, 1640, 1660],  # 400, 10, 200, 30, 20
                          [50, 90, 95, 0, 0, 0]])  # re-reading path
    phases = probe.phase_cycles(clock)
    assert phases["usual_path_rows"] == pytest.approx(2 / 3)
    assert phases["mean_cycles"] == {"first pass": 300.0, "first level": 10.0, "second pass": 195.0,
                                     "later levels": 25.0, "output": 15.0}
    assert phases["mean_row_cycles"] == 545.0 and sum(phases["share"].values()) == pytest.approx(1.0)


def test_launch_model_orders_the_tail_of_each_launch(capsys):
    """The CPU launch model: an even spread has no excess; taking the longest CTAs first, or the queries past whole
    waves first, leaves a shorter tail than the launch order where one launch's CTAs differ in length."""
    pytest.importorskip("tilelang", reason="the model takes the TileLang scorer's chunking")
    model = _load("launch_model")
    assert model.launch_time([5, 5, 5, 5], sms=2) == 10 and model.launch_time([1, 1, 4], sms=2) == 5
    (row,) = model.main(["--contexts", "30000", "--heads", "8", "--sms", "16"])  # two query chunks
    assert row["heads"] == 8 and row["context"] == 30000
    assert 0 <= row["longest_first"] < row["forward"] and 0 <= row["remainder_first"] < row["forward"]
    assert "remainder_first" in capsys.readouterr().out


def test_topk_conflicts_model_counts_each_warp_instructions_busiest_address(capsys):
    """The CPU model of the top-k's first-pass atomics: lanes in one bin counted per warp instruction (a constant row:
    all 32 in one; distinct keys spread over bins: fewer), and rows of many heads concentrated in fewer bins."""
    pytest.importorskip("tilelang", reason="the model takes the top-k program's radix levels")
    model = _load("topk_conflicts")
    assert set(model.busiest_address_counts(torch.ones(4096).numpy()).tolist()) == {32}
    spread = model.busiest_address_counts(torch.logspace(-30, 30, 4096).numpy())
    assert spread.max() < 32
    few, many = model.main(["--heads", "8,64", "--keys", "4096"])
    assert 1 <= few["mean_busiest_address_count"] <= 32 and many["distinct_bins"] < few["distinct_bins"]
    assert "mean_busiest_address_count" in capsys.readouterr().out


def test_topk_bound_model_keeps_at_least_k_and_no_bound_for_short_rows(capsys):
    """The CPU model of a one-read top-k's bound (the k-th largest of a row's group maxima): it never keeps fewer than
    k values (every one of the k groups has its maximum at or above it), gives no bound to rows of fewer than k
    groups, and keeps fewer values the longer the row."""
    pytest.importorskip("tilelang", reason="the model takes the top-k's group_maxima_bounds")
    model = _load("topk_bound_model")
    row = torch.randn(64 * 1024, generator=torch.Generator().manual_seed(0))
    assert model.kept_by_bound(row[: 16 * model.TOPK - 1], 16, model.TOPK) is None
    kept_short, kept_long = model.kept_by_bound(row[:40960], 16, model.TOPK), model.kept_by_bound(row, 16, model.TOPK)
    assert model.TOPK <= kept_long < kept_short
    ascending = torch.arange(32768, dtype=torch.float32)  # exactly k groups: the bound is the first group's maximum
    assert model.kept_by_bound(ascending, 16, model.TOPK) == 16 * (model.TOPK - 1) + 1
    for value, floor in ((4.55, 4.5), (-2.2943, -2.5), (35.73, 32.0), (-0.0, 0.0), (6.5, 6.5)):
        assert model.first_level_floor(value) == floor  # the lowest float of the value's 12-bit order-key bin
    loose = model.kept_by_bound(row, 16, model.TOPK, bin_floor=True)
    assert loose >= kept_long
    results = model.main(["--heads", "8", "--lengths", "16384,40960", "--contexts", "65536", "--rows", "1"])
    kept = results["heads"][8]["kept"]
    assert kept[16384] is None and kept[40960] >= model.TOPK
    assert "keep at most" in capsys.readouterr().out
    # --sample: the bound the top-k finds from a 1/16 sample of the row (`topk_bounds.sampled_bounds`); none for short
    # rows
    assert model.kept_by_bound(row[:8191], 16, model.TOPK, sample=16) is None
    assert model.TOPK <= model.kept_by_bound(row, 16, model.TOPK, sample=16) <= 4096
    sampled = model.main(["--heads", "8", "--lengths", "8192,40960", "--contexts", "65536", "--rows", "1",
                          "--sample", "16"])
    assert sampled["sample"] == 16 and all(model.TOPK <= n <= 4096 for n in sampled["heads"][8]["kept"].values())


def test_program_hashes_tell_changed_programs_apart(tmp_path, capsys):
    """benchmarks/program_hashes.py: every program the indexers build by default is in its table; hashing one writes
    its hash, a comparison with the same hashes passes and one with a changed or missing program fails, naming it."""
    pytest.importorskip("tilelang", reason="the programs are TileLang's")
    tool = _load("program_hashes")
    names = set(tool.programs())
    assert {"topk prefill vector", "topk decode vector", "routing h64 a8 prefill", "candidates h64",
            "logits h8 b1 q65536 k65536 bf16", "logits h64 b1 q65536 k65536 fp8"} <= names
    assert tool.differences({"a": "1", "b": "2"}, {"a": "1", "c": "3"}) == ["b", "c"]
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is absent: TileLang cannot compile CUDA here")
    out = tmp_path / "after.json"
    assert tool.main(["--only", "tail means", "--out", str(out)]) == 0
    (name, value), = json.loads(out.read_text()).items()
    assert name == "tail means" and len(value) == 16
    assert tool.main(["--only", "tail means", "--compare", str(out)]) == 0
    (tmp_path / "before.json").write_text(json.dumps({name: "0" * 16, "elsewhere": "1" * 16}))
    assert tool.main(["--only", "tail means", "--compare", str(tmp_path / "before.json")]) == 1
    assert "changed or missing: ['tail means']" in capsys.readouterr().out
