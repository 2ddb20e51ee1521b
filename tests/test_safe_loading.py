"""Loading never executes pickled code (tracker issue 9, item 3; arc-checkpoints.md §2).

Malicious payloads — a pickle whose ``__reduce__`` would create a marker file — are put where each
loader looks: statetx model directories (``model.safetensors`` / ``model.json``), checkpoints in a
run directory (``load``, ``load_run``, resume, ``init_from``, the CLI), perturbation feature
files, and every pickled file of an arc-state run (``from_arc_state``, ``import-arc``, ``tx
infer``, ``info``). Each load must raise, and the marker must not exist afterwards. A positive
control shows the payloads are live: unpickled normally, they do create the marker.
"""

from __future__ import annotations

import contextlib
import pickle
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, make_synthetic, need, writable_copy
from test_model import SMALL

from statetx import StateTransitionModel
from statetx.arc import load_pickle, load_torch
from statetx.cli import main
from statetx.errors import DataError
from statetx.run import load_run, partial_load
from statetx.train import TrainingError

ARC_RUN = FIXTURES / "arc_state" / "runs" / "model_a_llama_bidir"


class Payload:
    """Unpickling this runs ``exec``, which writes the marker file."""

    def __init__(self, marker: Path) -> None:
        self.code = f"open({str(marker)!r}, 'w').write('pwned')"

    def __reduce__(self):
        return (exec, (self.code,))


def plain_pickle(path: Path, marker: Path, wrap=lambda p: p) -> Path:
    path.write_bytes(pickle.dumps(wrap(Payload(marker)), protocol=2))
    return path


def torch_pickle(path: Path, marker: Path, wrap=lambda p: p) -> Path:
    torch.save(wrap(Payload(marker)), path)  # a zip archive whose data.pkl holds the payload
    return path


@pytest.fixture
def marker(tmp_path):
    m = tmp_path / "PWNED"
    yield m
    assert not m.exists(), "pickled code was executed"


def test_payloads_are_live(tmp_path):
    """Positive control: normal unpickling runs the payloads (so the tests below mean
    something), and the explicit opt-in ``trust_pickle=True`` does too."""
    for i, load in enumerate([
        lambda p: pickle.loads(p.read_bytes()),
        lambda p: torch.load(p, weights_only=False),
        lambda p: load_pickle(p, trust_pickle=True),
    ]):
        m = tmp_path / f"m{i}"
        write = torch_pickle if i == 1 else plain_pickle
        with pytest.warns(UserWarning) if i == 2 else contextlib.nullcontext():
            load(write(tmp_path / f"p{i}.pkl", m))
        assert m.read_text() == "pwned"


# =============================================================================================
# statetx model directories and run directories


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny trained run directory (checkpoints) and a saved model directory."""
    d = tmp_path_factory.mktemp("safe_loading")
    adata = make_synthetic(n_cell_types=2, n_perts=2)
    model = StateTransitionModel(
        "tiny", pert_col="gene", cell_type_key="cell_type", control_pert="ctrl",
        model_kwargs=SMALL, cell_set_len=8, batch_size=4, max_steps=1, val_freq=1,
        ckpt_every_n_steps=1, progress=False, seed=0, device="cpu",
    ).fit(adata, output_dir=d / "run")
    model.save(d / "saved")
    adata.write_h5ad(d / "data.h5ad")
    return {"model": model, "run": d / "run", "saved": d / "saved", "adata": adata, "dir": d}


_copy = writable_copy


@pytest.mark.parametrize("name,writer", [
    ("model.safetensors", plain_pickle),
    ("model.safetensors", torch_pickle),
    ("model.json", plain_pickle),
], ids=["weights-as-pickle", "weights-as-torch-zip", "json-as-pickle"])
def test_load_model_directory(trained, tmp_path, marker, name, writer):
    d = _copy(trained["saved"], tmp_path / "saved")
    writer(d / name, marker)
    with pytest.raises(DataError, match=rf"could not read the saved model in {d}"):
        StateTransitionModel.load(d)
    with pytest.raises(DataError, match="could not read the saved model"):
        load_run(d)  # a model directory given to load_run


def _checkpoint_with_payload(run: Path, marker: Path):
    """A real checkpoint whose metadata carries the payload next to genuine weights."""
    ckpt = torch.load(run / "checkpoints" / "final.ckpt", weights_only=True)

    def wrap(payload):
        return {**ckpt, "statetx_model": {**ckpt["statetx_model"], "params": payload}}

    return wrap


@pytest.mark.parametrize("loader", [
    lambda run, ck: StateTransitionModel.load_run(run, ck),
    lambda run, ck: load_run(run, ck, verbose=False),
    lambda run, ck: load_run(run / "checkpoints" / (ck or "final.ckpt"), verbose=False),
], ids=["StateTransitionModel.load_run", "statetx.run.load_run", "checkpoint-path"])
@pytest.mark.parametrize("variant", ["zip-payload", "legacy-pickle", "payload-in-metadata"])
def test_load_run_checkpoint(trained, tmp_path, marker, loader, variant):
    run = _copy(trained["run"], tmp_path / "run")
    if variant == "zip-payload":  # an extra file in checkpoints/, loaded by name
        torch_pickle(run / "checkpoints" / "evil.ckpt", marker)
        ck = "evil.ckpt"
    elif variant == "legacy-pickle":  # the default checkpoint replaced by a plain pickle
        plain_pickle(run / "checkpoints" / "final.ckpt", marker)
        ck = None
    else:
        torch_pickle(run / "checkpoints" / "final.ckpt", marker,
                     _checkpoint_with_payload(trained["run"], marker))
        ck = "final.ckpt"
    with pytest.raises(TrainingError, match=r"could not load checkpoint .*\.ckpt: it is "
                                            r"truncated, corrupted or not a statetx checkpoint"):
        loader(run, ck)


def test_resume_from_malicious_checkpoint(trained, tmp_path, marker):
    evil = torch_pickle(tmp_path / "last.ckpt", marker,
                        _checkpoint_with_payload(trained["run"], marker))
    model = StateTransitionModel("tiny", pert_col="gene", cell_type_key="cell_type",
                                 control_pert="ctrl", model_kwargs=SMALL, cell_set_len=8,
                                 batch_size=4, max_steps=2, progress=False, device="cpu")
    with pytest.raises(TrainingError, match=f"could not load checkpoint {evil}"):
        model.fit(trained["adata"], resume_from=evil)


def test_cli_resume_and_init_from_malicious_checkpoint(trained, tmp_path, marker, capsys):
    toml = tmp_path / "split.toml"
    toml.write_text(f'[datasets]\ndata = "{trained["dir"] / "data.h5ad"}"\n'
                    '[training]\ndata = "train"\n')
    base = ["tx", "train", f"data.kwargs.toml_config_path={toml}", f"output_dir={tmp_path}",
            "model=tiny", "model.kwargs.hidden_dim=32", "model.kwargs.n_heads=2",
            "model.kwargs.head_dim=16", "model.kwargs.cell_set_len=8", "training.max_steps=2",
            "training.device=cpu", "data.kwargs.control_pert=ctrl", "data.kwargs.batch_col=batch"]
    # an existing run whose last.ckpt is malicious: `tx train` resumes from it -> refused
    (tmp_path / "r" / "checkpoints").mkdir(parents=True)
    torch_pickle(tmp_path / "r" / "checkpoints" / "last.ckpt", marker)
    assert main([*base, "name=r", "resume=force"]) == 1
    err = capsys.readouterr().err
    assert "could not load checkpoint" in err and "last.ckpt" in err
    # model.kwargs.init_from=<malicious checkpoint> -> refused, and no run directory is left
    evil = torch_pickle(tmp_path / "evil.ckpt", marker)
    assert main([*base, "name=i", f"model.kwargs.init_from={evil}"]) == 2
    err = capsys.readouterr().err
    assert "evil.ckpt cannot be read with the restricted loader" in err and "trust_pickle" in err
    assert not (tmp_path / "i").exists()


def test_cli_predict_infer_info_with_malicious_checkpoint(trained, tmp_path, marker, capsys):
    run = _copy(trained["run"], tmp_path / "run")
    torch_pickle(run / "checkpoints" / "evil.ckpt", marker)
    out = tmp_path / "out"
    out.mkdir()
    for args in (["tx", "predict", "--output-dir", str(run), "--checkpoint", "evil.ckpt"],
                 ["tx", "infer", "--model-dir", str(run), "--checkpoint", "evil.ckpt",
                  "--adata", str(trained["dir"] / "data.h5ad"), "--output",
                  str(out / "pred.h5ad")],
                 ["info", str(run / "checkpoints" / "evil.ckpt")]):
        assert main(args) == 1
        err = capsys.readouterr().err
        assert "could not load checkpoint" in err and "evil.ckpt" in err
        assert "Traceback" not in err
    assert not any(out.iterdir()) and not list(run.glob("eval_*"))


def test_partial_load_and_feature_file(trained, tmp_path, marker):
    from statetx.nn import StateTransitionNetwork

    net = StateTransitionNetwork(trained["model"].network_config_)
    evil = torch_pickle(tmp_path / "evil.ckpt", marker)
    with pytest.raises(DataError, match="cannot be read with the restricted loader"):
        partial_load(net, evil)
    feats = torch_pickle(tmp_path / "features.pt", marker, lambda p: {"P0": p})
    model = StateTransitionModel("tiny", pert_col="gene", cell_type_key="cell_type",
                                 control_pert="ctrl", model_kwargs=SMALL, pert_features=feats,
                                 progress=False, device="cpu")
    with pytest.raises(DataError, match=rf"could not read the perturbation feature file {feats} "
                                        "with the weights-only loader"):
        model.fit(trained["adata"])


# =============================================================================================
# arc-state run directories


@pytest.fixture
def arc_run(tmp_path):
    return _copy(need(ARC_RUN), tmp_path / "arc_run")


def _replace_checkpoint_hparams(run: Path, marker: Path) -> None:
    path = run / "checkpoints" / "final.ckpt"
    ckpt = load_torch(path)  # the genuine fixture, read safely
    ckpt["hyper_parameters"] = {**ckpt["hyper_parameters"], "lr": Payload(marker)}
    torch.save(ckpt, path)


ARC_FILES = {
    "var_dims.pkl": lambda run, m: plain_pickle(run / "var_dims.pkl", m,
                                                lambda p: {"input_dim": p}),
    "pert_onehot_map.pt": lambda run, m: torch_pickle(run / "pert_onehot_map.pt", m,
                                                      lambda p: {"P0": p}),
    "cell_type_onehot_map.torch": lambda run, m: torch_pickle(
        run / "cell_type_onehot_map.torch", m),
    "batch_onehot_map.torch": lambda run, m: torch_pickle(run / "batch_onehot_map.torch", m),
    "cell_type_onehot_map.pkl (0.9.x)": lambda run, m: (
        (run / "cell_type_onehot_map.torch").unlink(),
        plain_pickle(run / "cell_type_onehot_map.pkl", m)),
    "final.ckpt (zip)": lambda run, m: torch_pickle(run / "checkpoints" / "final.ckpt", m),
    "final.ckpt (legacy pickle)": lambda run, m: plain_pickle(run / "checkpoints" / "final.ckpt",
                                                              m),
    "final.ckpt (hyper_parameters)": _replace_checkpoint_hparams,
}


@pytest.mark.parametrize("file", list(ARC_FILES))
def test_from_arc_state_refuses_pickled_code(arc_run, marker, file):
    ARC_FILES[file](arc_run, marker)
    with pytest.raises(DataError, match=r"cannot be read with the restricted loader.*executes "
                                        r"code.*trust_pickle=True"):
        StateTransitionModel.from_arc_state(arc_run, verbose=False)


@pytest.mark.parametrize("file", ["checkpoints/final.ckpt", "pert_onehot_map.pt",
                                  "var_dims.pkl"])
@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_damaged_arc_files_are_named_not_taken_for_pickled_code(arc_run, file, damage):
    path = arc_run / file
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"")
    with pytest.raises(DataError, match=rf"could not read .*{path.name} .*damaged or truncated"):
        StateTransitionModel.from_arc_state(arc_run, verbose=False)


def test_files_the_importer_does_not_need_are_never_unpickled(arc_run, marker):
    torch_pickle(arc_run / "data_module.torch", marker)
    model = StateTransitionModel.from_arc_state(arc_run, verbose=False)
    assert model.network_config_.attention == "bidirectional"


@pytest.mark.parametrize("command", ["import-arc", "infer", "info"])
def test_cli_on_malicious_arc_run(arc_run, tmp_path, marker, capsys, command):
    torch_pickle(arc_run / "pert_onehot_map.pt", marker, lambda p: {"P0": p})
    out = tmp_path / "out"
    adata = make_synthetic()
    adata.write_h5ad(tmp_path / "in.h5ad")
    args = {
        "import-arc": ["import-arc", str(arc_run), "--out", str(out)],
        "infer": ["tx", "infer", "--model-dir", str(arc_run), "--adata",
                  str(tmp_path / "in.h5ad"), "--output", str(out / "pred.h5ad")],
        "info": ["info", str(arc_run)],
    }[command]
    if command == "infer":
        out.mkdir()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "pert_onehot_map.pt cannot be read with the restricted loader" in err
    assert "Traceback" not in err
    assert not out.exists() or not any(out.iterdir())

