r"""A small bidirectional transformer denoiser for discrete diffusion (plain PyTorch).

``Denoiser(x_t, sigma)`` maps noisy ids (B, L) and the noise level :math:`\sigma` (B,) to
(B, L, V) logits over the clean token at every position, the interface
`fastbound.estimate_nll` expects; ``Denoiser.features`` gives the hidden states before the
final linear layer ``head``, for the fused output-layer losses and ``estimate_nll(head=...)``.
Attention is bidirectional (no causal mask), as in the denoisers of SEDD (Lou et al. 2024)
and MDLM (Sahoo et al. 2024), and positions enter through rotary embeddings (Su et al. 2021,
RoFormer), which make "look at my neighbours" easy to learn.

With the absorbing graph the denoiser needs no time input: the clean-data posterior at a
masked position does not depend on :math:`\sigma` (Ou et al. 2024, RADD; MDLM's SUBS), so
``time_conditioning`` is off by default and ``sigma`` is ignored. With it on, an embedding of
:math:`\log\sigma` is added to every position (needed by the uniform graph, whose noisy tokens
are ambiguous about how much noise they carry).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class DenoiserConfig:
    vocab_size: int  # V: the real tokens plus the mask (absorbing graph) or the real tokens only
    seq_len: int
    d_model: int = 128
    n_layers: int = 3
    n_heads: int = 4
    mlp_ratio: int = 4
    time_conditioning: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def rotary_tables(seq_len: int, head_dim: int, base: float = 10_000.0) -> tuple[torch.Tensor, torch.Tensor]:
    r"""(cos, sin) of the angles :math:`p\,\theta_i`, :math:`\theta_i = \text{base}^{-2i/d}`, each (L, d/2)."""
    theta = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(seq_len, dtype=torch.float64)[:, None] * theta[None, :]
    return angles.cos().float(), angles.sin().float()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates the pairs (x[..., 2i], x[..., 2i+1]) of (B, H, L, d) queries or keys by the position's angles."""
    even, odd = x[..., 0::2], x[..., 1::2]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], -1).flatten(-2)


class Block(nn.Module):
    """Pre-norm transformer block: bidirectional self-attention then a GELU MLP."""

    def __init__(self, d_model: int, n_heads: int, mlp_ratio: int):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be a multiple of n_heads ({n_heads})")
        self.n_heads = n_heads
        self.norm1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, mlp_ratio * d_model), nn.GELU(), nn.Linear(mlp_ratio * d_model, d_model)
        )

    def forward(self, h: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        b, n, d = h.shape
        q, k, v = self.qkv(self.norm1(h)).view(b, n, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        q, k = rotate(q, *rotary), rotate(k, *rotary)
        att = F.scaled_dot_product_attention(q, k, v)  # no mask: every position sees every other
        h = h + self.proj(att.transpose(1, 2).reshape(b, n, d))
        return h + self.mlp(self.norm2(h))


class Denoiser(nn.Module):
    """Token embedding, ``n_layers`` rotary-attention blocks, a final norm and a linear head."""

    def __init__(self, config: DenoiserConfig):
        super().__init__()
        self.config = config
        c = config
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        if (c.d_model // c.n_heads) % 2:
            raise ValueError(f"d_model / n_heads must be even for rotary embeddings, got {c.d_model // c.n_heads}")
        cos, sin = rotary_tables(c.seq_len, c.d_model // c.n_heads)
        self.register_buffer("rotary_cos", cos, persistent=False)
        self.register_buffer("rotary_sin", sin, persistent=False)
        self.time = (
            nn.Sequential(nn.Linear(1, c.d_model), nn.SiLU(), nn.Linear(c.d_model, c.d_model))
            if c.time_conditioning
            else None
        )
        self.blocks = nn.ModuleList(Block(c.d_model, c.n_heads, c.mlp_ratio) for _ in range(c.n_layers))
        self.norm = nn.LayerNorm(c.d_model)
        self.head = nn.Linear(c.d_model, c.vocab_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = 0.02
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=std)
        for block in self.blocks:  # residual branches start small (GPT-2's scaled init)
            nn.init.normal_(block.proj.weight, std=std / math.sqrt(2 * len(self.blocks)))
            nn.init.normal_(block.mlp[2].weight, std=std / math.sqrt(2 * len(self.blocks)))

    def forward(self, x_t: torch.Tensor, sigma: torch.Tensor | None = None, *, features: bool = False) -> torch.Tensor:
        """(B, L) ids and (B,) noise levels -> (B, L, V) logits, or with ``features`` the (B, L, d_model)
        hidden states that the linear ``head`` maps to them (for the fused losses and ``head=``).

        ``features`` is a keyword of ``forward`` rather than only a method so that a
        DistributedDataParallel wrapper sees the call (its gradient hooks are set up in forward).
        """
        h = self.features(x_t, sigma)
        return h if features else self.head(h)

    def features(self, x_t: torch.Tensor, sigma: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) ids and (B,) noise levels -> (B, L, d_model) hidden states before the output layer."""
        if x_t.shape[-1] > self.config.seq_len:
            raise ValueError(f"x_t has {x_t.shape[-1]} positions; this denoiser was built for {self.config.seq_len}")
        n = x_t.shape[-1]
        h = self.embed(x_t)
        if self.time is not None:
            if sigma is None:
                raise ValueError("sigma is required: this denoiser is time-conditioned")
            log_sigma = torch.as_tensor(sigma, dtype=h.dtype, device=h.device).log().reshape(-1, 1)
            h = h + self.time(log_sigma.expand(x_t.shape[0], 1))[:, None, :]
        rotary = (self.rotary_cos[:n], self.rotary_sin[:n])
        for block in self.blocks:
            h = block(h, rotary)
        return self.norm(h)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
