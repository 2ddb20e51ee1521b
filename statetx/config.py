"""Validated schemas: the TOML split specification (`SplitConfig`) and the obs column map.

A split file has four optional sections::

    [datasets]                      # name = path, directory, glob or {a,b} brace pattern
    kang = "kang.h5ad"
    [training]                      # datasets whose cell types train unless held out
    kang = "train"
    [zeroshot]                      # hold a whole cell type out
    "kang.B cells" = "test"
    [fewshot."kang.CD14+ Monocytes"]  # hold some perturbations of one cell type out
    val = ["IFNB"]

Everything that can be checked without the data is checked when the file is loaded; checks that
need the data (cell types, perturbation names, controls) run in :mod:`statetx.splits`.
"""

from __future__ import annotations

import glob
import json
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from statetx._options import ARCH_CHOICES
from statetx._utils import did_you_mean, unknown_option_message, warn
from statetx.errors import ConfigError, SplitConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SECTIONS = ("datasets", "training", "zeroshot", "fewshot")
SPLITS = ("train", "val", "test")
OUTPUT_SPACES = ARCH_CHOICES["output_space"]
DATA_SUFFIXES = (".h5", ".h5ad")


class FewshotEntry(BaseModel):
    """Perturbations of one cell type held out for validation and/or test."""

    model_config = ConfigDict(extra="forbid")
    val: list[str] = Field(default_factory=list)
    test: list[str] = Field(default_factory=list)


class SplitConfig(BaseModel):
    """The TOML split spec: sections ``datasets``, ``training``, ``zeroshot``, ``fewshot``.

    Build it with :meth:`from_toml` (a path, a TOML string or a dict); relative dataset paths
    resolve against ``base_dir`` (the TOML file's folder).
    """

    model_config = ConfigDict(extra="forbid")
    datasets: dict[str, str | list[str]] = Field(default_factory=dict)
    training: dict[str, Literal["train"]] = Field(default_factory=dict)
    zeroshot: dict[str, Literal["train", "val", "test"]] = Field(default_factory=dict)
    fewshot: dict[str, FewshotEntry] = Field(default_factory=dict)
    base_dir: Path | None = None
    source: str | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_toml(cls, obj: str | Path | dict | SplitConfig) -> SplitConfig:
        """Load and validate a split spec from a TOML path, TOML string, dict or SplitConfig
        (one built directly, ``SplitConfig(training=...)``, gets the same checks here)."""
        if isinstance(obj, SplitConfig):
            return cls._from_raw(obj.model_dump(include=set(SECTIONS)),
                                 source=obj.source or "<dict>", base_dir=obj.base_dir)
        if isinstance(obj, dict):
            return cls._from_raw(dict(obj), source="<dict>", base_dir=obj.get("base_dir"))
        text, source, base_dir = _read_toml_text(obj)
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise SplitConfigError(f"{source}: invalid TOML: {exc}") from None
        return cls._from_raw(raw, source=source, base_dir=base_dir)

    @classmethod
    def model_validate(cls, obj: Any, *args: Any, **kwargs: Any) -> SplitConfig:
        """Validate a dict with the same checks and messages as :meth:`from_toml`."""
        if isinstance(obj, dict):
            return cls.from_toml(obj)
        return super().model_validate(obj, *args, **kwargs)

    @classmethod
    def _from_raw(cls, raw: dict, source: str, base_dir: str | Path | None) -> SplitConfig:
        raw = {k: v for k, v in raw.items() if k not in ("base_dir", "source")}
        _check_raw(raw, source)
        try:
            cfg = super().model_validate(
                {**raw, "base_dir": Path(base_dir) if base_dir else None, "source": source}
            )
        except ValidationError as exc:  # anything _check_raw did not phrase itself
            err = exc.errors()[0]
            loc = ".".join(str(p) for p in err["loc"])
            raise SplitConfigError(f"{source}: [{loc}]: {err['msg']}") from None
        cfg._check_consistency()
        return cfg

    def absolute(self) -> SplitConfig:
        """A copy whose dataset paths are absolute (relative ones taken from ``base_dir``, else
        the current folder), with no ``base_dir``: it finds the same files from anywhere."""
        base = Path(self.base_dir).resolve() if self.base_dir else Path.cwd()

        def fix(p: str) -> str:
            q = Path(p).expanduser()
            if q.is_absolute():
                return os.path.normpath(str(q))
            # where resolve_paths finds it: the TOML's folder, else (said there) the current one
            root = base if _resolve_one(p, base) or not _resolve_one(p, Path.cwd()) else (
                Path.cwd())
            return os.path.normpath(os.path.join(str(root), p))

        ds = {k: fix(v) if isinstance(v, str) else [fix(x) for x in v]
              for k, v in self.datasets.items()}
        return self.model_copy(update={"datasets": ds, "base_dir": None})

    def to_toml(self) -> str:
        """Serialise back to TOML text (round-trips through :meth:`from_toml` from any folder:
        dataset paths relative to the spec's folder, ``base_dir``, are written absolute)."""
        lines: list[str] = []
        spec = self.absolute() if self.base_dir else self
        for section in ("datasets", "training", "zeroshot"):
            table = getattr(spec, section)
            if table:
                lines.append(f"[{section}]")
                lines += [f"{_q(k)} = {_tv(v)}" for k, v in table.items()]
                lines.append("")
        for key, entry in self.fewshot.items():
            lines.append(f"[fewshot.{_q(key)}]")
            lines.append(f"val = {_tv(entry.val)}")
            lines.append(f"test = {_tv(entry.test)}")
            lines.append("")
        return "\n".join(lines)

    # ------------------------------------------------------------------ queries
    def where(self, section: str, key: str | None = None, field: str | None = None) -> str:
        """Human-readable location of a key (and a field of its table), for error messages."""
        loc = f"[{section}]" + (f'."{key}"' if key else "") + (f".{field}" if field else "")
        return f"{loc} in {self.source}" if self.source and self.source != "<dict>" else loc

    def summarize(self, *args: object, **kwargs: object) -> None:
        """Moved to :func:`statetx.splits.summarize_config` (a schema reads no data)."""
        raise AttributeError("SplitConfig.summarize(data, columns) is now "
                             "statetx.splits.summarize_config(config, data, columns).")

    def referenced_datasets(self) -> list[str]:
        """Datasets that are loaded: [training] keys and the datasets of held-out keys, sorted."""
        names = set(self.training)
        names |= {split_key(k)[0] for k in (*self.zeroshot, *self.fewshot)}
        return sorted(names)

    def heldout(self, dataset: str) -> tuple[dict[str, str], dict[str, FewshotEntry]]:
        """The zeroshot and fewshot rules of one dataset, keyed by cell type."""
        zs = {split_key(k)[1]: v for k, v in self.zeroshot.items() if split_key(k)[0] == dataset}
        fs = {split_key(k)[1]: v for k, v in self.fewshot.items() if split_key(k)[0] == dataset}
        return zs, fs

    def resolve_paths(self, dataset: str) -> list[Path]:
        """Resolve ``[datasets].<dataset>`` to a sorted, de-duplicated list of .h5/.h5ad files."""
        if dataset not in self.datasets:
            raise SplitConfigError(
                f"dataset '{dataset}' has no entry in [datasets]"
                f"{' of ' + self.source if self.source else ''}. Add a line such as: "
                f'{dataset} = "/path/to/{dataset}/"'
            )
        patterns = self.datasets[dataset]
        patterns = [patterns] if isinstance(patterns, str) else patterns
        base = Path(self.base_dir) if self.base_dir else Path.cwd()
        files: list[Path] = []
        for pattern in patterns:
            found = _resolve_one(pattern, base)
            if not found and not Path(pattern).is_absolute() and base != Path.cwd():
                found = _resolve_one(pattern, Path.cwd())
                if found:
                    warn(
                        f'[datasets].{dataset} = "{pattern}" was not found relative to {base} '
                        f"(the TOML's folder) but exists relative to the current directory "
                        f"{Path.cwd()}; using that.",
                    )
            if not found:
                raise SplitConfigError(
                    f'[datasets].{dataset} = "{pattern}" matched no .h5 or .h5ad files'
                    f"{_searched(pattern, base)}. Directories are not searched recursively."
                )
            files += found
        seen: dict[Path, None] = {}
        for f in files:
            seen.setdefault(f.resolve(), None)
        return sorted(seen)

    def _check_consistency(self) -> None:
        for key in self.zeroshot:
            if key in self.fewshot:
                raise SplitConfigError(
                    f'"{key}" appears in both [zeroshot] and [fewshot]; hold a cell type out in '
                    f"one way only ({self.source})."
                )
        for key, entry in self.fewshot.items():
            both = sorted(set(entry.val) & set(entry.test))
            if both:
                raise SplitConfigError(
                    f"perturbation '{both[0]}' is listed in both val and test of "
                    f"{self.where('fewshot', key)}."
                )


def split_key(key: str) -> tuple[str, str]:
    """Split a held-out key ``"<dataset>.<cell type>"`` at the first dot."""
    dataset, _, cell_type = key.partition(".")
    return dataset, cell_type


def check_distinct_columns(pert_col: Any, cell_type_col: Any, batch_col: Any,
                           cell_type_name: str = "cell_type_key") -> None:
    """ConfigError when the perturbation column is also the cell-type or batch column (every
    cell type would be one perturbation: no controls), or ``batch_col`` is empty (not None)."""
    if isinstance(batch_col, str) and not batch_col.strip():
        raise ConfigError(f"batch_col={batch_col!r} names no column; pass batch_col=None (no "
                          "batches: controls are paired within the cell type) or the obs column "
                          "holding the batch.")
    for name, col in ((cell_type_name, cell_type_col), ("batch_col", batch_col)):
        if pert_col is not None and col is not None and col == pert_col:
            raise ConfigError(
                f"pert_col and {name} both name the obs column {pert_col!r}: the perturbation "
                f"and the {'cell type (context)' if name != 'batch_col' else 'batch'} must be "
                "different columns"
                + (" (for data from one context, add a constant column, e.g. "
                   f"adata.obs['cell_type'] = 'K562', and pass {name}='cell_type')."
                   if name != "batch_col" else "; pass batch_col=None without batches."))


class ColumnMap(BaseModel):
    """Which obs columns and matrices hold the labels and the cell representation.

    Attributes
    ----------
    pert_col
        obs column of the perturbation labels (arc-state's default ``gene``).
    cell_type_key
        obs column of the context (cell type or line) in which cells are paired with controls.
    batch_col
        obs column of the batch (e.g. gem group) for batch pairing and the batch input, or None.
    control_pert
        The control label in ``pert_col``; None: detected (``non-targeting`` / ``DMSO_TF``).
    embed_key
        The input representation: None for X, ``X_hvg`` for the highly variable genes
        (``obsm["X_hvg"]``), or an obsm key of an embedding.
    output_space
        What the network predicts: ``gene`` (the input genes), ``all`` (every gene of X) or
        ``embedding`` (the input embedding).
    gene_name_col
        var column naming the genes (e.g. symbols next to Ensembl IDs); None: var_names.
    """

    model_config = ConfigDict(extra="forbid")
    pert_col: str = "gene"
    cell_type_key: str = "cell_type"
    batch_col: str | None = None
    control_pert: str | None = None
    embed_key: str | None = None
    output_space: Literal["gene", "all", "embedding"] = "gene"
    gene_name_col: str | None = None  # var column naming the genes (None: var_names)

    @classmethod
    def build(cls, **kwargs: Any) -> ColumnMap:
        """Validate with statetx-style error messages."""
        if kwargs.get("output_space") not in (None, *OUTPUT_SPACES):
            raise ConfigError(
                f"output_space={kwargs['output_space']!r} is invalid; expected 'gene', 'all' or "
                "'embedding'."
            )
        for key, what in (("pert_col", "the perturbation"),
                          ("cell_type_key", "the context (cell type or line)")):
            if key in kwargs and not isinstance(kwargs[key], str):
                raise ConfigError(
                    f"{key}={kwargs[key]!r}: give the name of the obs column holding {what} of "
                    "each cell" + (" (for data from one context, add a constant column, e.g. "
                                   "adata.obs['cell_type'] = 'K562')."
                                   if key == "cell_type_key" else "."))
        check_distinct_columns(*(kwargs.get(k, cls.model_fields[k].default)
                                 for k in ("pert_col", "cell_type_key", "batch_col")))
        control = kwargs.get("control_pert")
        if control is not None and not isinstance(control, str):  # e.g. an integer label
            kwargs["control_pert"] = str(control)  # labels are compared as their str()
        valid = list(cls.model_fields)
        unknown = [k for k in kwargs if k not in valid]
        if unknown:
            raise ConfigError(unknown_option_message("column option", unknown[0], valid))
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        try:
            return cls(**kwargs)
        except ValidationError as exc:
            err = exc.errors()[0]
            raise ConfigError(f"{'.'.join(map(str, err['loc']))}={err.get('input')!r}: "
                              f"{err['msg']}.") from None


# ---------------------------------------------------------------------- raw checks
def _check_raw(raw: dict, source: str) -> None:
    for section in raw:
        if section not in SECTIONS:
            raise SplitConfigError(
                f"{source}: unknown section [{section}]; allowed sections are "
                f"{', '.join('[' + s + ']' for s in SECTIONS)}.{did_you_mean(section, SECTIONS)}"
            )
        if not isinstance(raw[section], dict):
            raise SplitConfigError(f"{source}: [{section}] must be a table, got {raw[section]!r}.")
    for section in ("datasets", "training"):
        for name in raw.get(section, {}):
            if "." in name:
                raise SplitConfigError(
                    f"{source}: [{section}] name '{name}' contains a dot; dataset names cannot "
                    "contain dots (held-out keys are split at the first dot). Rename the dataset."
                )
    for name, value in raw.get("datasets", {}).items():
        ok = isinstance(value, str) or (
            isinstance(value, list) and value and all(isinstance(v, str) for v in value)
        )
        if not ok:
            raise SplitConfigError(
                f"{source}: [datasets].{name} = {value!r} must be a path string or a list of paths."
            )
    for name, value in raw.get("training", {}).items():
        if value != "train":
            raise SplitConfigError(
                f'{source}: [training].{name} = "{value}" is not allowed: the only accepted value '
                'is "train". Use [zeroshot] or [fewshot] to hold data out.'
            )
    for section in ("zeroshot", "fewshot"):
        for key in raw.get(section, {}):
            dataset, dot, cell_type = key.partition(".")
            if not dot or not dataset or not cell_type:
                value = raw[section][key]
                nested = isinstance(value, dict) and value and not (
                    section == "fewshot" and set(value) <= {"val", "test"})
                hint = ""
                if nested:  # kang.B = "test" unquoted: TOML reads a table kang with key B
                    inner = next(iter(value))
                    hint = (f' TOML reads an unquoted dotted key as a nested table: write the key '
                            f'in quotes, e.g. "{key}.{inner}" = ...')
                raise SplitConfigError(
                    f'{source}: [{section}] key "{key}" must have the form '
                    '"<dataset>.<cell type>".' + hint
                )
    for key, value in raw.get("zeroshot", {}).items():
        if value not in SPLITS:
            raise SplitConfigError(
                f'{source}: [zeroshot]."{key}" = "{value}": the split must be "train", "val" or '
                '"test".'
            )
    for key, entry in raw.get("fewshot", {}).items():
        if not isinstance(entry, dict):
            raise SplitConfigError(
                f'{source}: [fewshot]."{key}" must be a table with optional val/test lists.'
            )
        for sub, value in entry.items():
            if sub not in ("val", "test"):
                raise SplitConfigError(
                    f"{source}: [fewshot].\"{key}\" has an unknown key '{sub}'; only 'val' and "
                    "'test' are allowed (unlisted perturbations train)."
                )
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise SplitConfigError(
                    f'{source}: [fewshot]."{key}".{sub} must be a list of perturbation names, '
                    f"got {value!r}."
                )


def _read_toml_text(obj: str | Path) -> tuple[str, str, Path | None]:
    """Return (text, source label, base dir) for a path or an inline TOML string."""
    if isinstance(obj, Path) or (isinstance(obj, str) and _looks_like_path(obj)):
        path = Path(obj).expanduser()
        if not path.is_file():
            raise SplitConfigError(f"split file {path} does not exist (or is not a file).")
        return path.read_text(), str(path), path.resolve().parent
    return str(obj), "<toml string>", None


def _looks_like_path(s: str) -> bool:
    if "\n" in s or not s.strip():  # an empty string is an empty spec, not the path "."
        return False
    try:  # an existing file wins, even if its name contains '[' or '='
        if Path(s).expanduser().is_file():
            return True
    except OSError:  # e.g. a one-line TOML string too long to be a file name
        pass
    return "=" not in s and "[" not in s


# ---------------------------------------------------------------------- path patterns
_PATTERN_CHARS = set("*?[]{}")
_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """Expand bash-style ``{a,b}`` groups, one group at a time (no nesting)."""
    m = _BRACE.search(pattern)
    if not m:
        return [pattern]
    out: list[str] = []
    for item in m.group(1).split(","):
        out += expand_braces(pattern[: m.start()] + item.strip() + pattern[m.end() :])
    return out


def _searched(patterns: str | Sequence[str], base: Path) -> str:
    """Where patterns that matched nothing were looked for, for the error: relative ones under
    ``base``; absolute ones only where they are (the first folder, or file, of each that does
    not exist)."""
    patterns = [q for p in ([patterns] if isinstance(patterns, str) else patterns)
                for q in expand_braces(p)]
    if any(not Path(p).expanduser().is_absolute() for p in patterns):
        return f" (searched relative to {base})"
    missing = []
    for p in patterns:
        fixed = Path(p).expanduser()
        while _PATTERN_CHARS & set(str(fixed)):  # (the part before any wildcard)
            fixed = fixed.parent
        first = next((q for q in (*reversed(fixed.parents), fixed) if not q.exists()), None)
        if first is not None and str(first) not in missing:
            missing.append(str(first))
    return f" (not found: {', '.join(missing)})" if missing else ""


def _resolve_one(pattern: str, base: Path) -> list[Path]:
    def anchored(p: str) -> Path:
        q = Path(p).expanduser()
        return q if q.is_absolute() else base / q

    if _PATTERN_CHARS & set(pattern):
        found: list[Path] = []
        empty = []  # {a,b} alternatives that match nothing (a typo drops its files silently)
        for p in expand_braces(pattern):
            full = str(anchored(p))
            hits: list[Path] = []
            if full.endswith(DATA_SUFFIXES):
                hits += sorted(Path(x) for x in glob.glob(full))
            else:
                for suffix in DATA_SUFFIXES:
                    hits += sorted(Path(x) for x in glob.glob(f"{full}/*{suffix}"))
            hits = [f for f in hits if f.is_file()]
            found += hits
            if not hits:
                empty.append(p)
        if found and empty:
            raise SplitConfigError(
                f'"{pattern}": its alternative(s) {", ".join(map(repr, empty))} match no .h5 or '
                f".h5ad files{_searched(empty, base)}. Fix them or leave them out.")
        return found
    path = anchored(pattern)
    if path.is_file():
        return [path]
    if path.is_dir():
        return [f for suffix in DATA_SUFFIXES for f in sorted(path.glob(f"*{suffix}"))]
    return []


def _q(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _tv(key)


def _tv(value: str | list[str]) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_tv(v) for v in value) + "]"
    # a JSON string literal is a valid TOML basic string (escapes quotes, backslashes, controls)
    return json.dumps(value, ensure_ascii=False)
