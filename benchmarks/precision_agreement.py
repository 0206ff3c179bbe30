"""Do two audits of the same config in different precisions agree? (bf16 against fp32)

Reads the ``summary.json`` of two finished runs (e.g. ``cl-audit run capitals --out A``
and ``cl-audit run capitals --set model.precision=bf16 --out B``) and prints, for every
checkpoint and metric, both values, the reference's 95% CI and whether the other value
lies inside it; then the verdicts and their quantities with CIs. The rule for making
bf16 the default (issue "Performance"): the verdict is the same and every metric of the
candidate lies within the reference's CI.

Usage:
    .venv/bin/python benchmarks/precision_agreement.py REFERENCE_RUN CANDIDATE_RUN
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

METRICS = ("task_acc", "knowledge_acc", "first_token_prob", "perturb_acc", "kl_to_base", "kl_to_aligned")
VERDICT = ("task_drop", "knowledge_retention")


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    ref, cand = (json.loads((Path(a) / "summary.json").read_text()) for a in sys.argv[1:])
    inside = total = 0
    print(f"{'checkpoint':24s} {'metric':18s} {'reference':>10s} {'95% CI':>18s} {'candidate':>10s}  inside")
    for name, st in ref["stages"].items():
        for m in METRICS:
            if m not in st or m not in cand["stages"].get(name, {}):
                continue
            lo, hi = st["ci"][m]
            v = cand["stages"][name][m]
            ok = lo - 1e-12 <= v <= hi + 1e-12
            inside += ok
            total += 1
            print(f"{name:24s} {m:18s} {st[m]:10.4f} [{lo:7.4f}, {hi:7.4f}] {v:10.4f}  {'yes' if ok else 'NO'}")
    rv, cv = ref["verdict"], cand["verdict"]
    for k in VERDICT:
        lo, hi = rv[f"{k}_ci"]
        print(f"verdict {k:16s} reference {rv[k]:.4f} [{lo:.4f}, {hi:.4f}]  candidate {cv[k]:.4f}")
    for k, r in rv["recovery_ratio"].items():
        print(f"verdict recovery_ratio[{k}] reference {r:.4f}  candidate {cv['recovery_ratio'][k]:.4f}")
    same = rv["label"] == cv["label"]
    print(f"labels: reference {rv['label']}, candidate {cv['label']} ({'same' if same else 'DIFFERENT'})")
    print(f"metrics inside the reference's 95% CI: {inside} of {total}")
    print("AGREE" if same and inside == total else "DISAGREE")
    return 0


if __name__ == "__main__":
    sys.exit(main())
