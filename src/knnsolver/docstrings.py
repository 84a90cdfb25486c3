"""Read option descriptions out of docstrings, so help texts have one source: the code's own documentation.

A class documents its options in a Google-style section (``Args:``,
``Arguments:``, ``Options:``, ``Attributes:`` or ``Parameters:``), one entry per
option, continuation lines indented further::

    Options:
        k: neighbours per sample in training. The paper uses 100 to 200.
        sigma: global RBF width, or ``auto``.

The first sentence of an entry is its one-line help (:func:`one_line`); the rest
is detail for the reader of the code.
"""
from __future__ import annotations

import inspect
import re
from typing import Any

SECTIONS = ("Args", "Arguments", "Options", "Attributes", "Parameters")
_HEADER = re.compile(rf"^(\s*)(?:{'|'.join(SECTIONS)}):\s*$")
_ENTRY = re.compile(r"^(\w+)\s*(?:\([^)]*\))?:\s*(.*)$")
# Sphinx roles (:meth:`~a.b.name` -> name) and literals (``x`` -> x).
_ROLE = re.compile(r":\w+:`~?([^`]*?)`")
_LITERAL = re.compile(r"``([^`]*)``")
_ABBREVIATIONS = ("e.g", "i.e", "etc", "cf", "vs")


def entries(doc: str | None) -> dict[str, str]:
    """Each option's full description (lines joined by spaces) in the option sections of ``doc``."""
    found: dict[str, str] = {}
    lines = inspect.cleandoc(doc or "").splitlines()
    header_indent: int | None = None
    entry_indent: int | None = None
    name: str | None = None
    for line in lines:
        header = _HEADER.match(line)
        if header:
            header_indent, entry_indent, name = len(header.group(1)), None, None
            continue
        if header_indent is None or not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        if indent <= header_indent:  # the section ended
            header_indent = name = None
            continue
        if entry_indent is None:
            entry_indent = indent
        match = _ENTRY.match(line.strip()) if indent == entry_indent else None
        if match:
            name = match.group(1)
            found[name] = match.group(2).strip()
        elif name is not None:
            found[name] = f"{found[name]} {line.strip()}".strip()
    return found


def plain(text: str) -> str:
    """``text`` without reStructuredText markup (roles and literals)."""
    return _LITERAL.sub(r"\1", _ROLE.sub(lambda m: m.group(1).rsplit(".", 1)[-1], text))


def one_line(text: str) -> str:
    """The first sentence of ``text`` as plain text, without its final full stop."""
    text = plain(text).strip()
    for match in re.finditer(r"\.(\s|$)", text):
        before = text[: match.start()]
        if not before.endswith(_ABBREVIATIONS):
            return before
    return text.rstrip(".")


def option_docs(obj: Any) -> dict[str, str]:
    """Option descriptions of a class (its docstring, its ``__init__``'s, then its bases') or a function."""
    found: dict[str, str] = {}
    owners = inspect.getmro(obj) if inspect.isclass(obj) else (obj,)
    for owner in owners:
        for doc in (owner.__dict__.get("__doc__") if inspect.isclass(owner) else owner.__doc__,
                    getattr(owner.__dict__.get("__init__"), "__doc__", None) if inspect.isclass(owner) else None):
            for name, text in entries(doc).items():
                found.setdefault(name, text)
    return found
