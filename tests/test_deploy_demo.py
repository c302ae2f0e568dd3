"""tools/demo.py orchestration: cached/invalidated stages, failure reports, accuracy, the from-scratch init."""
import os
import re
import shlex
import sys
from pathlib import Path

import pytest

from tools import demo


def _writer(path: Path, counter: Path) -> list:
    """A stage command that writes `path` and counts its runs in `counter`."""
    code = (f"import pathlib; p = pathlib.Path({str(path)!r}); p.parent.mkdir(parents=True, exist_ok=True); "
            f"p.write_text('x'); c = pathlib.Path({str(counter)!r}); "
            f"c.write_text(c.read_text() + {path.name!r} + ' ' if c.exists() else {path.name!r} + ' '); print('made', p)")
    return [sys.executable, "-c", code]


def _run_all(cfg, stages):
    token, stamps = "start", {}
    for i, stage in enumerate(stages, 1):
        stamps[stage.name] = demo.run_stage(cfg, stage, i, len(stages), token)
        token = stamps[stage.name]["token"]
    return stamps


def test_stages_are_cached_and_a_rerun_invalidates_what_follows(tmp_path, capsys):
    cfg = demo.DemoConfig(out=tmp_path / "out")
    counter = tmp_path / "runs.txt"
    files = [tmp_path / "out" / name / f"{name}.txt" for name in ("a", "b", "c")]
    stages = [demo.Stage(f.stem, f"stage {f.stem}", commands=[_writer(f, counter)], folder=f.parent, outputs=[f])
              for f in files]
    first = _run_all(cfg, stages)
    assert counter.read_text().split() == ["a.txt", "b.txt", "c.txt"]
    assert not any(s["cached"] for s in first.values())
    assert "made" in (cfg.out / "logs" / "b.log").read_text()  # output is logged ...
    assert "made" in capsys.readouterr().out  # ... and shown
    second = _run_all(cfg, stages)
    assert all(s["cached"] for s in second.values()) and counter.read_text().split() == ["a.txt", "b.txt", "c.txt"]
    files[1].unlink()  # b's output vanished: b re-runs, and so does c, which depends on it
    third = _run_all(cfg, stages)
    assert [n for n, s in third.items() if not s["cached"]] == ["b", "c"]
    assert counter.read_text().split()[3:] == ["b.txt", "c.txt"]
    fresh = _run_all(demo.DemoConfig(out=cfg.out, fresh=True), stages)
    assert not any(s["cached"] for s in fresh.values())


def test_a_changed_command_reruns_the_stage(tmp_path):
    cfg = demo.DemoConfig(out=tmp_path / "out")
    out = tmp_path / "out" / "a" / "a.txt"
    stage = demo.Stage("a", "a", commands=[_writer(out, tmp_path / "n")], outputs=[out])
    assert not demo.run_stage(cfg, stage, 1, 1, "start")["cached"]
    stage.commands[0] = stage.commands[0] + ["--epochs", "5"]
    assert not demo.run_stage(cfg, stage, 1, 1, "start")["cached"]


def test_changed_input_contents_rerun_the_stage(tmp_path, capsys):
    """Same name, size and modification time, different bytes: the stage is not up to date."""
    cfg = demo.DemoConfig(out=tmp_path / "out")
    images = tmp_path / "images"
    (images / "cat").mkdir(parents=True)
    image = images / "cat" / "1.png"
    image.write_bytes(b"\x89PNG first")
    model = tmp_path / "model.caffemodel"
    model.write_bytes(b"weights-a")
    out = tmp_path / "out" / "a" / "a.txt"
    stage = demo.Stage("a", "a", commands=[_writer(out, tmp_path / "n")], outputs=[out], inputs=[images, model])
    assert not demo.run_stage(cfg, stage, 1, 1, "start")["cached"]
    assert demo.run_stage(cfg, stage, 1, 1, "start")["cached"]
    for path, new in ((image, b"\x89PNG other"), (model, b"weights-b")):
        stat = path.stat()
        path.write_bytes(new)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        capsys.readouterr()
        assert not demo.run_stage(cfg, stage, 1, 1, "start")["cached"], path
        assert f"changed: input {images if path == image else model}" in capsys.readouterr().out
        assert demo.run_stage(cfg, stage, 1, 1, "start")["cached"]
    (images / "dog").mkdir()
    (images / "dog" / "2.png").write_bytes(b"new image")  # a new file in an input folder counts too
    assert not demo.run_stage(cfg, stage, 1, 1, "start")["cached"]


def test_changed_code_reruns_the_stage_and_unrelated_code_does_not(tmp_path, monkeypatch, capsys):
    """The code a stage runs is its module's import closure, lazy imports included."""
    root = tmp_path / "src"
    package = root / "stagepkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "__main__.py").write_text(
        "import sys\n\ndef main():\n    from stagepkg import helper  # a lazy import is followed too\n"
        "    helper.write(sys.argv[1])\n\nmain()\n")
    (package / "helper.py").write_text("import pathlib\nfrom .fmt import TEXT\n\ndef write(path):\n"
                                       "    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)\n"
                                       "    pathlib.Path(path).write_text(TEXT)\n")
    (package / "fmt.py").write_text("TEXT = 'one'\n")
    (package / "unused.py").write_text("X = 1\n")
    monkeypatch.setattr(demo, "PROJECT_ROOT", root)
    monkeypatch.setenv("PYTHONPATH", str(root))
    assert [p.name for p in demo.code_files(["stagepkg"], root)] == ["__init__.py", "__main__.py", "fmt.py",
                                                                     "helper.py"]
    cfg = demo.DemoConfig(out=tmp_path / "out")
    out = tmp_path / "out" / "s" / "made.txt"
    stage = demo.Stage("s", "s", commands=[[sys.executable, "-m", "stagepkg", str(out)]], outputs=[out])
    assert not demo.run_stage(cfg, stage, 1, 1, "start")["cached"] and out.read_text() == "one"
    (package / "unused.py").write_text("X = 2\n")
    assert demo.run_stage(cfg, stage, 1, 1, "start")["cached"]
    (package / "fmt.py").write_text("TEXT = 'two'\n")  # two imports away from the entry point
    capsys.readouterr()
    assert not demo.run_stage(cfg, stage, 1, 1, "start")["cached"] and out.read_text() == "two"
    assert "changed: code" in capsys.readouterr().out


def test_every_stage_hashes_the_code_it_runs(tmp_path):
    stages = {s.name: s for s in demo.build_stages(demo.DemoConfig(out=tmp_path / "o"))}
    root = demo.PROJECT_ROOT
    code = {name: {p.relative_to(root).as_posix() for p in demo.code_files(demo._stage_modules(s), root)}
            for name, s in stages.items()}
    assert {"recbuild/__main__.py", "recbuild/cli.py", "recbuild/packing.py", "recbuild/images.py"} <= code["pack"]
    assert "symbols/sidecar.py" in code["convert"]
    # --verify's lazy import of the OpenCV check is followed (wherever the converter keeps it)
    assert any("readNetFromCaffe" in (root / p).read_text() for p in code["convert"])
    assert {"train/__main__.py", "train/fit.py", "train/data.py", "symbols/head.py"} <= code["finetune"]
    assert {"train/__main__.py", "train/fit.py", "symbols/head.py"} <= code["scratch"]  # --from-scratch
    assert {"train/predict/__init__.py", "train/predict/cli.py", "train/predict/__main__.py",
            "train/data.py"} <= code["predict"] and "train/fit.py" not in code["predict"]
    assert {"tools/deploy.py", "tools/onnx_export.py", "tools/inference_graph.py", "tools/c_predict.py"} <= \
        code["deploy"]
    assert not any(p.startswith("train/") for p in code["deploy"] | code["pack"])
    # ... and reads the files it consumes: the images, the Caffe files, the checkpoints of earlier stages.
    cfg = demo.DemoConfig(out=tmp_path / "o")
    assert stages["pack"].inputs == [cfg.images]
    assert {p.name for p in stages["convert"].inputs} == {demo.PROTOTXT, demo.CAFFEMODEL}
    assert Path(f"{cfg.model_prefix}-0000.params") in stages["finetune"].inputs
    assert Path(f"{cfg.finetune_prefix}-{cfg.epochs:04d}.params") in stages["deploy"].inputs


def test_failed_stage_names_itself_its_log_and_the_error(tmp_path):
    cfg = demo.DemoConfig(out=tmp_path / "out")
    bad = demo.Stage("convert", "convert", commands=[[sys.executable, "-c",
                                                      "import sys; print('layer foo: unsupported'); sys.exit(3)"]])
    with pytest.raises(demo.DemoError) as err:
        demo.run_stage(cfg, bad, 1, 1, "start")
    message = str(err.value)
    assert "stage convert failed (exit 3)" in message and "layer foo: unsupported" in message
    assert str(cfg.out / "logs" / "convert.log") in message
    assert not (cfg.out / "stamps" / "convert.json").exists()
    missing = demo.Stage("pack", "pack", commands=[[sys.executable, "-c", "pass"]], outputs=[tmp_path / "x.rec"])
    with pytest.raises(demo.DemoError, match=r"did not write .*x\.rec"):
        demo.run_stage(cfg, missing, 1, 1, "start")


def test_printed_commands_paste_into_a_shell_as_they_ran(tmp_path, capsys):
    """A path with a blank or a quote (a user's folder) is printed shell-quoted: the shell gives back the words."""
    out = tmp_path / "my images" / "it's.txt"
    stage = demo.Stage("s", "s", commands=[[sys.executable, "-c", "import pathlib, sys; p = pathlib.Path("
                                            "sys.argv[1]); p.parent.mkdir(); p.write_text('x')", str(out)]],
                       outputs=[out])
    demo.run_stage(demo.DemoConfig(out=tmp_path / "out"), stage, 1, 1, "start")
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  $ ")]
    assert len(printed) == 1 and shlex.split(printed[0][4:]) == stage.commands[0]
    assert out.read_text() == "x"


def _write_lst(path, rows):
    path.write_text("".join(f"{i}\t{label:.6f}\t{p}\n" for i, label, p in rows))


def test_accuracy_from_csv_matches_ids_by_index_or_path(tmp_path):
    classes = ["bag", "coat", "dress"]
    rows = [(0, 0, "bag/1.png"), (1, 1, "coat/2.png"), (2, 2, "dress/3.png"), (3, 1, "coat/4.png")]
    lst = tmp_path / "v_val.lst"
    _write_lst(lst, rows)
    probs = {0: [0.8, 0.1, 0.1], 1: [0.1, 0.7, 0.2], 2: [0.6, 0.2, 0.2], 3: [0.2, 0.3, 0.5]}  # 2 of 4 right
    for id_of in (lambda r: str(r[0]), lambda r: r[2]):
        csv_file = tmp_path / "p.csv"
        csv_file.write_text("id," + ",".join(classes) + "\n" + "".join(
            id_of(r) + "," + ",".join(map(str, probs[r[0]])) + "\n" for r in rows))
        assert demo.accuracy_from_csv(csv_file, lst, classes) == (0.5, 4)
    csv_file.write_text("id,bag,coat,dress\n0,1,0,0\n")
    with pytest.raises(ValueError, match="1 predictions for 4 images"):
        demo.accuracy_from_csv(csv_file, lst, classes)
    csv_file.write_text("id,bag,coat\n0,1,0\n")
    with pytest.raises(ValueError, match="no probability column"):
        demo.accuracy_from_csv(csv_file, lst, classes)


def _converter_parser():
    """The converter's own parser: in tools/caffe_converter.py, or tools/caffe_converter/cli.py in the package."""
    try:
        from tools.caffe_converter.cli import build_parser
    except ModuleNotFoundError:  # "'tools.caffe_converter' is not a package"
        from tools.caffe_converter import build_parser
    return build_parser()


def _parsed(parser, command):
    """The namespace the stage's CLI itself makes of `command` (python -m MODULE ARGS...)."""
    assert command[1] == "-m"
    return parser.parse_args(command[3:])


def test_stage_commands_follow_the_cli_contracts(tmp_path):
    """Each stage's argv means what the demo intends, read by the real parsers of the CLIs it runs."""
    from recbuild.cli import build_parser as recbuild_parser
    from recbuild.report import build_parser as data_report_parser
    from tools.deploy import build_parser as deploy_parser
    from train.__main__ import build_parser as train_parser
    from train.config import parse_with_recipe
    from train.predict import build_parser as predict_parser
    from train.report import build_parser as eval_report_parser

    cfg = demo.DemoConfig(out=tmp_path / "o", epochs=3)
    stages = {s.name: s for s in demo.build_stages(cfg)}
    assert list(stages) == ["fetch", "pack", "convert", "finetune", "scratch", "predict", "deploy"]
    assert [c[1:3] for s in stages.values() for c in s.commands] == [
        ["-m", "tools.fetch_models"], ["-m", "recbuild"], ["-m", "recbuild"], ["-m", "tools.caffe_converter"],
        ["-m", "train"], ["-m", "train"], ["-m", "train.predict"], ["-m", "train.predict"], ["-m", "recbuild"],
        ["-m", "train.predict"], ["-m", "tools.deploy"]]

    listing, packing = (_parsed(recbuild_parser(), c) for c in stages["pack"].commands)
    assert listing.list and listing.recursive and listing.train_ratio == cfg.train_ratio
    assert (listing.prefix, listing.root) == (packing.prefix, packing.root) == (str(cfg.rec_prefix), str(cfg.images))
    assert not packing.list and (packing.resize, packing.quality, packing.color) == (cfg.resize, cfg.quality, 1)

    conv = _parsed(_converter_parser(), stages["convert"].commands[0])
    assert conv.verify and conv.mean == [104.0, 117.0, 123.0] and not conv.keep_bgr
    assert (conv.prototxt, conv.caffemodel) == (str(cfg.model_cache / demo.PROTOTXT),
                                                str(cfg.model_cache / demo.CAFFEMODEL))
    assert conv.prefix == str(cfg.model_prefix)

    # `python -m train` applies a --recipe before parsing the rest (train.config.parse_with_recipe)
    ft, sc = (parse_with_recipe(train_parser(), stages[n].commands[0][3:]) for n in ("finetune", "scratch"))
    assert (ft.pretrained_model, ft.pretrained_epoch, ft.model_prefix) == (str(cfg.model_prefix), 0,
                                                                          str(cfg.finetune_prefix))
    assert (sc.pretrained_model, sc.pretrained_epoch, sc.model_prefix) == (str(cfg.model_prefix), 0,
                                                                          str(cfg.scratch_prefix))
    assert sc.from_scratch and not ft.from_scratch
    assert ft.lr_mult == [f"{cfg.head}=5", f"{cfg.freeze}=0"] and sc.lr_mult == [f"{cfg.head}=5"]
    # Same recipe for both runs: only the start weights, the output prefix and the freezing differ.
    differ = {"model_prefix", "lr_mult", "from_scratch"}
    assert {k: v for k, v in vars(ft).items() if k not in differ} == \
        {k: v for k, v in vars(sc).items() if k not in differ}
    assert (ft.num_epochs, ft.batch_size, ft.lr, ft.lr_scheduler, ft.lr_warmup_epochs) == (
        3, cfg.batch_size, cfg.lr, cfg.lr_scheduler, cfg.warmup_epochs)
    # the recipe the README's figures were measured with, by name: momentum 0.9, wd 5e-4, Xavier head
    assert (ft.recipe, ft.mom, ft.wd, ft.initializer) == ("transfer", 0.9, 0.0005, "xavier")
    assert (ft.data_train, ft.data_val) == (f"{cfg.rec_prefix}_train.rec", f"{cfg.rec_prefix}_val.rec")
    assert stages["finetune"].outputs == [Path(f"{cfg.finetune_prefix}-0003.params")]

    # Both models predict the held-out .rec alike (same options), each into the CSV the stage promises.
    pred_ft, pred_sc = (_parsed(predict_parser(), c) for c in stages["predict"].commands[:2])
    for pred, prefix in ((pred_ft, cfg.finetune_prefix), (pred_sc, cfg.scratch_prefix)):
        assert (pred.prefix, pred.epoch, pred.data) == (str(prefix), "3", Path(f"{cfg.rec_prefix}_val.rec"))
        assert pred.classes is None  # the trained models' sidecars name their classes
    assert [pred_ft.out, pred_sc.out] == stages["predict"].outputs[:2]
    assert {k: v for k, v in vars(pred_ft).items() if k not in ("prefix", "out")} == \
        {k: v for k, v in vars(pred_sc).items() if k not in ("prefix", "out")}
    assert not pred_ft.mirror and pred_ft.resize == -1  # the training run's --resize, from its sidecar/config

    # The two reports: data health of every packed split, and the fine-tuned model evaluated on the held-out split.
    data_cmd, eval_cmd = stages["predict"].commands[2:]
    assert data_cmd[3] == "report" and eval_cmd[3] == "report"
    data_report = data_report_parser().parse_args(data_cmd[4:])
    assert data_report.prefix == str(cfg.rec_prefix) and not data_report.no_html
    evaluation = eval_report_parser().parse_args(eval_cmd[4:])
    assert (evaluation.prefix, evaluation.epoch, evaluation.data) == (str(cfg.finetune_prefix), "3",
                                                                      Path(f"{cfg.rec_prefix}_val.rec"))
    assert sorted(stages["predict"].outputs[2:]) == sorted([data_report.html, evaluation.out / "report.html"])

    bundle = _parsed(deploy_parser(), stages["deploy"].commands[0])
    assert (bundle.prefix, bundle.epoch, bundle.outdir) == (str(cfg.finetune_prefix), "3", cfg.deploy_dir)
    assert bundle.onnx and bundle.force and bundle.check


def test_freeze_regex_keeps_only_the_last_stage_and_head_trainable():
    """Parameter names of the converted open_nsfw net (Caffe layer names + MXNet suffixes)."""
    frozen = ["conv_1_weight", "bn_1_gamma", "scale_1_beta", "conv_stage0_block0_proj_shortcut_weight",
              "bn_stage1_block3_branch2b_moving_var", "conv_stage2_block5_branch2c_weight"]
    trainable = ["conv_stage3_block0_branch2a_weight", "bn_stage3_block2_branch2c_gamma",
                 "scale_stage3_block1_branch2b_beta", "fc_weight", "fc_bias"]
    rule = re.compile(demo.DemoConfig().freeze)
    assert all(rule.search(n) for n in frozen)
    assert not any(rule.search(n) for n in trainable)
    head = re.compile(demo.DemoConfig().head)  # the new head, fine-tune.py's `fc`, and nothing else
    assert [n for n in frozen + trainable if head.search(n)] == ["fc_weight", "fc_bias"]


def test_table_lists_accuracies_times_and_outputs():
    summary = {"classes": 10, "val_images": 160, "epochs": 4,
               "accuracy": {"fine-tuned": 0.8125, "from scratch": 0.5, "chance (uniform)": 0.1},
               "stage_seconds": {"pack": 3.2, "finetune": 150.0}, "cached": ["pack"],
               "wall_seconds_this_run": 160.0, "outputs": {"metrics CSV": "out/demo/finetune/m.csv"}}
    table = demo.format_table(summary)
    assert re.search(r"fine-tuned\s+81\.2%", table) and re.search(r"chance \(uniform\)\s+10\.0%", table)
    assert re.search(r"pack\s+3\.2\s+\(cached\)", table) and "out/demo/finetune/m.csv" in table
    assert re.search(r"total of the stages\s+153\.2", table)
