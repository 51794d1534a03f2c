"""Lightning DDP on the CPU: two processes (gloo) train one policy through `labkit.policies.fit`.

Each rank must draw its own batches (else DDP does the same work twice) and end with the same
weights (gradients are all-reduced). The training script runs in a subprocess, because Lightning's
DDP launcher re-runs the script for the second rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # two DDP processes (still in make test; skipped by make test-fast)

SCRIPT = textwrap.dedent('''
    import json, sys
    import labkit
    import lightning as L
    import torch
    from labkit.data import DATASETS
    from labkit.data import load_dataset
    from labkit.policies import BCPolicy, fit

    out = sys.argv[1]

    class Record(L.Callback):
        """Per rank: a fingerprint of the first batch, the losses, and the final weights' checksum."""
        def __init__(self):
            self.first, self.losses = None, []
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if self.first is None:
                self.first = float(batch["action"].sum())
            self.losses.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))
        def on_train_end(self, trainer, module):
            weights = sum(float(p.double().sum()) for p in module.parameters())
            with open(f"{out}/rank{trainer.global_rank}.json", "w") as f:
                json.dump({"world": trainer.world_size, "first": self.first, "losses": self.losses,
                           "weights": weights, "strategy": type(trainer.strategy).__name__,
                           "backend": torch.distributed.get_backend()}, f)

    data = load_dataset(DATASETS / "detour").select(list(range(20)))
    policy = BCPolicy.from_dataset(data, horizon=8, n_action_steps=4)
    fit(policy, data, steps=40, batch_size=64, progress=False, accelerator="cpu", devices=2, strategy="ddp",
        callbacks=[Record()])
''')


def test_ddp_two_cpu_processes(tmp_path):
    script = tmp_path / "train_ddp.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2] and ranks[0]["backend"] == "gloo", ranks[0]
    assert ranks[0]["first"] != ranks[1]["first"], "both ranks trained on the same batches"
    assert abs(ranks[0]["weights"] - ranks[1]["weights"]) < 1e-6, "the ranks' weights diverged"
    for r in ranks:
        assert len(r["losses"]) == 40 and r["losses"][-1] < r["losses"][0]
