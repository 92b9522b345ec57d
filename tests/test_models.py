"""The denoiser of the training script: shapes, bidirectional attention, rotary positions, time input."""

import pytest
import torch

from fastbound.train.models import Denoiser, DenoiserConfig, rotary_tables, rotate


def _model(**kw):
    torch.manual_seed(0)
    return Denoiser(DenoiserConfig(vocab_size=7, seq_len=12, d_model=16, n_layers=2, n_heads=2, **kw))


def test_output_shape_and_dtype():
    x = torch.randint(0, 7, (3, 12))
    out = _model()(x, torch.ones(3))
    assert out.shape == (3, 12, 7) and out.dtype == torch.float32
    assert _model()(x[:, :5]).shape == (3, 5, 7)  # shorter sequences are fine


def test_attention_is_bidirectional():
    """Changing the last token changes the output at the first position (no causal mask)."""
    model = _model()
    x = torch.randint(0, 6, (1, 12))
    y = x.clone()
    y[0, -1] = (x[0, -1] + 1) % 6
    out_x, out_y = model(x), model(y)
    assert not torch.allclose(out_x[0, 0], out_y[0, 0])


def test_positions_matter():
    """Rotary embeddings make the model position-aware: a shifted sequence gives other outputs."""
    model = _model()
    x = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4]])
    assert not torch.allclose(model(x)[0, 1:], model(torch.roll(x, 1, 1))[0, 1:], atol=1e-6)


def test_rotary_preserves_norm_and_relative_angle():
    cos, sin = rotary_tables(10, 8)
    q, k = torch.randn(1, 1, 10, 8), torch.randn(1, 1, 10, 8)
    rq = rotate(q, cos, sin)
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1))
    # the same vectors at positions (2, 5) and (4, 7) have the same dot product after rotation
    qq, kk = q[..., :1, :].expand(1, 1, 10, 8), k[..., :1, :].expand(1, 1, 10, 8)
    rq, rk = rotate(qq, cos, sin), rotate(kk, cos, sin)
    torch.testing.assert_close((rq[..., 2, :] * rk[..., 5, :]).sum(), (rq[..., 4, :] * rk[..., 7, :]).sum())


def test_time_conditioning():
    x = torch.randint(0, 7, (2, 12))
    plain = _model()
    torch.testing.assert_close(plain(x, torch.tensor([0.1, 0.1])), plain(x, torch.tensor([3.0, 3.0])))
    timed = _model(time_conditioning=True)
    assert not torch.allclose(timed(x, torch.tensor([0.1, 0.1])), timed(x, torch.tensor([3.0, 3.0])))
    with pytest.raises(ValueError, match="sigma"):
        timed(x)


def test_bad_configs():
    with pytest.raises(ValueError, match="n_heads"):
        Denoiser(DenoiserConfig(vocab_size=5, seq_len=4, d_model=10, n_heads=3))
    with pytest.raises(ValueError, match="even"):
        Denoiser(DenoiserConfig(vocab_size=5, seq_len=4, d_model=6, n_heads=2))
    with pytest.raises(ValueError, match="positions"):
        _model()(torch.zeros(1, 13, dtype=torch.long))
