"""The fused sampling head: its draws follow softmax(z/τ), its log-probs and entropies are exact."""

from __future__ import annotations

import pytest
import torch

from hypo_fast.kernels import launch
from hypo_fast.kernels.sample_head import sample_head
from hypo_fast.ops import chunked, native
from hypo_fast.ops.sample_head import sample_tokens
from tests.oracle import impl_param

CUDA = torch.cuda.is_available()
TRITON_DEVICE = "cuda" if CUDA else "cpu"
IMPL_DEVICE = [impl_param("triton", TRITON_DEVICE), impl_param("native", "cpu"), impl_param("torch", "cpu")]


def _chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    from scipy.stats import chisquare

    expected = probs.double() / probs.double().sum() * counts.sum()
    keep = expected >= 5  # pool the rare categories so the χ² approximation holds
    observed = torch.cat([counts[keep], counts[~keep].sum(0, keepdim=True)]).double()
    expected = torch.cat([expected[keep], expected[~keep].sum(0, keepdim=True)])
    if expected[-1] == 0:
        observed, expected = observed[:-1], expected[:-1]
    return float(chisquare(observed.numpy(), expected.numpy()).pvalue)


@pytest.mark.slow
@pytest.mark.parametrize("impl,device", IMPL_DEVICE)
@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("chunks", [1, 5])
def test_draws_follow_the_tempered_softmax(impl, device, temperature, chunks, monkeypatch):
    """χ² goodness of fit on V=23 categories, fixed seeds; one call draws many rows at once. With several
    vocabulary chunks the PyTorch path's reservoir merge and the Gumbel race across tiles of the native
    op and the Triton kernel are exercised too."""
    if chunks > 1:
        # Triton: 16-column sampling tiles (V = 23: one full, one ragged) race each other
        monkeypatch.setattr(launch, "INTERPRETER_HEAD_TILE", launch.TileConfig(16, 16, 16, 1, 1))
        monkeypatch.setattr(chunked, "MIN_CHUNK", 1)
        monkeypatch.setattr(chunked, "DEFAULT_CHUNK_ELEMENTS", 4000 * 5)
        monkeypatch.setattr(native, "SAMPLE_TILE", 5)
    torch.manual_seed(0)
    V, D, draws = 23, 16, 4000
    h = torch.randn(1, D, device=device).expand(draws, D).contiguous()  # the same row, many independent draws
    weight = torch.randn(V, D, device=device) * 0.4
    probs = torch.softmax((h[0] @ weight.T) / temperature, -1).cpu()
    tokens, logp = sample_tokens(h, weight, temperature=temperature, seed=1234, impl=impl)
    counts = torch.bincount(tokens.cpu(), minlength=V)
    assert _chi_square_pvalue(counts, probs) > 1e-3
    torch.testing.assert_close(logp.cpu(), probs.log()[tokens.cpu()], atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("impl,device", IMPL_DEVICE)
def test_vocabulary_tiles_are_picked_by_their_mass(impl, device, monkeypatch):
    """Two 16-column tiles: one holds a single logit log 8 (mass 8), the other sixteen zeros (mass 16).
    The first token must come up 1/3 of the time; a race on the tiles' maxima would give 8/9."""
    monkeypatch.setattr(launch, "INTERPRETER_HEAD_TILE", launch.TileConfig(16, 16, 16, 1, 1))
    monkeypatch.setattr(native, "SAMPLE_TILE", 16)
    monkeypatch.setattr(chunked, "MIN_CHUNK", 1)
    B, V, D = 3000, 32, 16
    monkeypatch.setattr(chunked, "DEFAULT_CHUNK_ELEMENTS", B * 16)
    bias = torch.cat([torch.tensor([8.0]).log(), torch.full((15,), -30.0), torch.zeros(16)]).to(device)
    hidden, weight = torch.zeros(B, D, device=device), torch.zeros(V, D, device=device)
    tokens, logp = sample_tokens(hidden, weight, bias, seed=99, impl=impl)
    share = (tokens == 0).double().mean().item()
    assert abs(share - 1 / 3) < 5 * (2 / 9 / B) ** 0.5, share  # 5 binomial standard deviations
    torch.testing.assert_close(logp.cpu(), torch.log_softmax(bias.double(), -1)[tokens].float().cpu())


@pytest.mark.parametrize("impl,device", IMPL_DEVICE)
def test_logp_entropy_greedy_and_reproducibility(impl, device, seed, monkeypatch):
    monkeypatch.setattr(native, "SAMPLE_TILE", 64)  # several native tiles, the last one ragged
    B, V, D = 5, 301, 40  # V not a multiple of any tile
    h = torch.randn(B, D, device=device)
    weight = torch.randn(V, D, device=device) * 0.3
    bias = torch.randn(V, device=device)
    z = (h.double() @ weight.double().T + bias.double()) / 0.7
    tokens, logp, entropy = sample_tokens(h, weight, bias, temperature=0.7, seed=7, return_entropy=True, impl=impl)
    log_probs = torch.log_softmax(z, -1)
    torch.testing.assert_close(logp.double(), log_probs.gather(1, tokens[:, None]).squeeze(1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy.double(), -(log_probs.exp() * log_probs).sum(-1), atol=1e-5, rtol=1e-5)
    again, _ = sample_tokens(h, weight, bias, temperature=0.7, seed=7, impl=impl)
    assert torch.equal(tokens, again)
    greedy, greedy_logp = sample_tokens(h, weight, bias, greedy=True, impl=impl)
    z1 = h.double() @ weight.double().T + bias.double()
    assert torch.equal(greedy, z1.argmax(-1))
    torch.testing.assert_close(greedy_logp.double(), torch.log_softmax(z1, -1).max(-1).values, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("splits", [2, 3])
def test_kernel_splits(splits):
    """The Triton launcher's vocabulary splits merge to the single-split result (same Philox stream)."""
    torch.manual_seed(0)
    h = torch.randn(6, 32, device=TRITON_DEVICE)
    weight = torch.randn(300, 32, device=TRITON_DEVICE) * 0.3
    one = sample_head(h, weight, seed=11, return_entropy=True, num_splits=1)
    many = sample_head(h, weight, seed=11, return_entropy=True, num_splits=splits)
    assert torch.equal(one[0], many[0])
    torch.testing.assert_close(one[1], many[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(one[2], many[2], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("greedy", [False, True])
def test_vocabulary_major_tiles_draw_the_same(greedy, monkeypatch, seed):
    """The decode tile orientations (zᵀ with the vocabulary on the MMA's M side, or z) compute the same
    draw: same tokens, same log-probs and entropies, several tiles and splits, a ragged last tile."""
    h = torch.randn(5, 40, device=TRITON_DEVICE)
    weight = torch.randn(300, 40, device=TRITON_DEVICE) * 0.3
    bias = torch.randn(300, device=TRITON_DEVICE)
    draws = []
    for vocab_major in (False, True):
        monkeypatch.setattr(launch, "INTERPRETER_HEAD_TILE",
                            launch.TileConfig(16, 32, 16, 1, 1, vocab_major=vocab_major))
        draws.append(sample_head(h, weight, bias, temperature=0.8, seed=5, greedy=greedy, return_entropy=True,
                                 num_splits=3))
    (tok_a, logp_a, ent_a), (tok_b, logp_b, ent_b) = draws
    assert torch.equal(tok_a, tok_b)
    torch.testing.assert_close(logp_a, logp_b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent_a, ent_b, atol=1e-5, rtol=1e-5)
    z = (h.double() @ weight.double().T + bias.double()) / (1.0 if greedy else 0.8)
    torch.testing.assert_close(logp_a.double(), torch.log_softmax(z, -1).gather(1, tok_a[:, None]).squeeze(1),
                               atol=1e-5, rtol=1e-5)


def test_bad_input():
    h, w = torch.randn(2, 8), torch.randn(5, 8)
    with pytest.raises(ValueError, match="temperature"):
        sample_tokens(h, w, temperature=0.0)
    with pytest.raises(ValueError, match="hidden"):
        sample_tokens(h[:, :7], w)
