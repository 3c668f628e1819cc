"""Rebuild the shipped ``lossforecast/priors.json`` from the real curves in ``shared/data``.

Run: ``python scripts/derive_priors.py [--data ../shared/data] [--out lossforecast/priors.json]``.
The fit behind it is ``lossforecast._derive.derive_priors``; the accuracy benchmark uses the
same function leave-one-source-out, so the shipped file is never what the benchmark scores.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lossforecast._derive import derive_priors
from lossforecast._io import load_runs

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--out", type=Path, default=ROOT / "lossforecast" / "priors.json")
    args = ap.parse_args(argv)
    runs = load_runs(args.data)
    sources = sorted({r.source for r in runs})
    provenance = (
        f"scripts/derive_priors.py on {len(runs)} runs from {', '.join(sources)} "
        "(shared/data; see its README for the sources and licences)"
    )
    priors = derive_priors(runs, provenance=provenance)
    args.out.write_text(json.dumps(priors.to_dict(), indent=2) + "\n")
    print(f"wrote {args.out} from {len(runs)} runs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
