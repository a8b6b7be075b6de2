"""``epq enqueue KIND``: one job from the command line, its fields as flags or JSON; ``epq
enqueue KIND --help`` lists a kind's fields from its request model."""

from __future__ import annotations

import argparse
import enum
import json
import sys
import types
import typing
from collections.abc import Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

from pydantic import AwareDatetime, ValidationError

from ..errors import MAX_NESTING, InvalidRequest
from ..kinds import KINDS
from ..models import ENQUEUE_OPTION_FIELDS
from ..service import QueueService
from ..settings import EpqSettings
from ._broker import open_broker
from .common import command

_DICT_FIELDS = {"source_data", "job_metadata", "source_metadata", "trigger_metadata", "schedule_metadata"}
#: The most ``--json @FILE`` or ``--json -`` reads: room for a payload at the 1 MiB limit written
#: out with indentation; what is over the payload limit is refused by name once parsed.
MAX_JSON_INPUT_BYTES = 8 * 1024 * 1024


@command
def run(args: argparse.Namespace, extra: Sequence[str], parser: argparse.ArgumentParser) -> int:
    if args.help:
        print(kind_help(args.kind) if args.kind else _subparser(parser, "enqueue").format_help(), end="")
        return 0
    if args.kind is None:
        _subparser(parser, "enqueue").error("KIND is required: one of " + ", ".join(KINDS))
    fields = parse_fields(args.kind, extra, args.json_fields)
    try:  # bad input is refused before any broker is touched
        request = KINDS[args.kind].model.model_validate(fields)
    except ValidationError as exc:
        raise InvalidRequest.from_validation_error(args.kind, exc) from None
    broker = open_broker(args, may_start_embedded=True)
    result = QueueService(broker).enqueue(args.kind, request)
    print(result.model_dump_json(indent=2))
    return 0


def parse_fields(kind: str, extra: Sequence[str], json_fields: str | None) -> dict[str, Any]:
    """Turn ``--field-name VALUE`` pairs (and ``--json``) into request fields."""
    fields: dict[str, Any] = {}
    if json_fields:
        loaded = _load_json(kind, "--json", _json_input(kind, json_fields))
        if not isinstance(loaded, dict):
            raise InvalidRequest(kind, [{"field": "--json", "message": "must be a JSON object"}])
        fields.update(loaded)
    items = list(extra)
    while items:
        flag = items.pop(0)
        if not flag.startswith("--"):
            raise InvalidRequest(kind, [{"field": flag, "message": "expected --field-name VALUE"}])
        name, eq, value = flag[2:].partition("=")
        name = name.replace("-", "_")
        if not eq:
            if not items:
                raise InvalidRequest(kind, [{"field": name, "message": "missing value"}])
            value = items.pop(0)
        if name in _DICT_FIELDS:
            fields[name] = _load_json(kind, name, value)
        elif name == "priority":
            fields[name] = int(value) if value.lstrip("-").isdigit() else value
        else:
            fields[name] = value
    return fields


def _json_input(kind: str, given: str) -> str:
    """The text of ``--json``: as given, or read from the file ``@PATH`` or from stdin (``-``),
    at most ``MAX_JSON_INPUT_BYTES``."""
    if given != "-" and not given.startswith("@"):
        return given
    where = "stdin" if given == "-" else given[1:]
    try:
        if given == "-":
            data = sys.stdin.buffer.read(MAX_JSON_INPUT_BYTES + 1)
        else:
            with open(given[1:], "rb") as file:
                data = file.read(MAX_JSON_INPUT_BYTES + 1)
    except OSError as exc:
        problem = f"cannot read {where}: {exc.strerror or exc}"
        raise InvalidRequest(kind, [{"field": "--json", "message": problem}]) from None
    if len(data) > MAX_JSON_INPUT_BYTES:
        problem = f"{where} holds more than {MAX_JSON_INPUT_BYTES} bytes (a job's payload is 1 MiB at most)"
        raise InvalidRequest(kind, [{"field": "--json", "message": problem}])
    try:
        return data.decode()
    except UnicodeDecodeError as exc:
        problem = f"{where} is not UTF-8 text (byte {exc.start})"
        raise InvalidRequest(kind, [{"field": "--json", "message": problem}]) from None


def _load_json(kind: str, field: str, text: str) -> Any:
    """``json.loads``, with a parse error or nesting too deep for the parser as ``InvalidRequest``."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(kind, [{"field": field, "message": f"not valid JSON: {exc}"}]) from None
    except RecursionError:
        problem = f"nested deeper than {MAX_NESTING} levels"
        raise InvalidRequest(kind, [{"field": field, "message": problem}]) from None


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._subparsers._group_actions if parser._subparsers else ():
        if isinstance(action, argparse._SubParsersAction):
            found: argparse.ArgumentParser = action.choices[name]
            return found
    raise KeyError(name)  # pragma: no cover


def kind_help(kind: str) -> str:
    """``epq enqueue KIND --help``: the kind's fields and enqueue options, from its request model."""
    job_kind = KINDS[kind]
    model = job_kind.model
    own: list[tuple[str, str]] = []
    options: list[tuple[str, str]] = []
    for name, info in model.model_fields.items():
        metavar, what = _describe_type(info.annotation)
        flag = f"--{name.replace('_', '-')} {metavar}"
        if info.is_required():
            text = "required"
        elif name == "queue_name":
            text = f"default: the kind's queue, {job_kind.queue}"
        elif name == "priority":
            text = f"1 runs first; default: the kind's priority, {job_kind.priority.value}"
        elif name == "run_at":
            text = "default: now"
        elif name == "unique_mode":
            metavar = "{keep_first,replace,debounce}"
            flag = f"--unique-mode {metavar}"
            setting = f"EPQ_{job_kind.unique_mode_setting.upper()}"
            text = f"what a duplicate does; default: {setting} (keep_first)"
        else:
            text = f"default: {json.dumps(info.get_default(call_default_factory=True))}"
        if what:
            text += f"; {what}"
        (options if name in ENQUEUE_OPTION_FIELDS else own).append((flag, text))
    window = EpqSettings.model_fields[job_kind.unique_window_setting].default
    required = " ".join(f for f, t in own if t.startswith("required"))
    rows = [*own, *options]
    width = max(len(f) for f, _ in rows) + 2
    out = [
        f"usage: epq enqueue {kind} {required} [--FIELD VALUE ...] [--json OBJECT] [--broker-url URL]",
        "",
        f"Enqueue one {kind} job ({model.__name__}) and print the result as JSON.",
        "Fields are --field-name VALUE (dashes or underscores), or all at once with --json OBJECT.",
        "",
        "fields:",
        *(f"  {f.ljust(width)}{t}" for f, t in own),
        "",
        "enqueue options:",
        *(f"  {f.ljust(width)}{t}" for f, t in options),
        "",
        "other options:",
        f"  {'--json OBJECT'.ljust(width)}all fields as one JSON object (flags given too win);",
        f"  {''.ljust(width)}--json @FILE reads it from a file, --json - from stdin",
        f"  {'--broker-url URL'.ljust(width)}overrides EPQ_BROKER_URL",
        "",
        f"{kind}: {job_kind.max_attempts} attempts; a second job with the same",
        f"{' + '.join(job_kind.unique_by)} within EPQ_{job_kind.unique_window_setting.upper()} "
        f"(default {_duration(window)}) is not enqueued.",
    ]
    return "\n".join(out) + "\n"


def _duration(value: Any) -> str:
    seconds = int(value.total_seconds())
    return f"{seconds // 60} min" if seconds % 60 == 0 else f"{seconds} s"


def _describe_type(annotation: Any) -> tuple[str, str]:
    """A metavar and a few words for a request field's type (``X | None`` and ``Annotated``
    unwrapped)."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
        else:
            break
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "{" + ",".join(str(m.value) for m in annotation) + "}", ""
    if annotation is UUID:
        return "UUID", ""
    if annotation in (datetime, AwareDatetime):
        return "DATETIME", "ISO 8601 with a timezone, e.g. 2030-01-01T09:00:00Z"
    if typing.get_origin(annotation) is dict or annotation is dict:
        return "JSON", "a JSON object"
    if annotation is int:
        return "INT", ""
    return "TEXT", ""
