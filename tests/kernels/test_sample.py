"""Fused temperature sampling (Triton interpreter) against its torch reference, and the reference
against the distribution it claims to draw from."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import pytest  # noqa: E402
import torch  # noqa: E402

from kernels.sample import philox_uniform, sample_reference  # noqa: E402

pytest.importorskip("triton")
from kernels._triton import jit_module, launch, tl  # noqa: E402

KEYS = torch.tensor([0, 1, 7, -1, 2**62 + 12345, -(2**40) - 3, 0x7FFFFFFF, 0x80000000])


def _rand_kernel(key_ptr, out_ptr, N, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    key = tl.load(key_ptr + row)
    offs = tl.arange(0, BLOCK)
    tl.store(out_ptr + row * N + offs, tl.rand(key, offs), mask=offs < N)


def test_philox_reference_is_tl_rand_bit_for_bit():
    jit_module(globals(), ("_rand_kernel",))
    n = 300
    out = torch.empty(len(KEYS), n)
    launch(_rand_kernel, (len(KEYS),), KEYS, out, n, BLOCK=512)
    ref = philox_uniform(KEYS, n)
    assert torch.equal(out, ref)
    assert (ref >= 0).all() and (ref < 1).all() and len({round(float(v), 6) for v in ref.flatten()}) > 0.99 * ref.numel()


@pytest.mark.parametrize("V", [5, 700, 1500])
def test_kernel_draws_what_the_reference_draws(V):
    from kernels.sample import sample_triton
    g = torch.Generator().manual_seed(V)
    B = len(KEYS)
    x = torch.randn(B, V, generator=g) * 3
    x[1, : V // 2] = float("-inf")                       # a grammar mask: half the row barred
    x[2] = x[2].round()                                   # ties in the logits
    inv_t = torch.tensor([1.0, 0.5, 2.0, 1 / 0.7, 1.0, 10.0, 0.1, 1.0])
    for dtype in (torch.float32, torch.bfloat16):
        xs = x.to(dtype)
        got, want = sample_triton(xs, inv_t, KEYS), sample_reference(xs, inv_t, KEYS)
        # the same draw; tl.log and torch.log may differ in the last bit, so a near tie may go either way
        s = xs.float() * inv_t[:, None] - torch.log(-torch.log(philox_uniform(KEYS, V)))
        gap = s.gather(1, want[:, None]) - s.gather(1, got[:, None])
        assert (gap.abs() <= 1e-5 * s.abs().amax(1, keepdim=True)).all(), (got, want)
        assert torch.equal(got, want)                     # here (the interpreter's logs) exactly
        assert torch.isfinite(xs[1, got[1]]).all()       # never a barred token
        for b in (1, 2, 3):                               # few rows: each split over several programs
            assert torch.equal(sample_triton(xs[:b], inv_t[:b], KEYS[:b]), want[:b])
    other = sample_triton(x, inv_t, KEYS + 1)             # another key, another draw (somewhere)
    assert not torch.equal(other, sample_triton(x, inv_t, KEYS))


def test_first_maximum_wins_across_lanes_blocks_and_splits():
    """Logits so large the noise cannot separate them: the draw is the first of the tied tokens,
    whether the ties share a lane, a block, a split, or none; NaN logits are never drawn."""
    from kernels.sample import sample_triton
    V = 3000
    cases = [(700, 100), (517, 5), (1499, 3, 1000), (2999, 2048), (1024, 2560)]
    x = torch.zeros(len(cases), V)
    for r, ids in enumerate(cases):
        x[r, list(ids)] = 1e30
    x[0, 50] = float("nan")
    x = torch.cat([x, torch.full((1, V), float("-inf")), torch.full((1, V), float("nan"))])  # nothing drawable
    keys, inv_t = KEYS[:len(x)], torch.ones(len(x))
    want = torch.tensor([min(c) for c in cases] + [0, 0])  # torch's argmax of an all -inf row: 0
    assert torch.equal(sample_reference(x, inv_t, keys), want)
    for b in (1, len(x)):                                 # one row: split over 4+ programs here
        assert torch.equal(sample_triton(x[:b], inv_t[:b], keys[:b]), want[:b])
    assert torch.equal(sample_triton(x[-1:], inv_t[:1], keys[:1]), want[-1:])


def test_reference_draws_from_softmax_over_temperature():
    """Frequencies of 40,000 draws (one key each) against softmax(x / T): a chi-square test at
    p ~ 1e-4, over a vocabulary of 6 with one barred token."""
    x = torch.tensor([1.0, 0.2, -0.5, 2.0, float("-inf"), 0.0])
    T = 0.7
    n = 40_000
    keys = torch.arange(n, dtype=torch.int64) * 0x9E3779B97F4A7C15 % 2**62
    ids = sample_reference(x.expand(n, -1), torch.full((n,), 1 / T), keys)
    counts = torch.bincount(ids, minlength=6).double()
    p = torch.softmax(x.double() / T, 0)
    assert counts[4] == 0
    live = p > 0
    chi2 = (((counts - n * p) ** 2)[live] / (n * p[live])).sum()
    assert chi2 < 23.5, (counts / n, p)  # 5 live cells: 4 degrees of freedom


@pytest.fixture
def triton_sampling(monkeypatch):
    monkeypatch.setenv("GPTOSS_KERNELS", "triton")  # under the interpreter: the GPU path, on CPU


def _spec(params, seeds, positions=None):
    from engine.sampler_state import SampleSpec
    return SampleSpec(params, seeds, positions=positions)


def test_sampler_state_draws_seeded_rows_by_key_whatever_the_batch(triton_sampling, monkeypatch):
    """Where the kernels run, a seeded row's draw depends on its seed and output position only: the same
    tokens alone or in any batch, in any row, from a fresh state; top_p rows keep the torch path."""
    from engine.sampler import SamplingParams
    from engine.sampler_state import SamplerState, philox_key
    from kernels import dispatch
    calls = []
    real = dispatch.sample
    monkeypatch.setattr(dispatch, "sample", lambda x, t, k: (calls.append(len(k)), real(x, t, k))[1])
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 600, generator=g) * 2
    seeded = SamplingParams(temperature=0.8, seed=5)
    alone, crowd = SamplerState(), SamplerState()
    a, b = [], []
    for step in range(4):
        a.append(int(alone.sample(logits[:1], _spec([seeded], [5], [step])).token_ids[0]))
        params = [SamplingParams(temperature=1.0), SamplingParams(temperature=0), seeded,
                  SamplingParams(temperature=1.0, top_p=0.9)]
        out = crowd.sample(torch.cat([logits[1:3], logits[:1], logits[3:]]), _spec(params, [None, None, 5, None],
                                                                                  [0, 0, step, 0]))
        b.append(int(out.token_ids[2]))
    assert a == b and len(set(a)) > 1                       # same stream, and it advances
    assert calls == [1, 2] * 4                              # the seeded row alone; then it and the unseeded row
    inv_t = torch.tensor([1 / 0.8])
    want = [int(dispatch.sample(logits[:1].float(), inv_t, torch.tensor([philox_key(5, n)]))[0]) for n in range(4)]
    assert a == want
    fresh = SamplerState()
    assert [int(fresh.sample(logits[:1], _spec([seeded], [5], [k])).token_ids[0]) for k in (2, 0)] == [a[2], a[0]]


def test_keys_differ_between_seeds_and_draws():
    from engine.sampler_state import philox_key
    keys = {philox_key(s, n) for s in range(50) for n in range(50)}
    assert len(keys) == 2500 and all(-(2**63) <= k < 2**63 for k in keys)
