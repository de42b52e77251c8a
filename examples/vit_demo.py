"""A ViT forward/backward with each image attention of the zoo, and a few training steps.

    .venv/bin/python examples/vit_demo.py                                   # full, agent, neighborhood_2d, biformer
    .venv/bin/python examples/vit_demo.py --variants neighborhood_2d --steps 30

Synthetic 32x32 images of 4 classes (a bright square in one quadrant, plus noise) so the script needs no
download; the loss goes down within a few steps. The 8x8 token grid is passed to the variants that need it
(2-D neighbourhood, BiFormer's region routing, Agent Attention's pooled agents). On a CUDA machine the same
script runs the Triton kernels; on a CPU, the generated PyTorch reference.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a fresh clone without installing

from attnc.zoo.models import ViT  # noqa: E402

VARIANT_KWARGS = {
    "agent": {"agents": 16},
    "neighborhood_2d": {"kernel_size": 3},
    "neighborhood_2d_dilated": {"kernel_size": 3, "dilation": 2},
    "neighborhood_1d": {"kernel_size": 7},
    "biformer": {"regions": 2, "top_k": 2},
}


def quadrant_images(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.randint(0, 4, (n,), generator=gen)
    images = 0.3 * torch.randn(n, 3, 32, 32, generator=gen)
    for b, c in enumerate(labels.tolist()):
        y, x = 16 * (c // 2), 16 * (c % 2)
        images[b, :, y + 4 : y + 12, x + 4 : x + 12] += 1.0
    return images, labels


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default="full,agent,neighborhood_2d,biformer")
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument(
        "--threads", type=int, default=1, help="CPU intra-op threads (a tiny model runs best on one)"
    )
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    images, labels = (t.to(device) for t in quadrant_images(args.batch, gen))
    failed = []
    for name in [n.strip() for n in args.variants.split(",") if n.strip()]:
        torch.manual_seed(0)
        model = ViT(
            image_size=32,
            patch=4,
            classes=4,
            variant=name,
            dim=64,
            heads=4,
            attn_kwargs=VARIANT_KWARGS.get(name),
        )
        model = model.to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
        t0 = time.perf_counter()
        losses = []
        for _ in range(args.steps):
            loss = F.cross_entropy(model(images), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # the backward of the generated operators (and of the routing/agent layers)
            opt.step()
            losses.append(loss.item())
        grads = sum(p.grad.abs().sum().item() for p in model.parameters() if p.grad is not None)
        print(
            f"{name:>16}: loss {losses[0]:.3f} -> {losses[-1]:.3f}, |grad| {grads:.2f} ({time.perf_counter() - t0:.1f} s)"
        )
        if not losses[-1] < losses[0]:
            failed.append(name)
    if failed:
        print(f"loss did not go down for: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
