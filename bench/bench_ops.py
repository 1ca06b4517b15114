"""Benchmark of the fused `_ltg` kernels against the eager torch composites in ltg.py (fused=False).

Times the guided step (Eqns 11, 8, 7, at a DDIM step's coefficients) and the longtail signals
(Eqn 4, forward and forward+backward), and a plain `dst.copy_(src)` moving as many bytes, to express the fused
kernels' throughput as a fraction of the measured copy bandwidth. Not a test.

    python bench/bench_ops.py [--device cpu|cuda] [--quick] [--out PATH]
"""

import argparse
import datetime
import json
import os

import torch
from timing import time_ms

import ltg

FULL = {
    "step": [1 << 16, 1 << 20, 1 << 22, 1 << 24],
    "entropy": [(8, 256, 1000), (64, 64, 1000), (16, 1024, 100)],
    "dtypes": [torch.float32, torch.bfloat16],
    "repeats": 15,
}
QUICK = {
    "step": [1 << 16, 1 << 18],
    "entropy": [(8, 32, 100), (16, 8, 1000)],
    "dtypes": [torch.float32],
    "repeats": 3,
}
STEP_PATH = (*ltg.vp_coefficients(0.6), *ltg.vp_coefficients(0.7))   # (a_t, b_t, a_prev, b_prev)
STEP_WEIGHT = 3.0


def median_ms(fn, device, repeats):
    return time_ms(fn, device, warmup=2, repeats=repeats)["ms"]


def copy_gbps(nbytes, dtype, device, repeats):
    """Measured bandwidth of dst.copy_(src) moving `nbytes` in all (half read, half written)."""
    n = max(1, nbytes // (2 * dtype.itemsize))
    src, dst = torch.randn(n, device=device).to(dtype), torch.empty(n, dtype=dtype, device=device)
    return nbytes / median_ms(lambda: dst.copy_(src), device, repeats) / 1e6


def step_case(n, dtype, device):
    """(op, size, bytes moved, fn(fused)) for the guided step on n elements: three reads, one write."""
    z, eps, grad = (torch.randn(n, device=device).to(dtype) for _ in range(3))
    return ("gaussian_path_step", f"{n}", 4 * n * dtype.itemsize,
            lambda fused: ltg.gaussian_path_step(z, eps, grad, *STEP_PATH, STEP_WEIGHT, fused=fused))


def entropy_cases(K, B, C, dtype, device):
    """The signals' forward, and forward + backward, on logits [K, B, C]."""
    x = torch.randn(K, B, C, device=device).mul(3).to(dtype)
    x_grad = x.clone().requires_grad_()
    logits_bytes = K * B * C * dtype.itemsize

    def fwd_bwd(fused):
        total, _, _ = ltg.longtail_signals(x_grad, fused=fused)
        total.sum().backward()
        x_grad.grad = None

    # forward reads the logits; forward + backward reads them twice and writes their gradient
    return [("entropy_fwd", f"{K}x{B}x{C}", logits_bytes + 3 * B * dtype.itemsize,
             lambda fused: ltg.longtail_signals(x, fused=fused)),
            ("entropy_fwd_bwd", f"{K}x{B}x{C}", 3 * logits_bytes, fwd_bwd)]


def run(device, config):
    repeats = config["repeats"]
    rows = []
    for dtype in config["dtypes"]:
        # each case owns its tensors (built by a function, so no closure sees a later case's)
        cases = [step_case(n, dtype, device) for n in config["step"]]
        cases += [case for shape in config["entropy"] for case in entropy_cases(*shape, dtype, device)]
        for op, size, nbytes, fn in cases:
            eager = median_ms(lambda: fn(False), device, repeats)
            fused = median_ms(lambda: fn(True), device, repeats)
            gbps = nbytes / fused / 1e6
            copy = copy_gbps(nbytes, dtype, device, repeats)
            rows.append(dict(op=op, device=device.type, size=size, dtype=str(dtype).removeprefix("torch."),
                             eager_ms=eager, fused_ms=fused, speedup=eager / fused, fused_gbps=gbps,
                             copy_gbps=copy, pct_copy=100 * gbps / copy))
    return rows


def print_table(rows):
    head = f"{'op':<20}{'device':<7}{'size':>13}{'dtype':>10}{'eager ms':>11}{'fused ms':>10}" \
           f"{'speedup':>9}{'fused GB/s':>12}{'% copy bw':>11}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['op']:<20}{r['device']:<7}{r['size']:>13}{r['dtype']:>10}{r['eager_ms']:>11.3f}"
              f"{r['fused_ms']:>10.3f}{r['speedup']:>8.2f}x{r['fused_gbps']:>12.2f}{r['pct_copy']:>10.0f}%")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats (a smoke test)")
    parser.add_argument("--out", help="JSON results (default bench/results/ops-<device>.json)")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's); 1 on a busy machine")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    if ltg.backend(device) != "fused":
        parser.error(f"the fused kernels are not built for {device} "
                     "(pip install --no-build-isolation -e .)")
    torch.manual_seed(0)
    rows = run(device, QUICK if args.quick else FULL)
    print_table(rows)

    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"ops-{device.type}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                torch=torch.__version__, quick=args.quick, threads=torch.get_num_threads(),
                device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else os.uname().machine)
    with open(out, "w") as f:
        json.dump(dict(meta=meta, results=rows), f, indent=2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
