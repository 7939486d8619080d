"""Peak memory of a Rev-ViT training step against depth, reversible vs. its non-reversible twin.

    python benchmarks/revvit_memory.py [--depths 2 4 8 12] [--embed-dim 192] [--batch 2]

Method: one forward+backward measured by ``monet.measure.measure_peak_memory``
(on CPU, the running sum of ``torch.profiler``'s allocation/free events).
Parameters, their gradients (allocated beforehand so accumulation is in place)
and the input are passed as resident and not counted (``delta_bytes``): the
figure is activations plus temporaries. Writes benchmarks/results/revvit_memory.csv.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from monet.measure import measure_peak_memory, resident_tensors
from monet.models.revvit import RevViT, RevViTConfig

MIB = 2**20
METHOD = (
    "monet.measure.measure_peak_memory delta_bytes over one forward+backward "
    "(torch.profiler [memory] events); parameters, preallocated gradients and input "
    "resident, not counted"
)


def peak_step_bytes(model: torch.nn.Module, images: torch.Tensor) -> int:
    """Peak bytes one forward+backward adds above parameters, gradients and input."""
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    resident = resident_tensors(model, images)
    return measure_peak_memory(lambda: model(images).sum().backward(), resident).delta_bytes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 4, 8, 12])
    parser.add_argument("--embed-dim", type=int, default=192)
    parser.add_argument("--heads", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument(
        "--output",
        type=Path,
        default=Path(__file__).resolve().parent / "results" / "revvit_memory.csv",
    )
    arguments = parser.parse_args(argv)

    torch.manual_seed(0)
    images = torch.randn(arguments.batch, 3, arguments.image_size, arguments.image_size)
    rows = []
    for depth in arguments.depths:
        config = RevViTConfig(
            embed_dim=arguments.embed_dim,
            depth=depth,
            num_heads=arguments.heads,
            image_size=arguments.image_size,
        )
        reversible = RevViT(config, reversible=True)
        twin = reversible.twin()
        block_bytes = sum(p.numel() * p.element_size() for p in reversible.blocks.parameters())
        started = time.perf_counter()
        reversible_peak = peak_step_bytes(reversible, images)
        twin_peak = peak_step_bytes(twin, images)
        rows.append(
            {
                "depth": depth,
                "embed_dim": arguments.embed_dim,
                "image_size": arguments.image_size,
                "batch": arguments.batch,
                "reversible_peak_mib": round(reversible_peak / MIB, 2),
                "twin_peak_mib": round(twin_peak / MIB, 2),
                "ratio": round(reversible_peak / twin_peak, 3),
                "block_parameters_mib": round(block_bytes / MIB, 2),
                "reversible_less_block_gradients_mib": round(
                    (reversible_peak - block_bytes) / MIB, 2
                ),
                "seconds": round(time.perf_counter() - started, 1),
            }
        )
        print(f"depth {depth}: done in {rows[-1]['seconds']} s", file=sys.stderr)

    print(
        f"Rev-ViT step peak memory, width {arguments.embed_dim}, {arguments.heads} heads, "
        f"{arguments.image_size}² images, batch {arguments.batch}, float32, CPU"
    )
    print(f"method: {METHOD}")
    print(
        f"{'depth':>5} {'reversible MiB':>15} {'twin MiB':>10} {'ratio':>6} "
        f"{'block params MiB':>17} {'reversible less block grads MiB':>32}"
    )
    for row in rows:
        print(
            f"{row['depth']:>5} {row['reversible_peak_mib']:>15.2f} {row['twin_peak_mib']:>10.2f} "
            f"{row['ratio']:>6.3f} {row['block_parameters_mib']:>17.2f} "
            f"{row['reversible_less_block_gradients_mib']:>32.2f}"
        )
    print(
        "The reversible backward returns every block's parameter gradients at once, so its "
        "peak holds one transient copy of them (block params column); the rest is constant."
    )

    arguments.output.parent.mkdir(parents=True, exist_ok=True)
    with arguments.output.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {arguments.output}")


if __name__ == "__main__":
    main()
