"""The State Transition (ST) network in plain PyTorch (spec: model.md §2–§8).

One cell set = S cells sharing a (context, perturbation) group. For every position the network adds
an encoded perturbation vector, an encoded basal (control) cell and, optionally, a batch embedding;
runs the [B, S, h] tensor through a transformer without token or position tables; and maps each
position to a predicted perturbed cell with a residual output head.

Parameter names are a stable interface (checkpoints and the arc-state importer rely on them). They
mirror arc-state's state_dict keys 1:1, except that GPT-2 projections are stored as PyTorch Linear
weights ``[out, in]`` (arc-state stores HF "Conv1D" ``[in, out]``; the importer transposes them)::

    pert_encoder.{3k}.weight/.bias                       MLP P -> h (k = 0..n_encoder_layers-1)
    basal_encoder.{3k}.weight/.bias                      MLP D_in -> h  (use_basal_projection=True)
    basal_encoder.weight/.bias                           bare Linear D_in -> h (False)
    batch_encoder.weight                                 [batch_dim, h] embedding table
    transformer_backbone.layers.{i}.self_attn.{q,k,v,o}_proj.weight          Llama, no biases
    transformer_backbone.layers.{i}.mlp.{gate,up,down}_proj.weight
    transformer_backbone.layers.{i}.{input_layernorm,post_attention_layernorm}.weight
    transformer_backbone.norm.weight                                          final RMSNorm
    transformer_backbone.h.{i}.{ln_1,ln_2}.weight/.bias                       GPT-2
    transformer_backbone.h.{i}.attn.{c_attn,c_proj}.weight/.bias        c_attn [3h, h] = q|k|v
    transformer_backbone.h.{i}.mlp.{c_fc,c_proj}.weight/.bias
    transformer_backbone.ln_f.weight/.bias                                    final LayerNorm
    project_out.{3k}.weight/.bias                        MLP h -> D_out (k = 0..n_decoder_layers-1)
    final_down_then_up.{0,2}.weight/.bias                output_space "all", hidden residual
    gene_decoder.decoder.{4j,4j+1,4n}.weight/.bias       Linear/LayerNorm pairs, final Linear
    gene_decoder.blocks.{j}.{0,1}.*, gene_decoder.final_layer.0.*   residual decoder variant
    confidence_token.confidence_token                    [1, 1, h] learned token
    confidence_token.confidence_projection.{0,1,4,5,8}.* Linear,LayerNorm,(GELU,Dropout) x2, Linear
    pert_bias.weight, pert_mean_scale.weight             [D_out, P], [1, P] pert_skip (option)

Confidence projection layout (statetx's choice; arc-state's is unverified): Linear(h, h),
LayerNorm(h), GELU, Dropout, Linear(h, h//2), LayerNorm(h//2), GELU, Dropout, Linear(h//2, 1), no
final activation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from statetx.errors import DataError
from statetx.netconfig import NetworkConfig  # (re-exported: statetx.nn.NetworkConfig)

ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


class MLP(nn.Sequential):
    """``n_layers`` Linear layers; Linear k at index 3k, its activation at 3k+1, dropout at 3k+2.

    n = 1 is a single Linear (still at index 0); nothing follows the last Linear.
    """

    def __init__(self, in_dim: int, out_dim: int, width: int, n_layers: int, dropout: float,
                 activation: str) -> None:
        layers: list[nn.Module] = []
        dims = [in_dim] + [width] * (n_layers - 1) + [out_dim]
        for k in range(n_layers):
            layers.append(nn.Linear(dims[k], dims[k + 1]))
            if k < n_layers - 1:
                layers += [ACTIVATIONS[activation](), Dropout(dropout)]
        super().__init__(*layers)


class _KeepMaskDropout(torch.autograd.Function):
    """y = x * keep * scale with a boolean keep mask drawn from 16-bit random integers."""

    @staticmethod
    def forward(ctx, x: Tensor, threshold: int) -> Tensor:  # type: ignore[override]
        # one 64-bit draw of the CPU generator gives four uniform 16-bit lanes
        bits = torch.empty((x.numel() + 3) // 4, dtype=torch.int64).random_(-2**63, 2**63 - 1)
        keep = bits.view(torch.int16)[: x.numel()].view(x.shape) >= threshold - 32768
        ctx.scale = 65536 / (65536 - threshold)
        ctx.save_for_backward(keep)
        return torch.where(keep, x * ctx.scale, 0.0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (keep,) = ctx.saved_tensors
        return torch.where(keep, grad * ctx.scale, 0.0), None


class Dropout(nn.Dropout):
    """``nn.Dropout``, with a faster training path on the CPU.

    PyTorch's CPU dropout draws one float per element from the (serial) CPU generator and keeps a
    float mask for backward. Here one 64-bit draw decides four elements and the mask is one byte:
    forward + backward ~1.7x faster at ST's shapes. The drop rate is ``p`` rounded to a multiple of
    1/65536 (0.1 -> 0.100006), kept values are scaled by the exact inverse keep rate. Seeded like
    PyTorch's (``torch.manual_seed``). Elsewhere (GPU, compiled graphs, in-place) it is
    ``nn.Dropout``.
    """

    def forward(self, x: Tensor) -> Tensor:
        threshold = round(self.p * 65536)
        if (self.training and 0 < threshold < 65536 and x.device.type == "cpu"
                and not self.inplace and not torch.compiler.is_compiling()):
            return _KeepMaskDropout.apply(x, threshold)
        return super().forward(x)


class _RMSNormFunction(torch.autograd.Function):
    """RMSNorm with a hand-written backward: ~5 passes over the activations instead of the ~12
    autograd records for the composite (pow, mean, rsqrt and three products), and only the
    normalised input and 1/rms saved."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:  # type: ignore[override]
        x32 = x.float()
        # mean of squares as one fused fp32 reduction (not subject to bf16 autocast)
        rstd = torch.linalg.vector_norm(x32, dim=-1, keepdim=True).square_()
        rstd = rstd.div_(x.shape[-1]).add_(eps).rsqrt_()
        xhat = x32 * rstd
        ctx.save_for_backward(xhat, rstd, weight)
        ctx.in_dtype = x.dtype
        return (xhat * weight).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None]:  # type: ignore[override]
        xhat, rstd, weight = ctx.saved_tensors
        g = grad.float()
        grad_weight = (g * xhat).reshape(-1, xhat.shape[-1]).sum(0)
        g = g * weight
        # d xhat / d x projects out the component along xhat: g - xhat * mean(g * xhat)
        proj = (g * xhat).mean(-1, keepdim=True)
        grad_x = g.sub_(xhat * proj).mul_(rstd)
        return grad_x.to(ctx.in_dtype), grad_weight.to(weight.dtype), None


class RMSNorm(nn.Module):
    """Llama RMSNorm: normalise and scale in fp32, cast back to the input dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # one rounding, and the input's dtype out (bf16 under autocast: no re-cast per projection)
        if x.device.type == "cpu" and not torch.compiler.is_compiling():
            return _RMSNormFunction.apply(x, self.weight, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * self.weight).to(x.dtype)


def rotary_cos_sin(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype
                   ) -> tuple[Tensor, Tensor]:
    """cos/sin tables [..., 1, S, d] for integer ``positions`` [S] or [B, S] (half-split layout)."""
    inv_freq = 1.0 / theta ** (
        torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim
    )
    freqs = positions.float()[..., None] * inv_freq  # [..., S, d/2]
    emb = torch.cat([freqs, freqs], dim=-1).unsqueeze(-3)  # [..., 1, S, d]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` [B, H, S, d]: x*cos + rotate_half(x)*sin with rotate_half = (-x2, x1)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def attend(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, is_causal: bool,
           rope: tuple[Tensor, Tensor] | None) -> Tensor:
    """Scaled dot-product attention on [B, heads, S, d] tensors (k/v heads repeated for GQA)."""
    if rope is not None:
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    if _math_attention_is_faster(q):
        return math_attention(q, k, v, attn_mask, is_causal)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)


def math_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None,
                   is_causal: bool) -> Tensor:
    """softmax(q kᵀ / √d, masked) v written out (boolean mask, True = may attend).

    Every row must keep at least one key (the network's masks always let a cell see itself).
    On the CPU its forward + backward at ST's set lengths is 1.3x (fp32) to 2.6x (bf16) faster
    than SDPA's own math kernel, which scales q and k separately and checks every row for full
    masking.
    """
    scores = torch.matmul(q, k.transpose(-2, -1)).mul_(q.shape[-1] ** -0.5)
    if is_causal:
        n = q.shape[-2]
        causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~causal, -math.inf)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, -math.inf)
    return torch.matmul(scores.softmax(-1), v)


def _math_attention_is_faster(q: Tensor) -> bool:
    """Whether :func:`math_attention` beats SDPA's fused CPU kernel (measured with torch 2.13 on
    ST's shapes). The fused kernel wins at full fp32 precision; under the bf16 products of
    ``matmul_precision="medium"`` it is 2-5x slower up to 256 cells per set when training
    (fwd + bwd) and up to 128 in inference (5x at 64, 1.75x at 128, 0.7x at 256), and under bf16
    autocast up to 512 cells when training."""
    if q.device.type != "cpu" or torch.compiler.is_compiling():
        return False
    if q.dtype == torch.bfloat16:
        return q.requires_grad and q.shape[-2] <= 512
    if torch.get_float32_matmul_precision() == "highest":
        return False
    return q.shape[-2] <= (256 if q.requires_grad else 128)


def _split_heads(x: Tensor, n: int, d: int) -> Tensor:
    b, s, _ = x.shape
    return x.view(b, s, n, d).transpose(1, 2)


def _merge_heads(x: Tensor) -> Tensor:
    b, n, s, d = x.shape
    return x.transpose(1, 2).reshape(b, s, n * d)


# ---- Llama-style backbone ------------------------------------------------------------------


class LlamaAttention(nn.Module):
    def __init__(self, c: NetworkConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = c.n_heads, c.n_kv_heads, c.head_dim
        h = c.hidden_dim
        self.q_proj = nn.Linear(h, c.n_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(h, c.n_kv_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(h, c.n_kv_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.n_heads * c.head_dim, h, bias=False)

    def forward(self, x: Tensor, attn_mask: Tensor | None, is_causal: bool,
                rope: tuple[Tensor, Tensor] | None) -> Tensor:
        q = _split_heads(self.q_proj(x), self.n_heads, self.head_dim)
        k = _split_heads(self.k_proj(x), self.n_kv_heads, self.head_dim)
        v = _split_heads(self.v_proj(x), self.n_kv_heads, self.head_dim)
        return self.o_proj(_merge_heads(attend(q, k, v, attn_mask, is_causal, rope)))


class LlamaMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), bias-free."""

    def __init__(self, c: NetworkConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_dim, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_dim, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nn.Module):
    def __init__(self, c: NetworkConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_dim, c.norm_eps)
        self.self_attn = LlamaAttention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_dim, c.norm_eps)
        self.mlp = LlamaMLP(c)

    def forward(self, x: Tensor, attn_mask: Tensor | None, is_causal: bool,
                rope: tuple[Tensor, Tensor] | None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), attn_mask, is_causal, rope)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaBackbone(nn.Module):
    def __init__(self, c: NetworkConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(LlamaBlock(c) for _ in range(c.n_layers))
        self.norm = RMSNorm(c.hidden_dim, c.norm_eps)

    def forward(self, x: Tensor, attn_mask: Tensor | None, is_causal: bool,
                rope: tuple[Tensor, Tensor] | None) -> Tensor:
        for layer in self.layers:
            x = layer(x, attn_mask, is_causal, rope)
        return self.norm(x)


# ---- GPT-2-style backbone ------------------------------------------------------------------


class GPT2Attention(nn.Module):
    def __init__(self, c: NetworkConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim = c.n_heads, c.head_dim
        self.c_attn = nn.Linear(c.hidden_dim, 3 * c.hidden_dim)  # fused q | k | v
        self.c_proj = nn.Linear(c.hidden_dim, c.hidden_dim)

    def forward(self, x: Tensor, attn_mask: Tensor | None, is_causal: bool,
                rope: tuple[Tensor, Tensor] | None) -> Tensor:
        q, k, v = (_split_heads(t, self.n_heads, self.head_dim)
                   for t in self.c_attn(x).chunk(3, dim=-1))
        return self.c_proj(_merge_heads(attend(q, k, v, attn_mask, is_causal, rope)))


class GPT2MLP(nn.Module):
    def __init__(self, c: NetworkConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(c.hidden_dim, c.intermediate_size)
        self.c_proj = nn.Linear(c.intermediate_size, c.hidden_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class GPT2Block(nn.Module):
    def __init__(self, c: NetworkConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(c.hidden_dim, eps=c.norm_eps)
        self.attn = GPT2Attention(c)
        self.ln_2 = nn.LayerNorm(c.hidden_dim, eps=c.norm_eps)
        self.mlp = GPT2MLP(c)

    def forward(self, x: Tensor, attn_mask: Tensor | None, is_causal: bool,
                rope: tuple[Tensor, Tensor] | None) -> Tensor:
        x = x + self.attn(self.ln_1(x), attn_mask, is_causal, rope)
        return x + self.mlp(self.ln_2(x))


class GPT2Backbone(nn.Module):
    def __init__(self, c: NetworkConfig) -> None:
        super().__init__()
        self.h = nn.ModuleList(GPT2Block(c) for _ in range(c.n_layers))
        self.ln_f = nn.LayerNorm(c.hidden_dim, eps=c.norm_eps)

    def forward(self, x: Tensor, attn_mask: Tensor | None, is_causal: bool,
                rope: tuple[Tensor, Tensor] | None) -> Tensor:
        for block in self.h:
            x = block(x, attn_mask, is_causal, rope)
        return self.ln_f(x)


def init_backbone(backbone: nn.Module, n_layers: int) -> None:
    """Linear weights ~ N(0, 0.02), biases 0; GPT-2 output projections scaled by 1/sqrt(2L)."""
    for name, m in backbone.named_modules():
        if isinstance(m, nn.Linear):
            std = 0.02
            if isinstance(backbone, GPT2Backbone) and name.endswith("c_proj"):
                std = 0.02 / math.sqrt(2 * n_layers)
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


# ---- heads ---------------------------------------------------------------------------------


class GeneDecoder(nn.Module):
    """Latent (D_out) -> gene space (G): [Linear, LayerNorm, GELU, Dropout] blocks, Linear, ReLU.

    Residual variant: the blocks are held separately and every odd-numbered block (0-based)
    adds its input to its output.
    """

    def __init__(self, latent_dim: int, gene_dim: int, hidden_dims: list[int], dropout: float,
                 residual: bool) -> None:
        super().__init__()
        self.residual = residual
        dims = [latent_dim, *hidden_dims]
        blocks = [[nn.Linear(dims[j], dims[j + 1]), nn.LayerNorm(dims[j + 1]), nn.GELU(),
                   Dropout(dropout)] for j in range(len(hidden_dims))]
        if residual:
            self.blocks = nn.ModuleList(nn.Sequential(*b) for b in blocks)
            self.final_layer = nn.Sequential(nn.Linear(dims[-1], gene_dim), nn.ReLU())
        else:
            flat = [m for b in blocks for m in b]
            self.decoder = nn.Sequential(*flat, nn.Linear(dims[-1], gene_dim), nn.ReLU())

    def forward(self, x: Tensor) -> Tensor:
        if not self.residual:
            return self.decoder(x)
        for j, block in enumerate(self.blocks):
            x = x + block(x) if j % 2 == 1 else block(x)
        return self.final_layer(x)


class ConfidenceToken(nn.Module):
    """A learned token appended at the end of each set, and the projection of its output."""

    def __init__(self, hidden_dim: int, dropout: float) -> None:
        super().__init__()
        h2 = hidden_dim // 2
        self.confidence_token = nn.Parameter(torch.randn(1, 1, hidden_dim) * 0.02)
        self.confidence_projection = nn.Sequential(
            nn.Linear(hidden_dim, hidden_dim), nn.LayerNorm(hidden_dim), nn.GELU(),
            Dropout(dropout),
            nn.Linear(hidden_dim, h2), nn.LayerNorm(h2), nn.GELU(), Dropout(dropout),
            nn.Linear(h2, 1),
        )


# --------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------


def pert_linear(layer: nn.Linear, pert: Tensor) -> Tensor:
    """``layer`` applied to perturbation vectors, or to one-hot vectors given as int64 positions
    (-1 = the zero vector): a column lookup instead of a P-wide product."""
    if pert.dtype.is_floating_point:
        return layer(pert)
    rows = layer.weight.index_select(1, pert.clamp(min=0)).t()  # [B, out]
    rows = rows.masked_fill((pert < 0).unsqueeze(-1), 0.0)
    rows = rows if layer.bias is None else rows + layer.bias
    device = pert.device.type
    if torch.is_autocast_enabled(device):  # as the Linear's output would be under autocast
        rows = rows.to(torch.get_autocast_dtype(device))
    return rows


def _per_cell(x: Tensor, pert: Tensor) -> Tensor:
    """Per-set rows [B,·] of a per-set ``pert`` as [B,1,·] (they broadcast over the set)."""
    return x if pert.dim() == 3 else x.unsqueeze(1)


def _set_mean(x: Tensor, valid_mask: Tensor | None) -> Tensor:
    """Mean over each set's (real) cells, [B, 1, D]."""
    if valid_mask is None:
        return x.mean(dim=1, keepdim=True)
    w = valid_mask[..., None].to(x.dtype)
    return (x * w).sum(dim=1, keepdim=True) / w.sum(dim=1, keepdim=True).clamp_min(1.0)


@dataclass
class STOutput:
    """Network output: predictions [B,S,D_out], gene-decoder output [B,S,G], confidence [B]."""

    pred: Tensor
    counts: Tensor | None = None
    confidence: Tensor | None = None


class StateTransitionNetwork(nn.Module):
    """Encoders -> transformer backbone (no token/position tables) -> residual output head."""

    def __init__(self, config: NetworkConfig) -> None:
        super().__init__()
        config.validate()
        self.config = c = config
        h = c.hidden_dim
        self.pert_encoder = MLP(c.pert_dim, h, h, c.n_encoder_layers, c.dropout, c.activation)
        if c.use_basal_projection:
            self.basal_encoder: nn.Module = MLP(c.input_dim, h, h, c.n_encoder_layers, c.dropout,
                                                c.activation)
        else:
            self.basal_encoder = nn.Linear(c.input_dim, h)
        self.batch_encoder = nn.Embedding(c.batch_dim, h) if c.batch_encoder else None
        # int64 [n]: the rows of the batches that had training cells, whose mean index -1 takes
        # (None = every row); not saved with the weights: the estimator sets it
        self.register_buffer("trained_batches", None, persistent=False)
        if c.backbone == "llama":
            self.transformer_backbone: nn.Module = LlamaBackbone(c)
        else:
            self.transformer_backbone = GPT2Backbone(c)
        init_backbone(self.transformer_backbone, c.n_layers)
        self.project_out = MLP(h, c.output_dim, h, c.n_decoder_layers, c.dropout, c.activation)
        if c.residual_space == "input" and c.predict_residual:  # start as the identity map
            last = self.project_out[-1]
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        # input-space skip per perturbation, zero here (the estimator starts it at the training
        # contexts' mean response, see StateTransitionModel)
        self.pert_bias = self.pert_mean_scale = None
        if c.pert_skip != "none":
            self.pert_bias = nn.Linear(c.pert_dim, c.output_dim, bias=False)
            nn.init.zeros_(self.pert_bias.weight)
        if c.pert_skip == "mean_affine":
            self.pert_mean_scale = nn.Linear(c.pert_dim, 1, bias=False)
            nn.init.zeros_(self.pert_mean_scale.weight)
        self.final_down_then_up = None  # (a residual in input space has its own skip instead)
        if c.output_space == "all" and c.predict_residual and c.residual_space != "input":
            d = c.output_dim
            self.final_down_then_up = nn.Sequential(
                nn.Linear(d, d // 8), nn.GELU(), nn.Linear(d // 8, d)
            )
        self.gene_decoder = None
        if c.gene_dim > 0:
            self.gene_decoder = GeneDecoder(c.output_dim, c.gene_dim, c.decoder_hidden_dims,
                                            c.decoder_dropout, c.residual_decoder)
        self.confidence_token = ConfidenceToken(h, c.dropout) if c.confidence_token else None

    @classmethod
    def for_loading(cls, config: NetworkConfig) -> StateTransitionNetwork:
        """A network to load weights into: its throw-away initialisation does not advance the
        global (CPU) random generator, so loading a model leaves the caller's random state as
        it was."""
        with torch.random.fork_rng(devices=[]):
            return cls(config)

    # ----------------------------------------------------------------------------------------
    def forward(self, basal: Tensor, pert: Tensor, batch_index: Tensor | None = None,
                valid_mask: Tensor | None = None, *, detach_decoder: bool = False,
                decoder_input: Tensor | None = None) -> STOutput:
        """Predict perturbed cells for B sets of S cells.

        basal [B,S,D_in] float, pert [B,S,P] float (one vector per cell, the reference's
        layout), [B,P] float (one per set) or [B] int64 (one-hot positions, -1 = none),
        batch_index [B,S] int64 (needed with a batch encoder, ignored otherwise; -1 in
        evaluation mode = the mean of the batch embeddings, of the ``trained_batches`` rows
        when those are set, and then the other rows are read as -1 too),
        valid_mask [B,S] bool (True = real cell; masked positions are not attended to and their
        outputs are zero). With a gene decoder: ``detach_decoder`` decodes the prediction
        without passing gradients back into the network; ``decoder_input`` [B,S,D_out] is
        decoded instead of the prediction.
        """
        c = self.config
        self._check_inputs(basal, pert, batch_index, valid_mask)
        b, s, _ = basal.shape
        if valid_mask is not None and bool(valid_mask.all()):
            valid_mask = None

        e_b = self.basal_encoder(basal)
        x = self._encode_pert(pert, s) + e_b
        if self.batch_encoder is not None and self.training:
            x = x + self.batch_encoder(batch_index)
        elif self.batch_encoder is not None:  # index -1: the mean embedding of trained batches
            table, trained = self.batch_encoder.weight, self.trained_batches
            if trained is not None:  # (rows that never trained, e.g. val-only batches: -1 too)
                batch_index = batch_index.where(torch.isin(batch_index, trained), -1)
            trained = table if trained is None else table[trained]
            table = torch.cat([table, trained.mean(0, keepdim=True)])
            x = x + F.embedding(batch_index.where(batch_index >= 0, len(table) - 1), table)
        if self.confidence_token is not None:
            x = torch.cat([x, self.confidence_token.confidence_token.expand(b, 1, -1)], dim=1)
        attn_mask, is_causal, rope = self._attention_inputs(x, valid_mask)
        r = self.transformer_backbone(x, attn_mask, is_causal, rope)

        confidence = None
        if self.confidence_token is not None:
            confidence = self.confidence_token.confidence_projection(r[:, -1]).squeeze(-1)
            r = r[:, :s]

        if not c.predict_residual:
            pred = self.project_out(r)
        elif self.final_down_then_up is not None:  # output_space "all"
            pred = self.final_down_then_up(self.project_out(r) + basal)
        elif c.residual_space == "input":  # statetx option: the head predicts the change
            pred = basal + self.project_out(r)
            if self.pert_bias is not None:
                pred = pred + _per_cell(pert_linear(self.pert_bias, pert), pert)
            if self.pert_mean_scale is not None:
                scale = _per_cell(pert_linear(self.pert_mean_scale, pert), pert)
                pred = pred + scale * _set_mean(basal, valid_mask)
        else:
            pred = self.project_out(r + e_b)
        if c.output_activation == "relu":
            pred = F.relu(pred)
        if valid_mask is not None:
            pred = pred.masked_fill(~valid_mask[..., None], 0.0)
        counts = None
        if self.gene_decoder is not None:
            if decoder_input is None:
                decoder_input = pred.detach() if detach_decoder else pred
            counts = self.gene_decoder(decoder_input)
        return STOutput(pred=pred, counts=counts, confidence=confidence)

    def _encode_pert(self, pert: Tensor, s: int) -> Tensor:
        """Encoded perturbations [B,S,h] (or [B,1,h], broadcast over the set).

        A per-set input ([B,P] vectors or [B] one-hot positions) goes through the encoder once
        per set instead of once per cell; while training, only up to its first active dropout,
        which then draws independently for every cell, as with per-cell inputs.
        """
        layers = list(self.pert_encoder)
        x = pert_linear(layers[0], pert)
        per_set = pert.dim() < 3
        if per_set:
            x = x.unsqueeze(1)
        for layer in layers[1:]:
            if per_set and isinstance(layer, nn.Dropout) and layer.training and layer.p > 0:
                x, per_set = x.expand(-1, s, -1), False
            x = layer(x)
        return x

    def _attention_inputs(self, x: Tensor, valid_mask: Tensor | None
                          ) -> tuple[Tensor | None, bool, tuple[Tensor, Tensor] | None]:
        """Boolean attention mask (True = may attend), causal flag and rotary tables."""
        c = self.config
        b, length, _ = x.shape
        causal = c.attention == "causal"
        if valid_mask is not None and self.confidence_token is not None:
            valid_mask = torch.cat([valid_mask, valid_mask.new_ones(b, 1)], dim=1)
        rope = None
        if valid_mask is None:
            attn_mask, is_causal = None, causal
            if c.rope is not None:
                pos = torch.arange(length, device=x.device)
                rope = rotary_cos_sin(pos, c.head_dim, c.rope, x.dtype)
        else:
            keys = valid_mask[:, None, None, :]  # [B,1,1,L]
            if causal:
                tril = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
                keys = keys & tril
            eye = torch.eye(length, dtype=torch.bool, device=x.device)
            attn_mask, is_causal = keys | eye, False  # a row always sees itself: no NaN rows
            if c.rope is not None:  # positions = rank among the real cells of the set
                pos = valid_mask.long().cumsum(dim=1) - 1
                rope = rotary_cos_sin(pos.clamp(min=0), c.head_dim, c.rope, x.dtype)
        return attn_mask, is_causal, rope

    def _check_inputs(self, basal: Tensor, pert: Tensor, batch_index: Tensor | None,
                      valid_mask: Tensor | None) -> None:
        c = self.config
        b, s = basal.shape[:2] if basal.dim() == 3 else (None, None)
        if pert.dtype.is_floating_point:
            ok = (pert.dim() == 3 and pert.shape[:2] == (b, s)) or (pert.dim() == 2
                                                                    and pert.shape[0] == b)
        else:
            ok = pert.dim() == 1 and pert.shape[0] == b and pert.dtype == torch.int64
        if basal.dim() != 3 or not ok:
            raise DataError(
                f"basal must be a [B, S, ·] tensor and pert [B, S, P] or [B, P] float or [B] "
                f"int64 (one-hot positions) with the same B (and S), got basal "
                f"{tuple(basal.shape)} and pert {pert.dtype} {tuple(pert.shape)} (use "
                f"forward_flat for [N, ·])."
            )
        if basal.shape[-1] != c.input_dim:
            raise DataError(f"basal has width {basal.shape[-1]}, the network expects "
                            f"input_dim={c.input_dim}.")
        if pert.dtype.is_floating_point and pert.shape[-1] != c.pert_dim:
            raise DataError(f"pert has width {pert.shape[-1]}, the network expects "
                            f"pert_dim={c.pert_dim}.")
        if (pert.device.type == "cpu" and not pert.dtype.is_floating_point and len(pert)
                and not torch.compiler.is_compiling()
                and (int(pert.min()) < -1 or int(pert.max()) >= c.pert_dim)):
            raise DataError(f"one-hot pert positions must lie in [-1, {c.pert_dim}) (-1 = no "
                            f"perturbation), got {int(pert.min())}..{int(pert.max())}.")
        if self.batch_encoder is not None:
            if batch_index is None:
                raise DataError("this network has a batch encoder: pass batch_index [B, S].")
            if tuple(batch_index.shape) != tuple(basal.shape[:2]):
                raise DataError(f"batch_index must have shape {tuple(basal.shape[:2])}, got "
                                f"{tuple(batch_index.shape)}.")
        if valid_mask is not None and (valid_mask.dtype != torch.bool
                                       or tuple(valid_mask.shape) != tuple(basal.shape[:2])):
            raise DataError(f"valid_mask must be a bool tensor of shape {tuple(basal.shape[:2])},"
                            f" got {valid_mask.dtype} {tuple(valid_mask.shape)}.")

    # ----------------------------------------------------------------------------------------
    def forward_flat(self, basal: Tensor, pert: Tensor, batch: Tensor | None = None, *,
                     set_len: int | None = None, padded: bool = True) -> STOutput:
        """Reference flat layout: basal [N,D_in], pert [N,P], batch one-hot [N,n] or ints [N].

        padded=True reshapes to [N/set_len, set_len, ·]; padded=False runs one set of N cells.
        Returns pred [N,D_out], counts [N,G] and confidence [B].
        """
        n = basal.shape[0]
        if padded:
            if set_len is None or set_len < 1 or n % set_len:
                raise DataError(f"padded mode needs set_len dividing the number of cells {n}, "
                                f"got set_len={set_len!r}.")
            shape = (n // set_len, set_len)
        else:
            shape = (1, n)
        batch_index = None
        if batch is not None:
            batch_index = batch.argmax(-1) if batch.dim() == 2 else batch
            batch_index = batch_index.long().reshape(shape)
        out = self(basal.reshape(*shape, -1), pert.reshape(*shape, -1), batch_index)
        return STOutput(
            pred=out.pred.reshape(n, -1),
            counts=None if out.counts is None else out.counts.reshape(n, -1),
            confidence=out.confidence,
        )

    def num_parameters(self, trainable_only: bool = True) -> int:
        """Number of (trainable) parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def backbone_parameters(self) -> int:
        """Number of parameters of the transformer backbone."""
        return sum(p.numel() for p in self.transformer_backbone.parameters())


def check_finite_weights(state: dict[str, Tensor], source: str) -> None:
    """DataError naming ``source`` and the tensors that hold NaN or Inf: such weights make every
    prediction NaN (a diverged training saved, or a damaged file)."""
    bad = [k for k, v in state.items()
           if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise DataError(f"{source}: weights hold NaN or Inf values ({shown}); every prediction "
                        "would be NaN. Load another checkpoint, or retrain.")
