"""Self-describing configuration dataclasses.

Every config in the stack is a dataclass whose fields carry their own help text. From that one
declaration each config gets its CLI flags (``--field-name``), its environment variables
(``NEO_FIELD_NAME``, so a Kubernetes ConfigMap can feed any container with ``envFrom``), a way back
to argv (so a launcher can start a child process with exactly its own config) and validation in
``__post_init__``. Precedence: explicit flag > environment > field default.

A field declared ``secret=True`` (an API key) never travels as a flag or in ``to_env``: any local
user can read a process's argv in /proc/PID/cmdline, and ``to_env`` feeds ConfigMaps. It is handed
to a child process through its environment (:meth:`Settings.secret_env`) instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from typing import Any, Iterator, Sequence, TypeVar

ENV_PREFIX = "NEO_"

T = TypeVar("T", bound="Settings")


def option(default: Any, help: str, choices: Sequence[Any] | None = None, secret: bool = False, **kw: Any) -> Any:
    """Declare a config field with its help text (and optional choices); ``secret`` keeps its value
    out of :meth:`Settings.to_args` and :meth:`Settings.to_env`."""
    meta = {"help": help, "choices": tuple(choices) if choices else None, "secret": secret}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta, **kw)
    return dataclasses.field(default=default, metadata=meta, **kw)


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the flag and what to change."""


def _parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _scalar_type(tp: Any) -> type:
    """The concrete type a field's text value parses to (unwrapping Optional)."""
    origin = typing.get_origin(tp)
    if origin is typing.Union or str(origin) == "types.UnionType":
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _scalar_type(args[0])
    if origin in (list, tuple):
        return list
    return tp


class Settings:
    """Mixin for config dataclasses. Subclasses set ``validate()``; fields use :func:`option`."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:  # overridden where there is something to check
        pass

    # -- field metadata -----------------------------------------------------------------------
    @classmethod
    def _fields(cls) -> list[tuple[dataclasses.Field, type]]:
        hints = typing.get_type_hints(cls)
        return [(f, _scalar_type(hints[f.name])) for f in dataclasses.fields(cls) if f.init]

    @staticmethod
    def flag(name: str) -> str:
        return "--" + name.replace("_", "-")

    @staticmethod
    def env_name(name: str) -> str:
        return ENV_PREFIX + name.upper()

    @staticmethod
    def _convert(kind: type, text: str) -> Any:
        if kind is bool:
            return _parse_bool(text)
        if kind is list:
            return [part for part in text.split(",") if part]
        return kind(text)

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group(cls.__name__)
        for f, kind in cls._fields():
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            shown = "(set)" if f.metadata.get("secret") and default else repr(default)
            help_text = f"{f.metadata.get('help', '')} [default {shown}; env {cls.env_name(f.name)}]"
            kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
            if kind is bool:
                kwargs["type"] = _parse_bool
                kwargs["nargs"] = "?"
                kwargs["const"] = True
            elif kind is list:
                kwargs["type"] = lambda s: [p for p in s.split(",") if p]
            else:
                kwargs["type"] = kind
            if f.metadata.get("choices"):
                kwargs["choices"] = f.metadata["choices"]
            group.add_argument(cls.flag(f.name), **kwargs)

    @classmethod
    def from_namespace(cls: type[T], ns: argparse.Namespace, env: dict[str, str] | None = None) -> T:
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f, kind in cls._fields():
            if hasattr(ns, f.name):
                values[f.name] = getattr(ns, f.name)
            elif cls.env_name(f.name) in env:
                raw = env[cls.env_name(f.name)]
                try:
                    values[f.name] = cls._convert(kind, raw)
                except ValueError as exc:
                    raise ConfigError(f"{cls.env_name(f.name)}={raw!r}: {exc}") from None
        return cls(**values)

    @classmethod
    def from_args(cls: type[T], argv: Sequence[str] | None = None, env: dict[str, str] | None = None) -> T:
        parser = argparse.ArgumentParser()
        cls.add_arguments(parser)
        return cls.from_namespace(parser.parse_args(argv), env)

    def _as_text(self, secret: bool = False) -> Iterator[tuple[str, str]]:
        """(field name, value as text that parses back to it) for every set field that is (or, by
        default, is not) secret."""
        for f, kind in self._fields():
            value = getattr(self, f.name)
            if value is None or bool(f.metadata.get("secret")) != secret:
                continue
            if kind is list:
                yield f.name, ",".join(str(v) for v in value)
            elif kind is bool:
                yield f.name, "true" if value else "false"
            else:
                yield f.name, str(value)

    def to_args(self) -> list[str]:
        """Flags that reproduce this config in a child process (defaults included, explicit), secret
        fields excepted: hand those over with :meth:`secret_env`."""
        return [part for name, text in self._as_text() for part in (self.flag(name), text)]

    def to_env(self) -> dict[str, str]:
        """Environment variables that reproduce this config (for ConfigMaps), secret fields excepted."""
        return {self.env_name(name): text for name, text in self._as_text()}

    def secret_env(self) -> dict[str, str]:
        """Environment variables of the secret fields that are set (for a child process's environment)."""
        return {self.env_name(name): text for name, text in self._as_text(secret=True) if text}

    def replace(self: T, **changes: Any) -> T:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]
