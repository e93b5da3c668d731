import shutil

from safetensors.torch import load_file, save_file


def with_router_bias(src, dst, bias: dict[int, float], replace: bool = False):
    """Copy a one-file checkpoint, shifting (or setting) every router's bias for some experts."""
    shutil.copytree(src, dst)
    f = dst / "model.safetensors"
    t = load_file(str(f))
    for k in [k for k in t if k.endswith("router.bias")]:
        b = t[k].float()
        for e, v in bias.items():
            b[e] = v if replace else b[e] + v
        t[k] = b.to(t[k].dtype)
    save_file(t, str(f), metadata={"format": "pt"})
    return dst
