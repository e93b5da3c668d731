"""GPU kernels one decode step launches, per layer and in all, counted on CPU.

    TRITON_INTERPRET=1 python -m bench.decode_launches [--batch 1]

A decode step replays as one CUDA graph, yet each of its kernels still costs
the GPU ~1-2 us to start, so at batch 1 the kernel count bounds the step rate
(gpt-oss-120b: 36 layers; its 430 tok/s goal leaves 2.3 ms per step). Counted
with the GPU path's code (GPTOSS_KERNELS=triton, the Triton kernels run in the
interpreter) on the tiny model: every Triton launch, and every torch op that
would launch a kernel (allocations, views and no-op casts left out), outside
the Triton interpreter's own bookkeeping. Per layer = what the first
transformer block launches; the rest is embedding, final norm and unembedding.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

NO_KERNEL = {"empty", "empty_like", "empty_strided", "new_empty", "view", "_unsafe_view", "reshape", "expand",
             "transpose", "t", "permute", "unsqueeze", "squeeze", "slice", "select", "as_strided", "alias",
             "detach", "split", "split_with_sizes", "unbind", "narrow", "lift_fresh", "flatten", "chunk",
             "_reshape_alias", "set_", "resize_", "size", "stride", "dim", "is_same_size"}


class Counter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.where = "outside"
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.__name__.split(".")[0]
        if name in NO_KERNEL or self._inside_triton():
            return out
        if name in ("to", "_to_copy", "contiguous", "clone") and isinstance(out, torch.Tensor):
            src = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if src is not None and out.untyped_storage().data_ptr() == src.untyped_storage().data_ptr():
                return out  # a no-op cast returns its input
        self.ops[(self.where, "torch." + name)] += 1
        return out

    @staticmethod
    def _inside_triton() -> bool:
        f = sys._getframe(2)
        while f is not None:
            if "triton" + os.sep in f.f_code.co_filename and "site-packages" in f.f_code.co_filename:
                return True
            f = f.f_back
        return False


def count(batch: int = 1) -> dict:
    saved = os.environ.get("GPTOSS_KERNELS")
    os.environ["GPTOSS_KERNELS"] = "triton"
    try:
        return _count(batch)
    finally:  # callers (tests) get their kernel choice back
        if saved is None:
            os.environ.pop("GPTOSS_KERNELS", None)
        else:
            os.environ["GPTOSS_KERNELS"] = saved


def _count(batch: int) -> dict:
    from engine.core import EngineConfig, LLMEngine
    from engine.request import GenerateRequest
    from engine.sampler import SamplingParams
    from kernels import _triton
    from models import load_model
    from models.checkpoint import RandomCheckpoint
    model = load_model(RandomCheckpoint("tiny"), dtype=torch.float32, keep_mxfp4=True)
    eng = LLMEngine(model, EngineConfig(block_size=16, num_blocks=64, max_num_seqs=batch, max_tokens_per_step=512))
    for i in range(batch):
        eng.add_request(GenerateRequest(f"r{i}", list(range(20 + i)), SamplingParams(temperature=0, max_tokens=8,
                                                                                   ignore_eos=True), harmony=False))
    while any(s.num_computed < s.prompt_len for ss in eng.seqs.values() for s in ss):
        eng.step()
    eng.step()  # every sequence decoding now
    counter = Counter()
    for i, block in enumerate(model.blocks):  # block 0 is "the layer"; the others are counted apart
        block.register_forward_pre_hook(lambda *a, i=i: setattr(counter, "where", "layer" if i == 0 else "other"))
        block.register_forward_hook(lambda *a: setattr(counter, "where", "outside"))
    real_launch = _triton.launch

    def launch(kernel, *a, **kw):
        counter.ops[(counter.where, "triton." + getattr(kernel, "__name__", str(kernel)))] += 1
        return real_launch(kernel, *a, **kw)

    mods = [m for n, m in sys.modules.items() if n.startswith("kernels.") and hasattr(m, "launch")]
    for m in mods:
        m.launch = launch
    try:
        import engine.executor as ex
        real_step = ex.run_step

        def counted(*a, **kw):
            with counter:
                return real_step(*a, **kw)
        ex.run_step = counted
        eng.step()
    finally:
        ex.run_step = real_step
        for m in mods:
            m.launch = real_launch
    layer = {k[1]: v for k, v in counter.ops.items() if k[0] == "layer"}
    outside = {k[1]: v for k, v in counter.ops.items() if k[0] == "outside"}
    return {"per_layer": sum(layer.values()), "outside_layers": sum(outside.values()),
            "layer_ops": dict(sorted(layer.items(), key=lambda x: -x[1])),
            "outside_ops": dict(sorted(outside.items(), key=lambda x: -x[1]))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=1)
    a = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        print("bench.decode_launches: set TRITON_INTERPRET=1 (the kernels run in the interpreter on CPU)",
              file=sys.stderr)
        return 2
    from bench.gpu import find_vocab
    find_vocab()
    r = count(a.batch)
    print(f"kernels per layer: {r['per_layer']}; outside the layers: {r['outside_layers']}; "
          f"gpt-oss-120b (36 layers): {36 * r['per_layer'] + r['outside_layers']} per decode step")
    print("per layer: " + ", ".join(f"{k} {v}" for k, v in r["layer_ops"].items()))
    print("outside: " + ", ".join(f"{k} {v}" for k, v in r["outside_ops"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
