"""Prefix-affinity routing: the pure table, then the Serve router class over fake replicas."""

import asyncio
import random
from types import SimpleNamespace

import pytest

pytest.importorskip("ray")
from deployments.router import PrefixAffinityRouter, PrefixTable, prefix_keys  # noqa: E402

SYSTEM = list(range(1000, 1200))  # a 200-token shared system prompt


def test_prefix_keys_chain_whole_blocks_only():
    a = prefix_keys(SYSTEM + [1, 2, 3], 16, 4096)
    b = prefix_keys(SYSTEM + [9, 9, 9, 9], 16, 4096)
    assert len(a) == 200 // 16 and a == b  # the partial last block is not a key
    c = prefix_keys([7] + SYSTEM[1:], 16, 4096)
    assert not set(a) & set(c)  # chained: one different early token changes every key
    assert len(prefix_keys(SYSTEM, 16, 64)) == 4


def test_shared_prefix_goes_where_it_was_computed():
    t = PrefixTable(block=16, min_tokens=64)
    t.record(t.keys(SYSTEM + [5] * 20), "r1")
    lens = {"r0": 0, "r1": 0, "r2": 0}
    ranks = t.rank(t.keys(SYSTEM + [6] * 30), lens, random.Random(0))
    assert ranks[0] == ["r1"] and len(ranks[1]) == 2 and "r1" not in ranks[1]


def test_short_or_unknown_prefixes_use_two_random_choices():
    t = PrefixTable(block=16, min_tokens=64)
    t.record(t.keys(SYSTEM), "r1")
    lens = {"r0": 0, "r1": 0, "r2": 0}
    assert len(t.rank(t.keys(SYSTEM[:48] + [1] * 40), lens)) == 1  # 3 shared blocks < 64 tokens
    assert len(t.rank(t.keys([3] * 300), lens)) == 1


def test_an_overloaded_affine_replica_is_skipped():
    t = PrefixTable(block=16, min_tokens=64, imbalance=4)
    t.record(t.keys(SYSTEM), "r1")
    assert t.rank(t.keys(SYSTEM), {"r0": 1, "r1": 5})[0] == ["r1"]   # within the allowance
    ranks = t.rank(t.keys(SYSTEM), {"r0": 1, "r1": 6})               # 5 more than the shortest:
    assert len(ranks) == 1 and sorted(ranks[0]) == ["r0", "r1"]      # plain shortest-queue choice
    assert t.rank(t.keys(SYSTEM), {"r1": 50})[0] == ["r1"]            # nowhere better to go


def test_dead_replicas_and_lru_bound():
    t = PrefixTable(block=16, min_tokens=16, max_entries=10)
    t.record(t.keys(SYSTEM), "r1")
    assert len(t.owner) == 10
    t.forget("r1")
    assert not t.owner
    t.record(t.keys(SYSTEM), "gone")
    assert t.lookup(t.keys(SYSTEM), {"r0"}) == (None, 0)


class _Replica:
    def __init__(self, uid):
        self.replica_id = SimpleNamespace(unique_id=uid)


def test_router_class_ranks_real_candidates_and_learns_from_routing():
    router = PrefixAffinityRouter.__new__(PrefixAffinityRouter)  # the Serve plumbing is not needed here
    router.initialize_state(block=16, min_prefix_tokens=64)
    lens = {}
    router.__dict__["_replica_queue_len_cache"] = SimpleNamespace(get=lambda rid: lens.get(rid.unique_id))
    reps = [_Replica(f"r{i}") for i in range(4)]
    req = SimpleNamespace(args=[SimpleNamespace(prompt_ids=SYSTEM + [1, 2])], kwargs={})
    ranks = asyncio.run(router.choose_replicas(reps, req))
    assert len(ranks) == 1 and len(ranks[0]) == 2
    router.on_request_routed(req, reps[3].replica_id, None)
    again = SimpleNamespace(args=[SimpleNamespace(prompt_ids=SYSTEM + [7] * 9)], kwargs={})
    ranks = asyncio.run(router.choose_replicas(reps, again))
    assert ranks[0] == [reps[3]]
