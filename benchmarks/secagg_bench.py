"""Secure aggregation's round trip against plain fedsilo over gloo, side by side in one group.

    .venv/bin/python benchmarks/secagg_bench.py            # 22M, K = 2, 4
    .venv/bin/python benchmarks/secagg_bench.py --quick    # 22M, K = 2, fewer rounds

Per K, one group of K + 1 ``roundtrip.py`` ranks rotates blocks of the unmodified round loops with
and without ``--secure-aggregation`` (``comm_seconds``: the aggregator's clock from the reduce to the
end of the broadcast, after every silo has reported). Each K runs twice:

- the silos' stand-in training takes no time, so the masks (drawn from the start of training) are
  all on the clock: what a round costs when nothing hides them;
- it sleeps ``--train-seconds`` per round, the CPU free as beside a GPU: the masks are drawn while
  the silo trains, as in a real round, and what is left on the clock is the fixed-point encoding,
  the int64 wire (twice fp32's bytes up) and the decoding.

Prints a table and writes it to ``<workdir>/secagg.md``.
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
    parser.add_argument(
        "--train-seconds",
        type=float,
        default=3.0,
        help="the stand-in training's time per round in the second run of each K (K - 1 masks must fit in it)",
    )
    parser.add_argument("--workdir", type=Path, default=HERE / ".work", help="scratch space")
    args = parser.parse_args()
    silos_list, rounds, blocks = ((2,), 3, 2) if args.quick else ((2, 4), 5, 4)
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    pki = make_pki(work, max(silos_list))  # unused by these kinds; the rank script takes it
    shapes, numel = shapes_file("22M", work)
    lines = [
        "| size | K | silo's training (s) | plain (s) | secure aggregation (s) | ratio | wire up per silo (MB): plain / masked |",
        "|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    for silos in silos_list:
        for training in (0.0, args.train_seconds):
            print(f"22M K={silos}, training {training:g} s: plain and secure-aggregation blocks ...", flush=True)
            got = ranks(
                "22M", silos, "fedsilo,secagg", rounds, blocks, work, pki, shapes, "--train-seconds", str(training)
            )
            plain, masked = (median(steady(got.get(k, []))) for k in ("fedsilo_comm_seconds", "secagg_comm_seconds"))
            lines.append(
                f"| 22M | {silos} | {training:g} | {fmt_s(plain)} | {fmt_s(masked)} | {fmt_x(masked / plain)} | "
                f"{numel * 4 / 1e6:.0f} / {numel * 8 / 1e6:.0f} |"
                + ("" if got["status"] == "ok" else f" ({got['status']})")
            )
            if silos == 4 and training > 0:
                verdicts.append(
                    f"secure aggregation / plain at 22M, K = 4, masks drawn while the silos train: "
                    f"{fmt_x(masked / plain)} against <= {TARGET}x: {verdict(masked / plain, TARGET, False)}"
                )
    text = "\n".join([*lines, "", *[f"- {v}" for v in verdicts]])
    (work / "secagg.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
