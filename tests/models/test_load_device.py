"""load_model(device=...) puts every tensor of the model there: loaded weights, and the buffers modules
make themselves (rotary frequencies, expert maps, load counters). Checked on the meta device, which
behaves like a GPU here: nothing may be left on the CPU."""

import torch

from models import load_model
from models.gpt_oss import ShardSpec


def _off_device(model, kind: str) -> list[str]:
    bad = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type != kind]
    for name, mod in model.named_modules():
        bad += [f"{name}.{k}" for k, v in vars(mod).items() if isinstance(v, torch.Tensor) and v.device.type != kind]
    return bad


def test_every_tensor_lands_on_the_device(tiny_ckpt):
    for keep in (True, False):
        m = load_model(tiny_ckpt, torch.bfloat16, "meta", keep_mxfp4=keep)
        assert _off_device(m, "meta") == [], keep
        assert m.device.type == "meta"


def test_a_shard_too(tiny_ckpt):
    m = load_model(tiny_ckpt, torch.bfloat16, "meta", shard=ShardSpec(experts=(0, 1, 2, 3)))
    assert _off_device(m, "meta") == []
