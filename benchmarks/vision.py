"""Speed of labkit's pixel pipeline on this machine; writes benchmarks/vision_results.json.

    python benchmarks/vision.py [--quick] [--threads N] [--only encoders policies inference memory]

1. Encoder training steps/s: each image encoder (ConvEncoder with Mish, as it was, and with ReLU;
   KeypointEncoder, channels-last as labkit builds it and converted back to contiguous) at 64, 84 and
   96 px, on a batch of 64 windows x 2 frames (128 random uint8 images), forward + backward + AdamW
   step on a linear head's MSE. Three paths on identical copies of one model (same weights, batch,
   loss and optimiser), measured in alternation: a plain PyTorch loop (`x.permute(0, 3, 1, 2).float()
   / 255`, the model, the loss: no labkit code), labkit's encoder call without augmentation (what its
   wrapper adds: `to_float`, the checks) and labkit's call as a policy trains it (with the random shift).
2. Policy training steps/s through `labkit.policies.fit` (flow, MLP-FiLM, SiLU, chunk 16, obs history 2)
   on the shipped `arm` (state) and `arm_pixels` (joints + two 64 px cameras) datasets, per image
   encoder (batch 256; 64 for encoders trained end to end). A Lightning callback times the steps of
   one `fit` after its first two (the warm-up), and the set-up before its first step (the windows, the
   Trainer, a frozen encoder's one-off precompute of every frame's features) on its own. Also the
   frozen encoder's precompute time per 1,000 frames. While the shipped arm encoders' weight files
   do not exist, untrained stand-ins of the same architecture are used (same cost; nothing written).
3. Inference: milliseconds per action chunk (`predict_action_chunk`, batch 1, 10 flow steps, one
   torch thread, EMA weights), median of 30 calls, for each policy of part 2.
4. Frame cache memory: bytes of the uint8 frames per 10,000 frames at 64/84/96 px, the old way (every
   training window's frames gathered up front: obs_horizon copies) against `FrameTable` (one copy), and
   the resident memory measured while loading `arm_pixels` in a fresh process.

--quick: shorter timings and 20 episodes per dataset (a smoke run; its numbers are noisy). The results
file records which mode wrote it.
"""

from __future__ import annotations

# isort: off
import labkit  # noqa: F401  (first: picks the headless GL backend before mujoco is imported)
# isort: on

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from run import median_ms  # benchmarks/run.py: `python benchmarks/vision.py` puts benchmarks/ on sys.path
from torch import nn

HERE = Path(__file__).resolve().parent
SIZES = (64, 84, 96)
WINDOWS, FRAMES = 64, 2  # a batch of 64 windows of 2 frames: 128 images per step
PIXEL_KEYS = ("observation.joints", "observation.images.top", "observation.images.wrist")


def _rate(fn, seconds: float, min_calls: int = 2) -> float:
    """Calls per second of fn over about `seconds` and at least `min_calls` calls (after one warm-up call)."""
    fn()
    n, start = 0, time.perf_counter()
    while n < min_calls or time.perf_counter() - start < seconds:
        fn()
        n += 1
    return n / (time.perf_counter() - start)


# ---- 1. encoders --------------------------------------------------------------------------------
def _encoders() -> dict:
    """name -> (a function building the encoder, whether the plain loop feeds it contiguous NCHW)."""
    from labkit.vision import ConvEncoder, KeypointEncoder

    return {
        "conv, Mish (as it was)": (lambda: ConvEncoder(64, 32), False),
        "conv, ReLU": (lambda: ConvEncoder(64, 32, act=nn.ReLU), False),
        "keypoints, channels-last": (lambda: KeypointEncoder(keypoints=32, channels=16), False),
        "keypoints, contiguous": (lambda: KeypointEncoder(keypoints=32, channels=16)
                                  .to(memory_format=torch.contiguous_format), True),
    }


class _Head(nn.Module):
    """The encoder and a linear head on each window's two frames' features (as a policy reads them)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(FRAMES * encoder.out_dim, 32)


def bench_encoders(seconds: float, rounds: int) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for name, (build, contiguous) in _encoders().items():
        for size in SIZES:
            images = torch.randint(0, 256, (WINDOWS * FRAMES, size, size, 3), dtype=torch.uint8, generator=gen)
            target = torch.randn(WINDOWS, 32, generator=gen)
            torch.manual_seed(0)
            base = _Head(build()).train()
            models = {p: copy.deepcopy(base) for p in ("plain", "labkit", "labkit_shift")}
            models["labkit"].encoder.augment = False  # the wrapper alone: to_float and the checks
            models["labkit_shift"].encoder.augment = True  # as a policy trains it: + random shift (DrQ)
            opts = {p: torch.optim.AdamW(m.parameters(), lr=1e-3) for p, m in models.items()}

            def step(path, m, opt, images=images, target=target, contiguous=contiguous):
                if path == "plain":  # no labkit code: the layout change by hand, then the model itself
                    x = images.permute(0, 3, 1, 2).float() / 255
                    feats = m.encoder.features(x.contiguous() if contiguous else x)
                else:
                    feats = m.encoder(images)
                loss = F.mse_loss(m.head(feats.view(WINDOWS, -1)), target)
                opt.zero_grad()
                loss.backward()
                opt.step()

            rates = {p: [] for p in models}
            for _ in range(rounds):  # alternated, so that another job's load falls on every path alike
                for p, m in models.items():
                    rates[p].append(_rate(lambda p=p, m=m, opt=opts[p]: step(p, m, opt), seconds))
            row = {"encoder": name, "image_size": size, "images_per_step": WINDOWS * FRAMES,
                   "params": sum(p.numel() for p in base.encoder.parameters())}
            for p, r in rates.items():
                row[f"{p}_steps_per_s"] = statistics.median(r)
            for p in ("labkit", "labkit_shift"):  # median of each round's own ratio
                row[f"{p}_of_plain"] = statistics.median(a / b for a, b in zip(rates[p], rates["plain"], strict=True))
            rows.append(row)
            print(f"{name:26s} {size:3d} px  plain {row['plain_steps_per_s']:6.2f}  labkit {row['labkit_steps_per_s']:6.2f}"
                  f" ({row['labkit_of_plain']:.2f})  + shift {row['labkit_shift_steps_per_s']:6.2f}"
                  f" ({row['labkit_shift_of_plain']:.2f}) steps/s", flush=True)
    return rows


# ---- 2. policies --------------------------------------------------------------------------------
def _pretrained_config() -> tuple[dict, str]:
    """Config for the shipped frozen arm encoders; while their weight files are not there, untrained
    stand-ins of the same architecture (their meta in the config: nothing is read or written), which
    cost exactly the same to run."""
    from labkit.data.keys import env_key
    from labkit.vision import PretrainedEncoder
    from labkit.vision.encoders import WEIGHTS, pretrained_name
    from labkit.vision.pretrain import ARM_TARGETS

    cameras = [k for k in PIXEL_KEYS if k.startswith("observation.images.")]
    if all((WEIGHTS / f"{pretrained_name('arm', k)}.pt").exists() for k in cameras):
        return {"pretrained": "arm"}, "shipped weights"
    meta = {k: PretrainedEncoder(ARM_TARGETS, 64, "top" if env_key(k) == "pixels" else env_key(k), "arm").meta
            for k in cameras}
    return {"pretrained": "arm", "pretrained_meta": meta}, "untrained stand-in: arm weights not shipped yet"


class _StepTimer(L.Callback):
    """When `fit`'s first batch starts (the set-up before it: windows, a frozen encoder's precompute,
    the Trainer) and how long batches skip..n-1 take (the steps before `skip` are the warm-up)."""

    def __init__(self, skip: int = 2):
        self.skip = skip
        self.first = self.timed_from = self.end = 0.0

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == 0:
            self.first = time.perf_counter()
        if batch_idx == self.skip:
            self.timed_from = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.end = time.perf_counter()


def bench_policies(steps: int, episodes: int | None, calls: int = 30) -> tuple[list[dict], list[dict], list[dict]]:
    """Training rows, inference rows and precompute rows."""
    from labkit.data import DATASETS, load_dataset
    from labkit.policies import FlowPolicy, fit
    from labkit.training import quiet_lightning

    quiet_lightning()
    # A frozen encoder stays in eval mode inside a training policy, on purpose; Lightning warns about it.
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
    state = load_dataset(DATASETS / "arm")
    pixels = load_dataset(DATASETS / "arm_pixels")
    if episodes:
        state, pixels = state.select(range(episodes)), pixels.select(range(episodes))
    pre_cfg, pre_note = _pretrained_config()
    common = dict(horizon=16, n_action_steps=8, obs_horizon=2, activation="silu")
    cases = [
        ("state", state, {"obs_keys": ("observation.state",)}, 256, ""),
        ("pixels, conv (end to end)", pixels, {"obs_keys": PIXEL_KEYS, "image_encoder": "conv"}, 64,
         "ConvEncoder with ReLU (policies build it so), random shift"),
        ("pixels, keypoints (end to end)", pixels, {"obs_keys": PIXEL_KEYS, "image_encoder": "keypoints"}, 64,
         "random shift"),
        ("pixels, pretrained (frozen)", pixels, {"obs_keys": PIXEL_KEYS, "image_encoder": "pretrained", **pre_cfg},
         256, pre_note),
    ]
    train_rows, infer_rows, pre_rows = [], [], []
    for name, ds, cfg, batch, note in cases:
        policy = FlowPolicy.from_dataset(ds, **common, **cfg)
        params = sum(p.numel() for p in policy.model.parameters() if p.requires_grad)
        n = steps if batch == 64 else 10 * steps  # end-to-end pixel encoders are ~10x slower a step
        timer = _StepTimer(skip=2)
        start = time.perf_counter()
        fit(policy, ds, steps=n, batch_size=batch, progress=False, callbacks=[timer])
        total = time.perf_counter() - start
        rate = (n - timer.skip) / (timer.end - timer.timed_from)
        row = {"policy": name, "batch": batch, "trainable_params": params, "frames": len(ds), "steps": n,
               "train_steps_per_s": rate, "setup_s": timer.first - start, "fit_s": total, "note": note}
        train_rows.append(row)
        print(f"{name:32s} batch {batch:3d}  {rate:7.2f} steps/s  set-up {row['setup_s']:5.1f} s"
              f"  ({len(ds)} frames){'  [' + note + ']' if note else ''}", flush=True)

        if cfg.get("image_encoder") == "pretrained":  # the one-off precompute on its own
            enc = policy.model["encoder"]
            for key in enc.image_keys:
                frames = torch.as_tensor(ds.frames[key][:1000])
                enc.encoder(key).precompute(frames[:64])
                start = time.perf_counter()
                enc.encoder(key).precompute(frames)
                sec = (time.perf_counter() - start) * 1000 / len(frames)
                pre_rows.append({"camera": key, "variants": 4, "s_per_1000_frames": sec, "threads": torch.get_num_threads()})
                print(f"  precompute {key}: {sec:.2f} s per 1,000 frames (4 variants each)", flush=True)

        # 3. inference: one observation history, batch 1, one thread
        obs_idx, _, _ = ds.window_indices(2, 16)
        one = {k: torch.as_tensor(ds.frames[k][obs_idx[len(ds) // 2:len(ds) // 2 + 1]]) for k in cfg["obs_keys"]}
        policy.config.steps = 10
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            ms = median_ms(lambda p=policy, o=one: p.predict_action_chunk(o), calls)
        finally:
            torch.set_num_threads(threads)
        infer_rows.append({"policy": name, "flow_steps": 10, "ms_per_chunk": ms, "calls": calls})
        print(f"  {ms:.2f} ms per chunk (median of {calls}, 1 thread)", flush=True)
    return train_rows, infer_rows, pre_rows


# ---- 4. memory ----------------------------------------------------------------------------------
_LOAD = r"""
import json, resource, sys, time
import labkit
from labkit.data import DATASETS, load_dataset

def rss():  # current resident set, bytes
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()

def peak():  # peak resident set of this process image, bytes. Not getrusage's ru_maxrss: on Linux a
    # child starts with its parent's peak (kept across fork and exec), which hid the growth here.
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))

peak0, now0 = peak(), rss()
start = time.perf_counter()
ds = load_dataset(DATASETS / "arm_pixels")
out = {"load_s": time.perf_counter() - start, "peak_rss_growth": peak() - peak0,
       "rss_growth": rss() - now0, "frames": len(ds),
       "image_bytes": sum(v.nbytes for k, v in ds.frames.items() if k.startswith("observation.images."))}
keys = [k for k in ds.frames if k.startswith("observation.images.")]
before = rss()
old = ds.windows(2, 16, keys=keys)  # the old way: every window's frames gathered up front
out["old_windows_rss_growth"] = rss() - before
out["old_windows_bytes"] = sum(v.nbytes for v in old["obs"].values())
print(json.dumps(out))
"""


def bench_memory() -> dict:
    obs_horizon = 2
    computed = []
    for size in SIZES:
        per_camera = 10_000 * size * size * 3
        computed.append({"image_size": size, "frame_cache_bytes_per_10k_frames_per_camera": per_camera,
                         "frame_table_bytes": per_camera + 10_000 * obs_horizon * 8,  # + its int64 index
                         "old_windows_bytes": per_camera * obs_horizon})
        print(f"{size:3d} px: {per_camera / 2**20:6.1f} MiB per 10,000 frames per camera; FrameTable "
              f"{computed[-1]['frame_table_bytes'] / 2**20:6.1f} MiB, old windows (x{obs_horizon}) "
              f"{computed[-1]['old_windows_bytes'] / 2**20:6.1f} MiB", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _LOAD], capture_output=True, text=True, env=env,
                          cwd=HERE.parent, check=False)
    if proc.returncode != 0:
        print(proc.stderr[-2000:])
        return {"computed": computed, "arm_pixels": {"error": proc.stderr[-500:]}}
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    m["frame_table_bytes"] = m["image_bytes"] + m["frames"] * obs_horizon * 8 * 2  # one index per camera
    print(f"arm_pixels ({m['frames']} frames, 2 cameras, 64 px): frames {m['image_bytes'] / 2**20:.0f} MiB; "
          f"loading took {m['load_s']:.1f} s, peak RSS +{m['peak_rss_growth'] / 2**20:.0f} MiB, "
          f"RSS after +{m['rss_growth'] / 2**20:.0f} MiB; old windows {m['old_windows_bytes'] / 2**20:.0f} MiB "
          f"(RSS +{m['old_windows_rss_growth'] / 2**20:.0f} MiB) vs FrameTable {m['frame_table_bytes'] / 2**20:.0f} MiB",
          flush=True)
    return {"computed": computed, "arm_pixels": m}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="short timings, 20 episodes (a smoke run)")
    p.add_argument("--threads", type=int, help="torch threads for training (default: torch's own)")
    p.add_argument("--only", choices=["encoders", "policies", "memory"], action="append",
                   help="run only these parts (policies includes inference) and update them in the results")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    machine = {"cpu": platform.processor() or platform.machine(), "platform": platform.platform(),
               "cores": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
               "load_average": os.getloadavg(), "date": datetime.datetime.now().isoformat(timespec="minutes"),
               "mode": "quick" if a.quick else "full"}
    print(machine)
    path = HERE / "vision_results.json"
    results = json.loads(path.read_text()) if path.exists() and a.only else {}
    results["machine"] = machine
    chosen = a.only or ["encoders", "policies", "memory"]
    if "encoders" in chosen:
        print("\n1. encoder training steps/s (128 images a step; ratio to the plain loop in brackets)")
        results["encoders"] = bench_encoders(0.5 if a.quick else 3.0, 2 if a.quick else 5)
    if "policies" in chosen:
        print("\n2./3. policy training through fit, precompute, inference")
        train, infer, pre = bench_policies(6 if a.quick else 40, 20 if a.quick else None)
        results.update(policies=train, inference=infer, precompute=pre)
    if "memory" in chosen:
        print("\n4. frame cache memory")
        results["memory"] = bench_memory()
    path.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
