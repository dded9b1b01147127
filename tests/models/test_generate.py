"""CodeMemoryLM.generate: the cached path against the full-window forward, sampling, stop
sequences, the sliding window, bad requests, and a model left as it was."""

import numpy as np
import pytest

from tritnet import backend
from tritnet import rng as trandom
from tritnet.autograd import no_grad
from tritnet.config import preset
from tritnet.models import GenerationError, generation_request, next_tokens
from tritnet.train import build
import tritnet.models as models

# Every part of the model on a few hundred trits: two layers, three experts routed two at a
# time, the shared code book read by every block and the head, relation codes, graph hops.
# A context of 24 lets generation run past it within a test.
SMALL = dict(d_model=32, n_layers=2, n_heads=2, context=24, n_experts=3, expert_hidden=16,
             top_k=2, codebook_dim=16, shared_vq_size=64, kgvq_size=32, kgvq_dim=16,
             graph_slots=4, batch_size=4, seq_len=16, steps=10)
CONFIGS = {
    "small-alibi-dense-exact": dict(SMALL, position="alibi"),
    "small-nope-active-routed": dict(SMALL, position="nope", graph_capacity=128,
                                     vq_search="routed"),
    "small-no-shared-vq": dict(SMALL, position="alibi", use_shared_vq=False),
    "small-memory-values": dict(SMALL, position="alibi", memory_values=True),
    "small-ngram-memory": dict(SMALL, position="alibi", ngram_memory=4, ngram_rows=97),
    "small-ngram-gated": dict(SMALL, position="alibi", ngram_memory=4, ngram_rows=97,
                              ngram_gate_layer=1),
}


@pytest.fixture(autouse=True)
def _cpu():
    backend.set_device("cpu")


def trained(config, steps=3):
    """A model after a few training steps (codes used, edges learned from them), its graphs
    then filled with strong edges from every code, in eval mode."""
    trandom.manual_seed(0)
    model, opt = build(config)
    rng = np.random.default_rng(1)
    for _ in range(steps):
        tokens = rng.integers(0, 256, (config.batch_size, config.seq_len + 1))
        loss, _ = model.loss(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        opt.step()
    K = config.shared_vq_size
    for block in model.blocks:
        src = np.arange(K, dtype=np.int32)
        dst = ((src + rng.integers(1, K, K)) % K).astype(np.int32)   # never a self-transition
        signs = rng.choice(np.array([-1, 1], np.int8), (K, 1))
        for _ in range(40):   # score 40: weight ±40/127 on each hop
            block.moe.graph.observe(np.stack([src, dst], axis=1), signs)
        _, weight = block.moe.graph.neighbors(src)
        assert (weight != 0).any(axis=1).mean() > 0.3   # hops read something
    model.eval()
    return model


def full_window_greedy(model, prompts, n):
    """Greedy tokens and the logits behind each, from forward over the whole window at every
    step, the window sliding as generate documents: at the context, on to the last
    context // 2 tokens."""
    context = model.config.context
    windows = [list(p) for p in prompts]
    picks, logits = [], []
    with no_grad():
        for _ in range(n):
            out, _ = model(np.array(windows))
            last = out.numpy()[:, -1].astype(np.float64)
            pick = last.argmax(axis=-1)
            logits.append(last)
            picks.append(pick)
            windows = [(w + [int(t)])[-(context // 2):] if len(w) == context else w + [int(t)]
                       for w, t in zip(windows, pick)]
    return np.stack(picks, axis=1), logits


def generate_recording(model, monkeypatch, *args, **kwargs):
    """model.generate(...), and the logits it sampled each step from."""
    seen = []
    original = models.next_tokens
    monkeypatch.setattr(models, "next_tokens",
                        lambda logits, *a: seen.append(logits.copy()) or original(logits, *a))
    return model.generate(*args, **kwargs), seen


def snapshot(model):
    """Everything generation must leave alone: buffers, the mode, pending observations and
    gradients, the code books' clocks."""
    buffers = {n: b.copy() for n, b in model.named_buffers()}
    vqs = (model.shared_vq, model.kgvq)
    rest = (model.training,
            [(len(v.observed), len(v.restart_queries), v.get_extra_state(), v.index is None)
             for v in vqs],
            [len(b.moe.graph.observed) for b in model.blocks],
            [getattr(m, "grad_q", None) is None and not getattr(m, "pending", [])
             for m in model.modules()])
    return buffers, rest


def assert_unchanged(model, before):
    buffers, rest = snapshot(model)
    assert rest == before[1]
    assert buffers.keys() == before[0].keys()
    for name in buffers:
        np.testing.assert_array_equal(buffers[name], before[0][name], err_msg=name)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cached_logits_and_greedy_tokens_equal_the_full_window(name, monkeypatch):
    """At every generated position, past the context too (two slides), the logits generate
    samples from equal forward's over the window, within float rounding, and greedy decoding
    picks the same tokens, for three streams in one batch."""
    model = trained(preset("tiny").override(**CONFIGS[name]))
    prompts = np.random.default_rng(2).integers(0, 256, (3, 10))
    n = 30   # 10 + 30 tokens: the window fills at 24 and slides twice
    want_tokens, want_logits = full_window_greedy(model, prompts, n)
    before = snapshot(model)
    got, seen = generate_recording(model, monkeypatch, prompts, n, temperature=0)
    np.testing.assert_array_equal(np.array(got), want_tokens)
    assert len(seen) == n
    for step, (a, b) in enumerate(zip(seen, want_logits)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4, err_msg=f"step {step}")
    assert_unchanged(model, before)


def test_tiny_preset_cached_path_equals_the_full_window(monkeypatch):
    """The same on the tiny preset (ALiBi, 4096 codes, four experts, two streams), trained a
    few steps, for 24 tokens after a 16-token prompt; generation leaves the model in training
    mode as it found it, unchanged, and holding no float array."""
    config = preset("tiny").override(batch_size=4, seq_len=32)
    model = trained(config)
    prompts = np.random.default_rng(3).integers(0, 256, (2, 16))
    want_tokens, want_logits = full_window_greedy(model, prompts, 24)
    model.train()
    before = snapshot(model)
    got, seen = generate_recording(model, monkeypatch, prompts, 24, temperature=0)
    np.testing.assert_array_equal(np.array(got), want_tokens)
    for step, (a, b) in enumerate(zip(seen, want_logits)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4, err_msg=f"step {step}")
    assert_unchanged(model, before)
    assert model.training
    # the packed weights were read as they are: no float array was left on any module
    assert [n for n, a in model.held_arrays() if np.dtype(a.dtype).kind == "f"] == []


def test_decode_token_by_token_equals_forward():
    """KVCache + decode fed one token at a time give forward's logits at every position; the
    cache holds each layer's keys and values and the last token's shared code."""
    model = trained(preset("tiny").override(**CONFIGS["small-alibi-dense-exact"]))
    tokens = np.random.default_rng(4).integers(0, 256, (2, 24))
    with no_grad():
        want = model(tokens)[0].numpy()
        cache = model.new_cache(2)
        got = [model.decode(tokens[:, :5], cache).numpy()]
        got += [model.decode(tokens[:, t:t + 1], cache).numpy() for t in range(5, 24)]
    np.testing.assert_allclose(np.concatenate(got, axis=1), want, rtol=1e-4, atol=1e-4)
    assert cache.length == 24 and cache.code.shape == (2, 1, 16)
    assert cache.keys[0].shape == (2, 2, 24, 16) and len(cache.values) == 2
    with pytest.raises(GenerationError, match="do not fit a cache of 2 streams holding 24 of 24"):
        model.decode(tokens[:, :1], cache)


def test_streams_of_a_batch_are_independent_and_stop_alone():
    """Greedy streams decoded together equal each decoded alone; a stream that meets a stop
    sequence ends there (the sequence dropped) while the others go on."""
    model = trained(preset("tiny").override(**CONFIGS["small-alibi-dense-exact"]))
    prompts = np.random.default_rng(5).integers(0, 256, (3, 6))
    together = model.generate(prompts, 12, temperature=0)
    alone = [model.generate(p, 12, temperature=0) for p in prompts]
    assert together == alone and all(len(t) == 12 for t in alone)
    stop = alone[1][4:6]   # stream 1 writes these by its 6th token
    stopped = model.generate(prompts, 12, temperature=0, stop=[stop])
    for i in range(3):   # each stream up to where it first writes the stop, if it does
        ends = [j for j in range(2, 13) if alone[i][j - 2:j] == stop]
        assert stopped[i] == (alone[i][:ends[0] - 2] if ends else alone[i])
    assert len(stopped[1]) <= 4 and any(len(s) == 12 for s in stopped)
    # a stop written as text; none that never occurs changes anything
    assert model.generate(prompts[0], 12, temperature=0, stop=["\x00\x01\x02"]) == alone[0]


def test_sampling_is_seeded_and_shaped_by_top_k_and_top_p():
    model = trained(preset("tiny").override(**CONFIGS["small-alibi-dense-exact"]))
    prompt = b"def f(x):"
    a = model.generate(prompt, 16, temperature=1.0, seed=7)
    assert a == model.generate(prompt, 16, temperature=1.0, seed=7)
    assert a != model.generate(prompt, 16, temperature=1.0, seed=8)
    greedy = model.generate(prompt, 16, temperature=0)
    assert model.generate(prompt, 16, temperature=1.0, top_k=1, seed=3) == greedy
    assert model.generate(prompt, 16, temperature=1.0, top_p=1e-6, seed=3) == greedy
    four = model.generate([list(prompt)] * 4, 16, temperature=1.5, seed=1)
    assert len({tuple(s) for s in four}) > 1   # each stream draws its own


def test_next_tokens_draws_from_the_filtered_distribution():
    logits = np.log(np.array([[0.1, 0.4, 0.2, 0.3]]))
    draws = np.random.default_rng(0).random(20000)
    rows = np.repeat(logits, len(draws), axis=0)

    def shares(**kw):
        picks = next_tokens(rows, kw.pop("temperature", 1.0), kw.get("top_k"), kw.get("top_p"),
                            draws)
        return np.bincount(picks, minlength=4) / len(draws)

    np.testing.assert_allclose(shares(), [0.1, 0.4, 0.2, 0.3], atol=0.015)
    np.testing.assert_allclose(shares(top_k=2), [0, 4 / 7, 0, 3 / 7], atol=0.015)
    # top_p 0.65: 0.4 + 0.3 reach it, the 0.2 and 0.1 tokens are dropped
    np.testing.assert_allclose(shares(top_p=0.65), [0, 4 / 7, 0, 3 / 7], atol=0.015)
    np.testing.assert_allclose(shares(top_p=0.75), [0, 4 / 9, 2 / 9, 3 / 9], atol=0.015)
    cold = shares(temperature=0.25)   # p ** 4, renormalised
    np.testing.assert_allclose(cold, np.array([1, 256, 16, 81]) / 354, atol=0.015)
    assert (next_tokens(rows[:3], 0, None, None, draws[:3]) == 1).all()


def test_window_rules_and_bad_requests_are_clear_errors():
    c = preset("tiny").override(**SMALL)
    ok = [[1, 2, 3]]

    def refused(match, prompt=ok, n=4, temperature=1.0, top_k=None, top_p=None, stop=None):
        with pytest.raises(GenerationError, match=match):
            generation_request(c, prompt, n, temperature, top_k, top_p, stop)

    refused(r"the prompt has 25 tokens, more than the model's context of 24; give at most "
            r"its last 24 tokens", prompt=[list(range(25))])
    refused(r"the prompt is empty", prompt=b"")
    refused(r"the prompt is empty", prompt=[[]])
    refused(r"the prompt holds token 256, outside the model's vocabulary of 256 tokens "
            r"\(0 to 255\)", prompt=[[1, 256]])
    refused(r"token -1, outside", prompt=[-1])
    refused(r"prompts have different lengths", prompt=[[1, 2], [3]])
    refused(r"temperature = -0.5: expected 0 \(greedy\) or a positive number", temperature=-0.5)
    refused(r"temperature = nan", temperature=float("nan"))
    refused(r"temperature 0 decodes greedily .* top_k and top_p only shape sampling",
            temperature=0, top_k=5)
    refused(r"temperature 0 decodes greedily", temperature=0, top_p=0.9)
    for p in (0, -0.1, 1.5):
        refused(rf"top_p = {p}: expected a probability in \(0, 1\]", top_p=p)
    refused(r"top_k = 0: expected an integer >= 1", top_k=0)
    refused(r"max_new_tokens = -1", n=-1)
    refused(r"an empty stop sequence", stop=[""])
    prompts, single, stops = generation_request(c, b"ab", 4, 0, None, None, ["\n\n", b"x"])
    assert prompts.tolist() == [[97, 98]] and single and stops == [[10, 10], [120]]
    assert generation_request(c, [list(range(24))], 100, 1.0, 3, 1.0, None)[0].shape == (1, 24)


def _decode_pair(model, streams, prompt_len, steps, step_at):
    """Logits of decode and of step_at (decode_at, or a captured decode) fed the same tokens,
    token by token, after one prompt; then through a reset and a refill (a window slide)."""
    rng = np.random.default_rng(4)
    prompts = rng.integers(0, 256, (streams, prompt_len))
    follow = rng.integers(0, 256, (streams, steps))
    eager, other = model.new_cache(streams, 16), model.new_cache(streams, 16)
    pairs = []
    with no_grad():
        for refill in range(2):
            for cache in (eager, other):
                cache.reset()
                model.decode(prompts[:, refill:], cache)
            for t in range(steps):
                want = model.decode(follow[:, t:t + 1], eager).data
                got = step_at(other, follow[:, t])
                assert other.length == eager.length
                assert int(backend.to_numpy(other.position)[0]) == eager.length
                pairs.append((backend.to_numpy(got), backend.to_numpy(want)))
    return pairs, eager, other


def _decode_at(model):
    def step(cache, tokens):
        xp = backend.get_array_module(cache.keys[0])
        logits = model.decode_at(xp.asarray(tokens.reshape(-1, 1)), cache).data
        cache.length += 1
        return logits
    return step


@pytest.mark.parametrize("name", list(CONFIGS))
def test_decode_at_equals_decode_token_by_token(name):
    """decode_at (one token per stream at the position the cache holds on the device, every
    expert run, attention over the masked whole cache) gives decode's logits, token after
    token, before and after a reset and a refill."""
    model = trained(preset("tiny").override(**CONFIGS[name]))
    pairs, _, _ = _decode_pair(model, 3, 5, 9, _decode_at(model))
    for i, (got, want) in enumerate(pairs):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=f"token {i}")


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["small-alibi-dense-exact", "small-nope-active-routed",
                                  "small-ngram-gated", "small-memory-values"])
def test_cuda_captured_decode_equals_decode(name):
    """CapturedDecode: the first token eager, the second captured, the rest replayed from
    the graph, each with decode's logits; a reset and refill keep the graph; streams dropped
    from the cache (select) capture it again; generate's greedy tokens are the same with and
    without graphs."""
    backend.set_device("cuda")
    model = trained(preset("tiny").override(**CONFIGS[name]))
    steps = {}

    def captured(cache, tokens):
        if id(cache) not in steps:
            steps[id(cache)] = models.CapturedDecode(model, cache)
        return steps[id(cache)](tokens)

    pairs, eager, other = _decode_pair(model, 3, 5, 6, captured)
    (step,) = steps.values()
    assert step.failed is None, step.failed
    assert step.counts == {"eager": 1, "capture": 1, "replay": 10}
    for i, (got, want) in enumerate(pairs):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=f"token {i}")
    with no_grad():
        eager.select([0, 2])
        other.select([0, 2])
        tokens = np.array([7, 9])
        want = model.decode(tokens[:, None], eager).data
        got = step(tokens)
    assert step.counts["capture"] == 2
    np.testing.assert_allclose(backend.to_numpy(got), backend.to_numpy(want), rtol=1e-4,
                               atol=1e-4)
    prompts = np.random.default_rng(5).integers(0, 256, (2, 8))
    with_graphs = model.generate(prompts, 30, temperature=0)
    without = model.generate(prompts, 30, temperature=0, cuda_graph=False)
    assert with_graphs == without
