"""Vocabularies (perturbations, cell types, batches) and perturbation feature vectors.

Names are kept in plain sorted (code-point) order, so index ``i`` is stable across runs; the
perturbation vectors are rows of an identity matrix (one-hot) or of a feature table loaded from a
file (e.g. ESM2 gene embeddings), in which case the file's order is kept.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from statetx._utils import did_you_mean, features_digest, preview, umask_mode, warn
from statetx.errors import ConfigError, DataError
from statetx.io import control_like


@dataclass
class Vocab:
    """Label ↔ index maps saved with a fitted model."""

    perturbations: list[str]
    cell_types: list[str]
    batches: list[str]
    control_pert: str
    pert_features: np.ndarray | None = None  # [n_pert, P] or None for one-hot

    @classmethod
    def build(cls, perts: Iterable[str], cell_types: Iterable[str], batches: Iterable[str],
              control_pert: str, features: dict[str, np.ndarray] | None = None,
              on_missing_features: str = "zeros") -> Vocab:
        """Sorted union of observed labels (plus the control); optional feature vectors."""
        observed = sorted(set(perts) | {control_pert})
        vectors = None
        if features is not None:
            names, vectors = feature_table(features, observed, control_pert, on_missing_features)
        else:
            names = observed
        return cls(names, sorted(set(cell_types)), sorted(set(batches)), control_pert, vectors)

    @property
    def pert_dim(self) -> int:
        feats = self.pert_features
        return len(self.perturbations) if feats is None else feats.shape[1]

    def vectors(self, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """Name -> feature vector (rows of the table, not copies) of ``names`` (default: all);
        a name the table lacks raises ``KeyError``."""
        row = {n: i for i, n in enumerate(self.perturbations)}
        return {n: self.pert_features[row[n]]
                for n in (self.perturbations if names is None else map(str, names))}

    def encode(self, kind: str, labels: Sequence[str], on_unknown: str = "error") -> np.ndarray:
        """Labels to int64 indices; unknown ones raise (or give -1 with on_unknown='ignore')."""
        names = {"pert": self.perturbations, "cell_type": self.cell_types,
                 "batch": self.batches}[kind]
        lut = {n: i for i, n in enumerate(names)}
        uniq, inv = np.unique(np.asarray(labels, dtype=object).astype(str), return_inverse=True)
        codes = np.array([lut.get(u, -1) for u in uniq], dtype=np.int64)
        unknown = uniq[codes < 0]
        if len(unknown) and on_unknown == "error":
            raise DataError(
                f"{len(unknown)} {kind} label(s) are not in the model's vocabulary: "
                f"{preview(unknown)}.{did_you_mean(unknown[0], names)}"
            )
        return codes[inv].reshape(-1)

    def extended(self, kind: str, labels: Iterable[str]) -> tuple[Vocab, list[str]]:
        """This vocabulary with the unseen ``labels`` of ``kind`` (``cell_type`` or ``batch``:
        labels the network does not read) appended in sorted order (known labels keep their
        codes), and those labels; itself when there are none."""
        field_name = {"cell_type": "cell_types", "batch": "batches"}[kind]
        known = getattr(self, field_name)
        new = sorted(set(map(str, labels)) - set(known))
        return (dataclasses.replace(self, **{field_name: [*known, *new]}) if new else self), new

    def with_vectors(self, features: Mapping[str, np.ndarray],
                     fixed: Iterable[str] | None = None) -> tuple[Vocab, list[str]]:
        """This vocabulary (one with a feature table) with the vectors of ``features``: new
        names appended, known ones outside ``fixed`` replaced (default: all known names are
        fixed, i.e. must come with their own vectors or be left out); and the names given new
        vectors."""
        if self.pert_features is None:
            raise ConfigError("pert_features= gives vectors for new perturbations, but this "
                              "model encodes perturbations one-hot (it was trained without a "
                              "feature table): it has no input for vectors. Train with "
                              "pert_features=... to predict unseen perturbations.")
        p = self.pert_features.shape[1]
        _, table = feature_table(features, [], self.control_pert)
        if table.shape[1] != p:
            raise DataError(f"pert_features= has vectors of length {table.shape[1]}; the model's "
                            f"perturbation features have length {p}.")
        index = {n: i for i, n in enumerate(self.perturbations)}
        fixed = set(index) if fixed is None else set(map(str, fixed))
        rows = {str(n): table[k] for k, n in enumerate(features)}
        changed = [n for n, v in rows.items() if n in index and not np.allclose(
            v, self.pert_features[index[n]], rtol=1e-5, atol=1e-6)]
        refused = [n for n in changed if n in fixed]
        if refused:
            raise DataError(f"pert_features= gives {len(refused)} perturbation(s) the model "
                            f"trained on another vector than they had in training: "
                            f"{preview(refused)}. Pass vectors only for other perturbations.")
        added = [n for n in rows if n not in index]
        if not changed and not added:
            return self, []
        vectors = self.pert_features.copy()
        for n in changed:
            vectors[index[n]] = rows[n]
        return dataclasses.replace(
            self, perturbations=[*self.perturbations, *added],
            pert_features=np.vstack([vectors, *(rows[n][None] for n in added)])), changed + added

    def to_dict(self) -> dict:
        """Labels as JSON; a feature table is named by its shape and digest only (its vectors
        travel as a tensor: ``pert_features.safetensors``, or inside a checkpoint)."""
        d = {"perturbations": list(self.perturbations), "cell_types": list(self.cell_types),
             "batches": list(self.batches), "control_pert": self.control_pert,
             "pert_features": None}
        if self.pert_features is not None:
            d["pert_features"] = {"shape": list(self.pert_features.shape),
                                  "sha256": features_digest(self.pert_features)}
        return d

    @classmethod
    def from_dict(cls, d: dict, features: np.ndarray | None = None,
                  source: str = "the saved model") -> Vocab:
        """Inverse of :meth:`to_dict`; ``features``: the table it names (checked against its
        shape and digest). Older records holding the vectors as lists load as they are."""
        record = d.get("pert_features")
        if isinstance(record, list):
            features = np.asarray(record, dtype=np.float32)
        elif record is not None:
            if features is None:
                raise DataError(f"{source} was trained with perturbation feature vectors, but "
                                f"they are missing ({FEATURES_FILE} next to model.json, or the "
                                "checkpoint's 'pert_features'); copy the whole folder.")
            features = np.asarray(features, dtype=np.float32)
            if (list(features.shape) != list(record["shape"])
                    or features_digest(features) != record["sha256"]):
                raise DataError(f"the perturbation feature vectors of {source} are not the ones "
                                "it was trained with (shape or digest differ): the file was "
                                "replaced or damaged.")
        return cls(list(d["perturbations"]), list(d["cell_types"]), list(d["batches"]),
                   d["control_pert"], features)


FEATURES_FILE = "pert_features.safetensors"


def write_features(vocab: Vocab, path: str | Path) -> None:
    """The vocabulary's feature table as ``{"pert_features": [n_pert, P]}`` safetensors (rows in
    ``vocab.perturbations`` order)."""
    from safetensors.numpy import save_file

    save_file({"pert_features": np.ascontiguousarray(vocab.pert_features, dtype=np.float32)},
              str(path))
    umask_mode(path)  # safetensors writes 0600


def read_features(path: str | Path) -> np.ndarray | None:
    """The table :func:`write_features` wrote, or None when there is no such file."""
    if not Path(path).is_file():
        return None
    from safetensors.numpy import load_file

    return load_file(str(path))["pert_features"]


def features_entry(vocab: Vocab) -> dict:
    """The checkpoint entry carrying the feature table (a tensor: weights-only loadable)."""
    if vocab.pert_features is None:
        return {}
    import torch

    return {"pert_features": torch.from_numpy(np.ascontiguousarray(vocab.pert_features))}


def feature_table(features: dict[str, np.ndarray], observed: Sequence[str], control: str,
                  on_missing: str = "zeros") -> tuple[list[str], np.ndarray]:
    """Names (file order, then missing observed names) and vectors; missing ones get zeros."""
    if on_missing not in ("zeros", "error"):
        raise ConfigError(f"on_missing_features={on_missing!r} is invalid; expected 'zeros' or "
                          "'error'.")
    if not isinstance(features, Mapping):
        raise DataError(f"perturbation features must map perturbation names to vectors (a dict, "
                        f"or a .pt / .npz / .csv / .safetensors file), not a "
                        f"{type(features).__name__}.")
    names = list(features)
    if not names:
        raise DataError("the perturbation feature table is empty (no name -> vector entries).")
    shaped = [n for n, v in features.items() if np.ndim(v) > 1 and max(np.shape(v)) !=
              int(np.prod(np.shape(v)))]
    if shaped:
        raise DataError(f"perturbation feature vectors must be 1-D; {preview(shaped)} have shape "
                        f"{np.shape(features[shaped[0]])}.")
    width: dict[int, str] = {}  # length -> first perturbation with that length
    for n, v in features.items():
        width.setdefault(np.asarray(v).reshape(-1).shape[0], n)
    if len(width) != 1:
        raise DataError(
            "perturbation feature vectors have different lengths: "
            + ", ".join(f"'{n}' has {w}" for w, n in sorted(width.items()))
            + ". All vectors must have the same length."
        )
    (p,) = width
    missing = [n for n in observed if n not in features]
    missing_pert = [n for n in missing if n != control]
    if missing_pert:
        msg = (f"{len(missing_pert)} perturbation(s) have no feature vector: "
               f"{preview(missing_pert)}.{_spelling_variants(missing_pert, names)}")
        if on_missing == "error":
            raise DataError(msg + " Add them to the file or pass on_missing_features='zeros'.")
        warn(msg + " They get zero vectors (like the control, if it has none): the "
             "model cannot tell them apart. Check the names (e.g. 'A+B' vs 'A_B').")
    table = np.zeros((len(names) + len(missing), p), dtype=np.float32)
    for i, n in enumerate(names):
        table[i] = np.asarray(features[n], dtype=np.float32).reshape(-1)
    if not np.isfinite(table).all():
        bad = [n for i, n in enumerate(names) if not np.isfinite(table[i]).all()]
        raise DataError(f"perturbation feature vectors contain NaN/Inf for: {preview(bad)}.")
    return names + missing, table


def _spelling_variants(missing: Sequence[str], names: Sequence[str]) -> str:
    """`` Did you mean …?`` for table names spelled like missing ones but for case and
    separators ('A+B' / 'a_b'); near-misses between gene symbols (IFNGR1 / IFNGR2) are no hint."""
    def key(n: str) -> str:
        return re.sub(r"[\W_]+", "", n).lower()

    by_key = {key(n): n for n in names}
    found = [f"'{by_key[key(m)]}' for '{m}'" for m in missing if key(m) in by_key][:3]
    return f" Did you mean: {', '.join(found)}?" if found else ""


def load_pert_features(path: str | Path) -> dict[str, np.ndarray]:
    """Read a name → vector table from ``.pt`` (torch dict, weights-only), ``.safetensors``,
    ``.npz`` or ``.csv`` (first column names, remaining columns numbers)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"perturbation feature file {path} does not exist.")
    suffix = path.suffix.lower()
    if suffix in (".pt", ".pth", ".torch"):
        import torch

        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - refused pickled code, truncated file, ...
            raise DataError(f"could not read the perturbation feature file {path} with the "
                            "weights-only loader (it must hold a dict name -> tensor and no "
                            f"pickled code): {type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:200]}") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path} must hold a dict name → 1-D tensor, got {type(obj).__name__}.")
        return {str(k): np.asarray(v, dtype=np.float32).reshape(-1) for k, v in obj.items()}
    if suffix == ".safetensors":
        from safetensors.numpy import load_file

        return {k: v.astype(np.float32).reshape(-1) for k, v in load_file(str(path)).items()}
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k].astype(np.float32).reshape(-1) for k in z.files}
    if suffix in (".csv", ".tsv"):
        return _read_feature_table(path, "\t" if suffix == ".tsv" else ",")
    raise DataError(f"{path}: unsupported perturbation feature format '{suffix}' (use .pt, "
                    ".safetensors, .npz or .csv).")


def _read_feature_table(path: Path, sep: str) -> dict[str, np.ndarray]:
    """A name-per-row table, with a header row (e.g. ``,0,1,...`` as written here) or without
    one: a first row of numbers other than the column positions is a perturbation's vector."""
    raw = pd.read_csv(path, sep=sep, header=None, index_col=0, dtype=str,
                      keep_default_na=False)
    head = pd.to_numeric(raw.iloc[0], errors="coerce") if len(raw) else pd.Series([])
    numbers = bool(len(head)) and head.notna().all() and not np.array_equal(
        head.to_numpy(), np.arange(len(head)))
    body = raw if numbers else raw.iloc[1:]
    names = list(range(raw.shape[1])) if numbers else list(raw.iloc[0])
    values = body.apply(lambda col: pd.to_numeric(col.replace("", np.nan), errors="coerce"))
    bad = (values.isna() & (body != "")).to_numpy()
    if bad.any():
        row, col = map(int, np.argwhere(bad)[0])
        raise DataError(f"{path}: column {names[col]!r} is not numeric (e.g. "
                        f"{body.iloc[row, col]!r}); a feature table holds the perturbation name "
                        "in its first column and numbers in the others.")
    return {str(k): row.to_numpy(np.float32) for k, row in values.iterrows()}

def save_pert_features(table: Mapping[str, np.ndarray], path: str | Path) -> None:
    """Write a name → vector table in a format :func:`load_pert_features` reads, chosen by the
    suffix: ``.pt`` (torch dict), ``.safetensors``, ``.npz`` or ``.csv``."""
    path = Path(path)
    arrays = {str(k): np.ascontiguousarray(v, dtype=np.float32).reshape(-1)
              for k, v in table.items()}
    suffix = path.suffix.lower()
    if suffix in (".pt", ".pth", ".torch"):
        import torch

        torch.save({k: torch.from_numpy(v) for k, v in arrays.items()}, path)
    elif suffix == ".safetensors":
        from safetensors.numpy import save_file

        save_file(arrays, str(path))
        umask_mode(path)  # safetensors writes 0600
    elif suffix == ".npz":
        with open(path, "wb") as fh:  # (np.savez would append .npz to a temporary name)
            np.savez(fh, **arrays)
    elif suffix == ".csv":
        pd.DataFrame.from_dict(arrays, orient="index").to_csv(path)
    else:
        raise ConfigError(f"{path}: write perturbation features as .pt, .safetensors, .npz or "
                          ".csv.")


def label_parts(label: str, sep: str, control: str | None) -> list[str]:
    """The single perturbations a label names: split at ``sep``, the control label and empty
    parts left out (so GEARS' ``A+ctrl`` is ``A``, and the control itself is none, even when
    its name contains ``sep``)."""
    label = str(label)
    if label == control:
        return []
    return [q for q in (t.strip() for t in label.split(sep)) if q and q != control]


def check_sep(sep: object) -> None:
    """The separator of combined labels (``"A+B"``) must be a non-empty string."""
    if not isinstance(sep, str) or not sep:
        raise ConfigError(f"sep={sep!r} is invalid; expected the non-empty string that joins "
                          "the parts of a combined label, e.g. '+'.")


def combination_features(labels: Iterable[str], features: Mapping[str, Any] | None = None, *,
                         sep: str = "+", control_pert: str | None = None
                         ) -> dict[str, np.ndarray]:
    """Feature vectors of combined perturbations (``"A+B"``) from their parts'.

    Parameters
    ----------
    labels
        The perturbation labels (a list or an obs column, not one string); each distinct label
        gets a vector.
    features
        None (default): multi-hot vectors over the single perturbations the labels name
        (sorted), e.g. for ``pert_features=`` of a model that should predict held-out pairs of
        trained singles. A name → vector table (e.g. ``model.pert_feature_table_`` or gene
        embeddings): a label keeps its own vector when the table has one, else gets the sum of
        its parts' vectors (zeros for the control), e.g. to predict new pairs with
        ``predict(pert_features=...)``; a part without a vector is an error.
    sep, control_pert
        The separator of a combined label's parts and the control label: ``control_pert`` and
        empty parts are no perturbation, so the control gets zeros and GEARS' ``A+ctrl``
        equals ``A``. Without ``control_pert``, parts that look like a control are warned about.

    Returns
    -------
    dict
        Label → float32 vector, for every distinct label.
    """
    check_sep(sep)
    if isinstance(labels, str):
        raise ConfigError(f"labels must be a list (or column) of labels, not one string "
                          f"({labels!r}); pass [{labels!r}].")
    values = list(labels)
    if any(v is None or (not isinstance(v, str) and bool(np.all(pd.isna(v)))) for v in values):
        raise DataError("labels contain missing values (None/NaN); drop those cells or label "
                        "them first.")
    names = sorted({str(n) for n in values})
    parts = {n: label_parts(n, sep, control_pert) for n in names}
    if control_pert is None and (looks := control_like({q for ps in parts.values() for q in ps})):
        warn(f"{preview(looks)} look(s) like a control label but got a feature column "
             f"like a perturbation: pass control_pert={looks[0]!r}.", UserWarning)
    if features is None:
        singles = sorted({q for ps in parts.values() for q in ps})
        index = {q: i for i, q in enumerate(singles)}
        out = {}
        for n, ps in parts.items():
            v = np.zeros(len(singles), dtype=np.float32)
            for q in ps:
                v[index[q]] += 1.0
            out[n] = v
        return out
    if not isinstance(features, Mapping) or not features:
        raise DataError("features= must be a non-empty name -> vector table (a dict).")
    table = {str(k): np.asarray(v, dtype=np.float32).reshape(-1) for k, v in features.items()}
    widths = {v.shape[0] for v in table.values()}
    if len(widths) > 1:
        raise DataError(f"the vectors of features= differ in length ({sorted(widths)}); all "
                        "must have the same length.")
    missing = {q: n for n, ps in parts.items() if n not in table for q in ps if q not in table}
    if missing:
        listed = preview([f"{q} (in {n!r})" for q, n in sorted(missing.items())])
        raise DataError(f"{len(missing)} part(s) of combined labels have no vector in features=: "
                        f"{listed}.{_spelling_variants(sorted(missing), list(table))} Add them, "
                        "or leave the labels that use them out.")
    width = widths.pop()
    return {n: table[n] if n in table else np.sum(
        [table[q] for q in parts[n]] or [np.zeros(width, np.float32)], axis=0, dtype=np.float32)
        for n in names}
