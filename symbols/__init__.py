"""Network symbols, the preprocessing sidecar that travels with every checkpoint, and head surgery."""
