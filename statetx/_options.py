"""The choices of the network's string options, in one table, and the obs column names looked
for when a column is not given (standard library only: the command line builds its parser from
it without importing NumPy or torch)."""

# statetx.nn checks them; the configuration schema, the CLI and the importers list them
ARCH_CHOICES = {
    "activation": ("gelu", "relu", "silu"),
    "backbone": ("llama", "gpt2"),
    "attention": ("bidirectional", "causal"),
    "output_space": ("gene", "all", "embedding"),
    "output_activation": ("relu", "none"),
    "residual_space": ("hidden", "input"),
    "pert_skip": ("none", "shift", "mean_affine"),
}

# obs columns that usually hold the batch (replicate, GEM group, donor, ...)
BATCH_COLS = ("gem_group", "gemgroup", "batch", "donor", "plate", "experiment", "lane",
              "batch_id")
