"""The report pages render in a real browser (headless Chromium) with no missing resource.

Skipped where no Chromium is installed, unless REPORTS_REQUIRE_CHROMIUM=1 (what `make check-reports` sets),
which turns the skip into a failure."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from tools.check_pages import check_page, find_browser, main as check_main

BROWSER = find_browser()
if BROWSER is None:
    if os.environ.get("REPORTS_REQUIRE_CHROMIUM") == "1":
        raise RuntimeError("REPORTS_REQUIRE_CHROMIUM=1 but no Chromium is installed (apt-get install -y chromium)")
    pytest.skip("no headless Chromium installed (Debian: apt-get install -y chromium)", allow_module_level=True)


def _data_page(tmp_path: Path) -> Path:
    from recbuild.cli import main as recbuild_main
    from tests.test_reports import make_split_tree
    make_split_tree(tmp_path, leaky=True)
    assert recbuild_main(["report", str(tmp_path / "set"), "--test-folder", str(tmp_path / "kaggle_test")]) == 0
    return tmp_path / "set.report.html"


def _eval_page(tmp_path: Path) -> Path:
    from tests._train_fixtures import tiny_vgg_checkpoint, write_rec
    from train.config import TrainConfig
    from train.fit import fit
    from train.predict.cli import main as predict_main
    tmp_path.mkdir(parents=True, exist_ok=True)
    tiny_vgg_checkpoint(tmp_path / "pre", num_classes=3)
    write_rec(tmp_path / "e_train.rec", 3, 16, class_names=["a", "b", "c"])
    write_rec(tmp_path / "e_val.rec", 3, 4, seed=2)
    fit(TrainConfig(pretrained_model=str(tmp_path / "pre"), data_train=str(tmp_path / "e_train.rec"),
                    model_prefix=str(tmp_path / "ft"), num_epochs=1, lr=0.05, batch_size=16, progress=False))
    assert predict_main(["report", str(tmp_path / "ft"), "1", str(tmp_path / "e_val.rec"),
                         "--out", str(tmp_path / "eval")]) == 0
    return tmp_path / "eval" / "report.html"


@pytest.mark.slow
def test_both_report_pages_render_with_nothing_missing(tmp_path, capsys):
    pages = [_data_page(tmp_path / "data"), _eval_page(tmp_path / "eval")]
    assert check_main([str(p) for p in pages] + ["--out-dir", str(tmp_path / "shots")]) == 0
    out = capsys.readouterr().out
    assert out.count(": ok (") == 2
    for page in pages:
        assert (tmp_path / "shots" / (page.stem + ".png")).stat().st_size > 10_000


def test_the_check_catches_missing_and_broken_resources(tmp_path):
    from recbuild.html_report import image, page, write_page
    bad = write_page(tmp_path / "bad.html", page("bad", [
        '<img src="nothere.png" alt="missing file">', image("data:image/png;base64,AAAA", "broken"),
        '<link rel="stylesheet" href="https://example.invalid/x.css">']))
    check = check_page(bad, BROWSER, tmp_path / "bad.png")
    text = "; ".join(check.problems)
    assert "external reference 'nothere.png'" in text and "example.invalid" in text
    assert "3 resource(s) failed to load" in text and "2 image(s) did not decode" in text
    good = write_page(tmp_path / "good.html", page("good", ["<p>fine</p>"]))
    assert check_page(good, BROWSER, tmp_path / "good.png").problems == []
