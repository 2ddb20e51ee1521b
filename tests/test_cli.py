"""The command line end to end on tiny settings: train -> predict -> infer -> evaluate, the seed
tutorial's commands, both flag spellings, exit codes, run-directory reload."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from statetx.cli import main
from statetx.train import load_checkpoint_file

# a tiny network through the reference's override keys
TINY = [
    "model.kwargs.hidden_dim=32",
    "model.kwargs.transformer_backbone_kwargs.num_attention_heads=2",
    "model.kwargs.transformer_backbone_kwargs.head_dim=16",
    "model.kwargs.transformer_backbone_kwargs.intermediate_size=64",
    "model.kwargs.transformer_backbone_kwargs.num_hidden_layers=1",
    "model.kwargs.n_encoder_layers=1", "model.kwargs.n_decoder_layers=1",
    "model.kwargs.cell_set_len=8", "training.batch_size=4", "training.val_freq=2",
    "training.device=cpu",
]
SPLIT = ('[datasets]\ndata = "data.h5ad"\n[training]\ndata = "train"\n[zeroshot]\n'
         '"data.CT2" = "test"\n"data.CT1" = "val"\n')


def _synthetic(**kw):
    from conftest import make_synthetic

    a = make_synthetic(**kw)
    a.obsm["X_hvg"] = np.asarray(a.X, dtype=np.float32)
    a.uns["X_hvg_var_names"] = np.asarray(a.var_names, dtype=str)
    return a


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_data")
    adata = _synthetic()
    adata.write_h5ad(d / "data.h5ad")
    (d / "split.toml").write_text(SPLIT)
    return d


def train_args(data: Path, out: Path, name: str, *extra: str) -> list[str]:
    """The seed tutorial's example-1 command (section 5.3), with tiny settings."""
    return ["tx", "train", f'data.kwargs.toml_config_path="{data / "split.toml"}"',
            "data.kwargs.embed_key=X_hvg", "data.kwargs.output_space=gene",
            'data.kwargs.pert_col="gene"', 'data.kwargs.cell_type_key="cell_type"',
            'data.kwargs.batch_col="batch"', 'data.kwargs.control_pert="ctrl"',
            "training.max_steps=4", "model=state_sm", f'output_dir="{out}"', f'name="{name}"',
            *TINY, *extra]


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli_out")
    assert main(train_args(data, out, "my_experiment")) == 0
    return out / "my_experiment"


# ------------------------------------------------------------------------------ train
def test_train_writes_run_directory(run, data):
    import torch

    from statetx.run import read_config, read_run_info

    for name in ("config.yaml", "statetx_run.json", "split.toml", "split_summary.csv",
                 "vocab.json", "var_dims.json", "metrics.csv", "model.json"):
        assert (run / name).is_file(), name
    for name in ("final.ckpt", "last.ckpt", "best.ckpt"):
        ckpt = torch.load(run / "checkpoints" / name, map_location="cpu", weights_only=True)
        assert "statetx_model" in ckpt
    cfg = read_config(run / "config.yaml")
    assert cfg["model"]["name"] == "state_sm" and cfg["data"]["kwargs"]["embed_key"] == "X_hvg"
    import json

    import anndata as ad

    dims = json.loads((run / "var_dims.json").read_text())
    src = ad.read_h5ad(data / "data.h5ad")  # the reference's meaning: genes in X, X_hvg's width
    assert (dims["gene_dim"], dims["hvg_dim"]) == (src.n_vars, src.obsm["X_hvg"].shape[1])
    assert cfg["model"]["kwargs"]["hidden_dim"] == 32 and cfg["training"]["max_steps"] == 4
    info = read_run_info(run)
    assert info["final_step"] == 4 and info["command"][:3] == ["statetx", "tx", "train"]
    assert not list(run.rglob(".*tmp*"))  # no temporary files left behind


def test_config_yaml_reloads(run, capsys):
    import yaml

    capsys.readouterr()
    assert main(["tx", "train", "--config", str(run / "config.yaml"), "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == yaml.safe_load((run / "config.yaml").read_text())


def test_load_run_matches_in_memory_model(data, tmp_path, capsys):
    import anndata as ad

    from statetx import StateTransitionModel
    from statetx.run import load_run

    adata = ad.read_h5ad(data / "data.h5ad")
    model = StateTransitionModel(
        "tiny", pert_col="gene", control_pert="ctrl", cell_set_len=8, batch_size=4,
        max_steps=3, val_freq=2, progress=False, seed=0, device="cpu",
        model_kwargs={"hidden_dim": 32, "n_heads": 2, "head_dim": 16, "intermediate_size": 128,
                      "n_layers": 1})
    model.fit(adata, data / "split.toml", output_dir=tmp_path / "run")
    for f in ("config.yaml", "split.toml", "vocab.json"):
        assert (tmp_path / "run" / f).is_file()
    loaded = load_run(tmp_path / "run")
    assert "final.ckpt" in capsys.readouterr().out
    np.testing.assert_array_equal(model.predict(adata).X, loaded.predict(adata).X)
    again = StateTransitionModel.load_run(tmp_path / "run", checkpoint="last.ckpt")
    np.testing.assert_array_equal(model.predict(adata).X, again.predict(adata).X)
    assert loaded.get_params() == model.get_params()
    # the fit record, split spec and summary, as a saved model keeps them
    for attr in ("preset_", "train_settings_", "best_step_", "training_time_"):
        assert getattr(loaded, attr) == pytest.approx(getattr(model, attr)), attr
    pd.testing.assert_frame_equal(loaded.split_summary_, model.split_summary_,
                                  check_dtype=False)
    assert loaded.split_config_.zeroshot == model.split_config_.zeroshot
    # a Python-API run gets a config.yaml that the CLI can train from
    assert main(["tx", "train", "--config", str(tmp_path / "run" / "config.yaml"),
                 "--print-config"]) == 0


# ------------------------------------------------------------------------------ predict
def test_predict_both_spellings(run, capsys):
    import anndata as ad

    assert main(["tx", "predict", "--output_dir", str(run), "--profile", "minimal"]) == 0
    out = run / "eval_final.ckpt"
    pred, real = ad.read_h5ad(out / "adata_pred.h5ad"), ad.read_h5ad(out / "adata_real.h5ad")
    assert pred.shape == real.shape and set(pred.obs["cell_type"]) == {"CT2"}
    assert list(pred.var_names) == list(real.var_names)
    assert (out / "CT2_results.csv").is_file() and (out / "CT2_agg_results.csv").is_file()
    assert main(["predict", "--output-dir", str(run), "--checkpoint", "last.ckpt",
                 "--predict-only", "--split", "val", "--matmul-precision", "medium"]) == 0
    out2 = run / "eval_val_last.ckpt"
    assert (out2 / "adata_pred.h5ad").is_file() and not list(out2.glob("*results.csv"))
    printed = capsys.readouterr().out
    assert "using checkpoint" in printed and "matmul precision medium" in printed


def test_predict_pseudobulk_gives_the_cell_level_metrics(run, capsys):
    import anndata as ad
    import pandas as pd

    args = ["tx", "predict", "--output-dir", str(run), "--profile", "full"]
    assert main(args) == 0
    out = run / "eval_final.ckpt"
    cells = pd.read_csv(out / "CT2_results.csv").set_index("perturbation")
    n_cells = ad.read_h5ad(out / "adata_pred.h5ad").n_obs
    (out / "CT9_results.csv").write_text("an earlier evaluation's file\n")
    (out / "notes.txt").write_text("the user's own file\n")
    assert main(args) == 0  # a new evaluation replaces every file of the earlier one
    assert not (out / "CT9_results.csv").exists() and (out / "notes.txt").is_file()
    assert "removed 1 file of an earlier evaluation" in capsys.readouterr().out
    # a new evaluation that fails leaves the earlier one as it was
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    import statetx.metrics

    def fail(*args, **kwargs):
        raise OSError("disk full")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(statetx.metrics, "evaluate", fail)
        assert main(args) == 1
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before  # (no temporary left)
    assert main([*args, "--pseudobulk"]) == 0
    printed = capsys.readouterr().out
    assert "pseudobulks" in printed and "DE, pearson_edistance" in printed
    pb_out = run / "eval_final.ckpt_pseudobulk"  # next to the cell-level evaluation
    assert (out / "CT2_pred_de.csv").is_file() and not (pb_out / "CT2_pred_de.csv").exists()
    pb = pd.read_csv(pb_out / "CT2_results.csv").set_index("perturbation")
    pred = ad.read_h5ad(pb_out / "adata_pred.h5ad")
    assert pred.n_obs == pred.obs["gene"].nunique() and pred.obs["n_cells"].sum() == n_cells
    shared = ["pearson_delta", "mse", "mae", "mse_delta", "mae_delta",
              "discrimination_score_l1", "discrimination_score_l2",
              "discrimination_score_cosine"]
    assert set(shared) <= set(pb.columns) and not {"overlap_at_N", "pr_auc"} & set(pb.columns)
    pd.testing.assert_frame_equal(pb[shared], cells.loc[pb.index, shared], rtol=1e-4,
                                  atol=1e-6)
    # a profile of DE metrics only cannot be computed from pseudobulks: refused before predicting
    assert main([*args[:4], "--profile", "de", "--pseudobulk"]) == 2
    assert "--profile de has only metrics that need the cells" in capsys.readouterr().err


def test_predict_with_another_split_file_keeps_the_runs_own_evaluation(run, tmp_path):
    other = tmp_path / "other_split.toml"
    other.write_text((run / "split.toml").read_text())
    args = ["tx", "predict", "--output-dir", str(run), "--profile", "minimal", "--predict-only"]
    assert main([*args, "--toml", str(other)]) == 0
    assert (run / "eval_final.ckpt_other_split" / "adata_pred.h5ad").is_file()


def test_predict_warns_when_another_split_files_test_part_was_trained_on(run, tmp_path,
                                                                         capsys):
    """tx predict --toml OTHER: test cells that the run trained on (its split.toml) score
    memorisation: a warning names their contexts and perturbations; none for held-out cells."""
    from statetx.config import SplitConfig

    args = ["tx", "predict", "--output-dir", str(run), "--profile", "minimal", "--predict-only"]
    data_file = SplitConfig.from_toml(run / "split.toml").datasets["data"]
    leak = tmp_path / "leak.toml"
    leak.write_text(f'[datasets]\ndata = "{data_file}"\n[training]\ndata = "train"\n'
                    '[zeroshot]\n"data.CT0" = "test"\n"data.CT2" = "val"\n')
    capsys.readouterr()
    assert main([*args, "--toml", str(leak)]) == 0
    err = capsys.readouterr().err
    assert (f"--toml {leak}: its test split holds perturbed cells that this run trained on"
            in err and "1 context(s): data.CT0 (P0, P1, P2)" in err), err
    # the run's held-out cell type as test under another name of the file: nothing said
    same = tmp_path / "same.toml"
    same.write_text(f'[datasets]\nmine = "{data_file}"\n[training]\nmine = "train"\n'
                    '[zeroshot]\n"mine.CT2" = "test"\n')
    assert main([*args, "--toml", str(same)]) == 0
    assert "trained on" not in capsys.readouterr().err
    # a fewshot test part: only its listed perturbations are named
    few = tmp_path / "few.toml"
    few.write_text(f'[datasets]\ndata = "{data_file}"\n[training]\ndata = "train"\n'
                   '[fewshot."data.CT0"]\ntest = ["P1"]\n')
    assert main([*args, "--toml", str(few)]) == 0
    assert "1 context(s): data.CT0 (P1)." in capsys.readouterr().err


def test_predict_eval_train_data_skips_control_only_cell_types(run, capsys):
    import pandas as pd

    assert main(["tx", "predict", "--output-dir", str(run), "--eval-train-data",
                 "--profile", "minimal", "--pseudobulk"]) == 0
    assert "control cells only are not evaluated: CT1, CT2" in capsys.readouterr().out
    out = run / "eval_train_final.ckpt_pseudobulk"
    assert (out / "CT0_results.csv").is_file() and not (out / "CT2_results.csv").exists()
    assert pd.read_csv(out / "CT0_results.csv")["pearson_delta"].notna().all()


def test_predict_with_test_time_finetuning(run, capsys):
    import anndata as ad

    from statetx.run import attach_data, load_run

    before = (run / "checkpoints" / "final.ckpt").read_bytes()
    args = ["tx", "predict", "--output-dir", str(run), "--predict-only"]
    assert main([*args, "--test-time-finetune", "3"]) == 0
    assert "test-time fine-tuning: 3 steps" in capsys.readouterr().out
    tuned = ad.read_h5ad(run / "eval_final.ckpt_ttft3" / "adata_pred.h5ad").X
    assert (run / "checkpoints" / "final.ckpt").read_bytes() == before  # run left as it was
    model = load_run(run, verbose=False)
    attach_data(model, run)
    plain = model.predict_split("test")[0].X
    assert not np.allclose(tuned, plain)
    # the same steps in Python give the same predictions
    np.testing.assert_allclose(model.finetune_on_controls(3, seed=42).predict_split("test")[0].X,
                               tuned, rtol=1e-5, atol=1e-6)


def test_predict_moved_data_needs_data_root(run, data, tmp_path):
    import shutil

    moved = tmp_path / "moved"
    shutil.copytree(run, moved)
    (moved / "split.toml").write_text((moved / "split.toml").read_text().replace(
        str(data.resolve()), str(tmp_path / "gone")))
    assert main(["tx", "predict", "--output-dir", str(moved), "--predict-only"]) == 2
    assert main(["tx", "predict", "--output-dir", str(moved), "--predict-only",
                 "--data-root", str(data)]) == 0


# ------------------------------------------------------------------------------ infer
def test_infer_both_spellings_and_npy(run, data, tmp_path, capsys):
    import anndata as ad

    src = data / "data.h5ad"
    h5 = tmp_path / "pred.h5ad"
    assert main(["tx", "infer", "--model_dir", str(run), "--adata", str(src), "--output",
                 str(h5), "--pert_col", "gene", "--control_pert", "ctrl"]) == 0
    assert main(["infer", "--model-dir", str(run), "--adata", str(src), "--output",
                 str(tmp_path / "pred.npy"), "--pert-col", "gene", "--batch-size", "2"]) == 0
    pred = ad.read_h5ad(h5)
    arr = np.load(tmp_path / "pred.npy")
    assert arr.dtype == np.float32 and arr.shape == pred.shape == (306, 32)
    np.testing.assert_array_equal(arr, np.asarray(pred.X))  # same seed, same cells
    assert main(["tx", "infer", "--model-dir", str(run), "--adata", str(src), "--output-dir",
                 str(tmp_path / "o"), "--all-perts", "--virtual-cells-per-pert", "4",
                 "--celltypes", "CT0,CT1"]) == 0
    sim = ad.read_h5ad(tmp_path / "o" / "data_simulated.h5ad")
    assert sim.n_obs == 2 * 102 + 2 * 3 * 4
    assert main(["tx", "infer", "--model-dir", str(run), "--adata", str(src), "--output-dir",
                 str(tmp_path / "o"), "--celltypes", "CT9"]) == 2
    assert "(it holds CT0, CT1, CT2)" in capsys.readouterr().err
    (tmp_path / "t.tsv").write_text("perturbation\tnum_cells\nP0\t5\n")
    noted = ad.read_h5ad(src)
    noted.uns["my_note"] = "kept"
    noted.write_h5ad(tmp_path / "noted.h5ad")
    assert main(["tx", "infer", "--model-dir", str(run), "--adata", str(tmp_path / "noted.h5ad"),
                 "--output", str(tmp_path / "t.h5ad"), "--tsv", str(tmp_path / "t.tsv")]) == 0
    virtual = ad.read_h5ad(tmp_path / "t.h5ad")
    assert virtual.n_obs == 306 + 5 and virtual.uns["my_note"] == "kept"  # (uns kept, §3.4)
    assert main(["tx", "infer", "--model-dir", str(run), "--adata", str(src), "--output",
                 str(tmp_path / "m.h5ad"), "--max_cells", "10", "--no-predict-controls"]) == 0
    m = ad.read_h5ad(tmp_path / "m.h5ad")
    assert m.n_obs == 3 * 3 * 10 + 3 * 30 and m.obs_names.is_unique  # + the copied controls
    assert main(["tx", "infer", "--model-dir", str(run), "--adata", str(src), "--output",
                 str(tmp_path / "bad.csv")]) == 2
    # a model that pairs controls by batch (batch_col set, basal_mapping_strategy "auto"): an
    # input whose batch column has another name gets it found, and the same controls drawn
    from test_model import small_model

    small_model(max_steps=1, batch_col="batch").fit(ad.read_h5ad(src)).save(tmp_path / "bm")
    renamed = ad.read_h5ad(src)
    renamed.obs = renamed.obs.rename(columns={"batch": "gem_group"})
    renamed.write_h5ad(tmp_path / "renamed.h5ad")
    for name, inp in (("b", src), ("r", tmp_path / "renamed.h5ad")):
        assert main(["tx", "infer", "--model_dir", str(tmp_path / "bm"), "--adata", str(inp),
                     "--output", str(tmp_path / f"{name}.h5ad")]) == 0
    np.testing.assert_array_equal(ad.read_h5ad(tmp_path / "r.h5ad").X,
                                  ad.read_h5ad(tmp_path / "b.h5ad").X)


def test_infer_matmul_precision(run, data, tmp_path, capsys):
    import anndata as ad

    src = data / "data.h5ad"
    base = ["tx", "infer", "--model-dir", str(run), "--adata", str(src), "--pert-col", "gene"]
    assert main([*base, "--output", str(tmp_path / "a.h5ad")]) == 0
    assert main([*base, "--output", str(tmp_path / "b.h5ad"), "--matmul_precision",
                 "medium"]) == 0
    assert "matmul precision medium" in capsys.readouterr().out
    a, b = ad.read_h5ad(tmp_path / "a.h5ad"), ad.read_h5ad(tmp_path / "b.h5ad")
    np.testing.assert_allclose(np.asarray(b.X), np.asarray(a.X), rtol=0.05, atol=0.05)
    assert main([*base, "--output", str(tmp_path / "c.h5ad"), "--matmul-precision",
                 "bf16"]) == 2
    assert "matmul_precision='bf16' is invalid" in capsys.readouterr().err
    assert not (tmp_path / "c.h5ad").exists()


def test_infer_reads_genes_from_x_or_a_var_column_when_told(run, data, tmp_path):
    """--embed-key X on an X_hvg model reads the genes from X by name (it was ignored);
    --gene-name-col names the var column of gene names."""
    import anndata as ad

    src = ad.read_h5ad(data / "data.h5ad")
    src.obsm["X_hvg"] = np.asarray(src.X, dtype=np.float32) * 0.5  # another matrix there
    src.uns["X_hvg_var_names"] = np.asarray(src.var_names, dtype=str)
    src.write_h5ad(tmp_path / "in.h5ad")
    plain = ad.read_h5ad(data / "data.h5ad")
    ens = plain.copy()
    ens.var["symbol"] = ens.var_names.astype(str)
    ens.var_names = [f"ENSG{i:05d}" for i in range(ens.n_vars)]
    if "X_hvg_var_names" in ens.uns:  # (named by var_names, as the data's own)
        ids = dict(zip(ens.var["symbol"], ens.var_names))
        ens.uns["X_hvg_var_names"] = np.asarray([ids[g] for g in ens.uns["X_hvg_var_names"]])
    ens.write_h5ad(tmp_path / "ens.h5ad")
    base = ["tx", "infer", "--model-dir", str(run)]
    out = {}
    for name, inp, extra in (("hvg", "in.h5ad", []), ("x", "in.h5ad", ["--embed-key", "X"]),
                             ("plain", data / "data.h5ad", []),
                             ("ens", "ens.h5ad", ["--gene-name-col", "symbol"])):
        assert main([*base, "--adata", str(tmp_path / inp), "--output",
                     str(tmp_path / f"{name}_pred.h5ad"), *extra]) == 0
        out[name] = np.asarray(ad.read_h5ad(tmp_path / f"{name}_pred.h5ad").X)
    assert not np.allclose(out["hvg"], out["plain"])  # obsm['X_hvg'] is the default input
    np.testing.assert_array_equal(out["x"], out["plain"])
    np.testing.assert_array_equal(out["ens"], out["plain"])


def test_infer_basal_self_on_relabelled_controls(run, data, tmp_path):
    """--basal self: control cells relabelled with a perturbation are predicted from
    themselves; the input needs no control cells."""
    import anndata as ad

    ctrl = ad.read_h5ad(data / "data.h5ad")
    ctrl = ctrl[ctrl.obs["gene"] == "ctrl"].copy()
    ctrl.obs["gene"] = "P2"
    ctrl.write_h5ad(tmp_path / "in.h5ad")
    base = ["tx", "infer", "--model-dir", str(run), "--adata", str(tmp_path / "in.h5ad")]
    assert main([*base, "--output", str(tmp_path / "p.h5ad")]) == 2  # sampled: no controls
    assert not (tmp_path / "p.h5ad").exists()
    assert main([*base, "--output", str(tmp_path / "p.h5ad"), "--basal", "self"]) == 0
    pred = ad.read_h5ad(tmp_path / "p.h5ad")
    assert list(pred.obs["statetx_ctrl_barcode"]) == list(ctrl.obs_names)
    assert pred.uns["statetx"]["basal"] == "self"


# ------------------------------------------------------------------------------ evaluate
def test_evaluate_commands(run, tmp_path, capsys):
    import anndata as ad

    from statetx.run import load_run

    ev = run / "eval_final.ckpt"
    if not (ev / "adata_pred.h5ad").exists():
        assert main(["tx", "predict", "--output-dir", str(run), "--predict-only"]) == 0
    # controls drawn with the run's training seed unless --seed is given
    recorded = ad.read_h5ad(ev / "adata_pred.h5ad", backed="r")
    assert recorded.uns["statetx"]["seed"] == load_run(run, verbose=False).seed
    recorded.file.close()
    out = tmp_path / "ev"
    assert main(["evaluate", "run", "-ap", str(ev / "adata_pred.h5ad"), "-ar",
                 str(ev / "adata_real.h5ad"), "--control-pert", "ctrl", "--pert_col", "gene",
                 "-o", str(out), "--profile", "minimal", "--batch-size", "100",
                 "--ceiling"]) == 0
    assert (out / "results.csv").is_file() and (out / "agg_results.csv").is_file()
    assert (out / "ceiling_results.csv").is_file()
    assert (out / "agg_ceiling_results.csv").is_file()
    # without the label flags: those the prediction recorded (uns['statetx']), not cell-eval's
    assert main(["evaluate", "run", "-ap", str(ev / "adata_pred.h5ad"), "-ar",
                 str(ev / "adata_real.h5ad"), "-o", str(tmp_path / "ev2"), "--profile",
                 "minimal"]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "ev2" / "results.csv"),
                                  pd.read_csv(out / "results.csv"))
    capsys.readouterr()
    assert main(["evaluate", "score", "-i", str(out / "agg_results.csv"), "-I",
                 str(out / "agg_results.csv"), "-o", str(tmp_path / "score.csv")]) == 0
    assert main(["evaluate", "baseline", "-a", str(ev / "adata_real.h5ad"), "--pert-col",
                 "gene", "--control-pert", "ctrl", "-o", str(tmp_path / "b.h5ad"),
                 "-t", "2"]) == 0  # (-t: the thread flag of cell-eval's baseline command)
    said = capsys.readouterr().out  # (the resolved inputs, before the work)
    assert f"score {out / 'agg_results.csv'} against the baseline" in said
    assert "cell-mean baseline of" in said and "pert_col='gene', control='ctrl'" in said
    assert (tmp_path / "b.h5ad").is_file()
    # without the label flags: those recorded in the input (statetx's prediction), and the
    # baseline records them in turn, so evaluate run needs no flags for it either
    assert main(["evaluate", "baseline", "-a", str(ev / "adata_pred.h5ad"), "-o",
                 str(tmp_path / "b2.h5ad")]) == 0
    base = ad.read_h5ad(tmp_path / "b2.h5ad")
    assert "gene" in base.obs and base.uns["statetx"]["control_pert"] == "ctrl"
    assert main(["evaluate", "run", "-ap", str(tmp_path / "b2.h5ad"), "-ar",
                 str(ev / "adata_real.h5ad"), "-o", str(tmp_path / "ev3"), "--profile",
                 "minimal"]) == 0
    assert main(["evaluate", "run", "-ap", "x.h5ad", "-ar", "y.h5ad", "--ceiling-seed", "1"]) == 2
    # an output that is the input is refused before anything is written (it was overwritten)
    src = tmp_path / "real_copy.h5ad"
    shutil.copy(ev / "adata_real.h5ad", src)
    before = src.read_bytes()
    assert main(["evaluate", "baseline", "-a", str(src), "-o", str(src)]) == 2
    genes = tmp_path / "genes.txt"
    genes.write_text("\n".join(ad.read_h5ad(src, backed="r").var_names))
    for out in (src, tmp_path / "other.h5ad"):
        assert main(["evaluate", "prep", "-i", str(src), "-g", str(genes), "-o", str(out),
                     "--expected-gene-dim", "-1"]) == 2
    assert src.read_bytes() == before and not (tmp_path / "other.h5ad").exists()


def test_evaluate_without_celltype_col_says_cell_types_are_pooled(tmp_path, capsys):
    """In Python as on the command line (evaluate run)."""
    from statetx.metrics import evaluate

    a = _synthetic()
    a.write_h5ad(tmp_path / "real.h5ad")
    evaluate(a, a.copy(), "gene", "ctrl", profile="pds")
    said = ("the 3 values of obs['cell_type'] are pooled into one group; pass "
            "celltype_col='cell_type' (--celltype-col cell_type) to score each")
    assert said in capsys.readouterr().out
    assert main(["evaluate", "run", "-ap", str(tmp_path / "real.h5ad"), "-ar",
                 str(tmp_path / "real.h5ad"), "--pert-col", "gene", "--control-pert", "ctrl",
                 "--profile", "pds", "-o", str(tmp_path / "ev")]) == 0
    assert said in capsys.readouterr().out
    evaluate(a, a.copy(), "gene", "ctrl", "cell_type", profile="pds")
    assert "pooled" not in capsys.readouterr().out


# ------------------------------------------------------------------------------ errors
def test_exit_codes_and_messages(run, data, tmp_path, capsys):
    assert main(["--help"]) == 0
    assert main(["tx", "train", "--help"]) == 0
    capsys.readouterr()
    assert main(["tx", "train", "training.max_step=5"]) == 2
    err = capsys.readouterr().err
    assert "Did you mean: training.max_steps" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert main(["tx", "predict", "--bogus"]) == 2
    assert main(["tx", "predict"]) == 2  # missing --output-dir
    assert main(["tx", "infer", "--model-dir", str(run), "--adata", "nope.h5ad"]) == 2
    assert main(["tx", "train", "training.lr=abc"]) == 2
    assert main([]) == 2
    # a run that fails on its data leaves no folder behind, output_dir's new parents included
    deep = tmp_path / "new" / "deeper"
    args = [t.replace('pert_col="gene"', "pert_col=nope") for t in train_args(data, deep, "r")]
    assert main(args) == 2 and "'nope'" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    (tmp_path / "afile").write_text("x")  # output_dir and name: checked before the data
    for bad, said in ((f"output_dir={tmp_path / 'afile' / 'sub'}", "is a file"),
                      ("name=", "name='' is invalid"), ("name=../up", "is invalid")):
        assert main([*train_args(data, tmp_path, "r"), bad]) == 2
        assert said in capsys.readouterr().err
    # a runtime failure (corrupt checkpoint) -> 1, one line; --debug adds the traceback
    (run / "checkpoints" / "corrupt.ckpt").write_bytes(b"not a checkpoint")
    args = ["tx", "infer", "--model-dir", str(run), "--checkpoint", "corrupt.ckpt",
            "--adata", str(data / "data.h5ad"), "--output", str(tmp_path / "x.h5ad")]
    capsys.readouterr()
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "corrupt.ckpt" in err and "Traceback" not in err
    assert main(["--debug", *args]) == 1
    assert "Traceback" in capsys.readouterr().err
    assert not (tmp_path / "x.h5ad").exists()
    (run / "checkpoints" / "corrupt.ckpt").unlink()


def test_python_m_statetx_exit_status():
    r = subprocess.run([sys.executable, "-m", "statetx", "tx", "train", "model=stat"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "not a known preset" in r.stderr


# ------------------------------------------------------------------------------ run dirs
def test_a_runs_own_config_resumes_it_as_it_is(data, tmp_path, capsys):
    """--config with the run's config.yaml (every model.kwargs value spelled out) is the same
    run: no 'changed settings', no decoder keys 'without effect'."""
    out = tmp_path / "out"
    assert main(train_args(data, out, "r", "training.max_steps=2")) == 0
    capsys.readouterr()
    assert main(["tx", "train", "--config", str(out / "r" / "config.yaml"),
                 "training.max_steps=3"]) == 0
    said = capsys.readouterr()
    assert "at step 3" in said.out
    assert "changed settings" not in said.err and "no effect" not in said.err


def test_a_run_written_before_a_new_key_still_resumes(data, tmp_path, capsys):
    """A run whose config.yaml and checkpoint lack a key statetx added later (here
    on_missing_features) resumes as one with that key's default."""
    import warnings

    import torch

    from statetx.runconfig import dump_config, read_config

    out = tmp_path / "out"
    assert main(train_args(data, out, "r", "training.max_steps=2")) == 0
    cfg_path = out / "r" / "config.yaml"
    cfg = read_config(cfg_path)
    del cfg["data"]["kwargs"]["on_missing_features"]
    cfg_path.write_text(dump_config(cfg))
    last = out / "r" / "checkpoints" / "last.ckpt"
    ckpt = load_checkpoint_file(last)
    del ckpt["statetx_model"]["params"]["on_missing_features"]
    torch.save(ckpt, last)
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # (no "changed settings" warning)
        assert main(train_args(data, out, "r", "training.max_steps=3")) == 0
    assert "resuming" in capsys.readouterr().out


def test_resume_overwrite_and_config_check(data, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(train_args(data, out, "r", "training.max_steps=2")) == 0
    capsys.readouterr()
    assert main(train_args(data, out, "r", "training.max_steps=4")) == 0
    o = capsys.readouterr().out
    assert "resuming" in o and "(step 2)" in o and "at step 4" in o
    # the same command again: the finished run is left as it is
    record = {n: (out / "r" / n).read_bytes() for n in ("statetx_run.json", "config.yaml")}
    last = (out / "r" / "checkpoints" / "last.ckpt").stat().st_mtime_ns
    assert main(train_args(data, out, "r", "training.max_steps=4")) == 0
    assert "already trained to step 4 (max_steps 4): nothing to do" in capsys.readouterr().out
    assert {n: (out / "r" / n).read_bytes() for n in record} == record
    assert (out / "r" / "checkpoints" / "last.ckpt").stat().st_mtime_ns == last
    assert main(train_args(data, out, "r", "training.max_steps=4", "training.lr=1e-3")) == 2
    assert "training.lr" in capsys.readouterr().err
    # overwrite=true with a mistake: the earlier run survives (nothing is lost to a typo)
    ckpts = sorted(p.name for p in (out / "r" / "checkpoints").iterdir())
    config = (out / "r" / "config.yaml").read_text()
    assert main(train_args(data, out, "r", "overwrite=true", 'data.kwargs.pert_col="gen"')) == 2
    assert "'gen'" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "r" / "checkpoints").iterdir()) == ckpts
    assert (out / "r" / "config.yaml").read_text() == config
    assert [p.name for p in out.iterdir()] == ["r"]  # nothing set aside is left behind
    # an option error on resume leaves the run's record alone, and so does a data error
    assert main(train_args(data, out, "r", "training.max_steps=0")) == 2
    assert (out / "r" / "config.yaml").read_text() == config
    info = (out / "r" / "statetx_run.json").read_text()
    assert main(train_args(data, out, "r", "resume=force", "training.max_steps=6",
                           'data.kwargs.pert_col="gen"')) == 2
    assert (out / "r" / "config.yaml").read_text() == config
    assert (out / "r" / "statetx_run.json").read_text() == info
    assert main(train_args(data, out, "r", "training.max_steps=2", "overwrite=true")) == 0
    assert "the earlier run in" in capsys.readouterr().out
    # starting the replacement from the replaced run's own weights
    assert main(train_args(data, out, "r", "training.max_steps=2", "overwrite=true",
                           f'model.kwargs.init_from="{out}/r/checkpoints/final.ckpt"')) == 0
    assert "init_from" in capsys.readouterr().out
    assert [p.name for p in out.iterdir()] == ["r"]
    # a killed overwrite leaves the earlier run set aside: the next command says where it is
    (out / ".r.replaced-abc123").mkdir()
    assert main(train_args(data, out, "r", "training.max_steps=2", "overwrite=true")) == 0
    assert f"an earlier run of {out / 'r'} was set aside by a process that stopped before its " \
           f"first checkpoint: {out / '.r.replaced-abc123'}" in capsys.readouterr().out
    (out / ".r.replaced-abc123").rmdir()
    # checkpoints without last.ckpt: nothing to resume, and they are not silently replaced
    (out / "r" / "checkpoints" / "last.ckpt").unlink()
    kept = sorted(p.name for p in (out / "r" / "checkpoints").iterdir())
    assert main(train_args(data, out, "r")) == 2
    assert "no checkpoints/last.ckpt to resume from; pass overwrite=true" in (
        capsys.readouterr().err)
    assert sorted(p.name for p in (out / "r" / "checkpoints").iterdir()) == kept
    # a folder that is not a run is never trained into
    (out / "mine").mkdir()
    (out / "mine" / "metrics.csv").write_text("my numbers\n")
    assert main(train_args(data, out, "mine")) == 2
    assert "not a statetx run" in capsys.readouterr().err
    assert (out / "mine" / "metrics.csv").read_text() == "my numbers\n"


def test_resume_refuses_a_changed_split_or_data_file(data, tmp_path, capsys):
    """Resuming after the split file or a data file changed would train on two splits (held-out
    cells could leak into training): refused, naming the change; resume=force continues."""
    import shutil

    import anndata as ad

    mine = tmp_path / "data"
    shutil.copytree(data, mine)
    out = tmp_path / "out"
    assert main(train_args(mine, out, "r", "training.max_steps=2")) == 0
    spec = (mine / "split.toml").read_text()
    swapped = spec.replace("CT2", "CTx").replace("CT1", "CT2").replace("CTx", "CT1")
    (mine / "split.toml").write_text(swapped)  # test and validation cell types swapped
    capsys.readouterr()
    assert main(train_args(mine, out, "r", "training.max_steps=4")) == 2
    assert "split [zeroshot]" in capsys.readouterr().err
    (mine / "split.toml").write_text(spec)
    a = ad.read_h5ad(mine / "data.h5ad")
    a[::2].copy().write_h5ad(mine / "data.h5ad")  # half the cells
    assert main(train_args(mine, out, "r", "training.max_steps=4")) == 2
    err = capsys.readouterr().err
    assert "data.h5ad: modified since the run started" in err and "bytes" in err
    rc = main(train_args(mine, out, "r", "training.max_steps=4", "resume=force"))
    assert rc == 0, capsys.readouterr().err


def test_gene_decoder_advice_is_in_the_command_lines_terms(data, tmp_path, capsys):
    """Gene-space targets without a gene decoder: tx train's warning names its key
    (model.kwargs.gene_decoder_bool=true), not Python's model_kwargs={...}."""
    args = train_args(data, tmp_path, "gd", "data.kwargs.output_space=all", "dry_run=true")
    assert main(args) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert "model.kwargs.gene_decoder_bool=true" in err and "model=state)" in err
    assert "model_kwargs" not in err and "data.kwargs.output_space=embedding" in err


def test_batch_pairing_without_the_default_batch_column_says_which_key_to_set(
        data, tmp_path, capsys):
    """basal_mapping_strategy=batch (or batch_encoder=true) with batch_col left at its default,
    gem_group, which the data lack: the error says so and names data.kwargs.batch_col (not
    Python's batch_col=)."""
    args = [a for a in train_args(data, tmp_path, "b", "dry_run=true")
            if not a.startswith("data.kwargs.batch_col")]
    assert main([*args, "data.kwargs.basal_mapping_strategy=batch"]) == 2
    err = capsys.readouterr().err
    assert ("data.kwargs.basal_mapping_strategy=batch needs a batch column, but "
            "data.kwargs.batch_col was not given and its default, 'gem_group', is not in") in err
    assert "set data.kwargs.batch_col=<the obs column holding the batch> (obs has 'batch')" in err
    assert main([*args, "model.kwargs.batch_encoder=true"]) == 2
    assert "model.kwargs.batch_encoder=true needs a batch column" in capsys.readouterr().err
    assert main(args) == 0  # (random pairing: one batch, with a notice)
    assert "the default column 'gem_group' is not in" in capsys.readouterr().out


def test_resume_accepts_the_same_split_at_another_path(data, tmp_path, capsys):
    """An identical copy of the split file (or the same file by another path) resumes, with a
    notice naming both paths; a copy whose split differs is still refused."""
    import shutil

    mine = tmp_path / "data"
    shutil.copytree(data, mine)
    out = tmp_path / "out"
    assert main(train_args(mine, out, "r", "training.max_steps=2")) == 0
    shutil.copy(mine / "split.toml", mine / "split_copy.toml")
    args = train_args(mine, out, "r", "training.max_steps=3")
    args[2] = f'data.kwargs.toml_config_path="{mine / "split_copy.toml"}"'
    capsys.readouterr()
    assert main(args) == 0, capsys.readouterr().err
    o = capsys.readouterr().out
    assert "split file's path changed" in o and "split_copy.toml" in o and "resuming" in o
    spec = (mine / "split.toml").read_text()
    swapped = spec.replace("CT2", "CTx").replace("CT1", "CT2").replace("CTx", "CT1")
    (mine / "split_copy.toml").write_text(swapped)
    args[args.index("training.max_steps=3")] = "training.max_steps=4"
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "split [zeroshot]" in err, err  # (config.yaml now names the copy)


def test_early_stopped_run_is_left_as_it_is(data, tmp_path, capsys):
    args = train_args(data, tmp_path, "es", "training.max_steps=40", "training.val_freq=1",
                      "training.early_stopping_patience=1", "training.lr=0.05",
                      "training.ckpt_every_n_steps=1000")
    assert main(args) == 0
    final = tmp_path / "es" / "checkpoints" / "final.ckpt"
    from statetx.train import load_checkpoint_file

    step = load_checkpoint_file(final)["train_state"]["step"]
    assert step < 40  # stopped early
    before = final.read_bytes()
    capsys.readouterr()
    assert main(args) == 0
    assert f"stopped early at step {step}" in capsys.readouterr().out
    assert final.read_bytes() == before


def test_dry_run_and_split(data, tmp_path, capsys):
    assert main(train_args(data, tmp_path, "dry", "dry_run=true")) == 0
    o = capsys.readouterr().out
    assert "Parameters:" in o and "CT2" in o and "dry run" in o
    assert not (tmp_path / "dry").exists()
    # a dry run checks the options the real run would refuse
    assert main(train_args(data, tmp_path, "dry", "dry_run=true", "training.batch_size=0")) == 2
    assert "batch_size=0" in capsys.readouterr().err
    # fit's notices on the options: a streaming option without streaming
    assert main(train_args(data, tmp_path, "dry", "dry_run=true",
                           "data.kwargs.stream_chunk_size=100")) == 0
    assert "has no effect with data_loading='memory'" in capsys.readouterr().err
    # an additional_obs column the files lack, as fit refuses it
    assert main(train_args(data, tmp_path, "dry", "dry_run=true",
                           "data.kwargs.additional_obs=[no_such_column]")) == 2
    assert "no_such_column" in capsys.readouterr().err
    assert not (tmp_path / "dry").exists()
    # and says what fit would say of the network: decoder settings without gene-space targets
    assert main(train_args(data, tmp_path, "dry", "dry_run=true",
                           "model.kwargs.gene_decoder_bool=true")) == 0
    assert "gene_decoder_bool have no effect here" in capsys.readouterr().err
    # statetx's small preset on the command line keeps the command line's recipe: said, unless
    # the recipe is given
    small = [a for a in train_args(data, tmp_path, "dry", "dry_run=true", "model=small")
             if a not in ("model=state_sm", "training.max_steps=4", "training.batch_size=4",
                          "training.val_freq=2")]
    assert main(small) == 0
    said = capsys.readouterr().out
    assert "model=small trains with the command line's recipe (lr 0.0001, batch 16, " \
        "40,000 steps, random control pairing) where it is not given" in said
    assert ("add training.lr=1e-3 training.batch_size=8 training.max_steps=N "
            "data.kwargs.basal_mapping_strategy=batch to train as it does") in said
    assert main([*small, "training.lr=1e-3", "training.max_steps=200"]) == 0
    said = capsys.readouterr().out  # only what is still missing is named
    assert "add training.batch_size=8 data.kwargs.basal_mapping_strategy=batch to" in said
    # fewer steps than the validation interval: validation only at the end, said
    assert ("training.val_freq=2,000 is not below training.max_steps=200: the run validates "
            "once, at its end") in said and "add training.val_freq=20 " in said
    assert main([*small, "training.lr=1e-3", "training.max_steps=200", "training.batch_size=8",
                 "data.kwargs.basal_mapping_strategy=batch", "training.val_freq=20"]) == 0
    said = capsys.readouterr().out
    assert "recipe" not in said and "val_freq" not in said
    # no batch column in the data (arc-state's default gem_group absent): no batch pairing
    # advised; no validation part in the spec: no validation interval advised
    no_val = data / "no_val.toml"  # (beside the data its [datasets] path names)
    no_val.write_text((data / "split.toml").read_text().replace('"data.CT1" = "val"\n', ""))
    bare = [a.replace(str(data / "split.toml"), str(no_val)) for a in small
            if not a.startswith("data.kwargs.batch_col")]
    assert main([*bare, "training.max_steps=200"]) == 0
    said = capsys.readouterr().out
    assert "training.lr=1e-3 training.batch_size=8 to train as it does" in said
    assert "pairs controls by batch" not in said and "val_freq" not in said
    # arc-state's default batch column is absent: said, naming the batch-like column there is
    no_batch = [a for a in train_args(data, tmp_path, "dry", "dry_run=true")
                if not a.startswith("data.kwargs.batch_col")]
    assert main(no_batch) == 0
    assert ("the default column 'gem_group' is not in data.h5ad; the data are treated as one "
            "batch (set data.kwargs.batch_col=<column> to use batches; obs has 'batch')"
            in capsys.readouterr().out)
    assert main(["tx", "split", "--toml", str(data / "split.toml"), "--control-pert", "ctrl"]) == 0
    said = capsys.readouterr().out
    assert "test" in said and "columns: pert_col='gene', cell_type_key='cell_type'" in said
    assert "no --batch-col: the data are one batch here (obs has 'batch'" in said
    assert main(["split", "--toml", str(data / "nope.toml")]) == 2
    # counts with output space 'all': refused with the flag that accepts them, which does
    counts = _synthetic()
    counts.X = np.round(np.expm1(counts.X) * 20).astype(np.float32)
    counts.write_h5ad(tmp_path / "data.h5ad")
    (tmp_path / "split.toml").write_text(SPLIT)
    split = ["tx", "split", "--toml", str(tmp_path / "split.toml"), "--control-pert", "ctrl"]
    capsys.readouterr()
    assert main(split) != 0
    assert "tx split --allow-counts" in capsys.readouterr().err
    assert main([*split, "--allow-counts"]) == 0


# ------------------------------------------------------------------------------ tutorial
def test_tutorial_commands(run, data, tmp_path, capsys):
    import torch

    toml = f"data.kwargs.toml_config_path={data / 'split.toml'}"
    # Replogle example (validated with dry_run: model=state is large)
    replogle = ["tx", "train", toml, "data.kwargs.num_workers=4", 'data.kwargs.output_space="gene"',
                "data.kwargs.batch_col=batch", "data.kwargs.control_pert=ctrl",
                "training.batch_size=64", "training.lr=1e-3", "model.kwargs.cell_set_len=64",
                "model.kwargs.hidden_dim=128", "model.kwargs.batch_encoder=True", "model=state",
                'wandb.tags="[replogle_baseline]"', f"output_dir={tmp_path}", "name=rep",
                "dry_run=true"]
    assert main(replogle) == 0
    err = capsys.readouterr().err
    assert "num_workers has no effect" in err and "keeps n_heads=12" in err
    # fine-tuning from the run's checkpoint
    ft = train_args(data, tmp_path, "ft", f'model.kwargs.init_from="{run}/checkpoints/final.ckpt"',
                    "training.max_steps=2", "training.lr=5e-5")
    assert main(ft) == 0
    assert "init_from" in capsys.readouterr().out
    # ... or from the run folder (its final checkpoint); a missing one fails before loading
    assert main(train_args(data, tmp_path, "ft2", f'model.kwargs.init_from="{run}"',
                           "training.max_steps=2")) == 0
    assert "init_from" in capsys.readouterr().out
    assert main(train_args(data, tmp_path, "ft3", f'model.kwargs.init_from="{run}/nope"')) == 2
    assert "init_from=" in capsys.readouterr().err and not (tmp_path / "ft3").exists()
    # perturbation feature file + control auto-detection (non-targeting), pert_col target_gene
    ad2 = _synthetic(n_cell_types=2, n_perts=2, n_cells=8, n_genes=8, n_controls=8)
    ad2.obs["target_gene"] = ad2.obs["gene"].replace({"ctrl": "non-targeting"})
    d2 = tmp_path / "featdata"
    d2.mkdir()
    ad2.write_h5ad(d2 / "data.h5ad")
    (d2 / "split.toml").write_text(
        SPLIT.replace('"data.CT1" = "val"\n', "").replace("CT2", "CT1"))
    torch.save({p: torch.randn(6) for p in ["P0", "P1", "non-targeting"]},
               d2 / "ESM2_pert_features.pt")
    feat = ["tx", "train", f"data.kwargs.toml_config_path={d2 / 'split.toml'}",
            f'data.kwargs.perturbation_features_file="{d2 / "ESM2_pert_features.pt"}"',
            'data.kwargs.pert_col="target_gene"', "model=state_sm", f"output_dir={tmp_path}",
            "name=feat", "training.max_steps=2", *TINY]
    assert main(feat) == 0
    assert "control_pert='non-targeting'" in capsys.readouterr().out
    # multi-device keys -> explicit error
    assert main(["tx", "train", toml, "training.devices=4", 'training.strategy="ddp"']) == 2
    assert "start several with torchrun" in capsys.readouterr().err


# ------------------------------------------------------------------------------ preprocessing
def test_preprocess_and_knockdown_filter(tmp_path, capsys):
    import anndata as ad
    import pandas as pd

    rng = np.random.default_rng(0)
    genes = [f"G{i}" for i in range(20)]
    labels = ["non-targeting"] * 40 + ["G1"] * 12 + ["G2"] * 12
    x = rng.poisson(5.0, size=(len(labels), len(genes))).astype(np.float32)
    x[40:52, 1] = 0  # G1 knocked down, G2 not
    obs = pd.DataFrame({"gene": labels, "cell_type": "A"},
                       index=[f"c{i}" for i in range(len(labels))])
    a = ad.AnnData(X=x, obs=obs, var=pd.DataFrame({"gene_name": genes}, index=genes))
    raw = tmp_path / "raw.h5ad"
    a.write_h5ad(raw)
    filt = tmp_path / "filtered.h5ad"
    # the tutorial's form: options first, input last
    assert main(["filter_on_target_knockdown", "--perturbation-column", "gene",
                 "--control-label", "non-targeting", "--min_cells", "5", "--output", str(filt),
                 str(raw)]) == 0
    assert "knock-down filter of" in capsys.readouterr().out  # (its resolved inputs)
    kept = ad.read_h5ad(filt)
    assert set(kept.obs["gene"]) == {"non-targeting", "G1"}
    # the report: one row per perturbation, and the per-stage summary next to it
    rep = tmp_path / "knockdown.csv"
    args = ["filter_on_target_knockdown", "--perturbation-column", "gene", "--control-label",
            "non-targeting", "--min_cells", "5", "--report", str(rep)]
    assert main([*args, "--output", str(filt), str(raw)]) == 0
    table = pd.read_csv(rep)
    assert list(table["perturbation"]) == ["G1", "G2"] and "ratio" in table.columns
    stages = pd.read_csv(tmp_path / "knockdown_stages.csv")
    assert list(stages["stage"]) == [0, 1, 2, 3, 4]
    rep.unlink()
    assert main([*args, "--output", str(tmp_path), str(raw)]) == 2  # a folder: nothing written
    assert not rep.exists()
    capsys.readouterr()  # a var column given by name must exist (no silent var_names)
    assert main([*args, "--output", str(filt), "--var-gene-name", "gene_nam", str(raw)]) == 2
    err = capsys.readouterr().err  # (the command line's advice, not Python's)
    assert "Did you mean: 'gene_name'" in err and "Omit --var-gene-name" in err
    assert "var_gene_name=None" not in err
    from statetx.errors import DataError
    from statetx.pp import filter_on_target_knockdown

    with pytest.raises(DataError, match="Pass var_gene_name=None to match against var_names"):
        filter_on_target_knockdown(a, "gene", "non-targeting", var_gene_name="gene_nam")
    pp = tmp_path / "pp.h5ad"
    assert main(["tx", "preprocess_train", "--adata", str(raw), "--output", str(pp),
                 "--num_hvgs", "8"]) == 0
    assert main(["preprocess-train", "--adata", str(raw), "--output", str(pp),
                 "--num-hvgs", "8"]) == 0
    assert ad.read_h5ad(pp).obsm["X_hvg"].shape == (64, 8)
    tpl = tmp_path / "tpl.h5ad"
    assert main(["tx", "preprocess_infer", "--adata", str(pp), "--output", str(tpl),
                 "--control_condition", "non-targeting", "--pert_col", "gene"]) == 0
    assert "template_ctrl_barcode" in ad.read_h5ad(tpl).obs
    capsys.readouterr()
    assert main(["tx", "preprocess_train", "--adata", str(pp), "--output",
                 str(tmp_path / "x.h5ad"), "--num-hvgs", "8"]) == 2  # already normalised
    assert "normali" in capsys.readouterr().err
    before = pp.read_bytes()
    for inp, out, says in ((raw, tmp_path / "x.txt", "use a .h5ad file name"),
                           (pp, pp, "is an input file")):
        assert main(["tx", "preprocess_train", "--adata", str(inp), "--output", str(out),
                     "--num-hvgs", "8"]) == 2
        assert says in capsys.readouterr().err
    assert not (tmp_path / "x.txt").exists() and pp.read_bytes() == before


def test_output_into_a_closed_pipe_stops_quietly():
    """`statetx tx train --list-keys | head -1`: no error when the reader goes away."""
    r = subprocess.run(f'"{sys.executable}" -m statetx tx train --list-keys | true', shell=True,
                       capture_output=True, text=True, timeout=120)
    assert "error" not in r.stderr


def test_info(run, capsys):
    assert main(["info", str(run)]) == 0
    o = capsys.readouterr().out
    assert "state_sm" in o and "attention bidirectional" in o and "checkpoints:" in o
    assert main(["info", str(run / "checkpoints" / "final.ckpt")]) == 0
    capsys.readouterr()
    assert main(["info", str(run / "split.toml")]) == 2
    assert "is not a run, model or checkpoint" in capsys.readouterr().err


def test_arc_state_run_infer_import_info(tmp_path, capsys):
    from conftest import FIXTURES, need

    arc = FIXTURES / "arc_state"
    run = need(arc / "runs" / "model_a_llama_bidir")
    inp = need(arc / "infer" / "infer_input.h5ad")
    assert main(["tx", "infer", "--model-dir", str(run), "--adata", str(inp), "--output",
                 str(tmp_path / "o.npy")]) == 0
    assert np.load(tmp_path / "o.npy").shape == (100, 128)
    assert "arc-state" in capsys.readouterr().out  # the import's notices
    copy = tmp_path / "in.h5ad"
    shutil.copy(inp, copy)
    assert main(["tx", "infer", "--model-dir", str(run), "--adata", str(copy), "--output",
                 str(copy)]) == 2
    assert "is an input file" in capsys.readouterr().err
    assert copy.read_bytes() == Path(inp).read_bytes()
    assert main(["tx", "infer", "--model-dir", str(run), "--adata", str(inp), "--output",
                 str(tmp_path / "q.npy"), "--quiet"]) == 0
    assert capsys.readouterr().out == ""
    np.testing.assert_array_equal(np.load(tmp_path / "q.npy"), np.load(tmp_path / "o.npy"))
    # --layout arc: the input with the predictions where arc-state writes them
    assert main(["tx", "infer", "--model-dir", str(run), "--adata", str(inp), "--output",
                 str(tmp_path / "arc.h5ad"), "--layout", "arc"]) == 0
    arc_out = ad.read_h5ad(tmp_path / "arc.h5ad")
    assert arc_out.obsm["X_hvg"].shape == (100, 128) and arc_out.n_vars == ad.read_h5ad(inp).n_vars
    assert main(["tx", "infer", "--model-dir", str(run), "--adata", str(inp), "--output",
                 str(tmp_path / "arc.npy"), "--layout", "arc"]) == 2
    # library errors name the command-line flag next to the Python argument
    unk = ad.read_h5ad(inp)
    unk.obs["gene"] = unk.obs["gene"].astype(str)
    unk.obs.iloc[:3, unk.obs.columns.get_loc("gene")] = "ZZZ"
    unk.write_h5ad(tmp_path / "unk.h5ad")
    capsys.readouterr()
    assert main(["tx", "infer", "--model-dir", str(run), "--adata", str(tmp_path / "unk.h5ad"),
                 "--output", str(tmp_path / "u.h5ad")]) == 2
    assert "unknown_perturbation='control'" in capsys.readouterr().err
    assert main(["tx", "infer", "--model-dir", str(run), "--adata", str(tmp_path / "unk.h5ad"),
                 "--output", str(tmp_path / "u.h5ad")]) == 2
    assert "[command line: --unknown-perturbation]" in capsys.readouterr().err
    assert main(["import-arc", str(run), "--out", str(tmp_path / "m")]) == 0
    assert main(["tx", "infer", "--model_dir", str(tmp_path / "m"), "--adata", str(inp),
                 "--output", str(tmp_path / "o2.npy")]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "o2.npy"), np.load(tmp_path / "o.npy"),
                               atol=1e-6)
    capsys.readouterr()
    assert main(["info", str(tmp_path / "m")]) == 0
    assert "CC BY-NC-SA" in capsys.readouterr().out
    # an earlier import is replaced; a folder holding anything else is not written into
    assert main(["import-arc", str(run), "--out", str(tmp_path / "m")]) == 0
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.yaml").write_text("mine")
    assert main(["import-arc", str(run), "--out", str(tmp_path / "r")]) == 2
    assert "holds other files" in capsys.readouterr().err
    saved = tmp_path / "saved"  # a model written by model.save is not an earlier import
    saved.mkdir()
    (saved / "model.json").write_text("{}")
    assert main(["import-arc", str(run), "--out", str(saved)]) == 2
    assert (saved / "model.json").read_text() == "{}"
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["config.yaml"]
    capsys.readouterr()  # a statetx model is not imported again
    assert main(["import-arc", str(tmp_path / "m"), "--out", str(tmp_path / "m2")]) == 2
    assert "is a statetx model, not an arc-state run" in capsys.readouterr().err
    assert not (tmp_path / "m2").exists()


@pytest.mark.slow
def test_demo(tmp_path, capsys):
    assert main(["demo", "--steps", "3", "--out", str(tmp_path / "demo")]) == 0
    said = capsys.readouterr()
    assert "ST (statetx)" in said.out  # (the table)
    assert "instead of the [datasets] path" not in said.out + said.err  # (once per model)
    assert (tmp_path / "demo" / "demo_results.csv").is_file()
    assert (tmp_path / "demo" / "demo_metrics.png").is_file()


def test_auto_preset_run_config_is_rerunnable(tmp_path, capsys):
    from conftest import make_synthetic

    from statetx import StateTransitionModel

    m = StateTransitionModel(pert_col="gene", cell_type_key="cell_type", control_pert="ctrl",
                             max_steps=2, progress=False,
                             model_kwargs={"hidden_dim": 32, "n_heads": 2, "head_dim": 16,
                                           "n_kv_heads": 2, "intermediate_size": 128,
                                           "n_layers": 2})
    m.fit(make_synthetic(), output_dir=tmp_path / "run")
    capsys.readouterr()
    assert main(["tx", "train", "--config", str(tmp_path / "run" / "config.yaml"),
                 "--print-config"]) == 0
    assert "name: small" in capsys.readouterr().out  # preset="auto" resolved and recorded
    assert main(["tx", "train", "model=small", "--print-config"]) == 0


def test_gpu_and_skip_options_reach_the_estimator(data, tmp_path, capsys):
    """training.compile(_mode) / data_on_device and model.kwargs.pert_skip are typed keys."""
    assert main(train_args(data, tmp_path, "opts", "training.compile=true",
                           "training.compile_mode=reduce-overhead",
                           "training.data_on_device=never", "model.kwargs.residual_space=input",
                           "model.kwargs.pert_skip=mean_affine", "--print-config")) == 0
    out = capsys.readouterr().out
    assert "compile: true" in out and "data_on_device: never" in out
    assert "compile_mode: reduce-overhead" in out and "pert_skip: mean_affine" in out
    assert main(train_args(data, tmp_path, "bad", "training.data_on_device=gpu")) != 0
    assert "data_on_device" in capsys.readouterr().err
    assert main(train_args(data, tmp_path, "bad2", "training.compile_mode=fast")) != 0
    assert "compile_mode" in capsys.readouterr().err


def test_weight_averaging_from_the_command_line(data, tmp_path, capsys):
    """training.weight_averaging / averaging_start reach the trainer; bad values are refused."""
    assert main(train_args(data, tmp_path, "avg", "training.weight_averaging=uniform",
                           "training.averaging_start=0.5")) == 0
    last = load_checkpoint_file(tmp_path / "avg" / "checkpoints" / "last.ckpt")
    assert last["train_state"]["n_averaged"] == 2 and "train_weights" in last  # steps 3, 4
    assert "weight_averaging: uniform" in (tmp_path / "avg" / "config.yaml").read_text()
    assert main(train_args(data, tmp_path, "bad", "training.weight_averaging=ema")) != 0
    assert "weight_averaging" in capsys.readouterr().err


def test_streaming_from_the_command_line(data, tmp_path, capsys):
    """data.kwargs.data_loading=stream trains out of core from the tutorial command; the
    stream settings are recorded in config.yaml and typed."""
    assert main(train_args(data, tmp_path, "stream", "data.kwargs.data_loading=stream",
                           "data.kwargs.stream_chunk_size=64",
                           "data.kwargs.stream_buffer_chunks=2")) == 0
    assert "chunks of <= 64 rows, 2 chunks per window" in capsys.readouterr().out
    config = (tmp_path / "stream" / "config.yaml").read_text()
    assert "data_loading: stream" in config and "stream_chunk_size: 64" in config
    assert (tmp_path / "stream" / "checkpoints" / "final.ckpt").is_file()
    assert main(train_args(data, tmp_path, "bad", "data.kwargs.data_loading=disk")) != 0
    # predicting the test split (and a dry run) keeps the training split on disk as well
    from statetx.run import attach_data, load_run
    from statetx.stream import StreamSplit

    run = tmp_path / "stream"
    assert isinstance(attach_data(load_run(run, verbose=False), run).splits["train"],
                      StreamSplit)
    assert main(["tx", "predict", "--output-dir", str(run), "--profile", "minimal"]) == 0
    # --eval_train_data reads the training split into memory for it
    assert main(["tx", "predict", "--output-dir", str(run), "--profile", "minimal",
                 "--eval_train_data", "--predict-only"]) == 0
    assert (run / "eval_train_final.ckpt" / "adata_pred.h5ad").is_file()
    assert main(train_args(data, tmp_path, "dry", "data.kwargs.data_loading=stream",
                           "dry_run=true")) == 0


def test_count_scale_model_is_scored_on_one_scale(tmp_path, capsys):
    """A model trained on raw counts predicts counts; tx predict scores predictions and real
    cells after the same normalisation + log1p (not real cells alone), and evaluate run on the
    files it wrote (marked as count scale) gives the same numbers."""
    from conftest import make_synthetic

    a = make_synthetic()
    a.X = np.round(np.expm1(a.X) * 3).astype(np.float32)  # integer counts
    d = tmp_path / "d"
    d.mkdir()
    a.write_h5ad(d / "data.h5ad")
    (d / "split.toml").write_text(SPLIT)
    args = ["tx", "train", f'data.kwargs.toml_config_path="{d / "split.toml"}"',
            "data.kwargs.output_space=gene", 'data.kwargs.pert_col="gene"',
            'data.kwargs.control_pert="ctrl"', f'output_dir="{tmp_path}"', 'name="r"', *TINY,
            "training.max_steps=2"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(["tx", "predict", "--output-dir", str(tmp_path / "r"), "--profile",
                 "minimal"]) == 0
    assert "count-scale prediction: predictions and real cells are normalised" in (
        capsys.readouterr().out)
    ev = tmp_path / "r" / "eval_final.ckpt"
    real = ad.read_h5ad(ev / "adata_real.h5ad")
    assert np.array_equal(real.X, np.round(real.X)) and real.X.max() > 15  # counts kept
    assert real.uns["statetx"]["scale"] == "counts"
    assert ad.read_h5ad(ev / "adata_pred.h5ad").uns["statetx"]["scale"] == "counts"
    assert main(["evaluate", "run", "-ap", str(ev / "adata_pred.h5ad"), "-ar",
                 str(ev / "adata_real.h5ad"), "--pert-col", "gene", "--control-pert", "ctrl",
                 "--celltype-col", "cell_type", "--profile", "minimal", "-o",
                 str(tmp_path / "ev")]) == 0
    for f in ev.glob("*_agg_results.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "ev" / f.name), pd.read_csv(f))


def test_import_arc_fills_in_what_the_run_does_not_record(tmp_path, capsys):
    from conftest import FIXTURES, need
    from test_arc import copy_run, edit_checkpoint

    need(FIXTURES / "arc_state" / "runs" / "model_a_llama_bidir")
    run = copy_run("model_a_llama_bidir", tmp_path / "run")
    edit_checkpoint(run, lambda ck: ck["hyper_parameters"].pop("control_pert"))
    (run / "config.yaml").unlink()
    capsys.readouterr()
    assert main(["import-arc", str(run), "--out", str(tmp_path / "m")]) == 2
    assert "statetx import-arc RUN --control-pert VALUE" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
    assert main(["import-arc", str(run), "--out", str(tmp_path / "m"),
                 "--control-pert", "non-targeting"]) == 0
    assert main(["info", str(tmp_path / "m")]) == 0
    assert "control='non-targeting'" in capsys.readouterr().out


def test_infer_without_a_cell_type_column(run, data, tmp_path, capsys):
    """--celltype-col none: every cell one context (controls of any cell type); without it a
    multi-context model asks for the column, naming the flag."""
    import anndata as ad

    src = ad.read_h5ad(data / "data.h5ad")
    del src.obs["cell_type"]
    src.write_h5ad(tmp_path / "noct.h5ad")
    args = ["tx", "infer", "--model-dir", str(run), "--adata", str(tmp_path / "noct.h5ad"),
            "--output", str(tmp_path / "o.h5ad")]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "no obs column 'cell_type'" in err and "--cell-type-col, --basal-pool" in err
    assert main([*args, "--celltype-col", "none"]) == 0
    assert "all cells form one context" in capsys.readouterr().out
    assert ad.read_h5ad(tmp_path / "o.h5ad").n_obs == src.n_obs
    assert main([*args, "--celltype-col", "none", "--basal-pool", "cell_type"]) == 2
    # the column there but not read: the same single context
    full = ["tx", "infer", "--model-dir", str(run), "--adata", str(data / "data.h5ad"),
            "--output", str(tmp_path / "f.h5ad"), "--celltype-col", "none"]
    assert main(full) == 0
    np.testing.assert_array_equal(ad.read_h5ad(tmp_path / "f.h5ad").X,
                                  ad.read_h5ad(tmp_path / "o.h5ad").X)


def test_infer_checks_the_tsv_and_an_embed_key_without_gene_names(run, data, tmp_path, capsys):
    import anndata as ad

    src = data / "data.h5ad"
    args = ["tx", "infer", "--model-dir", str(run), "--adata", str(src), "--output",
            str(tmp_path / "o.h5ad")]
    (tmp_path / "t.tsv").write_text("perturbation\tnum_cells\nP0\t-5\nP1\t2.5\nP2\t3\n")
    capsys.readouterr()
    assert main([*args, "--tsv", str(tmp_path / "t.tsv")]) == 2
    assert "num_cells must be whole numbers >= 0; row(s) P0: -5.0, P1: 2.5" in \
        capsys.readouterr().err
    # a label the model does not know came from the TSV: said so (not "drop 'unassigned' cells")
    (tmp_path / "t.tsv").write_text("perturbation\tnum_cells\nP0\t2\nPX\t3\n")
    assert main([*args, "--tsv", str(tmp_path / "t.tsv")]) == 2
    err = capsys.readouterr().err
    assert f"--tsv {tmp_path / 't.tsv'}: 1 perturbation(s) are not in the model's vocabulary: PX" \
        in err and "Correct them in the TSV" in err and "unassigned" not in err
    assert main([*args, "--tsv", str(tmp_path / "t.tsv"), "--unknown-perturbation",
                 "control"]) == 0
    # a gene matrix in obsm for a model that reads X: matched by name only with its names
    a = ad.read_h5ad(src)
    a.obsm["X_alt"] = np.asarray(a.X)[:, ::-1].copy()
    a.write_h5ad(tmp_path / "alt.h5ad")
    alt = [*args[:5], str(tmp_path / "alt.h5ad"), *args[6:], "--embed-key", "X_alt"]
    assert main(alt) == 2
    assert "obsm['X_alt'] has no gene names" in capsys.readouterr().err
    a.uns["X_alt_var_names"] = np.asarray(a.var_names)[::-1]
    a.write_h5ad(tmp_path / "alt.h5ad")
    assert main([*alt, "--seed", "3"]) == 0
    assert main([*args, "--seed", "3", "--output", str(tmp_path / "ref.h5ad")]) == 0
    np.testing.assert_allclose(ad.read_h5ad(tmp_path / "o.h5ad").X,
                               ad.read_h5ad(tmp_path / "ref.h5ad").X, atol=1e-5)


def test_infer_on_an_arc_state_run_takes_rope_and_trust_pickle(tmp_path, capsys):
    from conftest import FIXTURES, need

    run = need(FIXTURES / "arc_state" / "runs" / "model_d_llama_causal_rope")
    inp = need(FIXTURES / "arc_state" / "infer" / "infer_input.h5ad")
    args = ["tx", "infer", "--model-dir", str(run), "--adata", str(inp)]
    assert main([*args, "--output", str(tmp_path / "a.npy")]) == 0
    assert main([*args, "--output", str(tmp_path / "b.npy"), "--rope", "10000",
                 "--trust-pickle"]) == 0  # what the checkpoint records anyway
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))
    capsys.readouterr()
    assert main([*args, "--output", str(tmp_path / "c.npy"), "--rope", "none"]) == 0
    assert "will not compute what was trained" in "".join(capsys.readouterr())
    assert not np.allclose(np.load(tmp_path / "a.npy"), np.load(tmp_path / "c.npy"))
    assert main([*args, "--output", str(tmp_path / "d.npy"), "--rope", "ten"]) == 2


def test_embed_key_for_a_model_that_reads_x_hvg_by_position():
    """An imported model without gene names reads X_hvg by position: no names needed."""
    import anndata as ad

    from statetx.cli import _remap_embedding
    from statetx.errors import DataError

    a = ad.AnnData(np.zeros((3, 2), dtype=np.float32))
    a.obsm["X_other"] = np.ones((3, 4), dtype=np.float32)
    out = _remap_embedding(a, "X_other", "X_hvg", [f"X_hvg_{i}" for i in range(4)])
    np.testing.assert_array_equal(out.obsm["X_hvg"], a.obsm["X_other"])
    with pytest.raises(DataError, match="has no gene names"):
        _remap_embedding(a, "X_other", "X_hvg", ["G1", "G2", "G3", "G4"])


def test_info_shows_the_preset_auto_chose_and_the_recipe(tmp_path, capsys):
    from statetx import StateTransitionModel

    m = StateTransitionModel(pert_col="gene", cell_type_key="cell_type", control_pert="ctrl",
                             max_steps=2, progress=False, device="cpu").fit(_synthetic())
    m.save(tmp_path / "m")
    capsys.readouterr()
    assert main(["info", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert "statetx model directory: preset small (chosen by preset='auto')" in out
    assert ("training: batch_size 8, max_steps 2, val_freq 1, lr 0.001, "
            "weight_averaging uniform, pairing random, yield_controls True") in out


def test_every_option_has_help(capsys):
    """Every flag of every command says what it is (tx predict --split, evaluate run -o,
    evaluate baseline -a/-o, tx preprocess_train --adata/--output/--num-hvgs had none)."""
    import argparse

    from statetx.cli import build_parser

    missing = []

    def walk(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, [*path, name])
            elif action.option_strings and action.dest != "help" and not action.help:
                missing.append(f"{' '.join(path)} {action.option_strings[0]}")

    walk(build_parser(), ["statetx"])
    assert not missing, missing
    assert main(["evaluate", "run", "--help"]) == 0
    assert "(default ./cell-eval-outdir)" in " ".join(capsys.readouterr().out.split())
    assert main(["tx", "predict", "--help"]) == 0
    assert "which part of the split to predict" in " ".join(capsys.readouterr().out.split())


def test_profile_help_names_every_metric_set(capsys):
    from statetx.cli import PROFILE_HELP
    from statetx.metrics import PROFILES

    assert set(PROFILE_HELP) == set(PROFILES)
    assert main(["evaluate", "run", "--help"]) == 0
    out = capsys.readouterr().out
    assert "vcc: overlap_at_N, mae, discrimination_score_l1" in " ".join(out.split())


def test_state_emb_says_what_to_do_instead(capsys):
    """arc-state users type `state emb ...` (the State Embedding model): not a bare argparse
    error, but where embeddings come from and how to train on them."""
    assert main(["emb", "transform", "--model-folder", "SE-600M", "--input", "x.h5ad"]) == 2
    err = capsys.readouterr().err
    assert "not the State Embedding model" in err and "embed_key=X_state" in err


def test_infer_names_the_column_holding_the_model_perturbations(run, data, tmp_path, capsys):
    """The perturbation column renamed in the input: the error names the column that holds the
    model's labels (not a column spelled like the model's one, 'genes' for 'gene')."""
    src = ad.read_h5ad(data / "data.h5ad")
    src.obs = src.obs.rename(columns={"gene": "perturbation"})
    src.obs["genes"] = "x"  # spelled like 'gene', holds none of the labels
    src.obs["treat"] = src.obs["perturbation"].astype(str).replace({"ctrl": "DMSO"})  # some
    src.obs["score"] = 1.0
    src.write_h5ad(tmp_path / "renamed.h5ad")
    capsys.readouterr()
    assert main(["tx", "infer", "--model-dir", str(run), "--adata", str(tmp_path / "renamed.h5ad"),
                 "--output", str(tmp_path / "o.h5ad")]) == 2
    err = capsys.readouterr().err
    assert "perturbation column 'gene' is not in" in err
    assert "obs['perturbation'] holds 4 of the model's 4 perturbation labels" in err
    assert "--pert-col perturbation (fewer in 'treat')" in err and "'genes'" not in err
    # no column with the labels: the spelling neighbours, as before
    del src.obs["perturbation"], src.obs["treat"]
    src.write_h5ad(tmp_path / "none.h5ad")
    assert main(["tx", "infer", "--model-dir", str(run), "--adata", str(tmp_path / "none.h5ad"),
                 "--output", str(tmp_path / "o.h5ad")]) == 2
    assert "Did you mean: 'genes'?" in capsys.readouterr().err


def test_dry_run_says_the_parameters_per_training_cell(data, tmp_path, capsys):
    """The command line's default model=state on small data: the dry run gives fit's advice."""
    args = [a for a in train_args(data, tmp_path, "dry", "dry_run=true")
            if not a.startswith(("model", "training.batch_size"))]
    capsys.readouterr()
    assert main(args) == 0  # (model=state, the default)
    err = capsys.readouterr().err
    assert re.search(r"the 'state' network has 6\d\.\dM parameters for 162 training cells", err)
    assert "preset='small' (model=small)" in err
    assert main([*args, "model=small"]) == 0
    assert "parameters for" not in capsys.readouterr().err


def test_train_data_errors_name_the_configuration_key(data, tmp_path, capsys):
    """tx train's data errors that name an estimator option add its data.kwargs key (the
    cell-type column included, which the other commands set with --celltype-col)."""
    capsys.readouterr()
    assert main(train_args(data, tmp_path, "e", "dry_run=true",
                           "data.kwargs.cell_type_key=celltype")) == 2
    err = capsys.readouterr().err
    assert "Set cell_type_key=<column>" in err
    assert "[command line: data.kwargs.cell_type_key=<value>]" in err
    assert main(train_args(data, tmp_path, "e", "dry_run=true",
                           "data.kwargs.control_pert=control")) == 2
    err = capsys.readouterr().err
    assert "control_pert 'control' is not a value" in err
    assert "[command line: data.kwargs.control_pert=<value>]" in err
    assert not (tmp_path / "e").exists()
    # tx split keeps its flags
    assert main(["tx", "split", "--toml", str(data / "split.toml"), "--control-pert", "ctrl",
                 "--celltype-col", "celltype"]) == 2
    assert "data.kwargs" not in capsys.readouterr().err


def test_docs_placeholders_say_how_to_see_the_content():
    """docs/cli.md's generated sections tell a reader of the source which command prints them;
    the mkdocs hook replaces that note with the generated text."""
    import importlib.util

    repo = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location(
        "statetx_docs_hook", repo / "docs" / "_hooks" / "statetx_docs.py")
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)
    source = (repo / "docs" / "cli.md").read_text()
    for name, command in (("train-keys", "`statetx tx train --list-keys`"),
                          ("cli-help", "`statetx tx train --help`")):
        block = source.split(f"<!-- statetx:{name} -->")[1].split(f"<!-- /statetx:{name} -->")[0]
        assert command in block
    page = type("Page", (), {"file": type("File", (), {"src_path": "cli.md"})()})()
    built = hook.on_page_markdown(source, page, None, None)
    assert "Reading this file in the repository" not in built and "<!-- " not in built.split(
        "### Configuration keys")[1]
    assert "| `data.kwargs.toml_config_path` |" in built and "### `statetx tx train`" in built
    # a marker without a closing one is replaced alone
    assert hook.on_page_markdown("a\n<!-- statetx:presets -->\nb\n", page, None, None).startswith(
        "a\n| preset |")


@pytest.mark.parametrize("value", ["0", "10"])
def test_evaluate_cpm_filter_is_refused_whatever_its_value(value, capsys, tmp_path):
    """cell-eval's --cpm-filter is not implemented: refused (not silently ignored at 0)."""
    assert main(["evaluate", "run", "-ap", str(tmp_path / "p.h5ad"), "-ar",
                 str(tmp_path / "r.h5ad"), "--cpm-filter", value]) == 2
    assert f"--cpm-filter {value} is not supported" in capsys.readouterr().err


def test_demo_plot_marks_undefined_metrics(tmp_path, monkeypatch):
    """A NaN mean (e.g. context_mean's pearson_delta) is written as n/a, not left blank."""
    import matplotlib.pyplot as plt

    from statetx.cli import _demo_plot

    closed = []
    monkeypatch.setattr(plt, "close", closed.append)
    table = pd.DataFrame({"pearson_delta": [0.5, np.nan], "mse": [0.1, 0.2]},
                         index=["ST (statetx)", "context_mean"])
    _demo_plot(table, tmp_path / "p.png", "PW034")
    first = closed[0].axes[0]
    assert [t.get_text() for t in first.texts] == ["n/a"]
    assert first.texts[0].get_position()[0] == 1 and first.get_xlim()[1] > 1
    assert not closed[0].axes[1].texts and (tmp_path / "p.png").is_file()
