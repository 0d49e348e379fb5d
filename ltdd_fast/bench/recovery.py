"""`ltdd bench memory` for a uni-level preset: the peak memory of one recovery gradient at several IPCs, the whole
set in one pass against `batch_chunk` images a pass (unilevel/recovery.py's two passes), in one process.

The recovery holds no unrolled training, so its memory is the observer's activations of the images in one pass
plus the set itself: with a fixed chunk the activations stop growing with the IPC, and only the images, their
gradient and Adam's two moments do (4 copies of the set).
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import replace

import torch

from ..config import UnilevelConfig, load_config
from ..errors import ConfigError
from ..memory import format_bytes, peak_bytes
from ..unilevel import Recovery
from .timing import device_name


def bench_recovery_memory(preset, ipcs=(10, 50), chunk=100, overrides=(), device="cpu", progress=None) -> dict:
    """{"whole": {ipc: bytes}, "chunked": {ipc: bytes}, settings} for the uni-level preset (its experts must exist:
    --set experts=DIR)."""
    config = load_config(preset, [*overrides, f"device={device}"])
    if not isinstance(config, UnilevelConfig):
        raise ConfigError(f"{preset} is a {config.method} preset: this measurement is for method=unilevel")
    say = progress or (lambda text: None)
    out = {"whole": {}, "chunked": {}}
    dataset = None
    with tempfile.TemporaryDirectory() as tmp:
        for ipc in ipcs:
            for kind, batch_chunk in (("whole", None), ("chunked", chunk)):
                cfg = replace(config, ipc=ipc, iterations=1, init="real", batch_chunk=batch_chunk,
                              out=f"{tmp}/{kind}{ipc}").validate()
                rec = Recovery(cfg, dataset=dataset, progress=False)
                dataset = rec.dataset
                params = rec.augment.sample(rec.images.shape[0], tuple(dataset.im_size), rec.generator,
                                            device=rec.device) if rec.augment is not None else None
                rec.gradient(params)  # warm-up: the first call allocates what later ones reuse
                _, peak = peak_bytes(lambda: rec.gradient(params), rec.device)
                out[kind][str(ipc)] = peak
                say(f"IPC {ipc}, {kind}: {format_bytes(peak)}")
    return {**out, "preset": preset, "chunk": chunk, "ipcs": list(ipcs),
            "device": device_name(torch.device(device)), "measure": "tensor_peak" if str(device).startswith("cpu") else "cuda_max_allocated",
            "date": time.strftime("%Y-%m-%d"), "overrides": list(overrides)}


def format_recovery_memory(result) -> str:
    ipcs = [str(i) for i in result["ipcs"]]
    lines = [f"{result['preset']} on {result['device']}: peak memory of one recovery gradient ({result['measure']}), "
             f"MB", f"{'IPC':<22} " + " ".join(f"{i:>10}" for i in ipcs) + f" {'last/first':>11}"]
    for kind, name in (("whole", "whole set, one pass"), ("chunked", f"{result['chunk']} images a pass")):
        cells = " ".join(f"{result[kind][i] / 1e6:>10.1f}" for i in ipcs)
        lines.append(f"{name:<22} {cells} {result[kind][ipcs[-1]] / result[kind][ipcs[0]]:>10.2f}x")
    return "\n".join(lines)
