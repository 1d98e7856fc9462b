"""Read and validate a BIDS Stats Model before any data is read.

The model is checked by ``bsmschema`` (the pydantic schema of BIDS Stats
Models): a model it refuses gives the schema's message and the path of the
offending field (``Nodes[1].Level: Input should be 'Run', 'Session', 'Subject'
or 'Dataset' (received 'Participant')``). Fields the schema does not know are
refused here too (the schema's own ``extra='forbid'`` setting is misspelt in
bsmschema 0.1 and so not applied), and so are edges naming a node that does not
exist. Everything past that (variables, transformations, contrasts against
the data) is ``pybids``' ``BIDSStatsModelsGraph``'s to check.
"""

from __future__ import annotations

import json
import os
import typing
from contextlib import contextmanager
from pathlib import Path

import bids
import pydantic
from bsmschema.models import BIDSStatsModel

from chunkglm.errors import ChunkglmError, InputError

__all__ = ["read_model", "validate_model"]

#: Errors listed in one message; the rest are counted.
_SHOWN = 3


def read_model(source) -> dict:
    """The model as a validated dict (the JSON's own keys, not pybids' snake_case).

    Parameters
    ----------
    source : str, Path or dict
        A BIDS Stats Model JSON file, or the model already read.

    Returns
    -------
    dict
        The model as written in the file.

    Raises
    ------
    InputError
        The file is missing or not JSON, or the model is not a valid BIDS
        Stats Model (the message names the field).
    """
    if isinstance(source, dict):
        model, where = source, "the model"
    else:
        path = Path(source)
        if not path.is_file():
            raise InputError(f"--model {path}: no such file; give a BIDS Stats Model JSON file "
                             "(or 'auto' for the model pybids derives from the events).")
        try:
            model = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise InputError(f"the model {path} is not valid JSON ({err}); fix the file.") from None
        where = f"the model {path}"
    validate_model(model, where)
    return model


def validate_model(model, where="the model") -> BIDSStatsModel:
    """Check ``model`` against bsmschema's ``BIDSStatsModel``; returns the parsed model.

    Raises
    ------
    InputError
        With each problem as ``<field path>: <schema message> (received <value>)``.
    """
    if not isinstance(model, dict):
        raise InputError(f"{where} must be a JSON object (a BIDS Stats Model); received "
                         f"{type(model).__name__}.")
    try:
        parsed = BIDSStatsModel.model_validate(model)
    except pydantic.ValidationError as err:
        problems = [_describe(error) for error in err.errors()]
        raise InputError(_message(where, problems)) from None
    problems = _unknown_fields(model, BIDSStatsModel, ()) + _edge_problems(parsed)
    if problems:
        raise InputError(_message(where, problems))
    return parsed


def _message(where, problems) -> str:
    shown = "; ".join(problems[:_SHOWN])
    more = f" (and {len(problems) - _SHOWN} more)" if len(problems) > _SHOWN else ""
    return f"{where} is not a valid BIDS Stats Model: {shown}{more}."


def field_path(loc) -> str:
    """``("Nodes", 1, "Level")`` -> ``"Nodes[1].Level"``."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(the model)"


def _describe(error) -> str:
    path = field_path(_model_loc(error["loc"]))
    received = "" if error["type"] == "missing" else f" (received {error.get('input')!r})"
    return f"{path}: {error['msg']}{received}"


def _model_loc(loc) -> tuple:
    """pydantic's location without the names of union members (``'list[...]'``, ``'literal[1]'``)."""
    return tuple(part for part in loc if not (isinstance(part, str) and ("[" in part or part in ("str", "int"))))


def _unknown_fields(value, annotation, loc) -> list[str]:
    """Keys that the schema's classes do not declare, anywhere in the model."""
    cls = _model_class(annotation)
    if cls is not None and isinstance(value, dict):
        problems = []
        for key, item in value.items():
            if key not in cls.model_fields:
                known = ", ".join(cls.model_fields)
                problems.append(f"{field_path((*loc, key))}: not a field of {cls.__name__} (known: {known})")
            else:
                problems += _unknown_fields(item, cls.model_fields[key].annotation, (*loc, key))
        return problems
    item_type = _list_item(annotation)
    if item_type is not None and isinstance(value, list):
        return [p for index, item in enumerate(value) for p in _unknown_fields(item, item_type, (*loc, index))]
    return []


def _model_class(annotation):
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, pydantic.BaseModel):
            return candidate
    return None


def _list_item(annotation):
    for candidate in (annotation, *typing.get_args(annotation)):
        if typing.get_origin(candidate) is list:
            (item,) = typing.get_args(candidate)
            return item
    return None


def _edge_problems(parsed: BIDSStatsModel) -> list[str]:
    names = [node.Name for node in parsed.Nodes]
    problems = [f"Nodes: the name {name!r} is used by more than one node (names must be unique)"
                for name in sorted({n for n in names if names.count(n) > 1})]
    for index, edge in enumerate(parsed.Edges or []):
        for side in ("Source", "Destination"):
            if getattr(edge, side) not in names:
                problems.append(f"Edges[{index}].{side}: no node is named {getattr(edge, side)!r} "
                                f"(nodes: {', '.join(names)})")
    return problems


@contextmanager
def pybids_refusal(what: str):
    """Within the block, an error raised inside pybids (its graph, variables, transformations or
    contrasts, built from what the model says) becomes one InputError naming ``what``.

    A model can pass the schema and still ask what the dataset cannot give (a GroupBy entity
    the runs lack, a transformation of an absent variable, contrast weights of the wrong
    length): pybids then raises from deep inside. Errors raised in chunkglm's own code
    pass through unchanged.
    """
    try:
        yield
    except ChunkglmError:
        raise
    except Exception as err:  # noqa: BLE001 - classified by where it was raised
        if not _raised_in_pybids(err):
            raise
        detail = str(err).strip().splitlines()[0] if str(err).strip() else "no message"
        raise InputError(f"{what}: pybids cannot build it from the model ({type(err).__name__}: {detail}). "
                         "Check its GroupBy, Transformations, Model.X and Contrasts against the dataset "
                         "and the BIDS Stats Models specification.") from err


_PYBIDS = os.path.dirname(bids.__file__) + os.sep


def _raised_in_pybids(err: BaseException) -> bool:
    """Raised by pybids, or by a library pybids called (numpy, pandas, formulaic): of the
    traceback's frames in pybids or in chunkglm, the innermost is pybids'."""
    ours = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))) + os.sep
    owners = []
    tb = err.__traceback__
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if filename.startswith(_PYBIDS):
            owners.append("pybids")
        elif filename.startswith(ours):
            owners.append("chunkglm")
        tb = tb.tb_next
    return bool(owners) and owners[-1] == "pybids"
