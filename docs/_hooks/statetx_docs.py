"""mkdocs hook: pages generated from the code at build time, so the reference never goes stale.

Markers replaced in the Markdown sources:

* ``<!-- statetx:cli-help -->``: the ``--help`` text of every ``statetx`` command, rendered from
  :func:`statetx.cli.build_parser` (no command is run);
* ``<!-- statetx:train-keys -->``: every ``statetx tx train`` configuration key with its default,
  allowed values and how statetx treats it, from :data:`statetx.runconfig.KEYS` (plus the aliases);
* ``<!-- statetx:presets -->``: the architecture presets, from :data:`statetx.presets.PRESETS`.

A marker may close a block, ``<!-- statetx:NAME -->`` … ``<!-- /statetx:NAME -->``: what lies
between is for readers of the Markdown source (e.g. on GitHub: how to print the same content),
and the built page shows the generated text in its place.

A marker that cannot be rendered (e.g. the CLI fails to import) is logged as a warning, so
``mkdocs build --strict`` fails with a message that names it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import re

log = logging.getLogger("mkdocs.plugins.statetx_docs")

# `statetx train` etc. are shortcuts of `statetx tx train`: documented once, under `tx`.
_SHORTCUTS = {"train", "predict", "infer", "preprocess_train", "preprocess_infer", "split"}


@contextlib.contextmanager
def _columns(width: int):
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(width)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old


def _subcommands(parser: argparse.ArgumentParser):
    """(name, aliases, sub-parser) for each sub-command, in definition order."""
    for action in parser._actions:  # noqa: SLF001 - argparse has no public API for this
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            names = {}
            for name, sub in action.choices.items():
                names.setdefault(id(sub), (name, [], sub))[1].append(name)
            for name, aliases, sub in names.values():
                yield name, [a for a in aliases if a != name], sub


def _help(parser: argparse.ArgumentParser) -> str:
    buf = io.StringIO()
    parser.print_help(buf)
    return buf.getvalue().rstrip()


def cli_help() -> str:
    from statetx.cli import build_parser

    out: list[str] = []
    with _columns(100):
        top = build_parser()
        out += ["### `statetx`", "", "```text", _help(top), "```", ""]

        def walk(parser: argparse.ArgumentParser, depth: int) -> None:
            for name, aliases, sub in _subcommands(parser):
                if depth == 0 and name in _SHORTCUTS:
                    continue
                title = sub.prog
                out.append(f"{'#' * min(3 + depth, 5)} `{title}`")
                out.append("")
                if aliases:
                    out.append("Also spelled: " + ", ".join(f"`{a}`" for a in aliases) + ".")
                    out.append("")
                out.extend(["```text", _help(sub), "```", ""])
                walk(sub, depth + 1)

        walk(top, 0)
    return "\n".join(out)


def _fmt(value) -> str:
    if isinstance(value, str):
        return f'`"{value}"`' if value else '`""`'
    return f"`{value!r}`".replace("None", "null").replace("True", "true").replace("False", "false")


_STATUS = {
    "ok": "",
    "noeffect": "accepted; has no effect (warning)",
    "default_only": "only the default is supported (other values: error)",
    "reject_true": "`true` is not supported (error)",
}


def train_keys() -> str:
    from statetx.runconfig import ALIASES, KEYS, PRESET

    sections: dict[str, list] = {}
    for path, key in KEYS.items():
        head = path.split(".")[0] if "." in path else "top level"
        if path.startswith("model.kwargs.transformer_backbone_kwargs."):
            head = "model.kwargs.transformer_backbone_kwargs"
        elif path.startswith("model.kwargs."):
            head = "model.kwargs"
        elif path.startswith("data.kwargs."):
            head = "data.kwargs"
        sections.setdefault(head, []).append(key)
    out: list[str] = []
    for head, keys in sections.items():
        out += [f"#### `{head}`", "", "| key | type | default | values | note |",
                "|---|---|---|---|---|"]
        for k in keys:
            default = "from the preset" if k.default == PRESET else _fmt(k.default)
            values = ", ".join(f"`{c}`" for c in k.choices)
            note = "; ".join(x for x in (_STATUS.get(k.status, k.status), k.note) if x)
            out.append(f"| `{k.path}` | {k.kind} | {default} | {values} | {note} |")
        out.append("")
    out += ["#### Aliases", "", "Reference spellings accepted as the same key:", "",
            "| alias | key |", "|---|---|"]
    out += [f"| `{a}` | `{t}` |" for a, t in ALIASES.items()]
    return "\n".join(out) + "\n"


def presets() -> str:
    from statetx.presets import PRESETS

    cols = ["cell_set_len", "hidden_dim", "n_encoder_layers", "n_decoder_layers", "backbone",
            "n_layers", "n_heads", "head_dim", "intermediate_size", "use_basal_projection",
            "gene_decoder_bool", "residual_space", "dropout", "attention", "rope"]
    out = ["| preset | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for name, arch in PRESETS.items():
        cells = ["null" if arch[c] is None else str(arch[c]).lower() if isinstance(arch[c], bool)
                 else str(arch[c]) for c in cols]
        out.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


_MARKERS = {
    "<!-- statetx:cli-help -->": cli_help,
    "<!-- statetx:train-keys -->": train_keys,
    "<!-- statetx:presets -->": presets,
}


def _block(marker: str) -> re.Pattern:
    """``marker``, and up to its closing ``<!-- /statetx:NAME -->`` when it opens a block."""
    close = marker.replace("<!-- statetx:", "<!-- /statetx:")
    return re.compile(re.escape(marker) + "(?:.*?" + re.escape(close) + ")?", re.S)


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ANN001
    for marker, render in _MARKERS.items():
        if marker not in markdown:
            continue
        try:
            text = render()
        except Exception as exc:  # noqa: BLE001 - reported as a (strict-failing) warning
            log.warning("%s: could not render %s: %s: %s", page.file.src_path, marker,
                        type(exc).__name__, exc)
            text = f"!!! warning\n    This section could not be generated: `{exc}`\n"
        markdown = _block(marker).sub(lambda _, t=text: t, markdown)
    return markdown
