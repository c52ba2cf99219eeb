"""Peak memory and step time of the chunked token loss against the naive one, on CPU.

Each measurement runs in a fresh child process: it builds the inputs (final hidden states of a
student and a teacher for one sequence, and their output heads), records its peak resident
memory, runs loss + backward, and reports how far the peak rose above that: the memory the
loss itself needed, logits, softmaxes and gradients included. Time is the median over repeats
of loss + backward in that process. For each vocabulary the naive loss runs first, then the
chunked one with autograd per chunk (``closed_form=False``), then the chunked one as distill
runs it (the default path: each chunk's gradient in closed form).

The children run with glibc's mmap threshold fixed (``MALLOC_MMAP_THRESHOLD_``): by default the
threshold rises after large blocks are freed, later blocks of up to 32 MiB then come from the
heap, and the peak resident memory depends on fragmentation, not only on what the loss holds
(the same command gave 0.113x and 0.164x for one variant in two runs). With the threshold
fixed every large tensor is mapped and unmapped on its own, and the peak is what was alive.

    python bench/token_loss_memory.py [--vocab 32000 128000] [--tokens 2048] [--hidden 576] [--chunk N] \\
        [--kind forward_kl] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time


def _peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def child(variant: str, vocab: int, tokens: int, hidden: int, chunk: int | None, kind: str, repeats: int) -> None:
    import torch

    from distill.losses.chunked import chunked_token_loss, token_loss

    torch.manual_seed(0)
    s_h = torch.randn(tokens, hidden, requires_grad=True)
    s_w = (torch.randn(vocab, hidden) / hidden**0.5).requires_grad_()
    t_h = torch.randn(tokens, hidden)
    t_w = torch.randn(vocab, hidden) / hidden**0.5
    # The weight gradient is as large as the weight itself in both variants; allocate it first
    # so that the peak rise counts what differs, the loss's own working memory.
    s_w.grad = torch.zeros_like(s_w)
    s_h.grad = torch.zeros_like(s_h)
    before = _peak_bytes()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        if variant == "naive":
            loss = token_loss(s_h, s_w, t_h, t_w, kind=kind)
        else:  # "chunked": closed-form gradient per chunk; "chunked-autograd": autograd per chunk
            loss = chunked_token_loss(s_h, s_w, t_h, t_w, kind=kind, chunk_size=chunk,
                                      closed_form=variant == "chunked")
        loss.backward()
        times.append(time.perf_counter() - start)
    print(json.dumps({"variant": variant, "vocab": vocab, "peak_rise": _peak_bytes() - before,
                      "seconds": statistics.median(times), "loss": loss.item()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 128000])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--chunk", type=int, help="rows per chunk (default: the loss's own, sized to the vocabulary)")
    parser.add_argument("--kind", default="forward_kl")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "VOCAB"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), args.tokens, args.hidden, args.chunk, args.kind, args.repeats)
        return
    import torch

    from distill.losses.chunked import CHUNK_ELEMENTS

    chunk = args.chunk or f"{CHUNK_ELEMENTS:,} logits (rows: that // vocab)"
    print(f"{args.tokens} tokens, hidden {args.hidden}, chunk {chunk}, {args.kind}, "
          f"{torch.get_num_threads()} torch threads, float32, CPU; distill's default path: 'chunked' "
          "(closed-form gradient per chunk)")
    for vocab in args.vocab:
        results = {}
        for variant in ("naive", "chunked-autograd", "chunked"):
            command = [sys.executable, __file__, "--child", variant, str(vocab), "--tokens", str(args.tokens),
                       "--hidden", str(args.hidden), "--kind", args.kind, "--repeats", str(args.repeats)]
            if args.chunk:
                command += ["--chunk", str(args.chunk)]
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
            out = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
            results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        naive = results["naive"]
        for variant in ("chunked-autograd", "chunked"):
            ours = results[variant]
            print(f"vocab {vocab:,}, {variant}: peak rise naive {naive['peak_rise'] / 2**20:,.0f} MiB, ours "
                  f"{ours['peak_rise'] / 2**20:,.0f} MiB (ratio {ours['peak_rise'] / naive['peak_rise']:.3f}); "
                  f"step naive {naive['seconds']:.2f} s, ours {ours['seconds']:.2f} s "
                  f"(ratio {ours['seconds'] / naive['seconds']:.2f}); "
                  f"loss {naive['loss']:.6f} vs {ours['loss']:.6f}")


if __name__ == "__main__":
    main()
