"""What a request constrains its output to, read from the API's fields.

OpenAI's ``response_format`` (``json_object``, ``json_schema``, and vLLM's ``structural_tag``),
vLLM's ``guided_json`` / ``guided_regex`` / ``guided_choice`` / ``guided_grammar``, its chat
``structural_tag`` and its newer ``structured_outputs`` object all become one
:class:`StructuredOutputSpec`. At most one constraint per request (vLLM's
rule); anything malformed is a :class:`ParamError` naming the field, so the client gets a 400.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from typing import Any

from neo_gateway.param_error import ParamError


class StructuredOutputKind(str, enum.Enum):
    JSON = "json"                # a JSON schema
    JSON_OBJECT = "json_object"  # any JSON object
    REGEX = "regex"
    CHOICE = "choice"            # exactly one of a list of strings
    GRAMMAR = "grammar"          # GBNF / EBNF (llama.cpp's) or Lark
    # free text in which a trigger starts one of the structures: its ``begin``, JSON following its
    # ``schema``, its ``end`` (vLLM's structural tags, as tool calls inside running text)
    STRUCTURAL_TAG = "structural_tag"


# the keys of vLLM's ``structured_outputs`` object that carry a constraint, and their kinds
_SO_KINDS = {"json": StructuredOutputKind.JSON, "regex": StructuredOutputKind.REGEX,
             "choice": StructuredOutputKind.CHOICE, "grammar": StructuredOutputKind.GRAMMAR,
             "json_object": StructuredOutputKind.JSON_OBJECT, "structural_tag": StructuredOutputKind.STRUCTURAL_TAG}
# its other keys: options honoured (whitespace, additional properties), the backend (llguidance: any
# other name is refused), and what has no effect here by design (there is no other backend to fall
# back to; vLLM's own bookkeeping flag)
_SO_OPTIONS = {"whitespace_pattern", "disable_any_whitespace", "disable_additional_properties",
               "disable_fallback", "backend", "_backend", "_backend_was_auto"}
_BACKENDS = (None, "auto", "guidance", "llguidance")
_JSON_WHITESPACE = r"[\x20\x0A\x0D\x09]+"   # JSON's own whitespace, as llguidance's flexible default
_ANY_OBJECT = json.dumps({"type": "object"})


@dataclasses.dataclass(frozen=True)
class StructuredOutputSpec:
    """One constraint, hashable: the cache key of its compiled grammar.

    - ``kind``/``text``: the constraint as text (a JSON schema dumped in its own key order, a
      regex, a JSON list of choices, a grammar).
    - ``whitespace_pattern``: JSON only; None means no whitespace between JSON tokens beyond
      llguidance's fixed separators (a small model otherwise spends its tokens on indentation).
    - ``param``: the request field it came from, named in errors (not part of the key).
    """

    kind: StructuredOutputKind
    text: str
    whitespace_pattern: str | None = None
    param: str = dataclasses.field(default="response_format", compare=False, hash=False)


def _schema_text(value: Any, param: str) -> str:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ParamError(param, f"{param}: the JSON schema is not valid JSON: {exc}") from None
    if not isinstance(value, (dict, bool)):
        raise ParamError(param, f"{param}: a JSON schema must be an object")
    return json.dumps(value)   # property order kept: the output follows it


def _closed_objects(schema: Any) -> Any:
    """``schema`` with ``additionalProperties: false`` on every object schema that does not say
    (vLLM's ``disable_additional_properties``)."""
    if isinstance(schema, list):
        return [_closed_objects(v) for v in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _closed_objects(v) if k not in ("const", "enum", "default", "examples") else v for k, v in schema.items()}
    if (out.get("type") == "object" or "properties" in out) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def _text(value: Any, param: str, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise ParamError(param, f"{param} must be a non-empty {what} string")
    return value


def _choices(value: Any, param: str) -> str:
    if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
        raise ParamError(param, f"{param} must be a non-empty list of non-empty strings")
    return json.dumps(value)


def _structural_tag(value: Any, param: str) -> str:
    """vLLM's structural tag (an object, or its JSON text): ``triggers`` and ``structures`` of
    ``{"begin", "schema", "end"}``, each ``begin`` starting with a trigger."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ParamError(param, f"{param}: the structural tag is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ParamError(param, f"{param}: a structural tag is an object with `structures` and `triggers`")
    if "format" in value:
        raise ParamError(param, f"{param}: the structural tag `format` form is not supported; send `structures` "
                                "and `triggers`")
    triggers, structures = value.get("triggers"), value.get("structures")
    if not isinstance(triggers, list) or not triggers or not all(isinstance(t, str) and t for t in triggers):
        raise ParamError(param, f"{param}: `triggers` must be a non-empty list of non-empty strings")
    if not isinstance(structures, list) or not structures:
        raise ParamError(param, f"{param}: `structures` must be a non-empty list")
    out = []
    for i, item in enumerate(structures):
        if not isinstance(item, dict) or not isinstance(item.get("begin"), str) or \
                not isinstance(item.get("end"), str) or not isinstance(item.get("schema"), (dict, bool)):
            raise ParamError(param, f"{param}: structures[{i}] needs a `begin` and an `end` string and a `schema`")
        if not any(item["begin"].startswith(t) for t in triggers):
            raise ParamError(param, f"{param}: structures[{i}].begin must start with one of the triggers")
        out.append({"begin": item["begin"], "schema": item["schema"], "end": item["end"]})
    return json.dumps({"structures": out, "triggers": triggers})


def _make(kind: StructuredOutputKind, value: Any, param: str, whitespace: str | None) -> StructuredOutputSpec:
    if kind is StructuredOutputKind.JSON:
        text = _schema_text(value, param)
    elif kind is StructuredOutputKind.JSON_OBJECT:
        text = _ANY_OBJECT
    elif kind is StructuredOutputKind.CHOICE:
        text = _choices(value, param)
    elif kind is StructuredOutputKind.STRUCTURAL_TAG:
        text = _structural_tag(value, param)
    else:
        text = _text(value, param, kind.value)
    json_like = kind in (StructuredOutputKind.JSON, StructuredOutputKind.JSON_OBJECT)
    return StructuredOutputSpec(kind, text, whitespace if json_like else None, param)


def _from_response_format(value: Any) -> tuple[StructuredOutputKind, Any] | None:
    param = "response_format"
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise ParamError(param, "response_format must be an object with a `type`")
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputKind.JSON_OBJECT, None
    if kind == "json_schema":
        inner = value.get("json_schema")
        if not isinstance(inner, dict):
            raise ParamError(param, "response_format.json_schema must be an object with the `schema`")
        schema = inner.get("schema", inner.get("json_schema"))
        if schema is None:   # OpenAI allows a json_schema without a schema: any JSON object then
            return StructuredOutputKind.JSON_OBJECT, None
        return StructuredOutputKind.JSON, schema
    if kind == "structural_tag":
        return StructuredOutputKind.STRUCTURAL_TAG, value
    raise ParamError(param, f"response_format type {kind!r} is not supported (text, json_object, json_schema, "
                            "structural_tag)")


def spec_from_fields(fields: dict[str, Any]) -> StructuredOutputSpec | None:
    """The request's one constraint (None: free text), from the fields named as in the API:
    ``response_format``, ``guided_json``, ``guided_regex``, ``guided_choice``, ``guided_grammar``,
    ``guided_whitespace_pattern``, ``structural_tag``, ``structured_outputs`` (absent or None: not sent)."""
    found: list[tuple[str, StructuredOutputKind, Any]] = []
    whitespace = fields.get("guided_whitespace_pattern")
    if whitespace is not None and not isinstance(whitespace, str):
        raise ParamError("guided_whitespace_pattern", "guided_whitespace_pattern must be a string (a regex)")
    if fields.get("response_format") is not None:
        got = _from_response_format(fields["response_format"])
        if got is not None:
            found.append(("response_format", *got))
    for name, kind in (("guided_json", StructuredOutputKind.JSON), ("guided_regex", StructuredOutputKind.REGEX),
                       ("guided_choice", StructuredOutputKind.CHOICE),
                       ("guided_grammar", StructuredOutputKind.GRAMMAR),
                       ("structural_tag", StructuredOutputKind.STRUCTURAL_TAG)):
        if fields.get(name) is not None:
            found.append((name, kind, fields[name]))
    so = fields.get("structured_outputs")
    if so is not None:
        if not isinstance(so, dict):
            raise ParamError("structured_outputs", "structured_outputs must be an object")
        unknown = set(so) - set(_SO_KINDS) - _SO_OPTIONS
        if unknown:
            name = sorted(unknown)[0]
            raise ParamError(f"structured_outputs.{name}", f"structured_outputs.{name} is not supported")
        for key, kind in _SO_KINDS.items():
            value = so.get(key)
            if value is None or (key == "json_object" and value is False):
                continue
            found.append((f"structured_outputs.{key}", kind, value))
        for key in ("backend", "_backend"):
            if so.get(key) not in _BACKENDS:
                raise ParamError(f"structured_outputs.{key}", f"structured_outputs.{key}: the grammar backend is "
                                                              f"llguidance (auto, guidance or llguidance)")
        for key in ("disable_any_whitespace", "disable_additional_properties", "disable_fallback"):
            if so.get(key) is not None and not isinstance(so[key], bool):
                raise ParamError(f"structured_outputs.{key}", f"structured_outputs.{key} must be a boolean")
        if so.get("whitespace_pattern") is not None:
            whitespace = _text(so["whitespace_pattern"], "structured_outputs.whitespace_pattern", "regex")
        elif so.get("disable_any_whitespace") is False and whitespace is None:
            whitespace = _JSON_WHITESPACE   # asked for explicitly: JSON with free whitespace, as vLLM's default
        if so.get("disable_additional_properties") and found and found[-1][1] is StructuredOutputKind.JSON \
                and found[-1][0] == "structured_outputs.json":
            name, kind, value = found.pop()
            found.append((name, kind, _closed_objects(json.loads(_schema_text(value, name)))))
    if len(found) > 1:
        raise ParamError(found[1][0], f"only one kind of structured output per request: {found[0][0]} and "
                                      f"{found[1][0]} were both given")
    if not found:
        return None
    param, kind, value = found[0]
    return _make(kind, value, param, whitespace)


# the request fields :func:`spec_from_fields` reads
STRUCTURED_FIELDS = ("response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
                     "guided_whitespace_pattern", "structural_tag", "structured_outputs")
