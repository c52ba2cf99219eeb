"""CPU time of the chunked token loss with each chunk's gradient in closed form vs by autograd.

Both variants run in one process, alternating, on the same inputs (final hidden states and output
heads of a student and a teacher); each repeat times loss + backward with the process's CPU
time (all threads), so other jobs on the machine move both alike. Prints, per divergence, the
median over repeats and the ratio closed form / autograd, and checks that both give the same
loss and gradients.

    python bench/closed_form_gradient.py [--tokens 1024] [--hidden 256] [--vocab 32000] [--repeats 6]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from distill.losses.chunked import chunked_token_loss
from distill.losses.divergence import DIVERGENCES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--kinds", nargs="+", default=list(DIVERGENCES), choices=DIVERGENCES)
    args = parser.parse_args()
    torch.manual_seed(0)
    s_h = torch.randn(args.tokens, args.hidden, requires_grad=True)
    s_w = (torch.randn(args.vocab, args.hidden) / args.hidden**0.5).requires_grad_()
    t_h = torch.randn(args.tokens, args.hidden)
    t_w = torch.randn(args.vocab, args.hidden) / args.hidden**0.5
    print(f"{args.tokens} tokens, hidden {args.hidden}, vocabulary {args.vocab:,}, float32, "
          f"{torch.get_num_threads()} torch threads; CPU seconds of loss + backward, median of {args.repeats}")
    print("| divergence | closed form (s) | autograd (s) | closed / autograd | max relative gradient difference |")
    print("|---|---|---|---|---|")
    for kind in args.kinds:
        times: dict[bool, list[float]] = {True: [], False: []}
        grads: dict[bool, tuple[torch.Tensor, ...]] = {}
        for _ in range(args.repeats):
            for closed in (True, False):
                start = time.process_time()
                loss = chunked_token_loss(s_h, s_w, t_h, t_w, kind=kind, closed_form=closed)
                grads[closed] = torch.autograd.grad(loss, (s_h, s_w))
                times[closed].append(time.process_time() - start)
        diff = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(grads[True], grads[False], strict=True))
        closed, auto = statistics.median(times[True]), statistics.median(times[False])
        print(f"| {kind} | {closed:.3f} | {auto:.3f} | {closed / auto:.2f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
