"""Peak host memory while loading a checkpoint, whole or one rank's shard.

    python -m bench.load_memory PATH [--experts 0-7] [--q-heads 0-16 --kv-heads 0-2] [--dtype bf16]

Prints the checkpoint size, the bytes the model keeps, and the peak resident
set above the pre-load baseline (sampled every 2 ms from /proc/self/status:
file pages safetensors maps count too, so this is an upper bound).
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakRSS:
    """Context manager: samples RSS in a thread; `.peak` is the max above the entry value."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes() - self.base)
            time.sleep(self.interval)

    def __enter__(self):
        self.base = rss_bytes()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_bytes() - self.base)


def _range(s: str | None):
    if s is None:
        return None
    a, b = s.split("-")
    return int(a), int(b) + 1


def measure(path: str, experts=None, q_heads=None, kv_heads=None, dtype="bf16") -> dict:
    import torch

    from models import ShardSpec, load_model
    shard = ShardSpec(experts=tuple(range(*experts)) if experts else None, q_heads=q_heads, kv_heads=kv_heads)
    dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    ckpt = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
    t0 = time.time()
    with PeakRSS() as p:
        m = load_model(path, dtype=dt, shard=shard, keep_mxfp4=True)
        # tensors may still be views of the mapped file: fault every kept page in
        for b in m.buffers():
            b.view(torch.uint8).max() if b.is_contiguous() else b.sum()
    kept = sum(b.numel() * b.element_size() for b in m.buffers())
    return {"checkpoint_bytes": ckpt, "kept_bytes": kept, "peak_rss_bytes": p.peak,
            "seconds": round(time.time() - t0, 2), "shard": str(shard)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("path")
    ap.add_argument("--experts", help="inclusive range of expert ids, e.g. 0-7")
    ap.add_argument("--q-heads")
    ap.add_argument("--kv-heads")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    a = ap.parse_args()
    r = measure(a.path, _range(a.experts), _range(a.q_heads), _range(a.kv_heads), a.dtype)
    gb = {k: round(v / 1e9, 3) for k, v in r.items() if k.endswith("bytes")}
    print(json.dumps({**r, **{k.replace("bytes", "GB"): v for k, v in gb.items()}}))


if __name__ == "__main__":
    main()
