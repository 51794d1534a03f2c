"""Notebook regression: student copies are in sync, nothing is committed with outputs, every
solution notebook runs in FAST mode and meets its bars, and every student copy stops at its first
exercise.

Each lesson needs an entry in BARS: ``{metric_name: (op, bar)}`` with op one of ">=", "<=", "==",
"between" (bar = (lo, hi)). Metrics come from ``labkit.teach.record`` calls in the notebook.
"""

from __future__ import annotations

import nbformat
import pytest
from notebook_utils import (
    NOTEBOOKS,
    SOLUTIONS,
    assert_bars,
    assert_fails_at,
    first_stub_cell,
    run_notebook,
    stub_cells,
)

from labkit.teach import load_metrics, stale

# What each solution notebook must achieve in FAST mode (SEED=0). Keyed by file stem.
BARS: dict[str, dict[str, tuple]] = {
    "00_tour": {
        "detour_expert_success": (">=", 0.95),  # 20 episodes: the expert never fails here
        "pusht_expert_success": (">=", 0.85),  # measured 100% over 200 seeds; 17/20 allows one bad draw
        "detour_dataset_left_fraction": ("between", (0.35, 0.65)),  # the demos are bimodal
        "pusht_pixels_frames": (">=", 5000),
    },
    "01_behavior_cloning": {
        # Mode averaging is the lesson: MSE-BC drives into the wall (FAST, 300 steps: 100% of 10).
        "detour_bc_collision_rate": (">=", 0.6),
        "detour_bc_success": ("<=", 0.4),
        "detour_expert_success": (">=", 0.95),
        # PushT BC fails here at every chunking (see README); these catch broken numbers, not a level.
        "pusht_bc_coverage_h1": ("between", (0.0, 1.0)),
        "pusht_bc_coverage_h4": ("between", (0.0, 1.0)),
        "pusht_bc_coverage_h16": ("between", (0.0, 1.0)),
        "pusht_gap_cm_final_h1": ("between", (0.0, 60.0)),
    },
    "02_diffusion_and_flow": {
        # FAST (500 steps, 10 episodes): flow 70% with 30% collisions where BC collided in all 10.
        "detour_bc_collision_rate": (">=", 0.6),
        "detour_flow_success": (">=", 0.5),
        "detour_flow_collision_rate": ("<=", 0.5),
        "detour_diffusion_success": ("between", (0.0, 1.0)),  # 10% at 500 steps: diffusion learns slower
        "detour_flow_ms_k10": ("<=", 50.0),  # ~4 ms measured; 10x slower means a regression
        "detour_flow_success_k1": ("<=", 0.6),  # one Euler step averages the modes (20% measured)
        "pusht_success": ("between", (0.0, 1.0)),  # FAST trains 100 of the 10,000 steps that give 85% (README)
        "pusht_fit_error_mm": ("between", (0.0, 100.0)),
    },
    "03_posterior_bc": {
        # Tabular (exact, 50 random problems in FAST): BC-initialised finetuning misses the optimum
        # whenever a better demonstrator action went unseen; PostBC's never does.
        "tabular_coverage_bc": ("<=", 0.0),
        "tabular_coverage_postbc": (">=", 0.02),
        "tabular_reach_postbc": (">=", 0.95),
        "tabular_reach_bc": ("<=", 0.8),
        "spread_mean": (">", 0.0),
        "coverage_flow": ("between", (0.0, 1.0)),
        "coverage_postbc": ("between", (0.0, 1.0)),
        "success_bc": ("<=", 0.4),  # MSE-BC still averages the modes with 20 demos
    },
    "04_rl_finetuning_offpolicy": {
        # The shipped peg demos: the biased expert succeeds in 37.5% of 200 (the card).
        "demo_success": ("between", (0.3, 0.45)),
        # FAST trains for seconds: these catch broken plumbing (NaN, crashes), not a level; the lesson's
        # exercises are checked against labkit's own TD target, residual action and noise-space env.
        "base_bc_success": ("between", (0.0, 1.0)),
        "base_flow_success": ("between", (0.0, 1.0)),
        "residual_success": ("between", (0.0, 1.0)),
        "dsrl_success": ("between", (0.0, 1.0)),
        "expo_success": ("between", (0.0, 1.0)),
        "dsrl_postbc_success": ("between", (0.0, 1.0)),
    },
    "05_policy_gradient_and_advantage_conditioning": {
        "base_success": ("between", (0.0, 1.0)),
        "dppo_success": ("between", (0.0, 1.0)),
        "dppo_env_steps": (">=", 480),  # 2 iterations of 8 envs x 15 chunks of up to 4 steps ran
        "recap_success_beta0": ("between", (0.0, 1.0)),
        "recap_success_beta1": ("between", (0.0, 1.0)),
        "recap_success_beta3": ("between", (0.0, 1.0)),
    },
    "06_reward_models": {
        "heldout_successes": (">=", 5), "heldout_failures": (">=", 5),  # 11 and 13 (FAST replays 80 episodes)
        "fixed_auroc": (">=", 0.95), "augmented_auroc": (">=", 0.95),  # 0.999 and 1.0
        "fixed_failures_judged_success": ("<=", 0.1),  # 0.0: the negatives fix the naive model's flaw
        "augmented_failures_judged_success": ("<=", 0.1),
        "fixed_ece": ("<=", 0.05),  # 0.008
        "naive_ece": (">=", 0.1),  # 0.28: the flaw shows even in FAST
        "naive_failures_judged_success": (">", 0.0),  # 3 of 13
        "preference_rank_corr": (">=", 0.7),  # 0.96
        "progress_rank_corr_within_successes": (">=", 0.3),  # 0.65
        "pixels_auroc": ("between", (0.0, 1.0)),  # 20 steps in FAST: plumbing only
        "base_success": ("between", (0.0, 1.0)),
        "rl_true_success": ("between", (0.0, 1.0)),
        "rl_flawed_success": ("between", (0.0, 1.0)),
        "rl_fixed_success": ("between", (0.0, 1.0)),
        "rl_true_env_steps": (">=", 400), "rl_flawed_env_steps": (">=", 400), "rl_fixed_env_steps": (">=", 400),
        # Even two DPPO iterations show the hacking: the naive model ends episodes it calls successes.
        "rl_flawed_believed_success": (">=", 0.5),  # 1.0
        "rl_flawed_true_train_success": ("<=", 0.3),  # 0.0
    },
    "07_world_models": {
        "wm_val_error_first": ("between", (0.02, 0.2)),  # 0.051 measured
        "wm_val_error_last": ("<=", 0.01),  # 0.0028 after 150 FAST steps: the one-step error falls
        "rank_checkpoints": (">=", 6),  # 7
        "bc_real_success": ("<=", 0.4),  # 0 of 10: MSE-BC drives into the wall
        # FAST trains too little to show a level: these catch broken plumbing.
        "rank_pearson_demo_only": ("between", (-1.0, 1.0)),
        "rank_pearson_refined": ("between", (-1.0, 1.0)),
        "rank_mmrv_refined": ("between", (0.0, 1.0)),
        "loop_syn_round1": ("between", (0.0, 1.0)),
        "loop_real_round1": ("between", (0.0, 1.0)),
        "plan_bon_success": ("between", (0.0, 1.0)),
        "plan_cem_success": ("between", (0.0, 1.0)),
        "pixel_open_loop_mse": ("between", (0.0, 0.5)),
        "pixel_pos_error_px_t5": ("between", (0.0, 64.0)),
    },
    "08_test_time_scaling": {
        "base_success": ("<=", 0.95),  # the base must leave room (0.75 in FAST, 0.51 in full mode)
        "verifier_loss_last": ("<=", 4.1),  # InfoNCE falls from ~4.5
        "heldout_accuracy_mirror": (">=", 0.85),
        "heldout_accuracy_noise": (">=", 0.7),
        "heldout_accuracy_speed": (">=", 0.7),
        "success_vhard_n4": (">=", 0.6),  # 0.85 measured; a broken verifier or argmax gives <= 0.45 (untrained)
        "success_v20_n4": (">=", 0.6),
        "collision_vhard_n4": ("<=", 0.2),  # 0.0 measured
        "success_control_n4": ("between", (0.0, 1.0)),
        "success_critic_n4": ("between", (0.0, 1.0)),  # the FAST critic (20 rollouts) is poor: 0.10
        "power_law_slope": ("between", (-0.5, -0.1)),  # CoVer's power law: -0.26 in FAST, -0.23 full
    },
    "09_sim_to_real": {
        # FAST (30-step replay, CEM 3 x 8): error 0.065 -> 0.032 rad, latency 2 and gain 0.913 recovered
        # (the "real" arm's truth: gain 0.93, latency 2).
        "sysid_error_nominal": ("between", (0.05, 0.09)),
        "sysid_error_identified": ("<=", 0.045),
        "sysid_latency": ("between", (1, 3)),
        "sysid_gain": ("between", (0.85, 1.0)),
        # Policies are plumbing only in FAST (30 training steps, 40-step episodes: all 0%).
        "sim_success_nominal": ("between", (0.0, 1.0)),
        "sim_success_real": ("between", (0.0, 1.0)),
        "co_trained_success_real": ("between", (0.0, 1.0)),
        "mmrv_identified": ("between", (0.0, 1.0)),
        "pearson_identified": ("between", (-1.0, 1.0)),
    },
    "10_deploy": {
        "teleop_success": (">=", 1.0),  # the scripted operator's episode, fumbles included, succeeds
        "teleop_interventions": (">=", 2),  # its jerk and its NaN are caught by the safety layer (5 measured)
        "recorded_episodes": ("==", 12),
        "recorded_success": (">=", 0.9),  # 1.0 measured
        "policy_success": ("between", (0.0, 1.0)),  # 200 training steps: no level in FAST (full: 83%)
        "served_chunks": (">=", 3),  # 5 measured in 40 real-time steps through the policy server
        # Timing is measured and reported (9-16 ms round trip, 0.05-1.6 ms jitter at 20 Hz), not gated:
        # these only check that the numbers exist (benchmarks/robot.py is where speed lives).
        "rtt_p50_ms": ("between", (0.0, 1e4)),
        "jitter_std_ms": ("between", (0.0, 1e4)),
        "adapter_mse_gain_age15": (">=", 0.0),  # the adapter lowers held-out error (0.17 FAST, 0.06 full)
        "adapter_mse_stale_age15": ("between", (0.0, 1.0)),
        "latency_none_d0": ("between", (0.0, 1.0)),
    },
}

SOLUTION_NAMES = sorted(p.stem for p in SOLUTIONS.glob("*.ipynb"))
ALL_NOTEBOOKS = sorted([*SOLUTIONS.glob("*.ipynb"), *NOTEBOOKS.glob("*.ipynb")])


def test_student_notebooks_in_sync():
    out_of_date = stale(SOLUTIONS, NOTEBOOKS)
    assert out_of_date == [], (
        f"student notebooks out of sync with solutions/: {out_of_date}. "
        "Run `make student` (python -m labkit.teach.student) and commit notebooks/."
    )


def test_no_committed_outputs():
    problems = []
    for path in ALL_NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        rel = path.relative_to(path.parents[1])
        for i, cell in enumerate(nb.cells):
            if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None):
                problems.append(f"{rel} cell {i}: has outputs or an execution count")
        params = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
        if len(params) != 1:
            problems.append(f"{rel}: {len(params)} cells tagged 'parameters', expected exactly 1")
        elif "FAST" not in params[0].source:
            problems.append(f"{rel}: the 'parameters' cell does not define FAST")
    assert not problems, "\n".join(problems) + "\nRun `make student` to strip outputs."


@pytest.mark.notebook
@pytest.mark.parametrize("name", SOLUTION_NAMES)
def test_solution_notebook(name, tmp_path):
    metrics_path = tmp_path / "metrics.json"
    run_notebook(SOLUTIONS / f"{name}.ipynb", tmp_path / f"{name}.ipynb", metrics_path)
    metrics = load_metrics(metrics_path)
    if name not in BARS:
        pytest.fail(f"{name}: add bars for this notebook to BARS in tests/test_notebooks.py "
                    f"(recorded metrics: {metrics})")
    assert_bars(name, metrics, BARS[name])


@pytest.mark.notebook
@pytest.mark.parametrize("name", SOLUTION_NAMES)
def test_student_notebook_fails_at_first_exercise(name, tmp_path):
    from papermill.exceptions import PapermillExecutionError

    src = NOTEBOOKS / f"{name}.ipynb"
    if not src.exists():
        pytest.fail(f"{src.name}: no student copy in notebooks/; run `make student`")
    stub = first_stub_cell(nbformat.read(src, as_version=4))
    assert stub is not None, f"{src.name}: no exercise (no `raise NotImplementedError()` cell)"
    out = tmp_path / f"{name}.ipynb"
    with pytest.raises(PapermillExecutionError) as err:
        run_notebook(src, out, tmp_path / "metrics.json")
    assert err.value.ename == "NotImplementedError", (
        f"{src.name}: expected NotImplementedError from the first exercise, got "
        f"{err.value.ename}: {err.value.evalue}"
    )
    executed = nbformat.read(out, as_version=4)
    stubs = stub_cells(nbformat.read(src, as_version=4))
    assert_fails_at(executed, stub, src.name, stubs[1] if len(stubs) > 1 else None)

