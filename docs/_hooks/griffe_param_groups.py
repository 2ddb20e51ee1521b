"""Griffe extension: split grouped numpydoc parameter entries before rendering.

statetx docstrings document related parameters together (``pert_col, cell_type_key, batch_col``
followed by one description, possibly wrapped over several lines). griffe's numpydoc parser
gives every name of such a group the type and default of the *first* name, which would show
wrong defaults in the API reference. This extension rewrites each group into one entry per name
(same description), so each name gets its own annotation and default from the signature.
It also renders Sphinx cross-reference roles (``:class:`x```) as code spans.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_NAME = r"\*{0,2}[A-Za-z_]\w*"
_GROUP_START = re.compile(rf"^{_NAME}(?:, *{_NAME})*,?\s*$")
_SECTIONS = {"Parameters", "Other Parameters", "Attributes"}


def split_groups(text: str) -> str:
    lines = text.split("\n")
    out: list[str] = []
    i, section = 0, None
    while i < len(lines):
        line = lines[i]
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if line.strip() and set(nxt.strip()) == {"-"} and not line.startswith(" "):
            section = line.strip()
            out += [line, nxt]
            i += 2
            continue
        if section in _SECTIONS and _GROUP_START.match(line) and "," in line:
            names_text = line.strip()
            j = i + 1
            while names_text.endswith(",") and j < len(lines) and _GROUP_START.match(lines[j]):
                names_text += " " + lines[j].strip()
                j += 1
            names = [n.strip() for n in names_text.split(",") if n.strip()]
            desc = []
            while j < len(lines) and (lines[j].startswith(" ") or not lines[j].strip()):
                last = j + 1 >= len(lines)
                if not lines[j].strip() and (last or not lines[j + 1].startswith(" ")):
                    break
                desc.append(lines[j])
                j += 1
            for name in names:
                out.append(name)
                out += desc
            i = j
            continue
        if not line.strip() and i + 1 < len(lines) and not lines[i + 1].startswith(" ") \
                and i + 2 < len(lines) and set(lines[i + 2].strip()) == {"-"}:
            section = None
        out.append(line)
        i += 1
    return "\n".join(out)


_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|data|attr|exc|obj|const):`~?([^`]+)`")


def plain_roles(text: str) -> str:
    """Sphinx roles (``:class:`x```) have no meaning in Markdown: render them as code."""
    return _ROLE.sub(r"`\1`", text)


class ParamGroups(griffe.Extension):
    """Split grouped parameter entries and turn Sphinx roles into code spans."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        doc = obj.docstring
        if doc is None:
            return
        new = plain_roles(split_groups(doc.value) if "\n" in doc.value else doc.value)
        if new != doc.value:
            doc.value = new
