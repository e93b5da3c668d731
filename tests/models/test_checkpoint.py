"""Random checkpoints: presets, formats, sanity of activations, bad-checkpoint errors, CLI."""

import json
import subprocess
import sys

import pytest
import torch

from models import CheckpointError, load_model
from models.checkpoint import PRESETS, make_checkpoint
from models.weights import CheckpointReader

GPTOSS = [sys.executable, "-m", "cli.main"]


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_random_weights_keep_activations_sane(ckpt_root, preset):
    path = make_checkpoint(ckpt_root / f"sane-{preset}", preset, "hf", "mxfp4", seed=11)
    model = load_model(path)
    seen = []
    # a block returns (residual stream, next norm of it): the stream is what must stay sane
    hooks = [b.register_forward_hook(lambda m, i, o: seen.append(o[0])) for b in model.blocks]
    ids = torch.randint(0, model.config.vocab_size, (64,), generator=torch.Generator().manual_seed(0))
    logits = model.logits(ids)
    for h in hooks:
        h.remove()
    assert len(seen) == model.config.num_hidden_layers
    for i, h in enumerate(seen):
        assert torch.isfinite(h).all(), f"layer {i} produced non-finite activations"
        assert 0.1 < h.std() < 20, f"layer {i} residual std {h.std():.3f}"
    assert torch.isfinite(logits).all()
    # stated range for a random checkpoint: logits' std between 0.5 and 2 per position
    std = logits.std(dim=-1)
    assert (std > 0.5).all() and (std < 2.0).all(), std


def test_same_seed_same_weights_other_seed_differs(ckpt_root):
    a = make_checkpoint(ckpt_root / "seed-a", "tiny", "hf", "bf16", seed=1)
    b = make_checkpoint(ckpt_root / "seed-b", "tiny", "hf", "bf16", seed=1)
    c = make_checkpoint(ckpt_root / "seed-c", "tiny", "hf", "bf16", seed=2)
    ids = torch.arange(10)
    la, lb, lc = (load_model(p).logits(ids) for p in (a, b, c))
    assert torch.equal(la, lb) and not torch.allclose(la, lc)


def test_sharded_output_with_index(tmp_path):
    path = make_checkpoint(tmp_path / "sharded", "tiny", "hf", "mxfp4", seed=0, shard_bytes=4 * 2**20)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) >= 2 and all((path / f).exists() for f in files)
    single = make_checkpoint(tmp_path / "single", "tiny", "hf", "mxfp4", seed=0)
    ids = torch.arange(12)
    assert torch.equal(load_model(path).logits(ids), load_model(single).logits(ids))


def test_real_shapes_of_full_presets():
    """The full-size presets match the published tensor shapes (written for real in BENCHMARKS runs)."""
    from models.checkpoint import tensor_specs
    for name, layers, experts in (("gpt-oss-20b", 24, 32), ("gpt-oss-120b", 36, 128)):
        cfg = PRESETS[name]
        assert (cfg.num_hidden_layers, cfg.num_local_experts, cfg.hidden_size) == (layers, experts, 2880)
        shapes = {n: sh for n, layer, sh, _, _, _ in tensor_specs(cfg, "mxfp4") if layer in (None, 0)}
        assert shapes["embed"] == shapes["unembed"] == (201088, 2880)
        assert shapes["w1_blocks"] == (experts, 5760, 90, 16)
        assert shapes["w2_scales"] == (experts, 2880, 90)
        assert shapes["q_w"] == (4096, 2880) and shapes["k_w"] == (512, 2880)


@pytest.mark.parametrize("experts", ["mxfp4", "bf16"])
def test_in_memory_random_checkpoint_equals_the_written_one(tmp_path, experts):
    """RandomCheckpoint draws on read what make_checkpoint writes: same names, shapes and (on CPU)
    values, so a model loaded either way is the same, whole or sharded by experts and heads."""
    from models.checkpoint import RandomCheckpoint
    from models.weights import ShardSpec
    path = make_checkpoint(tmp_path / "ck", "tiny", "hf", experts, seed=3)
    mem, disk = RandomCheckpoint("tiny", experts, seed=3), CheckpointReader(path)
    assert set(mem._specs) == set(disk.weight_map)
    for name in disk.weight_map:
        assert mem.shape(name) == disk.shape(name), name
        assert torch.equal(mem.read(name), disk.read(name)), name
    # a scales tensor read before its blocks (and rows of it) comes from the same draw
    n = "model.layers.1.mlp.experts.down_proj_scales" if experts == "mxfp4" else "model.layers.1.mlp.experts.down_proj"
    assert torch.equal(mem.read(n, rows=[1, 2, 5]), disk.read(n, rows=[1, 2, 5]))
    ids = torch.arange(20)
    assert torch.equal(load_model(RandomCheckpoint("tiny", experts, seed=3)).logits(ids), load_model(path).logits(ids))
    shard = ShardSpec(experts=(2, 6), q_heads=(0, 2), kv_heads=(0, 1), vocab=(1000, 150000))
    kw = {"keep_mxfp4": True} if experts == "mxfp4" else {}  # the packed blocks themselves, as on GPU
    a = dict(load_model(RandomCheckpoint("tiny", experts, seed=3), shard=shard, **kw).named_buffers())
    b = dict(load_model(path, shard=shard, **kw).named_buffers())
    assert a.keys() == b.keys() and any("w1" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_in_memory_random_checkpoint_errors():
    from models.checkpoint import RandomCheckpoint
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        RandomCheckpoint("huge")
    r = RandomCheckpoint("tiny")
    with pytest.raises(CheckpointError, match="missing tensor 'nope'"):
        r.read("nope")
    with pytest.raises(CheckpointError, match="has shape"):
        r.read("lm_head.weight", (3, 3))


# ---- bad checkpoints: one clear error naming the tensor or file ------------------

def _copy(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_missing_tensor(tmp_path, tiny_ckpt):
    from safetensors.torch import load_file, save_file
    p = _copy(tiny_ckpt, tmp_path / "c")
    f = p / "model.safetensors"
    t = load_file(str(f))
    del t["model.layers.1.self_attn.sinks"]
    save_file(t, str(f))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.1\.self_attn\.sinks'"):
        load_model(p)


def test_wrong_shape(tmp_path, tiny_ckpt):
    from safetensors.torch import load_file, save_file
    p = _copy(tiny_ckpt, tmp_path / "c")
    f = p / "model.safetensors"
    t = load_file(str(f))
    t["model.layers.0.mlp.router.weight"] = t["model.layers.0.mlp.router.weight"][:3]
    save_file(t, str(f))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.mlp\.router\.weight'.*shape \(3, 64\), expected \(8, 64\)"):
        load_model(p)


def test_truncated_file(tmp_path, tiny_ckpt):
    p = _copy(tiny_ckpt, tmp_path / "c")
    f = p / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(p)


def test_index_names_missing_file(tmp_path):
    path = make_checkpoint(tmp_path / "s", "tiny", "hf", "mxfp4", seed=0, shard_bytes=4 * 2**20)
    victim = sorted(path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        CheckpointReader(path)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path)


# ---- CLI ------------------------------------------------------------------------

@pytest.mark.parametrize("fmt,experts", [("hf", "mxfp4"), ("hf", "bf16"), ("original", "mxfp4"),
                                         ("original", "bf16"), ("both", "mxfp4")])
def test_cli_checkpoint_make_tiny(tmp_path, fmt, experts):
    out = tmp_path / "ck"
    r = subprocess.run([*GPTOSS, "checkpoint", "make", str(out), "--preset", "tiny", "--format", fmt,
                        "--experts", experts, "--seed", "4"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "wrote tiny" in r.stdout
    ref = make_checkpoint(tmp_path / "ref", "tiny", "hf", experts, seed=4)
    ids = torch.arange(6)
    assert torch.equal(load_model(out).logits(ids), load_model(ref).logits(ids))
    if fmt == "both":
        assert (out / "original" / "config.json").exists()


def test_cli_checkpoint_make_small_and_full_presets_dry_run(tmp_path):
    r = subprocess.run([*GPTOSS, "checkpoint", "make", str(tmp_path / "s"), "--preset", "small"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for preset, lo, hi in (("gpt-oss-20b", 13, 15), ("gpt-oss-120b", 60, 70)):
        r = subprocess.run([*GPTOSS, "checkpoint", "make", str(tmp_path / preset), "--preset", preset,
                            "--dry-run"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        gb = float(r.stdout.split(" GB")[0].split()[-1])
        assert lo < gb < hi, r.stdout


def test_cli_errors_name_the_flag(tmp_path):
    r = subprocess.run([*GPTOSS, "checkpoint", "make", str(tmp_path), "--preset", "huge"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "--preset" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "keep.txt").write_text("x")
    r = subprocess.run([*GPTOSS, "checkpoint", "make", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2 and "not empty" in r.stderr and "--force" in r.stderr
    assert (tmp_path / "keep.txt").exists()
    # OUT under a file: the path is named, not a traceback from mkdir
    r = subprocess.run([*GPTOSS, "checkpoint", "make", str(tmp_path / "keep.txt" / "ckpt")], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip() == f"gptoss checkpoint make: OUT: cannot write to '{tmp_path / 'keep.txt' / 'ckpt'}' " \
                               "(Not a directory)"
