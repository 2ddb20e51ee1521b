"""Vocabularies (perturbations, cell types, batches) and perturbation feature vectors.

Names are kept in plain sorted (code-point) order, so index ``i`` is stable across runs; the
perturbation vectors are rows of an identity matrix (one-hot) or of a feature table loaded from a
file (e.g. ESM2 gene embeddings), in which case the file's order is kept.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from statetx._utils import did_you_mean, preview
from statetx.errors import ConfigError, DataError


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

    def pert_matrix(self) -> np.ndarray:
        """``[n_pert, P]`` float32: identity (one-hot) or the feature table."""
        if self.pert_features is None:
            return np.eye(len(self.perturbations), dtype=np.float32)
        return self.pert_features.astype(np.float32)

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

    def to_dict(self) -> dict:
        return {"perturbations": list(self.perturbations), "cell_types": list(self.cell_types),
                "batches": list(self.batches), "control_pert": self.control_pert,
                "pert_features": None if self.pert_features is None
                else self.pert_features.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> Vocab:
        feats = d.get("pert_features")
        return cls(list(d["perturbations"]), list(d["cell_types"]), list(d["batches"]),
                   d["control_pert"],
                   None if feats is None else np.asarray(feats, dtype=np.float32))


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
               f"{preview(missing_pert)}.{did_you_mean(missing_pert[0], names)}")
        if on_missing == "error":
            raise DataError(msg + " Add them to the file or pass on_missing_features='zeros'.")
        warnings.warn(msg + " They get zero vectors (like the control, if it has none): the "
                      "model cannot tell them apart. Check the names (e.g. 'A+B' vs 'A_B').",
                      stacklevel=3)
    table = np.zeros((len(names) + len(missing), p), dtype=np.float32)
    for i, n in enumerate(names):
        table[i] = np.asarray(features[n], dtype=np.float32).reshape(-1)
    if not np.isfinite(table).all():
        bad = [n for i, n in enumerate(names) if not np.isfinite(table[i]).all()]
        raise DataError(f"perturbation feature vectors contain NaN/Inf for: {preview(bad)}.")
    return names + missing, table


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
        import pandas as pd

        df = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", index_col=0)
        return {str(k): row.to_numpy(np.float32) for k, row in df.iterrows()}
    raise DataError(f"{path}: unsupported perturbation feature format '{suffix}' (use .pt, "
                    ".safetensors, .npz or .csv).")
