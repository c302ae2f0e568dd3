"""Network symbols, the preprocessing sidecar that travels with every checkpoint, the class-name rule
(symbols/classes.py: which file names a model's classes) and head surgery."""
