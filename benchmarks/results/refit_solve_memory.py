"""Peak RSS above its inputs during refit.fit (d_ff 3072, hidden 1024, float64 statistics, a kept
refit), sampled every 0.5 ms: the code before the in-place solve ("old", refit.py of 5b05236) vs this
checkout's ("new"). Run from the repository root, interleaved:

    git show 5b05236:src/come/refit.py | sed 's/from \.errors import/from come.errors import/' > /tmp/refit_old.py
    for i in 1 2 3 4 5; do for w in old new; do
        PYTHONPATH=/tmp:src python benchmarks/results/refit_solve_memory.py $w; done; done
"""
import sys, threading, time, os, importlib
import torch
torch.set_num_threads(1)
which, F, D = sys.argv[1], 3072, 1024
mod = importlib.import_module("refit_old") if which == "old" else importlib.import_module("come.refit")
page = os.sysconf("SC_PAGE_SIZE")
def rss(): return int(open("/proc/self/statm").read().split()[1]) * page
g = torch.Generator().manual_seed(0)
w_true = torch.randn(D, F, generator=g) / F**0.5
def eq(n):
    e = mod.NormalEquations.empty(F, D)
    for _ in range(n // 1000):
        x = torch.randn(1000, F, generator=g)
        t = x @ w_true.T + 0.1 * torch.randn(1000, D, generator=g)
        e.add(x, t, t)
    return e
train, hold = eq(6000), eq(2000)
w0 = torch.zeros(D, F)
import gc; gc.collect(); time.sleep(0.2)
base, peak, stop = rss(), [0], [False]
def watch():
    while not stop[0]:
        peak[0] = max(peak[0], rss()); time.sleep(0.0005)
t = threading.Thread(target=watch); t.start()
res = mod.fit(train, hold, w0, lambdas=(1e-3, 1e-2))
stop[0] = True; t.join()
print(which, f"peak above inputs {(peak[0] - base) / 2**20:.0f} MiB; f^2 float64 = {F*F*8/2**20:.0f} MiB, f x d = {F*D*8/2**20:.0f} MiB; lam {res.lam}; w sum {float(res.weight.sum()):.12e}")
