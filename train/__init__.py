"""Fine-tuning of converted checkpoints: head swap, per-layer lr_mult, resumable checkpoints.

Modules, each reusable on its own (train.recipes builds on them):
    config.py    TrainConfig: every default in one place; written as PREFIX-config.json by every run
    data.py      scan_labels / resolve_classes (labels from .rec headers vs class map and --num-classes),
                 record_iter (ImageRecordIter set up from the sidecar: mean/std/scale, BGR, mean image)
    fit.py       contexts, schedule, make_optimizer (lr_mult on an optimizer object), prepare_model
                 (head surgery from symbols/head.py), Checkpointer (atomic params/states), fit (the loop)
    metrics.py   Tally (loss, accuracy, top-k), MetricsLog (PREFIX-metrics.csv/.json/.png)
    predict.py   load_model, predict (Kaggle CSV + top-k CSV), evaluate; `python -m train.predict`
    __main__.py  `python -m train`: fine-tune.py/fit.py options -> TrainConfig -> fit
"""
