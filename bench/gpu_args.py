"""bench.gpu's command line (the flags are described in bench.gpu's docstring, shown by --help)."""

import argparse
from pathlib import Path

from kernels._cli import counts, presets


PHASES = ("decode", "prefill", "throughput", "profile")


def phases(s: str) -> list[str]:
    out = [x for x in s.split(",") if x]
    bad = [x for x in out if x not in PHASES]
    if bad or not out:
        raise argparse.ArgumentTypeError(f"unknown phase(s) {','.join(bad) or '(none)'}; choose from {','.join(PHASES)}")
    return out


def parse(argv=None, doc: str = ""):
    ints, extra = counts(), counts(none_ok=True)  # decode batches; those also measured otherwise ('' or 0: none)
    ap = argparse.ArgumentParser(description=doc.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=doc)
    ap.add_argument("--models", type=presets, default="gpt-oss-120b,gpt-oss-20b", help="presets, comma separated")
    ap.add_argument("--ckpt-dir", default=None,
                    help="where --weights disk writes/reads checkpoints (default ~/.cache/gptoss/bench; "
                         "a dry run's own temporary folder unless given)")
    ap.add_argument("--delete-created", action="store_true", help="remove checkpoints this run wrote (disk space)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--kernels", choices=["auto", "torch", "triton"], help="sets GPTOSS_KERNELS")
    ap.add_argument("--batches", type=ints, default=[1, 8, 64, 256])
    ap.add_argument("--decode-context", type=int, default=1024)
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--lockstep-batches", type=extra, default=[1, 8],
                    help="decode batches also measured with overlapped scheduling off (0 for none)")
    ap.add_argument("--sampled-batches", type=extra, default=[1, 64],
                    help="decode batches also measured at temperature 1 (the fused sampling kernel)")
    ap.add_argument("--unfused-gate-batches", type=extra, default=[1],
                    help="decode batches also measured with the few-row MoE fusions (the one-launch gate, "
                         "the combine in W2) off: GPTOSS_GATE_MAX_ROWS=0")
    ap.add_argument("--pdl-batches", type=extra, default=[1],
                    help="decode batches also measured with programmatic dependent launch (GPTOSS_PDL=1, then "
                         "=exit; off by default; kernels/pdl.py)")
    ap.add_argument("--padded-batches", type=extra, default=[1],
                    help="decode batches also measured with their steps padded to the next graph bucket "
                         "(0 for none)")
    ap.add_argument("--warmup-steps", type=int, default=4)
    ap.add_argument("--profile-batches", type=ints, default=[1, 64],
                    help="decode batches profiled in the last phase (bench.step_profile: time per kernel category "
                         "beside the bytes it moves; the Chrome trace beside the JSON)")
    ap.add_argument("--profile-steps", type=int, default=10)
    ap.add_argument("--profile-pdl", action="store_true",
                    help="profile with programmatic dependent launch on (GPTOSS_PDL=1; off by default, and for the "
                         "profiles: with it a kernel's span includes its wait for the kernel before)")
    ap.add_argument("--profile-prefill-steps", type=int, default=3,
                    help="full prefill chunks (--max-tokens-per-step tokens of --prefill-len prompts) profiled in "
                         "the last phase, after one unprofiled (0 for none)")
    ap.add_argument("--phases", type=phases, default=PHASES, help="comma separated, of: " + ",".join(PHASES))
    ap.add_argument("--prefill-seqs", type=int, default=8)
    ap.add_argument("--prefill-len", type=int, default=2048)
    ap.add_argument("--max-tokens-per-step", type=int, default=8192)
    ap.add_argument("--isl", type=int, default=1024)
    ap.add_argument("--osl", type=int, default=1024)
    # 1,024 1k/1k requests in two equal waves on an H200's bf16 cache (~39 GiB of KV, 101.9 GiB peak in session
    # 27): ~800 would fit at serving's 0.9 fraction, but would leave a ~200-request second wave at a small batch
    ap.add_argument("--concurrency", type=int, default=512)
    ap.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto",
                    help="every engine's KV cache (EngineConfig.kv_cache_dtype); fp8 halves its bytes, so twice the "
                         "concurrency fits (1,024 1k/1k sequences on one H200 with 120b's weights)")
    ap.add_argument("--requests", type=int, default=1024)
    ap.add_argument("--throughput-seconds", type=float, default=0, help="cap on the throughput phase (0 = none)")
    ap.add_argument("--weights", choices=["memory", "disk"], default="memory",
                    help="draw random weights on the device (memory) or write/read a checkpoint (disk)")
    ap.add_argument("--copy-gib", type=float, default=2.0)
    ap.add_argument("--out", help="results directory (default bench/results; a temp dir for --dry-run)")
    ap.add_argument("--dry-run", action="store_true", help="tiny preset on CPU, tiny sizes: exercises the flow")
    ap.add_argument("--update-benchmarks", metavar="RESULTS_DIR",
                    help="measure nothing: write the newest GPU result per (GPU, model) in RESULTS_DIR into "
                         "--benchmarks-file between its bench.gpu markers")
    ap.add_argument("--benchmarks-file", default="BENCHMARKS.md")
    ap.add_argument("--resume", type=Path, help=argparse.SUPPRESS)  # kernels.faults: a supervised child's state
    if ap.parse_args(argv).dry_run:  # tiny defaults; flags given explicitly still win
        ap.set_defaults(models="tiny", device="cpu", batches=[1, 2, 4], sampled_batches=[2], decode_context=12,
                        decode_steps=3, profile_batches=[2], profile_steps=2, profile_prefill_steps=2,
                        warmup_steps=1, prefill_seqs=2, prefill_len=24, max_tokens_per_step=32, isl=12, osl=6,
                        concurrency=3, requests=5, copy_gib=1 / 128)
    return ap.parse_args(argv)
