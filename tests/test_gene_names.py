"""``gene_name_col``: genes named by a var column (symbols when var_names are Ensembl IDs), on
Zhao 2021 (var_names Ensembl IDs, var['symbol'])."""

from __future__ import annotations

import numpy as np
import pytest

from statetx import StateTransitionModel
from statetx.errors import DataError

SPEC = '[training]\nzhao = "train"\n[zeroshot]\n"zhao.glioblastoma_PW040" = "test"\n'
TINY = {"hidden_dim": 32, "n_heads": 2, "head_dim": 16, "n_kv_heads": 2,
        "intermediate_size": 128, "n_layers": 1}


@pytest.fixture(scope="module")
def zhao_log(zhao_raw):
    import scanpy as sc

    a = zhao_raw[::4].copy()  # 1,250 cells, 5 patients x (DMSO, panobinostat)
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    return a


def model(**kw) -> StateTransitionModel:
    return StateTransitionModel("tiny", pert_col="target_gene", cell_type_key="cell_type",
                                control_pert="DMSO", model_kwargs=TINY, cell_set_len=16,
                                batch_size=4, max_steps=4, val_freq=100, progress=False,
                                seed=0, device="cpu", **kw)


def by_symbol(adata):
    out = adata.copy()
    out.var_names = out.var["symbol"].astype(str).to_numpy()
    return out


def test_symbols_name_and_match_the_genes(zhao_log):
    named = model(gene_name_col="symbol").fit(zhao_log, SPEC, dataset_name="zhao")
    plain = model().fit(by_symbol(zhao_log), SPEC, dataset_name="zhao")
    assert named.var_names_ == list(zhao_log.var["symbol"]) == plain.var_names_
    test = zhao_log[zhao_log.obs["cell_type"] == "glioblastoma_PW040"].copy()
    pred = named.predict(test, seed=1)
    assert list(pred.var_names) == named.var_names_
    np.testing.assert_array_equal(pred.X, plain.predict(by_symbol(test), seed=1).X)
    # genes are matched by symbol, whatever the input's column order and var_names
    shuffled = test[:, np.random.default_rng(0).permutation(test.n_vars)].copy()
    np.testing.assert_array_equal(named.predict(shuffled, seed=1).X, pred.X)
    # every input needs the column
    no_col = test.copy()
    del no_col.var["symbol"]
    with pytest.raises(DataError, match=r"var column 'symbol' \(gene_name_col\) not found"):
        named.predict(no_col)


def test_bad_gene_name_columns_are_clear_errors(zhao_log):
    with pytest.raises(DataError, match="gene_id"):  # did-you-mean of a typo
        model(gene_name_col="gene_ids").fit(zhao_log, SPEC, dataset_name="zhao")
    dup = zhao_log.copy()
    dup.var["symbol"] = dup.var["symbol"].astype(str).to_numpy()
    dup.var.iloc[1, dup.var.columns.get_loc("symbol")] = dup.var["symbol"].iloc[0]
    with pytest.raises(DataError, match="names several genes alike: MT-RNR2"):
        model(gene_name_col="symbol").fit(dup, SPEC, dataset_name="zhao")
    # at prediction a repeated symbol matters only among the model's genes (10x-style var)
    m = model(gene_name_col="symbol").fit(zhao_log[:, 2:].copy(), SPEC, dataset_name="zhao")
    test = zhao_log[zhao_log.obs["cell_type"] == "glioblastoma_PW040"].copy()
    want = m.predict(test, seed=1).X
    rep = test.copy()
    rep.var["symbol"] = rep.var["symbol"].astype(str).to_numpy()
    rep.var.iloc[1, rep.var.columns.get_loc("symbol")] = rep.var["symbol"].iloc[0]
    np.testing.assert_array_equal(m.predict(rep, seed=1).X, want)  # genes 0, 1 are unused
    rep.var.iloc[5, rep.var.columns.get_loc("symbol")] = rep.var["symbol"].iloc[4]
    with pytest.raises(DataError, match=r"several genes alike in var\['symbol'\]"):
        m.predict(rep, seed=1)
    gap = zhao_log.copy()
    gap.var["symbol"] = gap.var["symbol"].astype(object)
    gap.var.iloc[3, gap.var.columns.get_loc("symbol")] = None
    with pytest.raises(DataError, match=r"1 missing gene names \(genes ENSG"):
        model(gene_name_col="symbol").fit(gap, SPEC, dataset_name="zhao")


def test_hvg_names_and_the_command_line_key(zhao_log, tmp_path):
    import scanpy as sc

    from statetx.cli import main
    from statetx.run import load_run

    a = zhao_log.copy()
    sc.pp.highly_variable_genes(a, n_top_genes=100)
    a.obsm["X_hvg"] = a[:, a.var["highly_variable"]].X.toarray()
    path = tmp_path / "zhao.h5ad"
    a.write_h5ad(path)
    (tmp_path / "split.toml").write_text(f'[datasets]\nzhao = "{path}"\n{SPEC}')
    args = ["tx", "train", f"data.kwargs.toml_config_path={tmp_path / 'split.toml'}",
            "data.kwargs.pert_col=target_gene", "data.kwargs.control_pert=DMSO",
            "data.kwargs.embed_key=X_hvg", "data.kwargs.output_space=gene",
            "data.kwargs.gene_name_col=symbol", "model=tiny", "model.kwargs.cell_set_len=16",
            "training.batch_size=4", "training.max_steps=2", "training.device=cpu",
            *(f"model.kwargs.{k}={v}" for k, v in TINY.items()),
            f"output_dir={tmp_path}", "name=run"]
    assert main(args) == 0
    m = load_run(tmp_path / "run", verbose=False)
    hvg = list(a.var.loc[a.var["highly_variable"], "symbol"])
    assert m.get_params()["gene_name_col"] == "symbol" and m.var_names_ == hvg
    assert list(m.predict(a[:40].copy()).var_names) == hvg


def test_baselines_name_genes_like_the_model(zhao_log):
    from statetx.baselines import PerturbMeanBaseline, fit_all_baselines

    cols = dict(pert_col="target_gene", cell_type_key="cell_type", control_pert="DMSO")
    test = zhao_log[zhao_log.obs["cell_type"] == "glioblastoma_PW040"].copy()
    named = PerturbMeanBaseline(gene_name_col="symbol", **cols).fit(zhao_log, SPEC,
                                                                    dataset_name="zhao")
    plain = PerturbMeanBaseline(**cols).fit(by_symbol(zhao_log), SPEC, dataset_name="zhao")
    pred = named.predict(test[:, ::-1].copy())
    assert list(pred.var_names) == list(zhao_log.var["symbol"])
    np.testing.assert_array_equal(pred.X, plain.predict(by_symbol(test)).X)
    models = fit_all_baselines(zhao_log, SPEC, gene_name_col="symbol", dataset_name="zhao",
                               **cols)
    assert all(m.var_names_ == named.var_names_ for m in models.values())


def test_x_hvg_older_than_the_highly_variable_flags_is_said():
    """A user flags STAT1 after preprocess_train made X_hvg: X_hvg (uns names) is what is read,
    and the disagreement is said rather than silently training without STAT1."""
    import warnings

    from conftest import make_synthetic

    from statetx.io import hvg_names

    a = make_synthetic()
    hvg = list(a.var_names[:10])
    a.var["highly_variable"] = a.var_names.isin(hvg)
    a.obsm["X_hvg"] = a[:, hvg].X.copy()
    a.uns["X_hvg_var_names"] = np.asarray(hvg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert hvg_names(a) == hvg
    a.var.loc["G20", "highly_variable"] = True
    with pytest.warns(UserWarning, match=r"flags 11 \(also G20\): X_hvg is read as it is"):
        assert hvg_names(a) == hvg
