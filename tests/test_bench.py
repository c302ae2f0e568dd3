"""The trainer benchmarks' logic (bench/_trainruns.py, bench/scale.py, bench/train.py, bench/stock_fit.py):
statistics, schedules, cost fits, command building, and the stock script on one tiny epoch. Nothing here
asserts a timing."""
from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest

from bench import scale
from bench import train as bench_train
from bench._trainruns import (BenchError, Recipe, Spread, epoch_seconds, fit_costs, interleaved, ours_command,
                              pack_with_recbuild, paired_ratios, run_timed, split_costs, stock_command,
                              write_image_tree, write_net)
from bench.stock_fit import build_parser as stock_parser
from symbols.head import frozen, parse_lr_mult, resolve_lr_mults
from tests._train_fixtures import write_rec
from train.__main__ import build_parser as train_parser, config_from_args

ROOT = Path(__file__).resolve().parents[1]


# ---- statistics and schedules ------------------------------------------------------------------------------------
def test_spread_is_median_and_full_range():
    s = Spread.of([3.0, 1.0, 10.0, 2.0])
    assert (s.median, s.low, s.high, s.n) == (2.5, 1.0, 10.0, 4)
    assert s.format("{:.1f}", " s") == "2.5 s [1.0-10.0]"
    with pytest.raises(ValueError):
        Spread.of([])


def test_paired_ratios_pair_by_round_and_refuse_unequal_lengths():
    assert paired_ratios([2.0, 6.0], [1.0, 3.0]) == [2.0, 2.0]
    with pytest.raises(ValueError):
        paired_ratios([1.0], [1.0, 2.0])


def test_interleaved_rounds_are_permutations_in_differing_seeded_orders():
    jobs = list(range(8))
    schedule = interleaved(jobs, 6, seed=3)
    assert len(schedule) == 6 and all(sorted(r) == jobs for r in schedule)
    assert len({tuple(r) for r in schedule}) > 1          # not the same order every round
    assert schedule == interleaved(jobs, 6, seed=3)        # reproducible from the seed
    assert jobs == list(range(8))                           # the input is not shuffled in place


# ---- cost fits ---------------------------------------------------------------------------------------------------
TRUE = dict(start=1.3, per_record=2e-5, outside=0.4, loop=0.05, batch=0.008)


def _runs(sizes=(4000, 40000), epochs=(1, 2, 3), batch=128):
    for n, e in itertools.product(sizes, epochs):
        b = -(-n // batch)
        loop = e * (TRUE["loop"] + b * TRUE["batch"])
        wall = TRUE["start"] + TRUE["per_record"] * n + e * TRUE["outside"] + loop
        yield n, e, b, wall, loop


def test_fit_costs_recovers_known_costs_from_wall_times():
    costs = fit_costs([r[:4] for r in _runs()])
    assert costs.start_s == pytest.approx(TRUE["start"], abs=1e-9)
    assert costs.per_record_s == pytest.approx(TRUE["per_record"], abs=1e-12)
    assert costs.per_epoch_s == pytest.approx(TRUE["outside"] + TRUE["loop"], abs=1e-9)
    assert costs.per_batch_s == pytest.approx(TRUE["batch"], abs=1e-12)
    assert costs.residual_s < 1e-9


def test_split_costs_separates_outside_and_inside_the_loop():
    costs = split_costs(list(_runs()))
    assert costs.start_s == pytest.approx(TRUE["start"], abs=1e-9)
    assert costs.per_record_s == pytest.approx(TRUE["per_record"], abs=1e-12)
    assert costs.outside_per_epoch_s == pytest.approx(TRUE["outside"], abs=1e-9)
    assert costs.loop_per_epoch_s == pytest.approx(TRUE["loop"], abs=1e-9)
    assert costs.per_batch_s == pytest.approx(TRUE["batch"], abs=1e-12)


@pytest.mark.parametrize("sizes, epochs", [((4000,), (1, 2)), ((4000, 40000), (2,))])
def test_cost_fits_refuse_runs_that_cannot_separate_the_costs(sizes, epochs):
    runs = list(_runs(sizes, epochs))
    with pytest.raises(ValueError, match="need runs"):
        fit_costs([r[:4] for r in runs])
    with pytest.raises(ValueError, match="need runs"):
        split_costs(runs)


def test_step_seconds_leave_out_the_warm_up_epoch():
    assert bench_train.step_seconds([9.0, 2.0, 4.0], steps=10) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="warm-up"):
        bench_train.step_seconds([9.0], steps=10)


# ---- commands ----------------------------------------------------------------------------------------------------
def test_ours_command_is_a_valid_train_command_line_with_the_recipe():
    recipe = Recipe(batch_size=64, lr=0.02, mom=0.8, wd=1e-4, data_nthreads=2, disp_batches=7, seed=5)
    cmd = ours_command(Path("n/net"), Path("d/x.rec"), Path("o/ft"), 3, recipe, ["^conv1_=0"])
    assert cmd[:3] == [sys.executable, "-m", "train"]
    cfg = config_from_args(train_parser().parse_args(cmd[3:]))   # the trainer's own parser accepts every flag
    assert (cfg.pretrained_model, cfg.data_train, cfg.model_prefix) == ("n/net", "d/x.rec", "o/ft")
    assert (cfg.num_epochs, cfg.batch_size, cfg.lr, cfg.mom, cfg.wd) == (3, 64, 0.02, 0.8, 1e-4)
    assert (cfg.data_nthreads, cfg.disp_batches, cfg.seed, cfg.lr_mult) == (2, 7, 5, ["^conv1_=0"])
    assert cfg.top_k == 0 and cfg.progress is False and cfg.gpus is None


def test_stock_command_is_a_valid_stock_command_line_with_the_same_recipe():
    recipe = Recipe(batch_size=64, lr=0.02, mom=0.8, wd=1e-4, gpus="0")
    cmd = stock_command(Path("n/net"), Path("d/x.rec"), Path("o/ft"), 3, recipe, 10, 6000, (3, 16, 16), "^conv")
    assert cmd[:3] == [sys.executable, "-m", "bench.stock_fit"]
    a = stock_parser().parse_args(cmd[3:])
    assert (a.pretrained_model, a.data_train, a.model_prefix, a.num_epochs) == ("n/net", "d/x.rec", "o/ft", 3)
    assert (a.batch_size, a.lr, a.mom, a.wd, a.gpus) == (64, 0.02, 0.8, 1e-4, "0")
    assert (a.num_classes, a.num_examples, a.image_shape, a.fixed_params) == (10, 6000, "3,16,16", "^conv")


def test_scale_arms_ours_is_the_trainer_and_the_control_is_the_stock_command_itself():
    recs = {100: Path("a.rec")}
    commands = {arm: scale.job_command(scale.Job(arm, 100, 2), Path("net"), recs, Path("out"), Recipe())
                for arm in scale.ARMS}
    assert commands["ours"][1:3] == ["-m", "train"]
    assert commands["stock"] == commands["stock'"]   # identical baseline: the very same program and arguments
    assert commands["stock"][1:3] == ["-m", "bench.stock_fit"]


def test_bench_train_frozen_arms_freeze_the_same_parameters(tmp_path):
    net = write_net(tmp_path / "vgg", bench_train.stages_at(16), 64, 32)
    setup = bench_train.Setup(net, tmp_path / "x.rec", 64, 32)
    ours = bench_train.arm_command("ours frozen", setup, tmp_path / "o", 2, Recipe())
    stock = bench_train.arm_command("stock frozen", setup, tmp_path / "s", 2, Recipe())
    rule = ours[ours.index("--lr-mult") + 1]
    regex = stock[stock.index("--fixed-params") + 1]
    names = [n for n in mx.sym.load(f"{net}-symbol.json").list_arguments() if n not in ("data", "prob_label")]
    ours_frozen = set(frozen(resolve_lr_mults(names, [parse_lr_mult(rule)])))
    stock_frozen = {n for n in names if re.search(regex, n)}
    assert ours_frozen == stock_frozen and any(n.startswith("conv4_") for n in ours_frozen)
    assert not any(n.startswith(("conv5_", "fc")) for n in ours_frozen)
    assert "--lr-mult" not in bench_train.arm_command("ours", setup, tmp_path / "o", 2, Recipe())
    assert "--fixed-params" not in bench_train.arm_command("stock", setup, tmp_path / "s", 2, Recipe())


# ---- processes and logs ------------------------------------------------------------------------------------------
def test_run_timed_reports_peak_memory_and_names_a_failure(tmp_path):
    grow = "import numpy as np; a = np.ones(80 * 2**20 // 8); print('ok')"
    done = run_timed([sys.executable, "-c", grow], tmp_path / "ok.log")
    assert done.max_rss_mb >= 80 and done.wall_s > 0 and done.log.read_text().strip() == "ok"
    with pytest.raises(BenchError, match=r"exited 3; log .*bad.log: boom"):
        run_timed([sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], tmp_path / "bad.log")


def test_epoch_seconds_read_each_programs_own_clock(tmp_path):
    (tmp_path / "ft-metrics.json").write_text(json.dumps({"epochs": [{"epoch": 1, "seconds": 1.5},
                                                                     {"epoch": 2, "seconds": 0.75}]}))
    assert epoch_seconds(True, tmp_path / "ft", tmp_path / "log") == [1.5, 0.75]
    log = tmp_path / "stock.log"
    log.write_text("2026-12-01 10:00:00,000 Epoch[0] Train-accuracy=0.1\n"
                   "2026-12-01 10:00:01,000 Epoch[1] Time cost=0.250\n"
                   "2026-12-01 10:00:00,500 Epoch[0] Time cost=1.125\n")
    assert epoch_seconds(False, tmp_path / "ft", log) == [1.125, 0.25]
    with pytest.raises(BenchError, match="no metrics"):
        epoch_seconds(True, tmp_path / "missing", log)
    (tmp_path / "empty.log").write_text("nothing\n")
    with pytest.raises(BenchError, match="Time cost"):
        epoch_seconds(False, tmp_path / "ft", tmp_path / "empty.log")


@pytest.mark.slow
def test_image_tree_packs_with_recbuild_into_labelled_records(tmp_path):
    write_image_tree(tmp_path / "images", 30, 3, 16, seed=1)
    rec = pack_with_recbuild(tmp_path / "set", tmp_path / "images")
    reader = mx.recordio.MXIndexedRecordIO(str(rec.with_suffix(".idx")), str(rec), "r")
    labels = []
    for key in reader.keys:
        header, img = mx.recordio.unpack_img(reader.read_idx(key))
        assert img.shape == (16, 16, 3)
        labels.append(int(header.label))
    assert sorted(labels) == sorted(i % 3 for i in range(30))


@pytest.mark.slow
def test_stock_script_fine_tunes_one_tiny_epoch_and_keeps_frozen_weights(tmp_path):
    net = write_net(tmp_path / "vgg", ((4, 1), (8, 1)), 16, 16)
    rec = write_rec(tmp_path / "set.rec", 4, 16, size=16)      # mx.recordio directly, independent of recbuild
    cmd = stock_command(net, rec, tmp_path / "ft", 1, Recipe(batch_size=16, lr=1e-3), 4, 64, (3, 16, 16), "^conv1_")
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    log = tmp_path / "log.txt"
    log.write_text(done.stdout + done.stderr)
    assert len(epoch_seconds(False, tmp_path / "ft", log)) == 1
    _, before, _ = mx.model.load_checkpoint(str(net), 0)
    sym, after, _ = mx.model.load_checkpoint(str(tmp_path / "ft"), 1)
    assert after["fc8_weight"].shape == (4, 16)                 # the new 4-class head
    for name in ("conv1_1_weight", "conv1_1_bias"):              # frozen: unchanged
        np.testing.assert_array_equal(after[name].asnumpy(), before[name].asnumpy())
    for name in ("conv2_1_weight", "fc6_weight", "fc7_weight"):  # kept from the checkpoint (not re-initialised)
        old, new = before[name].asnumpy().ravel(), after[name].asnumpy().ravel()   # ... and trained
        assert np.corrcoef(old, new)[0, 1] > 0.99 and not np.array_equal(old, new)


def test_run_timed_counts_the_cpu_seconds_of_the_child(tmp_path):
    spin = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass"
    done = run_timed([sys.executable, "-c", spin], tmp_path / "spin.log")
    assert done.cpu_s >= 0.3                       # at least the CPU time the child itself counted


def _scale_results(ours_factor: float, rounds: int = 3):
    """Synthetic bench.scale results: stock costs 1 s + 1 ms per record per epoch, ours `ours_factor` times that."""
    results = {}
    for arm, n, e in itertools.product(scale.ARMS, (1000, 10000), (1, 2)):
        base = 1.0 + 0.5 * e + 1e-3 * n * e
        factor = ours_factor if arm == "ours" else 1.0
        results[scale.Job(arm, n, e)] = [scale.Measured(base * factor * (1 + 0.01 * k), 100.0, 0.8 * base, base)
                                         for k in range(rounds)]
    return results


@pytest.mark.parametrize("factor, met", [(1.0, True), (1.04, True), (1.2, False)])
def test_scale_verdict_follows_the_ratio_at_the_larger_size(factor, met, capsys):
    assert scale.report(_scale_results(factor), (1000, 10000), (1, 2), 3, 128) is met
    out = capsys.readouterr().out
    assert f"ours/stock {factor:.3f}" in out and ("NOT met" in out) is not met


def test_scale_results_round_trip_through_results_json(tmp_path):
    results = _scale_results(1.1, rounds=2)
    scale.save_results(results, tmp_path / "results.json")
    assert scale.load_results(tmp_path / "results.json") == results
