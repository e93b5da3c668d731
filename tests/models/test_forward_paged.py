"""The engine-facing forward: flattened sequences, chunked prefill mixed with decode,
paged KV with separate full / sliding-window block tables, equals the plain causal forward."""

import contextlib

import pytest
import torch

from models import load_model
from models.attention import NULL_BLOCK, DenseMetadata, KVCache, PagedMetadata, to_cache


class _E4M3Dense(DenseMetadata):
    """The plain causal forward over k and v rounded as an fp8 KV cache stores them."""

    def attend(self, layer, q, k, v, sinks, window, scale):
        r = lambda x: to_cache(x, torch.float8_e4m3fn).to(x.dtype)  # noqa: E731
        return super().attend(layer, q, r(k), r(v), sinks, window, scale)


def _leaves(x):
    return [y for a in x for y in _leaves(a)] if isinstance(x, (tuple, list)) else [x]


class _NoFloat8Indexing(torch.overrides.TorchFunctionMode):
    """Fails a tensor-indexed op on a float8 tensor. Such kernels are missing on some devices and torch
    versions, so the torch path moves an fp8 pool's bytes instead (models.attention.store_rows, gather_rows)."""
    OPS = {torch.Tensor.__getitem__, torch.Tensor.__setitem__, torch.Tensor.index_select, torch.index_select,
           torch.Tensor.index_put_, torch.Tensor.index_put, torch.index_put, torch.Tensor.index_copy_}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.OPS:
            flat = _leaves(list(args) + list(kwargs.values()))
            fp8 = any(isinstance(a, torch.Tensor) and a.dtype == torch.float8_e4m3fn for a in flat)
            indexed = any(isinstance(a, torch.Tensor) and not a.is_floating_point() for a in flat)
            assert not (fp8 and indexed), f"{func.__name__} indexes a float8 tensor"
        return func(*args, **kwargs)


def test_dense_varlen_batch_equals_single_sequences(tiny_ckpt):
    m = load_model(tiny_ckpt)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, m.config.vocab_size, (n,), generator=g) for n in (5, 23, 1, 17)]
    ids = torch.cat(seqs)
    pos = torch.cat([torch.arange(len(s)) for s in seqs])
    qs = torch.tensor([0, *torch.tensor([len(s) for s in seqs]).cumsum(0).tolist()])
    out = m.compute_logits(m(ids, pos, DenseMetadata(qs)))
    for s, a, b in zip(seqs, qs[:-1], qs[1:]):
        assert torch.allclose(out[a:b], m.logits(s), atol=1e-5)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float8_e4m3fn], ids=["f32", "fp8"])
def test_paged_chunked_prefill_and_decode_match_full_forward(tiny_ckpt, cache_dtype):
    """An fp8 pool (EngineConfig.kv_cache_dtype "fp8") equals the full forward over e4m3-rounded k and v,
    and is never indexed as float8 (_NoFloat8Indexing)."""
    m = load_model(tiny_ckpt)
    cfg, bs = m.config, 4
    W = cfg.sliding_window
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, cfg.vocab_size, (n,), generator=g) for n in (45, 30)]
    if cache_dtype == torch.float32:
        ref = [m.logits(s) for s in seqs]
    else:
        ref = [m.compute_logits(m(s, torch.arange(len(s)), _E4M3Dense.single(len(s)))) for s in seqs]
        assert (ref[0] - m.logits(seqs[0])).abs().max() > 1e-2  # the rounding is there to see
    n_full, n_slide = 40, 14  # the sliding pool is smaller: freed window blocks are reused
    groups = ["sliding" if cfg.window(i) else "full" for i in range(cfg.num_hidden_layers)]
    cache = KVCache.allocate(cfg.num_hidden_layers, [n_slide if g_ == "sliding" else n_full for g_ in groups],
                             bs, cfg.num_key_value_heads, cfg.head_dim, cache_dtype)
    free = {"full": list(range(1, n_full)), "sliding": list(range(1, n_slide))}
    tables = {"full": [[], []], "sliding": [[], []]}
    done = [0, 0]
    # (tokens for seq 0, tokens for seq 1) per step: prefill chunks, mixed, then decode
    plan = [(9, 0), (11, 6), (7, 13), (1, 11), (1, 0), (1, 1)] + [(1, 1)] * 16
    for step in plan:
        rows, ids, pos, qs, ctx, slot = [], [], [], [0], [], {"full": [], "sliding": []}
        for b, n in enumerate(step):
            n = min(n, len(seqs[b]) - done[b])
            if n == 0:
                continue
            p = torch.arange(done[b], done[b] + n)
            for grp in ("full", "sliding"):
                t = tables[grp][b]
                while len(t) * bs < done[b] + n:
                    t.append(free[grp].pop(0))
                slot[grp] += [t[i // bs] * bs + i % bs for i in p.tolist()]
            rows.append(b)
            ids.append(seqs[b][done[b]:done[b] + n])
            pos.append(p)
            qs.append(qs[-1] + n)
            done[b] += n
            ctx.append(done[b])
        if not rows:
            break
        width = max(len(tables[g_][b]) for g_ in tables for b in rows)
        bt = {g_: torch.tensor([tables[g_][b] + [NULL_BLOCK] * (width - len(tables[g_][b])) for b in rows])
              for g_ in tables}
        meta = PagedMetadata(cache, torch.tensor(qs), torch.tensor(ctx), bt,
                             {k: torch.tensor(v) for k, v in slot.items()}, groups)
        with _NoFloat8Indexing() if cache_dtype == torch.float8_e4m3fn else contextlib.nullcontext():
            out = m.compute_logits(m(torch.cat(ids), torch.cat(pos), meta))
        for k, b in enumerate(rows):
            assert torch.allclose(out[qs[k]:qs[k + 1]], ref[b][done[b] - (qs[k + 1] - qs[k]):done[b]], atol=1e-4), \
                f"seq {b} step {step}"
        # free sliding blocks no future query of b can see (the engine's job; done by hand here)
        for b in rows:
            t = tables["sliding"][b]
            for i in range(len(t)):
                if t[i] != NULL_BLOCK and (i + 1) * bs <= done[b] - W + 1:
                    free["sliding"].append(t[i])
                    t[i] = NULL_BLOCK
    assert done == [45, 30]
    assert max(len([x for x in t if x != NULL_BLOCK]) for t in tables["sliding"]) <= W // bs + 2
