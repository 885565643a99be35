"""Secure aggregation's round trip against plain fedsilo over gloo, side by side in one group.

    .venv/bin/python benchmarks/secagg_bench.py            # 22M, K = 2, 4
    .venv/bin/python benchmarks/secagg_bench.py --quick    # 22M, K = 2, fewer rounds

Per K, one group of K + 1 ``roundtrip.py`` ranks rotates blocks of the unmodified round loops with
and without ``--secure-aggregation`` (``comm_seconds``: the aggregator's clock from the reduce to the
end of the broadcast, which includes each silo's masking, done after its report). Prints a table and
writes it to ``<workdir>/secagg.md``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from run import HERE, fmt_s, fmt_x, median, shapes_file, steady, verdict
from tls_bench import make_pki, ranks

TARGET = 1.3  # secure aggregation's round trip / plain, at 22M, K = 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="K = 2 only, fewer rounds")
    parser.add_argument("--workdir", type=Path, default=HERE / ".work", help="scratch space")
    args = parser.parse_args()
    silos_list, rounds, blocks = ((2,), 3, 2) if args.quick else ((2, 4), 5, 4)
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    pki = make_pki(work, max(silos_list))  # unused by these kinds; the rank script takes it
    shapes, numel = shapes_file("22M", work)
    lines = [
        "| size | K | plain (s) | secure aggregation (s) | ratio | wire up per silo (MB): plain / masked |",
        "|---|---|---|---|---|---|",
    ]
    verdicts = []
    for silos in silos_list:
        print(f"22M K={silos}: plain and secure-aggregation blocks ...", flush=True)
        got = ranks("22M", silos, "fedsilo,secagg", rounds, blocks, work, pki, shapes)
        plain, masked = (median(steady(got.get(k, []))) for k in ("fedsilo_comm_seconds", "secagg_comm_seconds"))
        lines.append(
            f"| 22M | {silos} | {fmt_s(plain)} | {fmt_s(masked)} | {fmt_x(masked / plain)} | "
            f"{numel * 4 / 1e6:.0f} / {numel * 8 / 1e6:.0f} |"
            + ("" if got["status"] == "ok" else f" ({got['status']})")
        )
        if silos == 4:
            verdicts.append(
                f"secure aggregation / plain at 22M, K = 4: {fmt_x(masked / plain)} against <= {TARGET}x: "
                f"{verdict(masked / plain, TARGET, False)}"
            )
    text = "\n".join([*lines, "", *[f"- {v}" for v in verdicts]])
    (work / "secagg.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
