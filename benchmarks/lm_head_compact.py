"""TRL's fused LM head on CPU: every position projected (TRL's CPU default) vs only the labelled ones
(``s3t_llm.training.COMPACT_LM_HEAD``), side by side in one process on SmolLM2-135M.

One batch (4 x 192 tokens, the CPU recipe's shape; the first 100 positions of each row and the last 42 of two rows
unlabelled, about 37% of the positions labelled), forward through the whole model with ``fused_lm_head=True`` and
backward into the input embeddings, alternating the two modes ``--repeats`` times. Prints the times, the loss of
each and the largest difference of the input gradients (expected 0: the same sums over the same positions).

    python benchmarks/lm_head_compact.py --repeats 3 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from s3t_llm import training
    from s3t_llm.models import ensure_smollm2

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_pretrained(str(ensure_smollm2()), dtype=torch.float32)
    add_fused_lm_head(m, outputs=("log_probs", "entropy", "is_top1"))   # what SFTTrainer asks for
    for q in m.parameters():
        q.requires_grad_(False)
    ids = torch.randint(0, m.config.vocab_size, (4, 192))
    lab = ids.clone()
    lab[:, :100] = -100
    lab[2:, 150:] = -100
    emb = m.get_input_embeddings()
    res: dict[bool, list] = {False: [], True: []}
    for _ in range(args.repeats):
        for mode in (False, True):
            training.COMPACT_LM_HEAD = mode
            with training._compact_lm_head():
                x = emb(ids).detach().requires_grad_(True)
                t = time.perf_counter()
                out = m(inputs_embeds=x, labels=lab, fused_lm_head=True)
                out.loss.backward()
                res[mode].append((time.perf_counter() - t, out.loss.item(), x.grad.clone()))
    training.COMPACT_LM_HEAD = True
    frac = float((lab[:, 1:] != -100).float().mean())
    full, comp = (statistics.median(r[0] for r in res[k]) for k in (False, True))
    print(f"labelled positions: {100 * frac:.0f}%; torch threads {torch.get_num_threads()}")
    print(f"every position (TRL's CPU default): {[round(r[0], 3) for r in res[False]]} s, median {full:.3f}")
    print(f"labelled positions only:            {[round(r[0], 3) for r in res[True]]} s, median {comp:.3f}")
    print(f"speed-up {full / comp:.2f}x; loss {res[False][0][1]:.8f} vs {res[True][0][1]:.8f} (diff "
          f"{abs(res[False][0][1] - res[True][0][1]):.1e}); input-gradient max diff "
          f"{(res[False][0][2] - res[True][0][2]).abs().max().item():.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
