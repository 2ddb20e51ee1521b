import pandas as pd

import statetx
from statetx import StateTransitionModel
from statetx.baselines import fit_all_baselines
from statetx.datasets import example_toml, load_zhao2021
from statetx.pp import preprocess_train

MAX_STEPS = None  # None: the preset's default (~800 steps here, a few minutes on a CPU)

adata = load_zhao2021()                   # raw counts: 5,000 cells x 300 genes
preprocess_train(adata, n_top_genes=300, target_sum=1e4)  # normalise + log1p, in place
spec = example_toml("zhao2021")           # PW034 = test, PW040 = validation
cols = dict(pert_col="target_gene", cell_type_key="cell_type", control_pert="DMSO")

st = StateTransitionModel(**cols, output_space="all", max_steps=MAX_STEPS, progress=False)
st.fit(adata, spec)                       # preset="auto": the small architecture here

# (adata_pred, adata_real) of the held-out patient for ST and each baseline; with
# controls="real" every prediction shares the same real control cells
predictions = {"ST": st.predict_split("test", controls="real")}
for name, baseline in fit_all_baselines(adata, spec, **cols).items():
    predictions[name] = baseline.predict_split("test")

rows = {}
for name, (pred, real) in predictions.items():
    _, agg = statetx.evaluate(pred, real, pert_col="target_gene",
                              control_pert="DMSO", profile="minimal")
    rows[name] = agg.set_index("statistic").loc["mean"]
table = pd.DataFrame(rows).T  # one row per model, one column per metric
print(table.round(3).to_string())
