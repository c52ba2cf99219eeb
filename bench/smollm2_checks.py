"""Checks behind the SmolLM2 language-model results: is the teacher read right, is the loss right?

1. The teacher's next-token logits as distill computes them (its causal-LM adapter: tokenising,
   right padding, the final hidden state times the output head) against plain ``transformers``
   on the same batch.
2. ``token_kd`` (forward KL, the chunked closed-form path) and its gradient against a reference
   computed with autograd from the full logits, on the real teacher's hidden states (the
   student's side is the teacher's perturbed by noise).
3. How much of the teacher's probability its top 32 tokens hold (what a top-32 cache keeps; the
   rest is pooled into one bucket).
4. Where the teacher's test perplexity comes from: WikiText-2's markup tokens (``@-@``,
   ``<unk>``, ``= = heading = =``) against the rest, to test whether the teacher is poor at them.

    python bench/smollm2_checks.py --teacher PATH/SmolLM2-135M-Instruct.Q4_1.gguf

Prints markdown; about a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import math
from collections import defaultdict
from pathlib import Path

import torch

from distill.config import DataSpec
from distill.losses.chunked import chunked_token_loss
from distill.models.load import load_hf
from distill.tasks.lm import LanguageModelingTask

REPO = Path(__file__).resolve().parents[1]


def _category(piece: str) -> str:
    if "@" in piece:
        return "@-@, @,@, @.@"
    if "unk" in piece or piece.strip() in ("<", ">"):
        return "<unk> (its pieces)"
    if "=" in piece:
        return "= heading ="
    return "other"


@torch.inference_mode()
def perplexity_by_category(teacher, task) -> dict[str, tuple[int, float]]:
    """Tokens and summed NLL of the test split, per category of the predicted token."""
    data, sums = task.splits["test"], defaultdict(lambda: [0, 0.0])
    for start in range(0, len(data), 8):
        out = teacher(data.batch(range(start, min(start + 8, len(data))))["inputs"])
        logp = torch.log_softmax(out["hidden"] @ out["head"].T, -1)
        nll = -logp.gather(-1, out["targets"][..., None])[..., 0]
        for b, i in torch.nonzero(out["token_mask"]).tolist():
            cat = _category(teacher.tokenizer.decode([int(out["targets"][b, i])]))
            sums[cat][0] += 1
            sums[cat][1] += float(nll[b, i])
    return {k: (n, s) for k, (n, s) in sums.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help="the GGUF file (or a model folder)")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "wikitext-2"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    teacher = load_hf("hf-causal-lm", args.teacher, max_length=256)
    teacher.module.eval()
    data = Path(args.data)
    task = LanguageModelingTask(DataSpec(format="text", path=data / "valid.txt", test_path=data / "test.txt",
                                         block_chars=900, eval_fraction=0.05, test_limit=64))
    inputs = task.splits["test"].batch(range(8))["inputs"]
    with torch.inference_mode():
        out = teacher(inputs)
        enc = teacher.encode(inputs)
        reference = teacher.module(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits[:, :-1]
        ours = out["hidden"] @ out["head"].T
        mask = out["token_mask"].bool()
        gap = float((reference - ours).abs()[mask].max())
    first = teacher.tokenizer.convert_ids_to_tokens(enc["input_ids"][0, :3].tolist())
    bos = teacher.tokenizer.bos_token_id
    starts = "starts with" if bos is not None and int(enc["input_ids"][0, 0]) == bos else "does not start with"
    print(f"1. teacher logits, distill vs transformers, 8 test blocks ({int(mask.sum())} tokens): "
          f"max |diff| {gap:.2e}; first tokens {first}: the input {starts} the BOS token "
          f"({teacher.tokenizer.bos_token!r}), as the tokenizer itself encodes; padding side "
          f"{teacher.tokenizer.padding_side}, padded positions masked")

    hidden = out["hidden"][mask].float()
    head = out["head"].float()
    torch.manual_seed(0)
    student = (hidden + 0.5 * torch.randn_like(hidden)).requires_grad_(True)
    loss = chunked_token_loss(student, head, hidden, head, None, "forward_kl")
    (grad,) = torch.autograd.grad(loss, student)
    s2 = student.detach().clone().requires_grad_(True)
    log_t, log_s = torch.log_softmax(hidden @ head.T, -1), torch.log_softmax(s2 @ head.T, -1)
    ref = (log_t.exp() * (log_t - log_s)).sum(-1).mean()
    (ref_grad,) = torch.autograd.grad(ref, s2)
    print(f"2. forward KL: distill {loss.item():.6f}, full-logit reference {ref.item():.6f}; gradient max |diff| "
          f"{float((grad - ref_grad).abs().max()):.2e} (largest gradient entry {float(ref_grad.abs().max()):.2e})")
    top = log_t.exp().topk(32, -1).values.sum(-1)
    print(f"3. the teacher's top 32 tokens hold {float(top.mean()):.1%} of its probability on average "
          f"(median {float(top.median()):.1%}, 10th percentile {float(top.quantile(0.1)):.1%})")

    sums = perplexity_by_category(teacher, task)
    tokens, total = sum(n for n, _ in sums.values()), sum(s for _, s in sums.values())
    print(f"\n4. Teacher's test perplexity {math.exp(total / tokens):.2f} over {tokens} tokens, by predicted token:\n")
    print("| predicted token | share of tokens | mean NLL | share of the NLL | perplexity |")
    print("|---|---:|---:|---:|---:|")
    for cat, (n, s) in sorted(sums.items(), key=lambda kv: -kv[1][0]):
        print(f"| {cat} | {n / tokens:.1%} | {s / n:.2f} | {s / total:.1%} | {math.exp(s / n):.1f} |")
    other_n, other_s = sums["other"]
    print(f"\nWithout the markup tokens: perplexity {math.exp(other_s / other_n):.2f}")


if __name__ == "__main__":
    main()
