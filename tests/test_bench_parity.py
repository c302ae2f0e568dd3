"""bench.finetune_parity's command line and refusals (the bench itself runs fine-tune.py, which is not here)."""
from __future__ import annotations

from pathlib import Path

import pytest

from bench import finetune_parity as parity
from train.__main__ import build_parser
from train.config import config_from_args
from train.fit import resolve_load_epoch


def test_the_shared_args_parse_in_ours_as_fine_tune_py_means_them(tmp_path):
    args = parity.args_for(Path("m/nsfw"), Path("d/fashion"), 160, 2, 16, tmp_path / "ft")
    cfg = resolve_load_epoch(config_from_args(build_parser().parse_args(args)))
    assert (cfg.pretrained_model, cfg.pretrained_epoch, cfg.load_epoch) == ("m/nsfw", 0, None)
    assert (cfg.layer_before_fullc, cfg.mom, cfg.wd, cfg.lr, cfg.batch_size, cfg.top_k) == ("pool", 0, 0, 0.01, 16, 0)
    assert (cfg.rgb_mean, cfg.rgb_std, cfg.image_shape, cfg.gpus) == ((123, 117, 104), (1, 1, 1), (3, 224, 224), "")
    stock = parity.stock_command(Path("/x/fine-tune.py"), 3, args)
    assert stock[-len(args):] == args and "mx.random.seed(3)" in stock[2]


def test_refuses_without_fine_tune_py_or_its_common(tmp_path, capsys):
    assert parity.main([]) == 2
    assert "--finetune-py PATH is required" in capsys.readouterr().err
    (tmp_path / "fine-tune.py").write_text("")
    (tmp_path / "common").mkdir()
    (tmp_path / "common" / "fit.py").write_text("")
    assert parity.main(["--finetune-py", str(tmp_path / "fine-tune.py")]) == 2
    assert "lacks data.py, modelzoo.py, find_mxnet.py" in capsys.readouterr().err


@pytest.mark.parametrize("ours_rss, ours_startup, met", [(3000, 10.5, True), (4200, 10.0, False),
                                                         (3000, 11.5, False)])
def test_vgg16_memory_verdict_is_peak_rss_and_startup_against_stock(tmp_path, monkeypatch, capsys, ours_rss,
                                                                     ours_startup, met):
    """Stock: 4000 MB, start-up 10 s (wall 30 s, loop 20 s); the verdict is <= stock's RSS, <= +1 s start-up."""
    from bench import scale
    from bench._trainruns import Timed
    monkeypatch.setattr(scale, "write_net", lambda *a, **k: None)
    monkeypatch.setattr(scale, "dataset", lambda *a, **k: tmp_path / "set.rec")

    def timed(cmd, log, *a):
        ours = "train" in cmd
        return Timed(20.0 + (ours_startup if ours else 10.0), ours_rss if ours else 4000.0, log)
    monkeypatch.setattr(scale, "run_timed", timed)
    monkeypatch.setattr(scale, "epoch_seconds", lambda *a: [20.0])
    assert scale.report_vgg16_memory(tmp_path, batch_sizes=(4,)) is met
    out = capsys.readouterr().out
    assert f"peak RSS ours {ours_rss} MB / stock 4000 MB = {ours_rss / 4000:.2f}x" in out
    assert f"start-up ours {ours_startup:.1f} s / stock 10.0 s" in out and ("NOT met" not in out) == met
