"""The network's configuration: :class:`NetworkConfig`, every architecture option checked
without building anything. Kept apart from :mod:`statetx.nn` so that checking options (the command
line's ``model.kwargs.*`` errors) does not import PyTorch; ``statetx.nn`` re-exports it."""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, fields

from statetx._options import ARCH_CHOICES
from statetx._utils import did_you_mean, unknown_option_message
from statetx.errors import ConfigError

ACTIVATION_NAMES = ARCH_CHOICES["activation"]
BACKBONES = ARCH_CHOICES["backbone"]
ATTENTION_MODES = ARCH_CHOICES["attention"]
OUTPUT_SPACES = ARCH_CHOICES["output_space"]
OUTPUT_ACTIVATIONS = ARCH_CHOICES["output_activation"]
RESIDUAL_SPACES = ARCH_CHOICES["residual_space"]
PERT_SKIPS = ARCH_CHOICES["pert_skip"]




@dataclass
class NetworkConfig:
    """Every architecture option of the network (all explicit but ``pert_skip``); a preset is a
    complete set of them (:mod:`statetx.presets`), ``model_kwargs`` overrides fields.

    Parameters
    ----------
    input_dim, output_dim, pert_dim
        Widths of a basal cell vector (D_in), a predicted cell vector (D_out) and a
        perturbation vector (P).
    hidden_dim
        Model width h.
    n_encoder_layers, n_decoder_layers, dropout, activation
        Linear layers of the perturbation (and MLP basal) encoder and of the output head
        (``project_out``); their dropout and activation (``"gelu"``, ``"relu"``, ``"silu"``).
    use_basal_projection
        True: an MLP basal encoder; False: one Linear layer.
    backbone, n_layers, n_heads, head_dim, n_kv_heads, intermediate_size
        Transformer: ``"llama"`` or ``"gpt2"``; blocks; heads H of width d; key/value heads K
        (grouped-query attention when K < H, Llama only); FFN width.
    attention, rope
        ``"bidirectional"`` or ``"causal"``; None (no positions) or a rotary embedding base.
    norm_eps
        RMSNorm (Llama, 1e-6) / LayerNorm (GPT-2, 1e-5) epsilon.
    predict_residual, residual_space
        A residual output head; ``"hidden"``: ``project_out(r + e_b)`` (the reference),
        ``"input"``: basal + delta in input space.
    output_space, output_activation
        ``"gene"``, ``"all"`` or ``"embedding"``; ``"relu"`` or ``"none"`` on the output.
    batch_encoder, batch_dim
        A learned batch embedding added to the input; number of batch labels (0 without).
    gene_dim, decoder_hidden_dims, decoder_dropout, residual_decoder
        Gene decoder: output width G (0: none), hidden widths, dropout, residual variant.
    confidence_token
        Append a learned confidence token to each set.
    pert_skip
        Input-space skip per perturbation (``residual_space="input"``): ``"shift"`` adds a
        learned shift b_p to every cell; ``"mean_affine"`` adds b_p + a_p × mean(basal set), a
        learned scalar a_p per perturbation (how much of a context's deviation survives the
        perturbation); ``"none"`` (saved models from before the option load with it).
    """

    input_dim: int
    output_dim: int
    pert_dim: int
    hidden_dim: int
    n_encoder_layers: int
    n_decoder_layers: int
    dropout: float
    activation: str
    use_basal_projection: bool
    backbone: str
    n_layers: int
    n_heads: int
    head_dim: int
    n_kv_heads: int
    intermediate_size: int
    attention: str
    rope: float | None
    norm_eps: float
    predict_residual: bool
    residual_space: str
    output_space: str
    output_activation: str
    batch_encoder: bool
    batch_dim: int
    gene_dim: int
    decoder_hidden_dims: list[int]
    decoder_dropout: float
    residual_decoder: bool
    confidence_token: bool
    pert_skip: str = "none"

    def __post_init__(self) -> None:
        self.validate()

    # -- (de)serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict:
        """JSON-able dict of every field."""
        d = asdict(self)
        d["decoder_hidden_dims"] = list(d["decoder_hidden_dims"])
        return d

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, d: dict) -> NetworkConfig:
        """Build from a dict holding exactly the fields; unknown or missing keys are errors."""
        names = cls.field_names()
        unknown = [k for k in d if k not in names]
        if unknown:
            raise ConfigError(unknown_option_message("network option", unknown[0], names))
        optional = {f.name for f in fields(cls) if f.default is not MISSING}
        missing = [k for k in names if k not in d and k not in optional]
        if missing:
            raise ConfigError(
                f"network configuration is missing {', '.join(repr(m) for m in missing)}; "
                "every option must be given explicitly (use statetx.presets.build_network_config)."
            )
        return cls(**d)

    # -- validation --------------------------------------------------------------------------
    def validate(self) -> None:
        """Check types and consistency; raise ConfigError naming the offending field."""
        for name in ("input_dim", "output_dim", "pert_dim", "hidden_dim", "n_encoder_layers",
                     "n_decoder_layers", "n_layers", "n_heads", "head_dim", "n_kv_heads",
                     "intermediate_size"):
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("batch_dim", "gene_dim"):
            _check_int(name, getattr(self, name), minimum=0)
        for name in ("use_basal_projection", "predict_residual", "batch_encoder",
                     "residual_decoder", "confidence_token"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}.")
        _check_choice("activation", self.activation, ACTIVATION_NAMES)
        _check_choice("backbone", self.backbone, BACKBONES)
        _check_choice("attention", self.attention, ATTENTION_MODES)
        _check_choice("output_space", self.output_space, OUTPUT_SPACES)
        _check_choice("output_activation", self.output_activation, OUTPUT_ACTIVATIONS)
        _check_choice("residual_space", self.residual_space, RESIDUAL_SPACES)
        if (self.residual_space == "input" and self.predict_residual
                and self.input_dim != self.output_dim):
            raise ConfigError(
                f"residual_space 'input' adds the basal cell to the output, so input_dim "
                f"({self.input_dim}) must equal output_dim ({self.output_dim})."
            )
        _check_choice("pert_skip", self.pert_skip, PERT_SKIPS)
        if self.pert_skip != "none" and not (self.residual_space == "input"
                                             and self.predict_residual):
            raise ConfigError(f"pert_skip {self.pert_skip!r} acts on the basal cell in input "
                              "space, so it needs residual_space 'input' and predict_residual "
                              "true.")
        for name in ("dropout", "decoder_dropout"):
            p = getattr(self, name)
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
                raise ConfigError(f"{name} must be a number in [0, 1), got {p!r}.")
            setattr(self, name, float(p))
        eps = self.norm_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            raise ConfigError(f"norm_eps must be a positive number, got {eps!r}.")
        self.norm_eps = float(eps)
        if self.rope is not None:
            r = self.rope
            if isinstance(r, bool) or not isinstance(r, (int, float)) or r <= 0:
                raise ConfigError(
                    f"rope must be null (no positions) or a positive rotary base such as 10000.0, "
                    f"got {self.rope!r}."
                )
            self.rope = float(self.rope)
            if self.head_dim % 2:
                raise ConfigError(f"rope needs an even head_dim, got head_dim={self.head_dim}.")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})."
            )
        if self.backbone == "gpt2":
            if self.n_heads * self.head_dim != self.hidden_dim:
                raise ConfigError(
                    f"the gpt2 backbone needs n_heads * head_dim == hidden_dim, got "
                    f"{self.n_heads} * {self.head_dim} != {self.hidden_dim}; set head_dim to "
                    f"hidden_dim / n_heads."
                )
            if self.n_kv_heads != self.n_heads:
                raise ConfigError(
                    f"the gpt2 backbone has no grouped-query attention: n_kv_heads "
                    f"({self.n_kv_heads}) must equal n_heads ({self.n_heads})."
                )
        if self.batch_encoder and self.batch_dim < 1:
            raise ConfigError(
                "batch_encoder=true needs batch_dim >= 1 (the number of batch labels), "
                f"got batch_dim={self.batch_dim}."
            )
        if self.output_space == "all" and self.predict_residual:
            if self.input_dim != self.output_dim:
                raise ConfigError(
                    f"output_space 'all' with predict_residual adds the basal cell to the output, "
                    f"so input_dim ({self.input_dim}) must equal output_dim ({self.output_dim})."
                )
            if self.output_dim < 8:
                raise ConfigError(
                    f"output_space 'all' needs output_dim >= 8 for its D/8 bottleneck, "
                    f"got {self.output_dim}."
                )
        dims = self.decoder_hidden_dims
        if isinstance(dims, tuple):
            dims = self.decoder_hidden_dims = list(dims)
        if not isinstance(dims, list):
            raise ConfigError(f"decoder_hidden_dims must be a list of widths, got {dims!r}.")
        for w in dims:
            _check_int("decoder_hidden_dims", w, minimum=1)
        if self.residual_decoder and self.gene_dim > 0:
            for j in range(1, len(dims), 2):
                if dims[j - 1] != dims[j]:
                    raise ConfigError(
                        f"residual_decoder adds the input of every odd-numbered block to its "
                        f"output, so decoder_hidden_dims[{j - 1}] and [{j}] must be equal, got "
                        f"{dims}."
                    )
        if self.confidence_token and self.hidden_dim < 2:
            raise ConfigError("confidence_token needs hidden_dim >= 2.")


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}.")


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(
            f"{name} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}."
            + did_you_mean(str(value), choices)
        )
