"""Bind a converted checkpoint at another input size in a fresh process and save its outputs.

    python tests/_bind_at_size.py PREFIX N,C,H,W SEED|INPUT.npy OUT.npz [rgb|bgr]

Run by the size tests in a subprocess, so that a crash inside MXNet (the segfault a size written into a
Reshape causes) fails the test instead of killing pytest. Exit 0 with OUT.npz written (the BGR input `x` and
the outputs `out0`, `out1`, ...), or exit 3 with MXNet's error on stderr when binding or the first run fails.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the project is one folder up
import symbols.mxnet_compat  # noqa: E402,F401  numpy aliases MXNet 1.9.1 needs, before `import mxnet`
import mxnet as mx  # noqa: E402
import numpy as np


def main(prefix: str, shape: str, seed: str, out: str) -> int:
    dims = tuple(int(d) for d in shape.split(","))
    if seed.endswith(".npy"):  # a given (BGR, preprocessed) input, e.g. a real photo
        x_bgr = np.load(seed).astype(np.float32)
        dims = x_bgr.shape
    else:
        x_bgr = np.random.default_rng(int(seed)).uniform(-1, 1, dims).astype(np.float32)
    sym, args, aux = mx.model.load_checkpoint(prefix, 0)
    labels = [n for n in sym.list_arguments() if n.endswith("_label")]
    mod = mx.mod.Module(sym, data_names=["data"], label_names=labels)
    rgb = sys.argv[5] == "rgb" if len(sys.argv) > 5 else True
    try:  # MXNet checks shapes when binding; an op may still refuse when it first runs
        mod.bind([("data", dims)], for_training=False)
        mod.set_params(args, aux, allow_missing=False)
        mod.forward(mx.io.DataBatch([mx.nd.array(x_bgr[:, ::-1] if rgb else x_bgr)]), is_train=False)
        outputs = [o.asnumpy() for o in mod.get_outputs()]
    except (mx.base.MXNetError, RuntimeError) as err:  # Module.bind re-raises shape errors as RuntimeError
        print(" ".join(str(err).split())[:400], file=sys.stderr)
        return 3
    np.savez(out, x=x_bgr, **{f"out{i}": o for i, o in enumerate(outputs)})
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:5]))
