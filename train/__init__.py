"""Fine-tuning of converted checkpoints: head swap, per-layer lr_mult, resumable checkpoints.

Modules, each reusable on its own (train.recipes builds on them):
    config.py    TrainConfig: every option declared once (default, flag, help, parser); the CLI parser and
                 PREFIX-config.json derive from it; load_run_config reads it back; RECIPES (--recipe)
    finetune_flags.py  fine-tune.py's 65 flags: its default, ours, what each does here (docs and tests read it)
    data.py      scan_labels / resolve_classes (labels from .rec headers vs class map and --num-classes),
                 record_iter (ImageRecordIter set up from the sidecar: mean/std/scale, BGR, mean image)
    fit.py       contexts, schedule, init_optimizer (Module creates it; lr_mult via symbol attributes),
                 check_kv_store / make_kvstore / make_initializer / flag_notes (fit.py's flags that need them),
                 prepare_model (head surgery from symbols/head.py), the shared run set-up (start_run,
                 resolve_mults, resume_point, write_run_files, publish_epoch), fit (the loop)
    metrics.py   Tally (loss, accuracy, top-k), MetricsLog (PREFIX-metrics.csv/.json/.png)
    predict.py   load_model, predict (Kaggle CSV + top-k CSV), evaluate; `python -m train.predict`
    __main__.py  `python -m train`: fine-tune.py/fit.py options (and --recipe) -> TrainConfig -> fit
"""
import symbols.mxnet_compat  # noqa: F401  numpy aliases MXNet 1.9.1 needs, before any `import mxnet`
