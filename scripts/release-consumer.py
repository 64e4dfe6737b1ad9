#!/usr/bin/env python3
"""A consumer of odcd releases, as a user would write one (docs/embeddings.md, "Releases").

Reads only what `CURRENT` names: the current release's Parquet parts, with pyarrow, counts
them again with DuckDB, loads the vectors into a FAISS inner-product index (odcd's release
vectors are already centred and L2-normalised, so inner product = cosine), and scores the
index: leave-one-out weighted k-NN top-1 against the rows' `class_label` (exp(sim / 0.07)
votes over the k nearest other rows, as `odcd eval` votes). With --idx, the same k-NN on
the raw pixels of the same keys, centred and normalised the same way: the baseline a
release must beat.

  scripts/release-consumer.py RELEASES_DIR [--k 20] [--idx IMAGES.gz --idx-prefix P] [--json]

RELEASES_DIR is `[releases] url` as a local path. Keys are matched to IDX images by the
`<prefix>-<index>` names `odcd shards import-idx` gives them. Exit status 1 when the release
breaks a consumer's expectations (a key twice, rows of another release, a vector not of
unit length).
Needs: pip install pyarrow duckdb faiss-cpu numpy
"""

import argparse
import gzip
import json
import pathlib
import sys

import duckdb
import faiss
import numpy as np
import pyarrow.parquet as pq

TEMPERATURE = 0.07


def loo_knn(x, labels, k):
    """Leave-one-out weighted k-NN top-1 of the rows of x (unit rows, float32)."""
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    sims, ids = index.search(x, k + 1)
    classes = int(labels.max()) + 1
    correct = 0
    for i in range(len(x)):
        keep = ids[i] != i
        s, j = sims[i][keep][:k], ids[i][keep][:k]
        votes = np.zeros(classes)
        np.add.at(votes, labels[j], np.exp(s / TEMPERATURE))
        correct += int(np.argmax(votes) == labels[i])
    return correct / len(x)


def centred_unit(x):
    x = x - x.mean(axis=0, keepdims=True)
    return (x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-10)).astype(np.float32)


def idx_images(path):
    with gzip.open(path, "rb") if str(path).endswith(".gz") else open(path, "rb") as f:
        data = f.read()
    n, rows, cols = (int.from_bytes(data[i:i + 4], "big") for i in (4, 8, 12))
    return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(n, rows * cols)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("releases")
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--idx", help="IDX images file the catalog was made from (raw-pixel baseline)")
    ap.add_argument("--idx-prefix", help="the --prefix of `odcd shards import-idx`")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    root = pathlib.Path(args.releases)
    current = json.loads((root / "CURRENT").read_text())
    parts = sorted((root / current["prefix"] / "parts").glob("*.parquet"))
    table = pq.read_table(parts, columns=["key", "release", "class_label", "embedding"])
    keys = table.column("key").to_pylist()
    releases = sorted(set(table.column("release").to_pylist()))
    # The same files through DuckDB, as an analyst would query them.
    glob = str(root / current["prefix"] / "parts" / "*.parquet")
    duck_rows, duck_keys = duckdb.sql(
        f"SELECT count(*), count(DISTINCT key) FROM read_parquet('{glob}')"
    ).fetchall()[0]
    x = np.asarray(table.column("embedding").combine_chunks().flatten(), dtype=np.float32)
    x = x.reshape(len(keys), current["dim"])
    norms = np.linalg.norm(x, axis=1)
    labels = np.asarray(table.column("class_label").fill_null(-1), dtype=np.int64)
    out = {
        "release": current["release"],
        "releases": releases,
        "rows": len(keys),
        "keys": len(set(keys)),
        "duckdb_rows": duck_rows,
        "duckdb_keys": duck_keys,
        "dim": current["dim"],
        "min_norm": float(norms.min()) if len(norms) else None,
        "max_norm": float(norms.max()) if len(norms) else None,
        "k": args.k,
    }
    labelled = labels >= 0
    if labelled.sum() > args.k:
        out["knn_loo"] = loo_knn(np.ascontiguousarray(x[labelled]), labels[labelled], args.k)
    if args.idx and labelled.sum() > args.k:
        images = idx_images(args.idx)
        prefix = (args.idx_prefix or "") + "-"
        rows = np.array([int(k[len(prefix):]) for k in np.array(keys)[labelled]])
        px = centred_unit(images[rows].astype(np.float32))
        out["pixels_knn_loo"] = loo_knn(px, labels[labelled], args.k)
    ok = (
        out["rows"] == out["keys"] == duck_rows == duck_keys
        and releases == [current["release"]]
        and (not len(norms) or abs(out["min_norm"] - 1) < 1e-3 and abs(out["max_norm"] - 1) < 1e-3)
    )
    out["ok"] = bool(ok)
    if args.json:
        print(json.dumps(out))
    else:
        print(f"release {out['release']}: {out['rows']} rows, {out['keys']} keys, dim {out['dim']}, "
              f"releases in the rows {releases}, norms {out['min_norm']:.4f}..{out['max_norm']:.4f}")
        if "knn_loo" in out:
            line = f"leave-one-out weighted k-NN@{args.k}: release {100 * out['knn_loo']:.2f}%"
            if "pixels_knn_loo" in out:
                line += f", raw pixels {100 * out['pixels_knn_loo']:.2f}%"
            print(line)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
