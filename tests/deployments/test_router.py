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


def test_a_prompt_cache_key_keeps_its_own_affinity_for_a_shared_prefix():
    """prompt_cache_key starts the key chain: the same key and prefix go back where they ran, another key's
    requests with that prefix route on their own (spreading a prefix many share), and no key is its own space."""
    assert prefix_keys(SYSTEM, 16, 4096, "user-1") == prefix_keys(SYSTEM, 16, 4096, "user-1")
    assert not set(prefix_keys(SYSTEM, 16, 4096, "user-1")) & set(prefix_keys(SYSTEM, 16, 4096, "user-2"))
    assert not set(prefix_keys(SYSTEM, 16, 4096, "user-1")) & set(prefix_keys(SYSTEM, 16, 4096))
    t = PrefixTable(block=16, min_tokens=64)
    lens = {"r0": 0, "r1": 0, "r2": 0}
    t.record(t.keys(SYSTEM + [5] * 20, "user-1"), "r1")
    assert t.rank(t.keys(SYSTEM + [6] * 30, "user-1"), lens, random.Random(0))[0] == ["r1"]
    assert len(t.rank(t.keys(SYSTEM + [6] * 30, "user-2"), lens)) == 1  # unknown under its key: two random
    assert len(t.rank(t.keys(SYSTEM + [6] * 30), lens)) == 1
    # the router class reads it from the request it routes
    router = PrefixAffinityRouter.__new__(PrefixAffinityRouter)
    router.initialize_state(block=16, min_prefix_tokens=64)
    router.__dict__["_replica_queue_len_cache"] = SimpleNamespace(get=lambda rid: 0)
    reps = [_Replica(f"r{i}") for i in range(4)]

    def req(key):
        return SimpleNamespace(args=[SimpleNamespace(prompt_ids=SYSTEM, cache_key=key)], kwargs={})
    router.on_request_routed(req("user-1"), reps[2].replica_id, None)
    assert [r.replica_id.unique_id for r in asyncio.run(router.choose_replicas(reps, req("user-1")))[0]] == ["r2"]
    assert len(asyncio.run(router.choose_replicas(reps, req("user-2")))) == 1


def test_every_endpoint_hands_its_prompt_cache_key_to_the_router():
    """What the router reads (the engine request's cache_key) is the body's prompt_cache_key, on every endpoint."""
    from deployments.chat_api import ChatHandler
    from deployments.compaction import compaction_request
    from deployments.completions_api import CompletionHandler
    from deployments.protocol import ChatCompletionRequest, CompactRequest, CompletionRequest, ResponsesRequest
    from deployments.responses_api import ResponseBuilder
    msgs = [{"role": "user", "content": "hi"}]
    handlers = [ChatHandler(ChatCompletionRequest(model="m", messages=msgs, prompt_cache_key="k"), None),
                CompletionHandler(CompletionRequest(model="m", prompt=["a", "b"], prompt_cache_key="k"), None),
                ResponseBuilder(ResponsesRequest(model="m", input="hi", prompt_cache_key="k")),
                ResponseBuilder(compaction_request(CompactRequest(model="m", input="hi", prompt_cache_key="k")))]
    assert [[r.cache_key for r in h.requests] for h in handlers] == [["k"], ["k", "k"], ["k"], ["k"]]
    assert ChatHandler(ChatCompletionRequest(model="m", messages=msgs), None).requests[0].cache_key is None
