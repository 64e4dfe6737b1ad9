"""The same training step as benches/train_step.rs, in PyTorch on the CPU (or DEVICE=cuda).

ResNet (torchvision shapes, standard stem) -> ODC neck (Linear, BatchNorm1d affine off,
ReLU, Dropout, Linear, ReLU) -> head Linear(256 -> K); weighted cross-entropy; SGD momentum 0.9
(head momentum 0). Median step time of STEPS steps after one warm-up step.

    OMP_WAIT_POLICY=PASSIVE python3 benches/train_step_torch.py            # ResNet-18 3x32x32 b64
    ARCH=resnet50 SIZE=64 BATCH=32 OMP_WAIT_POLICY=PASSIVE python3 benches/train_step_torch.py
    DEVICE=cuda ARCH=resnet50 SIZE=224 BATCH=64 python3 benches/train_step_torch.py  # GPU, fp32

On a GPU each phase ends with torch.cuda.synchronize(), as odcd's bench synchronises its device,
and the convolutions run in plain fp32 like candle's (PyTorch's cuDNN default is TF32; TF32=1
allows it).

Needs `pip install torch` (not torchvision: the blocks are written out here).
"""
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

ARCH = os.environ.get("ARCH", "resnet18")
SIZE = int(os.environ.get("SIZE", 32))
BATCH = int(os.environ.get("BATCH", 64))
STEPS = int(os.environ.get("STEPS", 5))
K = int(os.environ.get("K", 10))
DEVICE = torch.device(os.environ.get("DEVICE", "cpu"))
torch.backends.cudnn.allow_tf32 = os.environ.get("TF32") == "1"
torch.backends.cuda.matmul.allow_tf32 = os.environ.get("TF32") == "1"
torch.set_num_threads(int(os.environ.get("THREADS", os.cpu_count() or 1)))


class Basic(nn.Module):
    exp = 1

    def __init__(self, cin, w, s):
        super().__init__()
        self.c1 = nn.Conv2d(cin, w, 3, s, 1, bias=False)
        self.b1 = nn.BatchNorm2d(w)
        self.c2 = nn.Conv2d(w, w, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(w)
        self.ds = None
        if s != 1 or cin != w:
            self.ds = nn.Sequential(nn.Conv2d(cin, w, 1, s, bias=False), nn.BatchNorm2d(w))

    def forward(self, x):
        y = F.relu(self.b1(self.c1(x)))
        y = self.b2(self.c2(y))
        return F.relu(y + (self.ds(x) if self.ds is not None else x))


class Bottle(nn.Module):
    exp = 4

    def __init__(self, cin, w, s):
        super().__init__()
        self.c1 = nn.Conv2d(cin, w, 1, bias=False)
        self.b1 = nn.BatchNorm2d(w)
        self.c2 = nn.Conv2d(w, w, 3, s, 1, bias=False)
        self.b2 = nn.BatchNorm2d(w)
        self.c3 = nn.Conv2d(w, w * 4, 1, bias=False)
        self.b3 = nn.BatchNorm2d(w * 4)
        self.ds = None
        if s != 1 or cin != w * 4:
            self.ds = nn.Sequential(nn.Conv2d(cin, w * 4, 1, s, bias=False), nn.BatchNorm2d(w * 4))

    def forward(self, x):
        y = F.relu(self.b1(self.c1(x)))
        y = F.relu(self.b2(self.c2(y)))
        y = self.b3(self.c3(y))
        return F.relu(y + (self.ds(x) if self.ds is not None else x))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        block, depths = (Basic, [2, 2, 2, 2]) if ARCH == "resnet18" else (Bottle, [3, 4, 6, 3])
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        layers, cin = [], 64
        for i, (d, w) in enumerate(zip(depths, [64, 128, 256, 512])):
            for j in range(d):
                layers.append(block(cin, w, 2 if (j == 0 and i > 0) else 1))
                cin = w * block.exp
        self.layers = nn.Sequential(*layers)
        self.neck = nn.Sequential(
            nn.Linear(cin, 512), nn.BatchNorm1d(512, momentum=0.001, affine=False), nn.ReLU(),
            nn.Dropout(0.5), nn.Linear(512, 256), nn.ReLU())
        self.head = nn.Linear(256, K)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        x = self.layers(x).mean((2, 3))
        return self.head(self.neck(x))


def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


net = Net().to(DEVICE).train()
head = [p for n, p in net.named_parameters() if n.startswith("head.")]
rest = [p for n, p in net.named_parameters() if not n.startswith("head.")]
opt = torch.optim.SGD([{"params": rest}, {"params": head, "momentum": 0.0}], lr=0.06,
                      momentum=0.9, weight_decay=1e-5)
x = torch.randn(BATCH, 3, SIZE, SIZE, device=DEVICE)
y = torch.arange(BATCH, device=DEVICE) % K
w = torch.ones(K, device=DEVICE)
times, tf, tb = [], [], []
for step in range(STEPS + 1):
    t0 = time.perf_counter()
    loss = F.cross_entropy(net(x), y, weight=w)
    sync()
    t1 = time.perf_counter()
    opt.zero_grad()
    loss.backward()
    sync()
    t2 = time.perf_counter()
    opt.step()
    sync()
    t3 = time.perf_counter()
    if step > 0:
        times.append(t3 - t0)
        tf.append(t1 - t0)
        tb.append(t2 - t1)
med = lambda v: sorted(v)[len(v) // 2]
s = med(times)
print(f"pytorch {torch.__version__} {ARCH} 3x{SIZE}x{SIZE} batch {BATCH} on {DEVICE}: step {s*1e3:.1f} ms "
      f"(forward {med(tf)*1e3:.1f} ms, backward {med(tb)*1e3:.1f} ms, fastest step {min(times)*1e3:.1f} ms), "
      f"{BATCH/s:.1f} images/s, "
      f"threads {torch.get_num_threads()}")
