"""The TLS star against the raw gloo floor and Flower, and the aggregator's memory over it.

    .venv/bin/python benchmarks/tls_bench.py            # 22M and 110M, K = 2, 4, 8 (~20 min idle)
    .venv/bin/python benchmarks/tls_bench.py --quick    # 22M, K = 2, 4: a smoke test

Per (size, K), one group of K + 1 ``roundtrip.py`` ranks runs, in rotated blocks: fedsilo over
gloo, the raw gloo floor (one reduce + one broadcast), and fedsilo over the TLS star; Flower's
legacy path runs on the same tensor shapes as in ``run.py`` part a. Then one TLS-only group at
K = 8 runs 50 rounds: rank 0's peak RSS above its import floor, and the slope of its RSS per
round. Beside each row: the physical limit, K x model bytes into the aggregator and K x model
bytes out of it per round. Prints a table and writes it to ``<workdir>/tls.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import run as bench
from run import GIB, HERE, MIB, Group, fmt_s, fmt_x, median, shapes_file, steady, verdict

TARGET_TLS_FLOOR = 1.5  # TLS star round trip / raw gloo floor, at K = 4
TARGET_FLOWER = 10.0  # Flower's round / the TLS star's, at least
TARGET_MEMORY = 3.0  # aggregator peak RSS above its import floor / fp32 model, at K = 8


def make_pki(work: Path, silos: int) -> Path:
    """Throwaway certificates for rank 0 (on 127.0.0.1) and ranks 1..silos."""
    from fedsilo import certs

    pki = work / "pki"
    if not (pki / f"silo-{silos}.pem").exists():
        pki.mkdir(parents=True, exist_ok=True)
        ca_cert, ca_key = certs.init_ca(pki, force=True)
        certs.issue(pki, ca_cert, ca_key, "aggregator", hosts=["127.0.0.1"], force=True)
        for rank in range(1, silos + 1):
            certs.issue(pki, ca_cert, ca_key, "silo", rank, force=True)
    return pki


def ranks(
    size: str, silos: int, kinds: str, rounds: int, blocks: int, work: Path, pki: Path, shapes: Path, *extra: str
) -> dict[str, Any]:
    """Rank 0's timings from K + 1 roundtrip.py ranks running ``kinds`` (``extra``: more of its flags)."""
    port, out = bench.free_port(), work / f"tls-{size}-k{silos}-{kinds.replace(',', '-')}.json"
    out.unlink(missing_ok=True)
    group = Group(work / "logs" / out.stem, bench.mem_available() - GIB, timeout=1800)
    bench.start_ranks(
        group, silos, shapes, port, rounds, blocks, work, out, "--kinds", kinds, "--tls-pki", str(pki), *extra
    )
    result = group.wait()
    if result.status != "ok":
        return {"status": result.status}
    return {"status": "ok", **json.loads(out.read_text())}


def slope(values: list[int]) -> float:
    """Least-squares bytes per round."""
    xs = range(len(values))
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(values)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, values, strict=False)) / sum(
        (x - mean_x) ** 2 for x in xs
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="22M, K = 2 and 4, fewer rounds")
    parser.add_argument("--workdir", type=Path, default=HERE / ".work", help="scratch space")
    parser.add_argument("--no-flower", action="store_true", help="skip Flower (its setup takes minutes)")
    parser.add_argument("--flower-mem-gb", type=float, default=14.0)
    parser.add_argument(
        "--parts", default="roundtrip,memory", help="which tables: roundtrip (with Flower), memory, or both"
    )
    args = parser.parse_args()
    plan = bench.QUICK if args.quick else bench.FULL
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    pki = make_pki(work, max(plan.silos))
    parts = set(args.parts.split(","))
    flower_missing = (
        "skipped (--no-flower)"
        if args.no_flower or "roundtrip" not in parts
        else bench.ensure_setup("setup-flower.sh", bench.FLOWER_PY, True, work / "setup-flower.log")
    )

    lines = [
        "| size | K | gloo floor (s) | fedsilo gloo (s) | TLS star (s) | TLS / floor | Flower (s) | "
        "Flower / TLS | limit: in + out per round at the aggregator |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    verdicts: list[str] = []
    for size in plan.sizes if "roundtrip" in parts else ():
        shapes, numel = shapes_file(size, work)
        for silos in plan.silos:
            print(f"{size} K={silos}: gloo, floor and TLS blocks ...", flush=True)
            got = ranks(size, silos, "fedsilo,floor,tls", plan.rounds, plan.blocks, work, pki, shapes)
            floor, gloo, tls = (
                median(steady(got.get(k, []))) for k in ("floor_seconds", "fedsilo_comm_seconds", "tls_comm_seconds")
            )
            if flower_missing:
                flower, flower_note = float("nan"), flower_missing
            else:
                print(f"{size} K={silos}: Flower ...", flush=True)
                f = bench.flower_roundtrip(size, silos, plan, work, shapes, int(args.flower_mem_gb * GIB))
                flower, flower_note = median(steady(f.get("rounds", []))), f["status"]
            moved = silos * numel * 4 / 1e6
            lines.append(
                f"| {size} | {silos} | {fmt_s(floor)} | {fmt_s(gloo)} | {fmt_s(tls)} | {fmt_x(tls / floor)} | "
                f"{fmt_s(flower) if flower == flower else flower_note} | {fmt_x(flower / tls)} | "
                f"{moved:.0f} MB in + {moved:.0f} MB out |"
            )
            if got["status"] != "ok":
                lines[-1] += f" ({got['status']})"
            if silos == 4:
                verdicts.append(
                    f"TLS star / gloo floor at {size}, K = 4: {fmt_x(tls / floor)} against <= "
                    f"{TARGET_TLS_FLOOR}x: {verdict(tls / floor, TARGET_TLS_FLOOR, False)}"
                )
            verdicts.append(
                f"Flower / TLS star at {size}, K = {silos}: {fmt_x(flower / tls)} against >= "
                f"{TARGET_FLOWER}x: {verdict(flower / tls, TARGET_FLOWER, True)}"
            )

    memory = [
        "",
        "| size | K | rounds | model (MiB) | rank-0 import floor (MiB) | peak (MiB) | peak above floor / model "
        "| RSS slope (KiB/round) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    silos, rounds = max(plan.silos), 50 if not args.quick else 10
    for size in plan.sizes if "memory" in parts else ():
        shapes, numel = shapes_file(size, work)
        print(f"{size} K={silos}: TLS only, {rounds} rounds, aggregator memory ...", flush=True)
        got = ranks(size, silos, "tls", rounds, 1, work, pki, shapes)
        if got["status"] != "ok":
            memory.append(f"| {size} | {silos} | {rounds} | {numel * 4 / MIB:.0f} | {got['status']} |||")
            continue
        above = (got["peak_rss_bytes"] - got["import_floor_rss"]) / (numel * 4)
        per_round = slope(got["tls_rss_by_round"][5:]) / 1024  # after the first rounds' allocations settle
        memory.append(
            f"| {size} | {silos} | {rounds} | {numel * 4 / MIB:.0f} | {got['import_floor_rss'] / MIB:.0f} | "
            f"{got['peak_rss_bytes'] / MIB:.0f} | {fmt_x(above)} | {per_round:.1f} |"
        )
        verdicts.append(
            f"aggregator peak above the import floor at {size}, K = {silos}: {fmt_x(above)} against <= "
            f"{TARGET_MEMORY}x: {verdict(above, TARGET_MEMORY, False)}"
        )
    text = "\n".join([*lines, *memory, "", *[f"- {v}" for v in verdicts]])
    (work / "tls.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
