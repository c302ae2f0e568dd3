"""Caffe's text-parser rules for a prototxt, with every offence listed at once.

Caffe reads a prototxt with protobuf's text parser against its full caffe.proto, which refuses an unknown field,
an enum value it does not define and a value of the wrong type. Our caffe.proto (beside this file) holds the
messages of every layer we convert, field for field as Caffe (and the SSD fork) defines them, so the same
rules apply to them here. For layers we do not convert, only their parameter message's name has to be one Caffe
knows (`OTHER_CAFFE_PARAMS`): such a layer is refused by name, or cut away with --output-layer, so its
settings have no effect. protobuf's parser stops at the first problem and does not say which layer it is in;
this scan walks the whole file and names the field, the layer and the line of each.
"""
from __future__ import annotations

import re
from typing import List, Optional, Tuple

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from tools.caffe_converter import caffe_pb2

# LayerParameter fields of BVLC Caffe and the SSD fork (weiliu89/caffe) for layer types this converter does not
# model. Accepted without looking inside: a layer using them is refused by name unless the net is cut before it.
OTHER_CAFFE_PARAMS = frozenset({
    "annotated_data_param", "contrastive_loss_param", "detection_evaluate_param", "dummy_data_param",
    "embed_param", "hdf5_data_param", "hdf5_output_param",
    "hinge_loss_param", "infogain_loss_param", "multibox_loss_param",
    "parameter_param", "python_param", "recurrent_param", "spp_param",
    "video_data_param", "window_data_param",
})
# Fields of a converted layer's message accepted without looking inside: they only matter outside inference.
UNREAD_FIELDS = frozenset({("DetectionOutputParameter", "save_output_param")})
# V1 `layers {}` fields with no V2 counterpart here: shared-blob modes and a wrapped V0 layer (refused on loading).
_V1_ONLY = frozenset({"blob_share_mode", "layer"})

_LAYER_MESSAGES = ("LayerParameter", "V1LayerParameter")
_TOKEN = re.compile(r'\s+|#[^\n]*|"(?:[^"\\\n]|\\.)*"|\'(?:[^\'\\\n]|\\.)*\'|[A-Za-z0-9_.+\-]+|[:{}<>\[\],;]')
_OPEN = {"{": "}", "<": ">"}
_INT_TYPES = {FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT32,
              FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SINT64}
_FLOAT_TYPES = {FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE}


def _tokens(text: str) -> List[Tuple[str, int]]:
    out, line, pos = [], 1, 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:  # a character no prototxt holds: the scan stops there, protobuf's parser names it
            out.append((text[pos], line))
            return out
        tok = m.group(0)
        if tok.strip() and not tok.startswith("#"):
            out.append((tok, line))
        line += tok.count("\n")
        pos = m.end()
    return out


def _bad_scalar(field: FieldDescriptor, tok: str) -> Optional[str]:
    """Why `tok` is not a valid value of `field` (None when it is)."""
    if field.type == FieldDescriptor.TYPE_ENUM:
        if tok in field.enum_type.values_by_name or re.fullmatch(r"-?\d+", tok):
            return None
        return f"{field.enum_type.name} has no value {tok} (valid: {', '.join(field.enum_type.values_by_name)})"
    if field.type == FieldDescriptor.TYPE_STRING or field.type == FieldDescriptor.TYPE_BYTES:
        return None if tok[0] in "\"'" else f"expects a quoted string, got {tok}"
    if tok[0] in "\"'":
        return f"expects a {'number' if field.type != FieldDescriptor.TYPE_BOOL else 'true/false'}, got {tok}"
    if field.type == FieldDescriptor.TYPE_BOOL:
        ok = tok in ("true", "false", "True", "False", "t", "f", "1", "0")
        return None if ok else f"expects true/false, got {tok}"
    if field.type in _INT_TYPES:
        return None if re.fullmatch(r"[-+]?(0x[0-9a-fA-F]+|\d+)", tok) else f"expects an integer, got {tok}"
    if field.type in _FLOAT_TYPES:
        return None if re.fullmatch(r"[-+]?(\d+\.?\d*([eE][-+]?\d+)?|\.\d+([eE][-+]?\d+)?|inf|nan|infinity)f?",
                                    tok, re.IGNORECASE) else f"expects a number, got {tok}"
    return None


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_QUOTES = ('"', "'")


class _Scan:
    """A recursive walk of the token list against the message descriptors, collecting offences.

    It never reads past the last token: a file that ends inside a field or a block (a truncated file) is one
    offence naming the field and its line, and a token where the grammar has no place for it (a stray `}` or
    `:`) stops the walk, leaving that syntax error to protobuf's parser, which names its line and column.
    """

    def __init__(self, tokens: List[Tuple[str, int]]):
        self.toks, self.pos = tokens, 0
        self.problems: List[Tuple[int, str, Optional[dict]]] = []  # (line, what, the layer it is in)
        self.stopped = False
        self.truncated: Optional[Tuple[int, str, Optional[dict]]] = None  # where the tokens ran out, and in what

    def peek(self) -> str:
        return self.toks[self.pos][0] if self.pos < len(self.toks) else ""

    def _ends_inside(self, what: str, line: int, layer: Optional[dict]) -> None:
        self.truncated = (line, f"the file ends inside {what}; is it truncated?", layer)
        self.stopped = True

    def message(self, desc: Optional[Descriptor], close: str, layer: Optional[dict], opened: str = "",
                line: int = 0) -> None:
        while not self.stopped and self.pos < len(self.toks) and self.peek() != close:
            name, line = self.toks[self.pos]
            if not _NAME.fullmatch(name):  # not a field name: a syntax error protobuf's parser will name
                self.stopped = True
                return
            self.pos += 1
            if self.peek() == ":":
                self.pos += 1
            field = desc.fields_by_name.get(name) if desc is not None else None
            accepted = (desc is not None and desc.name in _LAYER_MESSAGES and name in OTHER_CAFFE_PARAMS) or \
                (desc is not None and desc.name == "V1LayerParameter" and name in _V1_ONLY) or \
                (desc is not None and (desc.name, name) in UNREAD_FIELDS)
            if desc is not None and field is None and not accepted:
                self.problems.append((line, f"unknown field '{name}' in {desc.name}", layer))
            if desc is not None and desc.name in _LAYER_MESSAGES and name == "name":
                if layer is not None and self.peek()[:1] in _QUOTES:
                    layer["name"] = self.peek()[1:-1]
            self.value(field if desc is not None else None, layer, line, name)
            if self.peek() in (",", ";"):
                self.pos += 1
        if close and not self.stopped and self.pos >= len(self.toks):
            self._ends_inside(f"'{opened} {{' (no closing '{close}')", line, layer)

    def value(self, field: Optional[FieldDescriptor], layer: Optional[dict], line: int, name: str) -> None:
        tok = self.peek()
        if not tok:
            self._ends_inside(f"field '{name}' (no value)", line, layer)
            return
        if tok == "[":
            self.pos += 1
            while not self.stopped and self.pos < len(self.toks) and self.peek() != "]":
                self.value(field, layer, line, name)
                if self.peek() == ",":
                    self.pos += 1
            if not self.stopped and self.pos >= len(self.toks):
                self._ends_inside(f"the list of field '{name}' (no closing ']')", line, layer)
            self.pos += 1
            return
        if tok in _OPEN:
            self.pos += 1
            sub = field.message_type if field is not None and field.message_type is not None else None
            if field is not None and sub is not None and sub.name in _LAYER_MESSAGES:
                layer = {"name": None, "line": line}
            self.message(sub, _OPEN[tok], layer, name, line)
            self.pos += 1
            return
        if tok in ("}", ">", "]", ":", ",", ";"):  # a value is missing: protobuf's parser names the position
            self.stopped = True
            return
        self.pos += 1
        while tok[:1] in _QUOTES and self.peek()[:1] in _QUOTES and self.peek():  # adjacent strings concatenate
            self.pos += 1
        if field is not None and field.message_type is None:
            why = _bad_scalar(field, tok)
            if why:
                self.problems.append((self.toks[self.pos - 1][1], f"field '{field.name}' {why}", layer))


def _where(path: str, line: int, what: str, layer: Optional[dict]) -> str:
    where = f"layer '{layer['name']}' (line {layer['line']}): " if layer and layer.get("name") else \
        (f"layer at line {layer['line']}: " if layer else "")
    return f"{path}:{line}: {where}{what}"


def check_prototxt_text(text: str, path: str) -> Tuple[List[str], Optional[str]]:
    """Every field, enum value or value type in `text` that Caffe's parser refuses, one message each, and
    where the file ends inside a field or block (a truncated file), if it does.

    Returns:
        (["deploy.prototxt:12: layer 'relu1': unknown field 'negative_slop' in ReLUParameter", ...],
        "deploy.prototxt:40: layer 'fc8' (line 38): the file ends inside field 'num_output' ..." or None);
        other syntax errors are left to protobuf's parser, which names their line and column.
    """
    scan = _Scan(_tokens(text))
    scan.message(caffe_pb2.NetParameter.DESCRIPTOR, "", None)
    problems = [_where(path, line, what, layer) for line, what, layer in scan.problems]
    return problems, (_where(path, *scan.truncated) if scan.truncated else None)
