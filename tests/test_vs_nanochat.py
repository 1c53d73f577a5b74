"""bench/vs_nanochat.py without a nanochat checkout: its table on canned numbers (ratios, n/a, the summary line), the
parsing of nanochat's step lines, and one clear error for arguments that cannot work."""
import math
import os
import subprocess
import sys

import pytest

from conftest import ROOT, load_module

SCRIPT = os.path.join(ROOT, "bench", "vs_nanochat.py")


@pytest.fixture(scope="module")
def bench():
    return load_module(SCRIPT, "vs_nanochat")


OURS = {"params": 12_779_799, "params_matrix": 1_769_472, "train_tokens": 245_760, "val_bpb": 3.0, "train_tok_s": 2600.0,
        "core": -0.05, "core_examples_s": 8.0, "decode_tok_s@1": 150.0, "decode_tok_s@16": 1200.0, "sft_tok_s": 3000.0}
THEIRS = {"params": 8_061_034, "params_matrix": 1_769_544, "train_tokens": 245_760, "val_bpb": 3.2, "train_tok_s": 1300.0,
          "core": -0.01, "core_examples_s": 0.5, "decode_tok_s@1": 60.0, "decode_tok_s@16": 480.0}  # no SFT


def rows_by_label(lines):
    """Table lines -> {label: [ours, nanochat, ratio]} (labels hold spaces; the three values do not)."""
    return {line.rsplit(None, 3)[0]: line.rsplit(None, 3)[1:] for line in lines[1:-1]}


def test_table_shows_both_sides_and_their_ratio(bench):
    lines = bench.table(OURS, THEIRS, bench.metric_rows([1, 16], 11))
    assert lines[0].split() == ["decoderstack", "nanochat", "ours/nanochat"]
    rows = rows_by_label(lines)
    assert rows["parameters"] == ["12,779,799", "8,061,034", "1.59x"]
    assert rows["training tokens"] == ["245,760", "245,760", "1.00x"]
    assert rows["val bpb, every val token (lower is better)"] == ["3.0000", "3.2000", "0.94x"]
    assert rows["pretraining tok/s"] == ["2,600", "1,300", "2.00x"]
    assert rows["CORE examples/s"] == ["8.00", "0.50", "16.00x"]
    assert rows["decoding tok/s, batch 1"] == ["150", "60", "2.50x"]
    assert rows["decoding tok/s, batch 16"] == ["1,200", "480", "2.50x"]


def test_missing_numbers_print_na_and_core_gets_no_ratio(bench):
    rows = rows_by_label(bench.table(OURS, {**THEIRS, "val_bpb": None}, bench.metric_rows([1, 16], 11)))
    assert rows["SFT tok/s"] == ["3,000", "n/a", "n/a"]  # the key is absent on nanochat's side
    assert rows["val bpb, every val token (lower is better)"] == ["3.0000", "n/a", "n/a"]  # present but None
    assert rows["CORE (11 per task)"] == ["-0.0500", "-0.0100", "n/a"]  # a ratio of centered scores means nothing
    assert rows_by_label(bench.table({}, THEIRS, bench.metric_rows([4], 0)))["CORE (every example)"] == ["n/a", "-0.0100", "n/a"]


def test_summary_line_names_each_headline_ratio(bench):
    summary = bench.table(OURS, THEIRS, bench.metric_rows([1, 16], 11))[-1]
    assert summary.startswith("summary: ours/nanochat val bpb 0.94x, pretraining tok/s 2.00x, CORE examples/s 16.00x, "
                              "decoding tok/s at batch 1 2.50x, decoding tok/s at batch 16 2.50x, SFT tok/s n/a")
    assert "parameters" not in summary and "CORE 5" not in summary


def test_ratio_is_none_without_both_numbers_or_with_a_zero_denominator(bench):
    assert bench.ratio(3.0, 1.5) == 2.0
    assert bench.ratio(None, 1.5) is None and bench.ratio(3.0, None) is None and bench.ratio(3.0, 0) is None


def test_step_times_reads_nanochat_step_lines_after_the_warm_up(bench):
    # base_train prints `step 00011/00060 (...)`, chat_sft `step 00011 (...)`; both time only steps numbered above 10
    log = "\n".join([*(f"step {i:05d}/00012 (1.00%) | loss: 9.0 | lrm: 1.00 | dt: {1000 + i}.50ms | tok/sec: 4,000 | x"
                       for i in range(12)),
                     "step 00011 (55.00%) | loss: 3.0 | lrm: 1.00 | dt: 250.00ms | tok/sec: 16,384 | mfu: 0.00",
                     "Step 00012 | Validation bpb: 3.1", "Total training time: 0.04m"])
    assert bench.step_times(log) == pytest.approx([1.0115, 0.25])


def test_every_step_counts_when_the_compile_is_to_be_counted(bench):
    log = "\n".join(f"step {i:05d}/00012 (1.00%) | loss: 9.0 | lrm: 1.00 | dt: {3000 if i == 0 else 100}.00ms | x"
                     for i in range(12))
    assert sum(bench.step_times(log, skip=-1)) == pytest.approx(3.0 + 11 * 0.1)  # step 0 compiles
    assert len(bench.step_times(log)) == 1


def test_time_to_target_is_a_row_with_its_ratio(bench):
    rows = rows_by_label(bench.table({**OURS, "target_steps": 60, "target_s": 40.0},
                                     {**THEIRS, "target_steps": 150, "target_s": 160.0}, bench.metric_rows([1], 11)))
    assert rows["steps to nanochat's final val bpb"] == ["60", "150", "0.40x"]
    assert rows["seconds to nanochat's final val bpb"] == ["40.0", "160.0", "0.25x"]


def log_law(steps):  # bpb falling linearly in log steps, as it about does at this scale
    return 4.0 - 0.2 * math.log(steps)


@pytest.mark.parametrize("target", [3.2, 3.1, 3.05, 3.0])
def test_steps_to_target_finds_the_fewest_passing_steps_in_few_runs(bench, target):
    calls = []
    steps, runs = bench.steps_to_target(lambda s: calls.append(s) or log_law(s), target, 150, {150: log_law(150)})
    fewest = next(s for s in range(1, 151) if log_law(s) <= target)
    assert fewest <= steps <= fewest * 1.05 + 1 and runs[steps] <= target
    assert any(fewest * 0.95 - 1 <= s < fewest and runs[s] > target for s in runs) or steps == fewest
    assert 150 not in calls and len(calls) == len(set(calls)) <= 7  # the measured run is reused, none twice


def test_steps_to_target_when_the_longest_run_misses_or_the_shortest_passes(bench):
    calls = []
    assert bench.steps_to_target(lambda s: calls.append(s) or log_law(s), 2.0, 150) == (None, {150: log_law(150)})
    assert calls == [150]
    steps, runs = bench.steps_to_target(log_law, 9.0, 150)
    assert steps == 3 and sorted(runs) == [3, 9, 37, 150]  # quartered down to min_steps, all passing


def test_time_to_target_runs_each_step_count_the_preset_takes_once(bench, tmp_path, monkeypatch):
    """The cpu preset rescales each of its three stages and rounds: 47 and 49 steps both take 48. Those are one run, and
    the row says 48 with that run's seconds."""
    assert [bench.preset_steps(n) for n in (47, 48, 49, 150)] == [48, 48, 48, 150]
    runs = []

    def ours_pretrain(args, run_dir, log_path, steps):
        taken = bench.preset_steps(steps)
        runs.append(taken)
        return {"val_bpb": log_law(taken), "pt_train_time_s": taken / 2, "pt_compile_time_s": 0.0}

    monkeypatch.setattr(bench, "ours_pretrain", ours_pretrain)
    args = bench.argparse.Namespace(steps=150)
    ours = {"val_bpb": log_law(150), "train_s": 75.0}
    out = bench.time_to_target(args, str(tmp_path), ours, 3.22, lambda msg: None)
    assert len(runs) == len(set(runs)) and 150 not in runs
    assert out["target_steps"] == bench.preset_steps(out["target_steps"]) and log_law(out["target_steps"]) <= 3.22
    assert out["target_s"] == out["target_steps"] / 2 and out["target_runs"] == len(runs) + 1


def test_steps_to_target_ends_on_noisy_results(bench):
    noisy = lambda s: log_law(s) + (0.03 if s % 2 else -0.03)  # seeds' spread: not monotone
    steps, runs = bench.steps_to_target(noisy, 3.1, 150)
    assert runs[steps] <= 3.1 and len(runs) <= 12


def fake_inputs(bench, tmp):
    """A nanochat-shaped checkout (empty files where the script looks), a data directory with our manifests and a
    one-task CORE bundle of 10-shot prompts: all that the arguments are checked against before anything runs."""
    checkout, data, bundle = tmp / "nanochat", tmp / "data", tmp / "core"
    for path in [checkout / f for f in bench.NANOCHAT_FILES] + [data / f for f in (
            "pretrain/manifest.json", "core/manifest.json", "sft/manifest.json", "tokenizer/tokenizer.json")]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")
    bundle.mkdir()
    (bundle / "core.yaml").write_text("icl_tasks:\n- label: jeopardy\n  dataset_uri: j.jsonl\n  icl_task_type: language_modeling\n"
                                      "  num_fewshot: [10]\n")
    (bundle / "eval_meta_data.csv").write_text("Eval Task,Random baseline\njeopardy,0\n")
    return ["--nanochat-dir", str(checkout), "--data-dir", str(data), "--core-bundle", str(bundle)]


@pytest.mark.parametrize("change, message", [
    (lambda tmp, args: ["--nanochat-dir", str(tmp / "data"), *args[2:]], "not a nanochat checkout (no scripts/base_train.py)"),
    (lambda tmp, args: [*args, "--nanochat-python", str(tmp / "no-python")], "not an executable file"),
    (lambda tmp, args: [*args[:2], "--data-dir", str(tmp / "nanochat"), *args[4:]], "no pretrain/manifest.json (prepare it"),
    (lambda tmp, args: [*args, "--core-per-task", "10"], "more than the largest few-shot count (10), or 0 (all)"),
    (lambda tmp, args: [*args, "--batch-sizes", "1,x"], "expected whole numbers"),
    (lambda tmp, args: [*args, "--prompt-tokens", "500"], "512-token context"),
    (lambda tmp, args: [*args, "--sft-steps", "10"], "more than 10: nanochat times the steps after its first 10"),
])
def test_bad_arguments_give_one_error_line_and_exit_2(bench, tmp_path, change, message):
    args = change(tmp_path, fake_inputs(bench, tmp_path))
    proc = subprocess.run([sys.executable, SCRIPT, *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], proc.stderr


def test_good_arguments_pass_the_checks(bench, tmp_path):
    args = bench.parse_args(fake_inputs(bench, tmp_path) + ["--core-per-task", "11", "--batch-sizes", "1,4"])
    assert args.batch_sizes == [1, 4] and args.core_per_task == 11 and os.path.isabs(args.nanochat_dir)
    assert bench.parse_args(fake_inputs(bench, tmp_path / "b") + ["--core-per-task", "0"]).core_per_task == 0
