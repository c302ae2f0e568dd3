"""Class names: the one rule for which file names a model's outputs, shared by the predictor and deploy.

- A **model**'s class names are its sidecar's `class_names` (symbols/sidecar.py): the trainer writes them from
  the class map it trained on, so they are the truth for that checkpoint.
- A **data set**'s class names are its class map `PREFIX.classes.json` (recbuild/classmap.py), found from any
  .lst/.rec/.idx path.
- A `--classes` file (predict, deploy) names the outputs of a model whose sidecar has none (a converted model).
  Given for a model that has names, it must list the same classes in the same order; it never overrides them,
  so a bundle or a CSV cannot silently relabel a model's columns.

Errors are `ClassNamesError` (a ValueError), one line naming the files involved.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Union

from recbuild.classmap import SUFFIX, find_class_map, read_class_map


class ClassNamesError(ValueError):
    """Class names missing, unreadable or disagreeing; the message names the files."""


def check_same_classes(names: Sequence[str], where: str, other: Sequence[str], other_where: str) -> None:
    """Two class lists must be identical (same names, same order): labels mean the same class on both sides.

    Raises:
        ClassNamesError: naming both files, the sizes and the first label whose name differs.
    """
    names, other = list(names), list(other)
    if names == other:
        return
    first = next((i for i, (a, b) in enumerate(zip(names, other)) if a != b), min(len(names), len(other)))
    left = repr(names[first]) if first < len(names) else "nothing"
    right = repr(other[first]) if first < len(other) else "nothing"
    raise ClassNamesError(f"class maps differ: {where} ({len(names)} classes) and {other_where} ({len(other)} "
                          f"classes) first differ at label {first}: {left} vs {right}; both must list the same "
                          f"classes in the same order (pack every split from one `python -m recbuild --list` run)")


def class_map_file(path: Union[str, Path]) -> Path:
    """The class map a `--classes` argument means: a `*.classes.json` itself, or the one beside a .lst/.rec/.idx.

    Raises:
        ClassNamesError: no class map is found beside a data file.
    """
    path = Path(path)
    if path.name.endswith(SUFFIX):
        return path
    found = find_class_map(path)
    if found is None:
        raise ClassNamesError(f"{path}: no class map (*{SUFFIX}) found beside it; pass the class map written by "
                              f"`python -m recbuild --list`")
    return found


def _read(path: Path) -> List[str]:
    try:
        return read_class_map(path)
    except ValueError as err:  # already one line naming the file
        raise ClassNamesError(str(err)) from None


def model_class_names(sidecar_names: Optional[Sequence[str]], sidecar: Union[str, Path],
                      classes_arg: Optional[Union[str, Path]], num_outputs: int, required: bool = False
                      ) -> List[str]:
    """The names of a model's outputs, by the rule in the module docstring.

    Args:
        sidecar_names: the sidecar's `class_names` (None or empty when it has none).
        sidecar: path of the model's sidecar, for messages.
        classes_arg: a `--classes` argument (class map, or a .lst/.rec/.idx beside one), or None.
        num_outputs: size of the model's output; the names must number exactly this.
        required: raise when neither the sidecar nor `classes_arg` names the classes (deploy: a bundle needs
            real names); otherwise the columns are named class_0 .. class_{n-1} (predict).

    Returns:
        The class names in label order.

    Raises:
        ClassNamesError: `classes_arg` disagrees with the sidecar's names, cannot be read or found, the names
            do not number `num_outputs`, or (with `required`) there are none.
    """
    source, counted = str(sidecar), "its sidecar lists"
    if sidecar_names:
        names = list(sidecar_names)
        if classes_arg:
            given = class_map_file(classes_arg)
            check_same_classes(names, f"the model's sidecar {sidecar}", _read(given), str(given))
    elif classes_arg:
        given = class_map_file(classes_arg)
        names = _read(given)
        source, counted = f"{given} (the sidecar {sidecar} has no class names)", "the class map has"
    elif required:
        raise ClassNamesError(f"{sidecar}: the sidecar has no class names; pass --classes PREFIX{SUFFIX} "
                              f"(written by `python -m recbuild --list`)")
    else:
        names = [f"class_{i}" for i in range(num_outputs)]
    if len(names) != num_outputs:
        raise ClassNamesError(f"{source}: the model has {num_outputs} outputs but {counted} {len(names)} classes")
    return names
