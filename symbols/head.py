"""Head surgery and per-layer learning-rate rules.

`replace_head` cuts a pretrained network at the classifier's input, attaches a new FullyConnected(num_classes)
(optionally behind a hidden layer with dropout) and a SoftmaxOutput, and checks that every other parameter
of the new network is present in the pretrained weights with the right shape. Nothing is re-initialised
behind the user's back (fine-tune.py's `allow_missing=True`): only the new head gets fresh weights, by name.

`parse_lr_mult` / `resolve_lr_mults` turn `--lr-mult 'REGEX=MULT'` rules into a {param name: multiplier} map;
a multiplier of 0 means frozen (Module's fixed_param_names, so no gradient is even computed).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import mxnet as mx
import numpy as np

from symbols import vgg
from symbols.vgg import HeadSpec

log = logging.getLogger(__name__)

INPUT_NAME = "data"


class HeadError(ValueError):
    """The network, its weights or the head description do not fit together; the message says how."""


@dataclass
class NewHead:
    """Result of head surgery.

    Attributes:
        symbol: the new training symbol (ends in SoftmaxOutput `spec.output_name`).
        arg_params: every argument parameter: pretrained ones plus freshly initialised new-head ones.
        aux_params: pretrained auxiliary states (BatchNorm moving statistics).
        spec: classifier / feature_output / output_name of the new network.
        new_params: names of the freshly initialised parameters (the new head).
        dropped: every pretrained parameter that is not carried into the new network as it was: the replaced
            classifier (same name, fresh values) and anything the cut removed.
    """

    symbol: mx.sym.Symbol
    arg_params: Dict[str, mx.nd.NDArray]
    aux_params: Dict[str, mx.nd.NDArray]
    spec: HeadSpec
    new_params: List[str] = field(default_factory=list)
    dropped: List[str] = field(default_factory=list)

    @property
    def label_name(self) -> str:
        return f"{self.spec.output_name}_label"


def fc_layers(symbol: mx.sym.Symbol) -> List[str]:
    """Names of the FullyConnected layers of `symbol`, in graph order (for error messages)."""
    import json
    nodes = json.loads(symbol.tojson())["nodes"]
    return [n["name"] for n in nodes if n["op"] == "FullyConnected"]


def _layer_input(symbol: mx.sym.Symbol, layer: str) -> Optional[str]:
    """The output name feeding layer `layer` (its first input), e.g. 'drop7_output' for fc8."""
    import json
    graph = json.loads(symbol.tojson())
    nodes = graph["nodes"]
    for node in nodes:
        if node["name"] == layer and node["op"] != "null":
            src = nodes[node["inputs"][0][0]]
            if src["op"] == "null":
                return src["name"]
            # Multi-output ops name their outputs <name>_output<i>; classifiers follow single-output ops.
            return f"{src['name']}_output"
    return None


def find_head(symbol: mx.sym.Symbol, sidecar_classifier: Optional[str] = None,
              sidecar_feature_output: Optional[str] = None, sidecar_output_name: Optional[str] = None,
              layer_before_fullc: Optional[str] = None) -> HeadSpec:
    """Decide which layer is the classifier and where the new head attaches.

    Priority: an explicit `layer_before_fullc` (fine-tune.py's flag; the classifier is then whatever layer
    consumed it, or `fc` when none), then the head the sidecar declares (classifier / feature_output), then
    the head VGG declares when the net has VGG's layer names. A declaration outranks a name signature.

    Raises:
        HeadError: nothing identifies the head, or a named layer is not in the network.
    """
    outputs = symbol.get_internals().list_outputs()
    output_name = sidecar_output_name or "softmax"
    if layer_before_fullc:
        feature = layer_before_fullc if layer_before_fullc.endswith("_output") else f"{layer_before_fullc}_output"
        if feature not in outputs:
            near = [o[:-7] for o in outputs if o.endswith("_output")][-8:]
            raise HeadError(f"--layer-before-fullc {layer_before_fullc}: no such layer in the network; "
                            f"the last layers are {near}")
        consumers = [name for name in fc_layers(symbol) if _layer_input(symbol, name) == feature]
        classifier = consumers[0] if consumers else (sidecar_classifier or "fc")
        return HeadSpec(classifier=classifier, feature_output=feature, output_name=output_name)
    if sidecar_classifier:
        feature = sidecar_feature_output or _layer_input(symbol, sidecar_classifier)
        if feature is None or feature not in outputs:
            raise HeadError(f"sidecar names classifier {sidecar_classifier!r} (feature_output "
                            f"{sidecar_feature_output!r}), which is not in the network; its FullyConnected "
                            f"layers are {fc_layers(symbol)}; pass --layer-before-fullc")
        return HeadSpec(classifier=sidecar_classifier, feature_output=feature, output_name=output_name)
    if vgg.matches(symbol):
        return vgg.HEAD
    raise HeadError(f"cannot tell which layer is the classifier: the network is not VGG-shaped and its sidecar "
                    f"names none; pass --layer-before-fullc (FullyConnected layers: {fc_layers(symbol)})")


# fine-tune.py's names for the new classifier and its SoftmaxOutput (label `softmax_label`, Module's default).
FINE_TUNE_HEAD = ("fc", "softmax")


def fine_tune_names(symbol: mx.sym.Symbol, spec: HeadSpec) -> HeadSpec:
    """`spec` with fine-tune.py's names for the new head: classifier `fc`, output `softmax`.

    Raises:
        HeadError: a layer the new network keeps (below the cut) already has one of those names.
    """
    classifier, output = FINE_TUNE_HEAD
    kept = {name[:-len("_output")] for name in symbol.get_internals()[spec.feature_output].get_internals()
            .list_outputs() if name.endswith("_output")}
    kept |= set(symbol.get_internals()[spec.feature_output].list_arguments())
    taken = [n for n in (classifier, f"{classifier}_weight", f"{classifier}_hidden", output) if n in kept]
    if taken:
        raise HeadError(f"the network below {spec.feature_output} already has a layer named {taken[0]!r}, the name "
                        f"fine-tune.py gives the new head; pass --keep-head-names to name it {spec.classifier} -> "
                        f"{spec.output_name}")
    return HeadSpec(classifier=classifier, feature_output=spec.feature_output, output_name=output)


def to_float16(symbol: mx.sym.Symbol, spec: HeadSpec) -> mx.sym.Symbol:
    """The training network in float16: the input is cast to float16 (so every weight infers as float16) and
    the classifier's logits back to float32, so the softmax and its gradient stay accurate.

    Checkpoints keep the float32 symbol (same parameter names and shapes), which runs anywhere, CPU included.
    """
    logits = symbol.get_internals()[f"{spec.classifier}_output"]
    logits = logits(**{INPUT_NAME: mx.sym.Cast(mx.sym.var(INPUT_NAME), dtype="float16", name=f"{INPUT_NAME}_fp16")})
    logits = mx.sym.Cast(logits, dtype="float32", name=f"{spec.classifier}_fp32")
    return mx.sym.SoftmaxOutput(logits, name=spec.output_name)


def build_head(features: mx.sym.Symbol, num_classes: int, spec: HeadSpec, hidden: int = 0,
               hidden_dropout: float = 0.5) -> mx.sym.Symbol:
    """New classifier on top of `features`: [FC(hidden) -> ReLU -> Dropout ->] FC(num_classes) -> SoftmaxOutput.

    The classifier keeps the old layer's name (e.g. fc8), so code that looks it up keeps working.
    """
    x = features
    if hidden:
        x = mx.sym.FullyConnected(x, num_hidden=hidden, name=f"{spec.classifier}_hidden")
        x = mx.sym.Activation(x, act_type="relu", name=f"{spec.classifier}_hidden_relu")
        if hidden_dropout > 0:
            x = mx.sym.Dropout(x, p=hidden_dropout, name=f"{spec.classifier}_hidden_drop")
    x = mx.sym.FullyConnected(x, num_hidden=num_classes, name=spec.classifier)
    return mx.sym.SoftmaxOutput(x, name=spec.output_name)


def xavier_uniform(shape: Sequence[int], rng: np.random.RandomState) -> np.ndarray:
    """Xavier-uniform (Glorot, fan-avg) weights, float32: U(-b, b) with b = sqrt(6 / (fan_in + fan_out)).

    The one initialisation of new layers (head surgery here, the fused classifier in train.recipes.fusion);
    numpy-seeded so a run's new head does not depend on MXNet's global random state.
    """
    fan_in, fan_out = int(np.prod(shape[1:])), int(shape[0])
    bound = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-bound, bound, size=tuple(shape)).astype(np.float32)


def init_array(name: str, shape: Tuple[int, ...], rng: np.random.RandomState) -> np.ndarray:
    """Fresh values for a new parameter: Xavier-uniform weights, zero biases (and anything 1-D)."""
    if name.endswith("_bias") or len(shape) < 2:
        return np.zeros(shape, np.float32)
    return xavier_uniform(shape, rng)


def he_normal(shape: Sequence[int], rng: np.random.RandomState) -> np.ndarray:
    """He (MSRA) weights, float32: N(0, 2 / fan_in); mx.init.Xavier(rnd_type='gaussian', factor_type='in',
    magnitude=2), what fine-tune.py's common/fit.py initialises a network with unless it is a VGG."""
    fan_in = max(int(np.prod(shape[1:])), 1)
    return rng.normal(0.0, np.sqrt(2.0 / fan_in), size=tuple(shape)).astype(np.float32)


def scratch_network(symbol: mx.sym.Symbol, arg_params: Dict[str, mx.nd.NDArray],
                    aux_params: Dict[str, mx.nd.NDArray], seed: int = 0
                    ) -> Tuple[mx.sym.Symbol, Dict[str, mx.nd.NDArray], Dict[str, mx.nd.NDArray]]:
    """The same network with fresh weights: the "trained from scratch" baseline of a fine-tune.

    Weights are initialised as common/fit.py's default initializer does: Xavier-uniform (xavier_uniform) for
    a VGG, He (he_normal) for anything else; biases and betas 0, gammas and Caffe Scale factors 1, moving means
    0 and variances 1, numpy-seeded by `seed`. Every BatchNorm learns its statistics (a converted Caffe net
    keeps them fixed, right for fine-tuning, but it would leave a random ResNet unnormalised), with MXNet's
    default momentum 0.9: Caffe's 0.999 would keep the moving statistics near their initial values over a
    short run. A parameter whose role its name does not tell is an error, not a guess.

    Raises:
        HeadError: naming the parameter or auxiliary state.
    """
    import json
    graph = json.loads(symbol.tojson())
    for node in graph["nodes"]:
        if node["op"] == "BatchNorm":
            node.setdefault("attrs", {}).update(use_global_stats="False", fix_gamma="False", momentum="0.9")
    fresh_symbol = mx.sym.load_json(json.dumps(graph))
    weight_init = xavier_uniform if vgg.matches(symbol) else he_normal
    rng = np.random.RandomState(seed)
    args, aux = {}, {}
    for name in sorted(arg_params):
        shape = arg_params[name].shape
        if name.endswith("_weight") and len(shape) >= 2:
            values = weight_init(shape, rng)
        elif name.endswith(("_bias", "_beta")):
            values = np.zeros(shape, np.float32)
        elif name.endswith("_gamma") or "scale" in name:
            values = np.ones(shape, np.float32)
        else:
            raise HeadError(f"cannot tell how to initialise parameter {name} from scratch (not a weight, bias, "
                            f"beta, gamma or scale by its name)")
        args[name] = mx.nd.array(values)
    for name in sorted(aux_params):
        if name.endswith(("_moving_mean", "_moving_var")):
            fill = np.ones if name.endswith("_moving_var") else np.zeros
            aux[name] = mx.nd.array(fill(aux_params[name].shape, np.float32))
        else:
            raise HeadError(f"cannot tell how to initialise auxiliary state {name} from scratch")
    return fresh_symbol, args, aux


def with_lr_mults(symbol: mx.sym.Symbol, mults: Dict[str, float]) -> mx.sym.Symbol:
    """A copy of `symbol` whose parameter variables carry `__lr_mult__` (those not 1).

    An optimizer that Module creates by name reads these attributes through its `sym` (what
    mx.sym.var(lr_mult=...) sets), on whatever device/kvstore layout Module chooses; this is how the
    `--lr-mult` rules reach it. The checkpoint keeps the symbol without them.
    """
    import json
    graph = json.loads(symbol.tojson())
    for node in graph["nodes"]:
        mult = mults.get(node["name"], 1.0) if node["op"] == "null" else 1.0
        if mult != 1.0:
            node.setdefault("attrs", {})["__lr_mult__"] = repr(float(mult))
    return mx.sym.load_json(json.dumps(graph))


def replace_head(symbol: mx.sym.Symbol, arg_params: Dict[str, mx.nd.NDArray], aux_params: Dict[str, mx.nd.NDArray],
                 input_shape: Sequence[int], num_classes: int, spec: HeadSpec, hidden: int = 0,
                 hidden_dropout: float = 0.5, seed: int = 0, dtype: str = "float32",
                 initializer: Optional[mx.init.Initializer] = None) -> NewHead:
    """Swap the classifier of a pretrained network for a new one with `num_classes` outputs.

    Args:
        symbol: the pretrained network (any output; only its internals up to `spec.feature_output` are used).
        arg_params / aux_params: its weights, as from mx.model.load_checkpoint.
        input_shape: (C, H, W) of the data input, used to check every weight's shape.
        num_classes: outputs of the new classifier.
        spec: where the head is (see find_head).
        hidden: width of an optional hidden FC layer before the classifier (0: none).
        hidden_dropout: dropout after the hidden layer.
        seed: seeds the new head's initialisation, so runs are repeatable.
        dtype: "float16" casts the input to float16 (GPU mixed precision; weights stay float32 masters
            in the optimizer).
        initializer: an mx.init initializer for the new weights (fit.py's --initializer), drawn after
            mx.random.seed(seed); None: `init_array`'s numpy-seeded Xavier-uniform.

    Returns:
        NewHead with the new symbol and a complete set of parameters.

    Raises:
        HeadError: the feature output is missing, or a pretrained parameter the new network needs is missing
            or has the wrong shape.
    """
    if num_classes < 2:
        raise HeadError(f"num_classes must be at least 2, got {num_classes}")
    internals = symbol.get_internals()
    if spec.feature_output not in internals.list_outputs():
        raise HeadError(f"feature output {spec.feature_output!r} is not in the network; "
                        f"FullyConnected layers: {fc_layers(symbol)}")
    features = internals[spec.feature_output]
    if dtype not in ("float32", "float16"):
        raise HeadError(f"dtype {dtype!r} is not supported; use float32 or float16")
    new_sym = build_head(features, num_classes, spec, hidden, hidden_dropout)
    if dtype == "float16":
        new_sym = to_float16(new_sym, spec)

    label = f"{spec.output_name}_label"
    arg_shapes, _, aux_shapes = new_sym.infer_shape(**{INPUT_NAME: (1,) + tuple(input_shape)})
    if arg_shapes is None:
        raise HeadError(f"cannot infer the new network's shapes for input {tuple(input_shape)}")
    arg_names = [n for n in new_sym.list_arguments() if n not in (INPUT_NAME, label)]
    shapes = dict(zip(new_sym.list_arguments(), arg_shapes))
    aux_shape = dict(zip(new_sym.list_auxiliary_states(), aux_shapes))
    head_layers = {spec.classifier, f"{spec.classifier}_hidden"}
    new_names = [n for n in arg_names if n.rsplit("_", 1)[0] in head_layers]

    problems = []
    for name in arg_names:
        if name in new_names:
            continue
        if name not in arg_params:
            problems.append(f"{name} missing")
        elif tuple(arg_params[name].shape) != tuple(shapes[name]):
            problems.append(f"{name} has shape {tuple(arg_params[name].shape)}, the network needs {shapes[name]}")
    for name, shape in aux_shape.items():
        if name not in aux_params:
            problems.append(f"{name} (auxiliary state) missing")
        elif tuple(aux_params[name].shape) != tuple(shape):
            problems.append(f"{name} has shape {tuple(aux_params[name].shape)}, the network needs {shape}")
    if problems:
        more = f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
        raise HeadError(f"pretrained weights do not fit the network below {spec.feature_output}: "
                        f"{'; '.join(problems[:5])}{more}; were they converted from the same prototxt?")

    rng = np.random.RandomState(seed)
    args = {n: arg_params[n] for n in arg_names if n not in new_names}
    if initializer is not None:
        mx.random.seed(seed)
    for name in new_names:
        if initializer is None:
            args[name] = mx.nd.array(init_array(name, shapes[name], rng))
        else:
            args[name] = mx.nd.zeros(shapes[name])
            initializer(mx.init.InitDesc(name), args[name])
    aux = {n: aux_params[n] for n in aux_shape}
    # Every pretrained parameter that does not reach the new network as it was: left out by the cut, or
    # replaced by a fresh one of the same name (the old classifier).
    replaced = sorted(n for n in new_names if n in arg_params)
    left_out = sorted((set(arg_params) - set(args)) | (set(aux_params) - set(aux)))
    dropped = sorted(set(replaced) | set(left_out))
    log.info("new head %s(%d classes) on %s; fresh: %s; pretrained weights kept: %d", spec.classifier,
             num_classes, spec.feature_output, new_names, len(args) - len(new_names) + len(aux))
    if dropped:
        log.warning("head surgery dropped %d pretrained parameter(s): %s%s", len(dropped),
                    ", ".join(f"{n} (replaced)" for n in replaced),
                    (", " if replaced and left_out else "") + ", ".join(f"{n} (cut off)" for n in left_out))
    return NewHead(new_sym, args, aux, spec, new_names, dropped)


# ---- lr_mult rules -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LrMultRule:
    """`REGEX=MULT`: parameters whose name matches REGEX (re.search) train at MULT x the learning rate."""

    pattern: str
    mult: float

    @property
    def regex(self) -> "re.Pattern[str]":
        return re.compile(self.pattern)


def parse_lr_mult(text: str) -> LrMultRule:
    """Parse one `--lr-mult 'REGEX=MULT'` rule (split at the last '=', so the regex may contain '=')."""
    pattern, sep, mult = text.rpartition("=")
    if not sep or not pattern:
        raise ValueError(f"--lr-mult {text!r}: expected 'REGEX=MULT', e.g. 'conv[1-4]=0' or 'fc8=10'")
    try:
        value = float(mult)
    except ValueError:
        raise ValueError(f"--lr-mult {text!r}: MULT {mult!r} is not a number") from None
    if value < 0 or not np.isfinite(value):
        raise ValueError(f"--lr-mult {text!r}: MULT must be a finite number >= 0 (0 freezes)")
    try:
        re.compile(pattern)
    except re.error as err:
        raise ValueError(f"--lr-mult {text!r}: bad regular expression ({err})") from None
    return LrMultRule(pattern, value)


def resolve_lr_mults(param_names: Iterable[str], rules: Sequence[LrMultRule]) -> Dict[str, float]:
    """Map every parameter name to its multiplier; later rules override earlier ones; unmatched names get 1.

    Raises:
        ValueError: a rule matches no parameter (a typo would otherwise silently train everything).
    """
    names = list(param_names)
    mults = {n: 1.0 for n in names}
    for rule in rules:
        hits = [n for n in names if rule.regex.search(n)]
        if not hits:
            raise ValueError(f"--lr-mult '{rule.pattern}={rule.mult:g}' matches no parameter; parameters look "
                             f"like {names[:3] + names[-2:]}")
        for name in hits:
            mults[name] = rule.mult
    return mults


def frozen(mults: Dict[str, float]) -> List[str]:
    """Parameters with multiplier 0: given to Module as fixed_param_names."""
    return [name for name, mult in mults.items() if mult == 0]
