"""Timing shared by the benchmarks: the median of calls timed back to back, a device's copy bandwidth, its name."""
import platform
import statistics
import time

import torch


def time_median(fn, device, repeats, warmup=None, min_sample_s=1e-3, max_calls=256):
    """Median seconds per call of fn over `repeats` samples, after `warmup` calls (default: 2, or 1 for a single
    repeat; the warm-up also runs Triton's autotuning on a GPU). A sample times enough back-to-back calls to span
    `min_sample_s` (at most max_calls; one for anything slower), so that a 50-microsecond op is not measured by
    one reading of the clock against its own jitter: on CUDA with device events around the calls (no
    synchronisation per call, as a loop of such calls would run), on a CPU with the wall clock."""
    for _ in range((2 if repeats > 1 else 1) if warmup is None else warmup):
        fn()
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def sample(calls):
            torch.cuda.synchronize(device)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) * 1e-3 / calls
    else:
        def sample(calls):
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            return (time.perf_counter() - t0) / calls

    calls, first = 1, sample(1)
    while calls < max_calls and first * calls < min_sample_s:
        calls *= 4
    if calls == 1 and repeats >= 1:  # a slow fn: the calibration call was the first sample
        return statistics.median([first] + [sample(1) for _ in range(repeats - 1)])
    return statistics.median(sample(calls) for _ in range(repeats))


def copy_bandwidth(device, nbytes=1 << 28, repeats=10):
    """Bytes per second of a device-to-device copy (read + write counted) of an nbytes buffer."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    return 2 * nbytes / time_median(lambda: dst.copy_(src), device, repeats)


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
