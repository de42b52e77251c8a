"""Train the zoo's small decoder LM on a public-domain text, one attention variant after another.

    .venv/bin/python examples/train_lm.py                       # causal, alibi, sink, sliding_window, document
    .venv/bin/python examples/train_lm.py --variants softcap,t5_bias --steps 300

A character-level model on examples/data/sonnets.txt (Shakespeare's Sonnets, 1609). Each variant trains from
the same initial seed; the script prints the loss at the start and the end, then samples a few characters
token by token with the KV cache (each step calls the generated operator with one query). The `document`
variant trains on packed batches: every line is a document, packed into rows with document masking and
positions restarting per document. On a CUDA machine the same script runs the Triton kernels (backend=None
picks them for CUDA tensors); on a CPU it runs the generated PyTorch reference in a few minutes.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a fresh clone without installing

from attnc.zoo.models import DecoderLM, pack_documents  # noqa: E402

from attnc import zoo  # noqa: E402

DEFAULT_VARIANTS = "causal,alibi,sink,sliding_window,document"
VARIANT_KWARGS = {
    "sliding_window": {"window": 32},
    "streaming_llm": {"sink_tokens": 4, "window": 32},
    "topk_retrieval": {"block": 16, "top_k": 2, "window": 16},
    "moh": {"shared_heads": 2, "top_k": 1},
    "prefix_lm": {"prefix": 8},
}


def progress(items: Iterable[int], total: int, desc: str) -> Iterator[int]:
    """tqdm when installed, else a one-line bar on stderr."""
    try:
        from tqdm import tqdm

        yield from tqdm(items, total=total, desc=desc, leave=False)
        return
    except ImportError:
        pass
    for n, item in enumerate(items):
        done = (n + 1) * 30 // total
        print(
            f"\r{desc} [{'#' * done}{'.' * (30 - done)}] {n + 1}/{total}", end="", file=sys.stderr, flush=True
        )
        yield item
    print("\r" + " " * (len(desc) + 45) + "\r", end="", file=sys.stderr)


class CharTokenizer:
    def __init__(self, text: str) -> None:
        self.chars = sorted(set(text))
        self.index = {c: n for n, c in enumerate(self.chars)}

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor([self.index[c] for c in text], dtype=torch.long)

    def decode(self, ids: torch.Tensor) -> str:
        return "".join(self.chars[int(i)] for i in ids)


def random_windows(data: torch.Tensor, batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(data) - length, (batch,), generator=gen)
    return torch.stack([data[s : s + length] for s in starts.tolist()])


def train_variant(
    name: str, text: str, tok: CharTokenizer, args: argparse.Namespace, device: torch.device
) -> tuple[float, float, str]:
    torch.manual_seed(args.seed)
    model = DecoderLM(
        len(tok.chars),
        variant=name,
        dim=args.dim,
        depth=args.depth,
        heads=args.heads,
        kv_heads=args.kv_heads,
        attn_kwargs=VARIANT_KWARGS.get(name),
    ).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    data = tok.encode(text)
    docs = [tok.encode(line + "\n") for line in text.splitlines() if line.strip()]  # a line is a document
    gen = torch.Generator().manual_seed(args.seed)
    losses: list[float] = []
    for _ in progress(range(args.steps), args.steps, f"{name:>16}"):
        if name == "document":  # packed batches: lines in random order, packed into `batch` rows
            order = torch.randperm(len(docs), generator=gen).tolist()
            tokens, doc, positions = (
                t[: args.batch] for t in pack_documents([docs[n] for n in order], args.seq + 1)
            )
            tokens, doc, positions = tokens.to(device), doc.to(device), positions.to(device)
            loss = model.loss(tokens, doc=doc, positions=positions)
        else:
            tokens = random_windows(data, args.batch, args.seq + 1, gen).to(device)
            loss = model.loss(tokens)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    prompt = tok.encode("Shall I ")[None].to(device)
    sample = tok.decode(model.generate(prompt, args.sample, temperature=0.8, generator=gen)[0].cpu())
    tail = losses[-max(1, len(losses) // 10) :]  # the final loss, averaged over the last tenth of the steps
    return losses[0], sum(tail) / len(tail), sample


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--variants",
        default=DEFAULT_VARIANTS,
        help=f"comma-separated causal zoo variants ({DEFAULT_VARIANTS})",
    )
    p.add_argument("--text", default=str(ROOT / "examples" / "data" / "sonnets.txt"))
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--sample", type=int, default=60, help="characters to generate after training")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads", type=int, default=1, help="CPU intra-op threads (a tiny model runs best on one)"
    )
    args = p.parse_args(argv)
    causal = [v.name for v in zoo.VARIANTS if v.use is zoo.Use.CAUSAL]
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    bad = [n for n in names if n not in causal]
    if bad:
        p.error(f"not causal zoo variants: {', '.join(bad)} (choose from {', '.join(causal)})")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    text = Path(args.text).read_text(encoding="utf-8")
    tok = CharTokenizer(text)
    print(
        f"{len(text)} characters, vocabulary {len(tok.chars)}, device {device}, {args.steps} steps per variant"
    )
    failed = []
    for name in names:
        t0 = time.perf_counter()
        first, last, sample = train_variant(name, text, tok, args, device)
        ok = last < first
        failed += [] if ok else [name]
        print(f"{name:>16}: loss {first:.3f} -> {last:.3f} ({time.perf_counter() - t0:.0f} s)  {sample!r}")
    if failed:
        print(f"loss did not go down for: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
