"""Reads each grid point's results.json (validation split) and writes the search table and the
chosen point as markdown. Usage: python3 choose.py OUT_DIR POINT... (as tune.sh calls it)."""

import json
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path


def mean_of(variants, names, bench, key):
    vals = [
        r["value"]
        for n in names
        for r in variants.get(n, {}).get(bench, {}).get(key, {}).get("runs", [])
    ]
    return 100.0 * sum(vals) / len(vals) if vals else float("nan")


def main():
    out = Path(sys.argv[1])
    points = sys.argv[2:]
    rows = []
    base = None
    for p in points:
        name = p.replace(" ", "_").replace("=", "-")
        res = json.loads((out / name / "results.json").read_text())
        assert res["split"] == "val", f"{name}: evaluated on {res['split']}, not val"
        v = res["variants"]
        if base is None:
            base = (
                mean_of(v, ["base"], "pope/adversarial", "f1"),
                mean_of(v, ["base"], "chair", "chair_s"),
            )
        trained = ["dpo", "misp"]
        rows.append(
            (
                p,
                mean_of(v, trained, "pope/adversarial", "f1"),
                mean_of(v, trained, "chair", "chair_s"),
                mean_of(v, ["dpo"], "chair", "chair_s"),
                mean_of(v, ["misp"], "chair", "chair_s"),
            )
        )
    ok = [r for r in rows if r[1] >= base[0] - 1.0]
    chosen = min(ok or rows, key=lambda r: r[2])
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    print(
        f"Searched on the **validation** split by `bench/demo_tune/tune.sh` ({when}, commit {commit}): "
        "each point trains dpo and misp with seeds 0 and 1 on the demo's settings plus the point's "
        "`--set` overrides (240 records, one epoch of 15 steps of 16 records); chosen: the lowest mean "
        "validation CHAIR_s whose mean POPE-adversarial F1 is at most 1 point below the base's. "
        "The test split is read once, by the demo itself.\n"
    )
    print(
        f"Base model on validation: POPE adv F1 {base[0]:.1f}, CHAIR_s {base[1]:.1f}.\n"
    )
    best = min(r[2] for r in rows)
    ratio = best / base[1]
    print(
        f"Lowest mean validation CHAIR_s of the grid: {best:.1f}, {ratio:.2f}x the base's "
        f"(the target of <= 0.75x is {'met' if ratio <= 0.75 else 'NOT met'}); "
        "larger rates cut CHAIR_s no further and cost POPE F1, and neither every record of the "
        "world (600, 2.5x the steps), a second epoch, mDPO's beta of 0.1 nor a doubled image "
        "term cut it further: at this model and world, training settings alone do not reach the "
        "target (docs/design.md §13 says why). Differences of a point or less between points "
        "are within the noise of two seeds.\n"
    )
    print("| point (`--set`) | mean adv F1 | mean CHAIR_s | dpo CHAIR_s | misp CHAIR_s | |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        mark = "**chosen**" if r is chosen else ""
        print(f"| `{r[0]}` | {r[1]:.1f} | {r[2]:.1f} | {r[3]:.1f} | {r[4]:.1f} | {mark} |")


if __name__ == "__main__":
    main()
