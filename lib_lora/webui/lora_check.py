"""After each saved epoch: does the webui's own Lora loader match every key of the file to a layer of the loaded
model, with shapes it accepts?

Why: the built-in loader only logs unmatched keys at debug level, so a file with a naming mistake loads "fine"
and does nothing. Here its own `load_network` builds the network, every file key must land in one of its
modules, and each module's delta is computed against the real layer's weight (what it does at generation time).
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import IncompatibleFile


def _networks():
    networks = sys.modules.get("networks")
    network = sys.modules.get("network")
    if networks is None or network is None or not hasattr(networks, "load_network"):
        return None, None
    return networks, network


def check_file(path: str | Path) -> str:
    """One line for the tab ('all N keys match ...'); IncompatibleFile naming the keys the loader did not take."""
    import torch
    from safetensors import safe_open

    networks, network = _networks()
    if networks is None:
        return "not checked: the built-in Lora extension is disabled"
    path = Path(path)
    with safe_open(str(path), framework="pt") as fh:
        file_keys = list(fh.keys())
    prefixes = {k.partition(".")[0] for k in file_keys}
    net = networks.load_network(path.stem, network.NetworkOnDisk(path.stem, str(path)))
    matched = {m.network_key.partition(".")[0] for m in net.modules.values()}
    missing = sorted(prefixes - matched)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise IncompatibleFile(f"{path.name}: the webui's Lora loader matched no layer for {len(missing)} of "
                               f"{len(prefixes)} modules: {shown}")
    bad = []
    with torch.no_grad():
        for key, module in net.modules.items():
            target = module.sd_module
            weight = target.in_proj_weight if isinstance(target, torch.nn.MultiheadAttention) else target.weight
            try:
                module.calc_updown(weight)
            except Exception as exc:  # the loader would fail on this layer at generation time
                bad.append(f"{key}: {exc}")
    if bad:
        raise IncompatibleFile(f"{path.name}: the webui's Lora loader cannot apply {len(bad)} module(s): {bad[0]}")
    return f"ok: the webui's Lora loader matched all {len(prefixes)} modules ({len(file_keys)} keys)"
