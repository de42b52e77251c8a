"""Train a TransNormerLLM-style model (linear attention) on a public-domain text, then generate from its
recurrent state, one token at a time.

    .venv/bin/python examples/generate_linear.py                      # lightning, 200 steps
    .venv/bin/python examples/generate_linear.py --variant retention --steps 300

Character-level, on examples/data/sonnets.txt. Training runs the chunked linear kernels (the PyTorch reference
on a CPU, the Triton kernels on a GPU: backend=None picks them for CUDA tensors). Generation prefills each
layer's D×E state with one chunked call and then takes one recurrent step per token: the state's size never
grows, unlike a softmax model's KV cache (the script prints both sizes).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a fresh clone without installing
sys.path.insert(0, str(ROOT / "examples"))

from attnc.zoo.linear_models import TransNormerLM  # noqa: E402
from train_lm import CharTokenizer, progress, random_windows  # noqa: E402

from attnc import zoo  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    linear = zoo.list("linear")
    p.add_argument("--variant", default="lightning", choices=linear)
    p.add_argument("--text", default=str(ROOT / "examples" / "data" / "sonnets.txt"))
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--sample", type=int, default=120, help="characters to generate after training")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    text = Path(args.text).read_text(encoding="utf-8")
    tok = CharTokenizer(text)
    data = tok.encode(text)
    torch.manual_seed(args.seed)
    model = TransNormerLM(
        len(tok.chars), variant=args.variant, dim=args.dim, depth=args.depth, heads=args.heads
    ).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(args.seed)
    print(f"{args.variant}: {len(text)} characters, vocabulary {len(tok.chars)}, device {device}")
    t0 = time.perf_counter()
    losses = []
    for _ in progress(range(args.steps), args.steps, args.variant):
        loss = model.loss(random_windows(data, args.batch, args.seq + 1, gen).to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    tail = losses[-max(1, len(losses) // 10) :]
    print(f"loss {losses[0]:.3f} -> {sum(tail) / len(tail):.3f} ({time.perf_counter() - t0:.0f} s)")
    model.eval()
    prompt = tok.encode("Shall I ")[None].to(device)
    t0 = time.perf_counter()
    out = model.generate(prompt, args.sample, temperature=0.8, generator=gen)
    dt = time.perf_counter() - t0
    print(repr(tok.decode(out[0].cpu())))
    caches = model.new_caches()
    model(out, caches=caches)
    state = sum(c.state.numel() for c in caches if c.state is not None)
    head_dim = args.dim // args.heads
    kv = 2 * args.depth * args.heads * out.shape[1] * head_dim
    print(
        f"{args.sample} tokens in {dt:.2f} s; recurrent state {state} numbers per sequence, whatever its "
        f"length (a KV cache for these {out.shape[1]} positions: {kv}, growing by {kv // out.shape[1]} per token)"
    )
    return 0 if sum(tail) / len(tail) < losses[0] else 1


if __name__ == "__main__":
    sys.exit(main())
