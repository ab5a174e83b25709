"""Declaring a setting once: dataclass fields that carry their default and check, and the validator that walks them.

A config dataclass writes each setting as one field, e.g.
``hidden: int = number(32, lo=1, hi=4096, integer=True)``: the dataclass default is the
value when a YAML file leaves the key out, and :class:`FieldValidator` reads the bounds
from the field's metadata. Nothing here knows the study's sections; they are in
:mod:`metafx.config`, which subclasses :class:`FieldValidator` with the checks that are
not one field's range (``checked_by`` fields and cross-field ``rules``).
"""
from __future__ import annotations

import math
from dataclasses import MISSING, Field, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping

from metafx.config_io import ConfigError

Choices = tuple[str, ...] | Callable[[], tuple[str, ...]]


def number(default: float | int | None, *, lo: float | None = None, hi: float | None = None,
           lo_open: bool = False, integer: bool = False, nullable: bool = False) -> Any:
    """A numeric setting: its default and the range the validator enforces.

    Args:
        default: the value when the key is absent (checked like a given value).
        lo: lower bound, inclusive unless ``lo_open``; None = unbounded.
        hi: inclusive upper bound; None = unbounded.
        lo_open: the value must be strictly greater than ``lo``.
        integer: the value must be integral; it is stored as an ``int`` (else as a ``float``).
        nullable: ``null`` (None) is allowed and kept.

    Returns:
        A dataclass field carrying the check in its metadata.
    """
    return field(default=default, metadata={"kind": "num", "lo": lo, "hi": hi, "lo_open": lo_open,
                                            "integer": integer, "nullable": nullable})


def flag(default: bool) -> Any:
    """A boolean setting (YAML ``true`` / ``false`` only).

    Args:
        default: the value when the key is absent.

    Returns:
        A dataclass field carrying the check in its metadata.
    """
    return field(default=default, metadata={"kind": "bool"})


def one_of(default: str, choices: Choices) -> Any:
    """A setting that takes one of a fixed list of names.

    Args:
        default: the value when the key is absent.
        choices: the allowed values, listed in the error message in this order; or a
            function returning them (for a list defined after the dataclass).

    Returns:
        A dataclass field carrying the check in its metadata.
    """
    return field(default=default, metadata={"kind": "choice", "choices": choices})


def text(default: str, expect: str) -> Any:
    """A non-empty string setting.

    Args:
        default: the value when the key is absent.
        expect: what the error message says is allowed, e.g. ``"expected a metric name"``.

    Returns:
        A dataclass field carrying the check in its metadata.
    """
    return field(default=default, metadata={"kind": "text", "expect": expect})


def subsection(cls: type, **tags: Any) -> Any:
    """A nested section, validated field by field; ``null`` or absent = all its defaults.

    Args:
        cls: the section's dataclass.
        **tags: facts about the section kept in the metadata for its owner to read
            (:class:`metafx.config.ModelConfig` marks its models with ``model=True``, ``film=True``).

    Returns:
        A dataclass field with a ``cls()`` default factory, carrying the check in its metadata.
    """
    return field(default_factory=cls, metadata={"kind": "section", "cls": cls, **tags})


def checked_by(check: str, **kw: Any) -> Any:
    """A setting with a hand-written check: the validator method ``check_<check>``.

    Args:
        check: the suffix of the validator method.
        **kw: ``default`` or ``default_factory`` of the field.

    Returns:
        A dataclass field carrying the check's name in its metadata.
    """
    return field(metadata={"kind": "custom", "check": check}, **kw)


def field_default(f: Field) -> Any:
    """A field's default value, calling its default factory (so it is read at each call).

    Args:
        f: a dataclass field.

    Returns:
        Its default.

    Raises:
        TypeError: the field has no default.
    """
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    raise TypeError(f"config field {f.name!r} has no default")


def field_named(cls: type, name: str) -> Field:
    """One field of a dataclass, by name.

    Args:
        cls: a dataclass.
        name: the field's name.

    Returns:
        The :class:`dataclasses.Field`.

    Raises:
        KeyError: ``cls`` has no such field.
    """
    for f in fields(cls):
        if f.name == name:
            return f
    raise KeyError(f"{cls.__name__} has no field {name!r}")


class FieldValidator:
    """Checks a raw mapping against a dataclass's declared fields; every error names ``path`` and the dotted key.

    Args:
        path: the study file named in every error message.

    Subclasses add ``check_<name>(value, full_key, field, done)`` methods for
    :func:`checked_by` fields and override :meth:`rules` for cross-field rules.
    """

    def __init__(self, path: Path):
        self.path = path

    def err(self, key: str, value: Any, allowed: str) -> ConfigError:
        """The error for one bad value.

        Args:
            key: the dotted key.
            value: the bad value (shown with ``repr``).
            allowed: what is allowed, or how to fix it.

        Returns:
            A :class:`ConfigError` naming the file, the key, the value and ``allowed``, to raise;
            its ``key`` and ``allowed`` attributes hold the dotted key and ``allowed``.
        """
        return ConfigError(f"{self.path}: key '{key}' = {value!r} is invalid: {allowed}", key=key, allowed=allowed)

    def section(self, d: Any, key: str, allowed: tuple[str, ...]) -> dict[str, Any]:
        """Check the keys of one YAML section.

        Args:
            d: the section's raw value; None = an empty section.
            key: its dotted key ("" for the top level).
            allowed: the keys it may have.

        Returns:
            ``d`` (``{}`` for None).

        Raises:
            ConfigError: ``d`` is not a mapping, or has a key not in ``allowed`` (all of them are listed).
        """
        if d is None:
            return {}
        if not isinstance(d, dict):
            raise self.err(key, d, "expected a mapping (a YAML section)")
        for k in d:
            if k not in allowed:
                full = f"{key + '.' if key else ''}{k}"
                raise ConfigError(f"{self.path}: unknown key '{full}'; allowed keys here: {', '.join(allowed)}",
                                  key=full, allowed=f"allowed keys here: {', '.join(allowed)}")
        return d

    def num(self, v: Any, full: str, *, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
            integer: bool = False) -> int | float:
        """Check one number.

        Args:
            v: the raw value.
            full: its dotted key.
            lo, hi, lo_open, integer: as in :func:`number`.

        Returns:
            ``v`` as an ``int`` (``integer``) or a ``float``.

        Raises:
            ConfigError: not a number (a bool is not one), not integral, not finite, or out of range.
        """
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise self.err(full, v, "expected an integer" if integer else "expected a number")
        if integer and not float(v).is_integer():
            raise self.err(full, v, "expected an integer")
        if not math.isfinite(float(v)):
            raise self.err(full, v, "expected a finite number")
        if lo is not None and (v <= lo if lo_open else v < lo):
            raise self.err(full, v, f"must be {'>' if lo_open else '>='} {lo}")
        if hi is not None and v > hi:
            raise self.err(full, v, f"must be <= {hi}")
        return int(v) if integer else float(v)

    def choice(self, v: Any, full: str, choices: Choices) -> Any:
        """Check one name against a list.

        Args:
            v: the raw value.
            full: its dotted key.
            choices: the allowed values, or a function returning them.

        Returns:
            ``v``.

        Raises:
            ConfigError: it is not; the message lists the choices.
        """
        if callable(choices):
            choices = choices()
        if v not in choices:
            raise self.err(full, v, f"allowed: {', '.join(map(str, choices))}")
        return v

    def value(self, f: Field, d: Mapping[str, Any], full: str, done: Mapping[str, Any]) -> Any:
        """The validated value of field ``f`` in the section ``d``; its default when the key is absent.

        Args:
            f: the field.
            d: the section's raw mapping.
            full: the field's dotted key, for messages.
            done: the fields of the same section validated before ``f`` (a hand-written check
                may depend on them, e.g. the families on the sample rate).

        Returns:
            The value to store in the dataclass.

        Raises:
            ConfigError: the value breaks the field's declared check.
        """
        m = f.metadata
        kind = m.get("kind")
        if kind == "section":
            return self.build(m["cls"], d.get(f.name), full)
        if kind == "custom":
            return getattr(self, "check_" + m["check"])(d.get(f.name), full, f, done)
        v = d[f.name] if f.name in d else field_default(f)
        if kind == "num":
            if v is None and m["nullable"]:
                return None
            return self.num(v, full, lo=m["lo"], hi=m["hi"], lo_open=m["lo_open"], integer=m["integer"])
        if kind == "bool":
            if not isinstance(v, bool):
                raise self.err(full, v, "expected true or false")
            return v
        if kind == "choice":
            return self.choice(v, full, m["choices"])
        if kind == "text":
            if not isinstance(v, str) or not v:
                raise self.err(full, v, m["expect"])
            return v
        raise TypeError(f"config field {full!r} declares no check (use number, flag, one_of, text, subsection)")

    def build(self, cls: type, d: Any, key: str) -> Any:
        """Validate one section: its keys, each field in declaration order, then :meth:`rules`.

        Args:
            cls: the section's dataclass.
            d: the section's raw mapping (None = all defaults).
            key: its dotted key.

        Returns:
            The ``cls`` instance.

        Raises:
            ConfigError: an unknown key, a bad value or a broken rule.
        """
        d = self.section(d, key, tuple(f.name for f in fields(cls)))
        done: dict[str, Any] = {}
        for f in fields(cls):
            done[f.name] = self.value(f, d, f"{key}.{f.name}", done)
        obj = cls(**done)
        self.rules(obj, key)
        return obj

    def rules(self, obj: Any, key: str) -> None:
        """Cross-field rules of one validated section (none here; subclasses add them).

        Args:
            obj: the section, validated field by field.
            key: its dotted key.

        Raises:
            ConfigError: in subclasses, a broken rule.
        """
