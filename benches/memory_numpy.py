"""NumPy baseline for benches/memory_step.rs: the same per-step ODC memory operations, written
the way the reference (OpenSelfSup ODCMemory / conformance odc_ref.py) does them: a full
np.bincount over the label bank for every size query, np.where over the whole label bank per
small cluster, and a sort-based full centroid recompute. float32 throughout (like the official
GPU code) so BLAS does the relabel product.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python3 benches/memory_numpy.py

Sizes from env, same names as the Rust bench: ODC_BENCH_M, _K, _D, _B, _STEPS, _RECOMPUTES, _SMALL.
"""
import os
import time

import numpy as np

M = int(os.environ.get("ODC_BENCH_M", 1281167))
K = int(os.environ.get("ODC_BENCH_K", 10000))
D = int(os.environ.get("ODC_BENCH_D", 256))
B = int(os.environ.get("ODC_BENCH_B", 512))
STEPS = int(os.environ.get("ODC_BENCH_STEPS", 20))
RECOMPUTES = int(os.environ.get("ODC_BENCH_RECOMPUTES", 3))
N_SMALL = int(os.environ.get("ODC_BENCH_SMALL", 5))
MIN_CLUSTER = 20
EPS = 1e-10


def normalise(x):
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + EPS)


def update_centroids(bank, labels, centroids, cinds=None):
    if cinds is None:
        # sort-based grouping, as get_indices_sparse/argsort implementations do
        order = np.argsort(labels, kind="stable")
        counts = np.bincount(labels, minlength=K)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        nz = counts > 0
        sums = np.add.reduceat(bank[order], starts[nz], axis=0)
        centroids[nz] = sums / counts[nz, None]
    else:
        for c in cinds:
            idx = np.where(labels == c)[0]
            if len(idx):
                centroids[c] = bank[idx].mean(axis=0)


def update_samples(bank, labels, centroids, idx, feats, momentum=0.5):
    f_hat = normalise(feats)
    m = normalise((1 - momentum) * bank[idx] + momentum * f_hat)
    bank[idx] = m
    new = np.argmax(m @ centroids.T, axis=1)
    change = int((new != labels[idx]).sum())
    labels[idx] = new
    return change


def class_weights(labels):
    n = np.bincount(labels, minlength=K).astype(np.float64)
    u = (n + 1e-5) ** -0.5
    return (u / u.sum()).astype(np.float32)


def two_means(x, rounds=20):
    x = x.astype(np.float64)
    far = int(np.argmax(((x - x[0]) ** 2).sum(1)))
    c0, c1 = x[0].copy(), x[far].copy()
    assign = None
    for _ in range(rounds):
        new = ((x - c1) ** 2).sum(1) < ((x - c0) ** 2).sum(1)
        if assign is not None and np.array_equal(new, assign):
            break
        assign = new
        if (~assign).any():
            c0 = x[~assign].mean(0)
        if assign.any():
            c1 = x[assign].mean(0)
    if assign.all() or not assign.any():
        assign = np.zeros(len(x), dtype=bool)
        assign[1::2] = True
    return assign


def deal_with_small_clusters(bank, labels, centroids):
    sizes = np.bincount(labels, minlength=K)
    small = np.where(sizes < MIN_CLUSTER)[0]
    if len(small) == 0:
        return 0
    allowed = np.setdiff1d(np.arange(K), small)
    for s in small:
        idx = np.where(labels == s)[0]
        if len(idx):
            labels[idx] = allowed[np.argmax(bank[idx] @ centroids[allowed].T, axis=1)]
    for e in small:
        sizes = np.bincount(labels, minlength=K)
        big = int(np.argmax(sizes))
        idx = np.where(labels == big)[0]
        labels[idx[two_means(bank[idx])]] = e
        update_centroids(bank, labels, centroids, [big, e])
    return len(small)


def make_small(bank, labels, rng, count):
    for _ in range(count):
        c = int(rng.integers(K))
        idx = np.where(labels == c)[0][3:]
        labels[idx] = (c + 1) % K


def report(name, ms):
    ms = np.sort(np.asarray(ms))
    print(f"{name:<44} {len(ms):>6} {ms.mean():>10.3f} {ms[len(ms) // 2]:>10.3f} {ms[-1]:>10.3f}")


def main():
    print(f"numpy memory bench: M={M} K={K} D={D} B={B} steps={STEPS} numpy {np.__version__}")
    rng = np.random.default_rng(1)
    t = time.perf_counter()
    bank = normalise(rng.random((M, D), dtype=np.float32))
    labels = rng.integers(0, K, M)
    centroids = np.zeros((K, D), dtype=np.float32)
    update_centroids(bank, labels, centroids)
    print(f"setup: {1e3 * (time.perf_counter() - t):.0f} ms")
    deal_with_small_clusters(bank, labels, centroids)
    upd, small, none_small, weights, total, recompute = [], [], [], [], [], []
    for _ in range(STEPS):
        idx = rng.integers(0, M, B)
        feats = rng.random((B, D), dtype=np.float32)
        make_small(bank, labels, rng, N_SMALL)
        t0 = time.perf_counter()
        update_samples(bank, labels, centroids, idx, feats)
        t1 = time.perf_counter()
        deal_with_small_clusters(bank, labels, centroids)
        t2 = time.perf_counter()
        class_weights(labels)
        t3 = time.perf_counter()
        deal_with_small_clusters(bank, labels, centroids)
        t4 = time.perf_counter()
        upd.append(1e3 * (t1 - t0))
        small.append(1e3 * (t2 - t1))
        weights.append(1e3 * (t3 - t2))
        none_small.append(1e3 * (t4 - t3))
        total.append(1e3 * (t3 - t0))
    for _ in range(RECOMPUTES):
        t0 = time.perf_counter()
        update_centroids(bank, labels, centroids)
        recompute.append(1e3 * (time.perf_counter() - t0))
    print(f"{'operation':<44} {'runs':>6} {'mean ms':>10} {'median ms':>10} {'max ms':>10}")
    report("update_samples (momentum + relabel, B rows)", upd)
    report("deal_with_small_clusters (few small)", small)
    report("deal_with_small_clusters (none small)", none_small)
    report("class_weights (full bincount)", weights)
    report("per-step total (upd + small + weights)", total)
    report("update_centroids (full recompute)", recompute)


if __name__ == "__main__":
    main()
