"""A Hugging Face transformers Llama whose attention is a generated attnc operator.

    .venv/bin/python examples/hf_llama.py                          # ALiBi, then a sliding window of 16
    .venv/bin/python examples/hf_llama.py --variants alibi --steps 300 --backend triton

For each variant: register the shipped spec (attnc/integrations/specs/) with transformers'
`AttentionInterface`, build a tiny `LlamaForCausalLM` from a config (random weights, grouped-query
attention; nothing is downloaded), switch it to the operator with `set_attn_implementation`, train it on
the bytes of examples/data/sonnets.txt with padded batches, and generate with `model.generate()` (transformers'
own KV cache: each decoding step calls the operator with one query row). On a CPU it runs in well under
two minutes (the generated PyTorch reference; `--backend triton` runs the kernels under the interpreter).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a fresh clone without installing

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from attnc.integrations import transformers as attnc_hf  # noqa: E402

TEXT = ROOT / "examples" / "data" / "sonnets.txt"
HEADS, KV_HEADS = 4, 2


def alibi_slopes(heads: int) -> torch.Tensor:
    """ALiBi's geometric slopes 2^(-8 (h + 1) / H) (Press et al., 2022, section 3)."""
    return torch.tensor([2.0 ** (-8.0 * (h + 1) / heads) for h in range(heads)])


def register(variant: str, window: int, backend: str | None) -> str:
    name = f"attnc_{variant}"
    if variant == "alibi":
        attnc_hf.register_spec(
            attnc_hf.spec_path("alibi"), name=name, tensors={"slopes": alibi_slopes(HEADS)}, backend=backend
        )
    elif variant == "sliding_window":
        # A Llama config has no sliding window, so transformers passes none: the spec's own W applies.
        attnc_hf.register_spec(
            attnc_hf.spec_path("sliding_window"), name=name, scalars={"W": window}, backend=backend
        )
    else:
        raise SystemExit(f"unknown variant {variant!r} (alibi, sliding_window)")
    return name


def make_model(hidden: int, layers: int, seq: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,  # bytes
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=4 * seq,
        attention_dropout=0.0,
    )
    return LlamaForCausalLM(config)


def batches(data: torch.Tensor, batch: int, seq: int, gen: torch.Generator):
    """Random windows of the text; every other row is left-padded by a random amount (as generate() pads)."""
    while True:
        start = torch.randint(0, len(data) - seq - 1, (batch,), generator=gen).tolist()
        ids = torch.stack([data[s : s + seq] for s in start])
        mask = torch.ones_like(ids)
        for b in range(1, batch, 2):
            pad = int(torch.randint(1, seq // 2, (1,), generator=gen))
            mask[b, :pad] = 0
        yield ids, mask


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="alibi,sliding_window")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=48)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--sample", type=int, default=60, help="bytes to generate after the prompt")
    ap.add_argument("--backend", default=None, help="None (Triton on CUDA), 'reference' or 'triton'")
    args = ap.parse_args(argv)

    data = torch.tensor(list(TEXT.read_bytes()), dtype=torch.long)
    prompt = "Shall I compare thee"
    for variant in args.variants.split(","):
        name = register(variant, args.window, args.backend)
        model = make_model(args.hidden, args.layers, args.seq)
        model.set_attn_implementation(name)  # every Llama attention layer now calls the generated operator
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        gen = torch.Generator().manual_seed(0)
        model.train()
        t0 = time.perf_counter()
        first = last = float("nan")
        for step, (ids, mask) in zip(
            range(args.steps), batches(data, args.batch, args.seq, gen), strict=False
        ):
            loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            first = loss.item() if step == 0 else first
            last = loss.item()
        model.eval()
        ids = torch.tensor([list(prompt.encode())])
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=args.sample,
                do_sample=False,
                pad_token_id=0,
            )
        text = bytes(out[0].tolist()).decode("utf-8", errors="replace")
        print(
            f"{variant}: loss {first:.3f} -> {last:.3f} in {args.steps} steps ({time.perf_counter() - t0:.1f} s)"
        )
        print(f"  generate(): {text!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
