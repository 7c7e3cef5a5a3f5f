#!/usr/bin/env python
"""Attention alone: each f2d_jax.models.attention implementation against PyTorch's
scaled_dot_product_attention, forward and forward + backward, on the UNet's self- and
cross-attention shapes.

    python benchmarks/attention.py                    # the cpu preset's shapes (256 px, batch 2 with guidance)
    python benchmarks/attention.py --preset sd14      # SD v1.4 at 512 px, batch 8 with guidance

Times are the best of --repeats calls after a warm-up (jitted on our side), in float32 on CPU and
bfloat16 on an accelerator; PyTorch runs in the same process after ours, on the same inputs. The
backward pass is the gradient of sum(sin(out)) with respect to q, k and v.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

# (batch, queries, keys, heads, head width) of the UNet's attention at its largest token counts:
# self-attention at the first two levels and cross-attention over 77 text tokens at the first.
SHAPES = {
    "cpu": [(4, 1024, 1024, 8, 8), (4, 256, 256, 8, 16), (4, 1024, 77, 8, 8)],
    "sd14": [(16, 4096, 4096, 8, 40), (16, 1024, 1024, 8, 80), (16, 4096, 77, 8, 40)],
}


def best(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def ours(implementation: str, q, k, v, repeats: int) -> tuple[float, float]:
    import jax
    import jax.numpy as jnp

    from f2d_jax.models.attention import attention

    def out(q, k, v):
        return attention(q, k, v, implementation=implementation)

    forward = jax.jit(out)
    backward = jax.jit(jax.grad(lambda q, k, v: jnp.sum(jnp.sin(out(q, k, v).astype(jnp.float32))), (0, 1, 2)))
    return (best(lambda: jax.block_until_ready(forward(q, k, v)), repeats),
            best(lambda: jax.block_until_ready(backward(q, k, v)), repeats))


def pytorch(q, k, v, repeats: int, dtype) -> tuple[float, float]:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v = (torch.tensor(np.asarray(x, np.float32), dtype=dtype, device=device).transpose(1, 2) for x in (q, k, v))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def forward():
        with torch.no_grad():
            torch.nn.functional.scaled_dot_product_attention(q, k, v)
        sync()

    def backward():
        args = [x.detach().requires_grad_() for x in (q, k, v)]
        torch.nn.functional.scaled_dot_product_attention(*args).float().sin().sum().backward()
        sync()

    return best(forward, repeats), best(backward, repeats)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=("auto", *SHAPES), default="auto",
                        help="shapes: cpu or sd14 (auto: sd14 when JAX sees an accelerator)")
    parser.add_argument("--implementations", default="reference,xla,auto",
                        help="comma list of ours to time (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls, the best reported (default: 5)")
    args = parser.parse_args(argv)
    import jax
    import jax.numpy as jnp
    import torch

    from f2d_jax.models.attention import check_implementation, resolve

    names = [check_implementation(n) for n in args.implementations.split(",")]
    accelerated = jax.default_backend() != "cpu"
    preset = args.preset if args.preset != "auto" else ("sd14" if accelerated else "cpu")
    dtype, torch_dtype = (jnp.bfloat16, torch.bfloat16) if accelerated else (jnp.float32, torch.float32)
    print(f"{jax.default_backend()}, {jnp.dtype(dtype).name}, best of {args.repeats}; torch "
          f"{torch.get_num_threads()} threads; times in ms, forward / forward + backward")
    print("| batch, queries, keys, heads, width | " + " | ".join(names) + " | PyTorch SDPA | "
          + " | ".join(f"PyTorch / {n}" for n in names) + " |")
    print("|---" * (2 * len(names) + 2) + "|")
    for shape in SHAPES[preset]:
        b, tq, tk, h, d = shape
        rng = np.random.default_rng(0)
        q, k, v = (jnp.asarray(rng.standard_normal((b, t, h, d)), dtype) for t in (tq, tk, tk))
        times = {n: ours(n, q, k, v, args.repeats) for n in names}
        theirs = pytorch(q, k, v, args.repeats, torch_dtype)
        label = ", ".join(map(str, shape))
        cells = [f"{1e3 * f:.1f} / {1e3 * fb:.1f} ({resolve(n, q, k)})" for n, (f, fb) in times.items()]
        ratios = [f"{theirs[0] / f:.2f}x / {theirs[1] / fb:.2f}x" for f, fb in times.values()]
        print(f"| {label} | " + " | ".join(cells) + f" | {1e3 * theirs[0]:.1f} / {1e3 * theirs[1]:.1f} | "
              + " | ".join(ratios) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
