"""The sampler: greedy equals HF generate, recorded log-probs equal the training forward's, stops, errors."""

from __future__ import annotations

import pytest
import torch

from hypo_fast.examples.toy import tiny_llama
from hypo_fast.models import Policy, pack_sequences, pack_step
from hypo_fast.sampling import Sampler, SamplingConfig

PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11]]


def _sampler(model, temperature=1.0, **config):
    return Sampler(Policy(model, temperature=temperature), SamplingConfig(temperature=temperature, **config))


@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_greedy_equals_hf_generate(cache):
    model = tiny_llama().eval()
    out = _sampler(model, max_new_tokens=12, num_samples=1, greedy=True, cache=cache).generate(PROMPTS)
    for i, prompt in enumerate(PROMPTS):  # one prompt at a time: HF's own unpadded greedy path
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, len(prompt):]
        assert out.tokens[i].tolist() == expected.tolist()


@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 0.1)])
def test_recorded_logps_equal_the_training_forward(dtype, atol, temperature):
    """The sampler records log π_τ; the training forward scores the same online tokens under π_τ too
    (and the pairs beside them at τ = 1), so the two agree at any temperature."""
    model = tiny_llama().to(dtype).eval()
    policy = Policy(model, temperature=temperature)
    samples = Sampler(policy, SamplingConfig(max_new_tokens=10, num_samples=3, temperature=temperature)).generate(
        PROMPTS, seed=3)
    online = [(PROMPTS[i], r) for i, r in zip(samples.prompt_index.tolist(), samples.responses())]
    pairs = [([5, 6, 7], [8, 9], [10, 11, 12])]
    batch = pack_step(pairs, online)
    with torch.no_grad():
        offline, rescored = batch.split(policy.step_logprobs(batch))
        untempered = Policy(model).token_logprobs(pack_sequences([(p, c) for p, c, _ in pairs]
                                                                 + [(p, r) for p, _, r in pairs]))
    torch.testing.assert_close(samples.logps[samples.mask], rescored, atol=atol, rtol=0)
    torch.testing.assert_close(offline, untempered, atol=atol, rtol=0)  # the pairs stay at τ = 1


def test_k_samples_per_prompt_are_consecutive_reproducible_and_different():
    sampler = _sampler(tiny_llama().eval(), max_new_tokens=8, num_samples=4)
    a, b, c = sampler.generate(PROMPTS, seed=1), sampler.generate(PROMPTS, seed=1), sampler.generate(PROMPTS, seed=2)
    assert a.prompt_index.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logps, b.logps)
    assert not torch.equal(a.tokens, c.tokens)
    assert len({tuple(r) for r in a.responses()[:4]}) > 1  # the k samples of a prompt differ


def test_rows_finish_at_their_stop_token():
    model = tiny_llama().eval()
    free = _sampler(model, max_new_tokens=10, num_samples=2).generate(PROMPTS, seed=0)
    stop = int(free.tokens[0, 2])  # a token the first row draws at step 2: with the same seed it stops there
    out = _sampler(model, max_new_tokens=10, num_samples=2, stop_token_ids=(stop,)).generate(PROMPTS, seed=0)
    for row in range(out.tokens.shape[0]):
        tokens, mask = out.tokens[row], out.mask[row]
        hits = (tokens == stop).nonzero()
        if len(hits):
            first = int(hits[0])
            assert mask[: first + 1].all() and not mask[first + 1:].any()
            assert (out.logps[row, first + 1:] == 0).all() and (tokens[first + 1:] == 0).all()
        else:
            assert mask.all()
    assert out.mask[0].sum() == 3


@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_stop_check_interval_changes_no_sample(cache):
    """Checking for finished rows every 8 steps (a GPU's interval: one host sync per 8 tokens) draws what
    checking every step draws: finished rows keep being fed pad and masked, and the loop still ends early."""
    model = tiny_llama().eval()
    free = _sampler(model, max_new_tokens=24, num_samples=2).generate(PROMPTS, seed=3)
    stop = int(free.tokens[0, 1])
    runs = [_sampler(model, max_new_tokens=24, num_samples=2, stop_token_ids=(stop,), cache=cache, compact_below=0.0,
                     stop_check_every=every).generate(PROMPTS, seed=3) for every in (1, 8)]
    assert runs[0].mask[0].sum() == 2  # the first row stops at step 1
    for field in ("tokens", "logps", "mask"):
        a, b = getattr(runs[0], field), getattr(runs[1], field)
        width = min(a.shape[1], b.shape[1])  # the per-step loop may end a few steps sooner; nothing is live there
        assert torch.equal(a[:, :width], b[:, :width])
        assert not runs[0].mask[:, width:].any() and not runs[1].mask[:, width:].any()
    with pytest.raises(ValueError, match="stop_check_every"):
        SamplingConfig(stop_check_every=-1)


@pytest.mark.parametrize("prompts,config,match", [
    ([], {}, "prompts is empty"),
    ([[1, 2], []], {}, "prompt 1 is empty"),
    ([[1] * 250], {"max_new_tokens": 10}, "context"),
])
def test_bad_prompts(prompts, config, match):
    with pytest.raises(ValueError, match=match):
        _sampler(tiny_llama(), **config).generate(prompts)


@pytest.mark.parametrize("config,match", [({"num_samples": 0}, "num_samples"), ({"max_new_tokens": 0}, "max_new"),
                                          ({"cache": "paged"}, "cache")])
def test_bad_config(config, match):
    with pytest.raises(ValueError, match=match):
        SamplingConfig(**config)


def test_temperature_belongs_to_the_policy():
    with pytest.raises(ValueError, match="temperature"):
        Policy(tiny_llama(), temperature=0.0)
    with pytest.raises(ValueError, match="greedy"):
        Sampler(Policy(tiny_llama(), temperature=0.7), SamplingConfig(temperature=0.7, greedy=True))
    with pytest.raises(ValueError, match="the Policy owns τ"):
        Sampler(Policy(tiny_llama(), temperature=0.7), SamplingConfig())


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_sharing_a_prompts_prefill_changes_no_draw(cache):
    """One prefill per prompt, its KV cache repeated k times, draws exactly what k separate prefills draw."""
    model = tiny_llama().eval()
    runs = {}
    for shared in (True, False):
        config = SamplingConfig(max_new_tokens=12, num_samples=3, cache=cache, shared_prefill=shared, compact_below=0.0,
                                stop_token_ids=(3, 17))
        runs[shared] = Sampler(Policy(model), config).generate(PROMPTS, seed=11)
    assert torch.equal(runs[True].tokens, runs[False].tokens) and torch.equal(runs[True].mask, runs[False].mask)
    torch.testing.assert_close(runs[True].logps, runs[False].logps, atol=1e-5, rtol=0)


def test_dropping_finished_rows_keeps_the_draws_exact():
    """With finished rows leaving the decode batch, two-token responses still follow π exactly (χ² against the
    enumerated distribution) and their recorded log-probs equal the model's."""
    from scipy.stats import chisquare

    vocab, eos, prompt = 5, 0, [1, 2]
    model = tiny_llama(vocab_size=vocab, hidden_size=16, layers=1).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)  # a peaked, non-uniform distribution
        first = torch.log_softmax(model(torch.tensor([prompt])).logits[0, -1], -1)
        seconds = torch.log_softmax(model(torch.tensor([[*prompt, t] for t in range(vocab)])).logits[:, -1], -1)
    exact = {(eos,): first[eos].exp().item()}
    exact.update({(a, b): (first[a] + seconds[a, b]).exp().item() for a in range(vocab) if a != eos for b in range(vocab)})
    config = SamplingConfig(max_new_tokens=2, num_samples=3000, stop_token_ids=(eos,), compact_below=0.99)
    samples = Sampler(Policy(model), config).generate([prompt], seed=4)
    responses = [tuple(r) for r in samples.responses()]
    observed = [responses.count(seq) for seq in exact]
    total = sum(exact.values())
    assert abs(total - 1) < 1e-5  # the enumeration covers every response
    expected = [p / total * len(responses) for p in exact.values()]
    assert chisquare(observed, expected).pvalue > 1e-4
    recorded = samples.logps.sum(1)
    for seq, logp in zip(responses[:50], recorded[:50]):
        assert abs(logp.item() - torch.tensor(exact[seq]).log().item()) < 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CUDA graphs)")
def test_compiled_decode_draws_what_the_eager_decode_draws_on_cuda():
    model = tiny_llama().cuda().eval()
    policy = Policy(model)
    runs = [Sampler(policy, SamplingConfig(max_new_tokens=16, num_samples=2, cache="static", compile_decode=c))
            .generate(PROMPTS, seed=9) for c in (False, True)]
    assert torch.equal(runs[0].tokens, runs[1].tokens)
    torch.testing.assert_close(runs[0].logps, runs[1].logps, atol=1e-4, rtol=0)
