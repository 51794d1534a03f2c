"""Notebook regression: student copies are in sync, nothing is committed with outputs, every
solution notebook runs in FAST mode and meets its bars, and every student copy stops at its first
exercise.

Each lesson needs an entry in BARS: ``{metric_name: (op, bar)}`` with op one of ">=", "<=", "==",
"between" (bar = (lo, hi)); a bar may be ``Rel(other_metric, delta)``, relative to another metric of the
same run. Metrics come from ``labkit.teach.record`` calls in the notebook.
"""

from __future__ import annotations

import nbformat
import pytest
from notebook_utils import (
    NOTEBOOKS,
    SOLUTIONS,
    Rel,
    assert_bars,
    assert_fails_at,
    first_stub_cell,
    run_notebook,
    stub_cells,
)

from labkit.teach import load_metrics, stale

# What each solution notebook must achieve in FAST mode (SEED=0, what CI runs). Every bar holds in FAST
# runs under seeds 0-4 (re-measured after evaluate began seeding torch); "seeds 0-4: ..." quotes those
# values. Rel(m, d) is a bar relative to metric m of the same run: a method against its base, so a bar
# follows the thing the lesson claims. Metrics that mean nothing after FAST's seconds of training (a
# success rate that is 0-10% in every run) have no bar; the full-mode numbers are in the README.
BARS: dict[str, dict[str, tuple]] = {
    "00_tour": {
        "detour_expert_success": (">=", 0.95),  # 20 episodes: the expert never fails here
        "pusht_expert_success": (">=", 0.85),  # measured 100% over 200 seeds; 17/20 allows one bad draw
        "detour_dataset_left_fraction": ("between", (0.35, 0.65)),  # the demos are bimodal (0.445)
        "pusht_pixels_frames": (">=", 5000),
    },
    "01_behavior_cloning": {
        # Mode averaging is the lesson: MSE-BC drives into the wall (seeds 0-4: 100% of 10 collide).
        "detour_bc_collision_rate": (">=", 0.6),
        "detour_bc_success": ("<=", 0.4),
        "detour_expert_success": (">=", 0.95),
        # ... and it fails at PushT at every chunking (seeds 0-4: final coverage 0.00-0.07; the expert's
        # is >= 0.95).
        "pusht_bc_coverage_h1": ("<=", 0.3),
        "pusht_bc_coverage_h4": ("<=", 0.3),
        "pusht_bc_coverage_h16": ("<=", 0.3),
        # DAgger (section 4, one-mode Detour, FAST: 2 demos + 2 rounds of 2 rollouts, 300 steps): BC is
        # compared at exactly DAgger's label count (SEED 0: 388 labels, SEED 1: 409); BC with ~11 demos
        # stays near the demonstrations (mean gap SEED 0: 6.6 cm, SEED 1: 4.1; DAgger 32 and 42 cm).
        # Success at 10 episodes is too noisy for a bar (DAgger 20% / 10%, BC 30% / 50%).
        "dagger_bc_labels": ("==", Rel("dagger_labels")),
        "dagger_labels": (">=", 150),
        "dagger_bc_equal_labels_gap_cm": ("<=", 15.0),
    },
    "02_diffusion_and_flow": {
        # FAST (500 steps, 10 episodes), seeds 0-4: flow 30-50% success with 50-60% collisions where
        # BC collides in 100% and never succeeds. Diffusion learns slower (0-10%): no bar.
        "detour_bc_collision_rate": (">=", 0.6),
        "detour_flow_success": (">=", Rel("detour_bc_success", 0.2)),
        "detour_flow_collision_rate": ("<=", Rel("detour_bc_collision_rate", -0.3)),
        "detour_flow_ms_k10": ("<=", 50.0),  # 3-6 ms measured; 10x slower means a regression
        "detour_flow_success_k1": ("<=", 0.6),  # one Euler step averages the modes (10% in seeds 0-4)
        # PushT trains 100 of the 10,000 steps that give 85% (README): 0% in FAST. The first-action error
        # (19-21 mm in seeds 0-4) catches broken units or normalisation, not a level.
        "pusht_fit_error_mm": ("<=", 30.0),
    },
    "03_posterior_bc": {
        # Tabular (exact, 50 random problems in FAST): BC-initialised finetuning misses the optimum
        # whenever a better demonstrator action went unseen; PostBC's never does.
        "tabular_coverage_bc": ("<=", 0.0),
        "tabular_coverage_postbc": (">=", 0.02),
        "tabular_reach_postbc": (">=", 0.95),
        "tabular_reach_bc": ("<=", 0.8),  # seeds 0-4: 0.50-0.68
        "spread_mean": (">", 0.0),
        # Detour: the generative policies cover the demos' modes, MSE-BC does not (seeds 0-4: BC
        # 0.44-0.47, flow 0.806-0.812, PostBC 0.817-0.828, PostBC above flow by 0.005-0.022).
        "coverage_flow": (">=", Rel("coverage_bc", 0.2)),
        "coverage_postbc": (">=", Rel("coverage_flow", 0.0)),
        "success_bc": ("<=", 0.4),  # MSE-BC still averages the modes with 20 demos
    },
    "04_rl_finetuning_offpolicy": {
        # The shipped peg demos: the biased expert succeeds in 37.5% of 200 (the card).
        "demo_success": ("between", (0.3, 0.45)),
        # FAST trains each method for seconds (200-400 env steps, 10 episodes): no gain shows (the
        # end-to-end gain is tests/test_rl_improves.py), but none may wreck its base. Seeds 0-4, method
        # minus base: residual 0 in every run (it starts at the base), DSRL -0.4..+0.4, EXPO -0.1..+0.5,
        # DSRL on PostBC -0.4..0.0; the margins are the worst seen, plus 0.1.
        "residual_success": (">=", Rel("base_bc_success", -0.1)),
        "dsrl_success": (">=", Rel("base_flow_success", -0.5)),
        "expo_success": (">=", Rel("base_flow_success", -0.2)),
        "dsrl_postbc_success": (">=", Rel("postbc_base_success", -0.5)),
        "postbc_spread_mm": (">=", Rel("flow_spread_mm", 0.0)),  # PostBC samples wider (seeds 0-4: +0.1..+0.4 mm)
    },
    "05_policy_gradient_and_advantage_conditioning": {
        # Two DPPO iterations (seeds 0-4, DPPO minus base: -0.2..+0.2); RECAP's FAST rounds leave it at
        # 0-10% for every beta: no bar (lesson 05 full mode and the README have its numbers).
        "dppo_success": (">=", Rel("base_success", -0.3)),
        "dppo_env_steps": (">=", 480),  # 2 iterations of 8 envs x 15 chunks of up to 4 steps ran
    },
    "06_reward_models": {
        "heldout_successes": (">=", 5), "heldout_failures": (">=", 5),  # 11 and 13 (FAST replays 80 episodes)
        "fixed_auroc": (">=", 0.95), "augmented_auroc": (">=", 0.95),  # 0.999-1.0 in seeds 0-4
        "fixed_failures_judged_success": ("<=", 0.1),  # 0.0: the negatives fix the naive model's flaw
        "augmented_failures_judged_success": ("<=", 0.1),
        "fixed_ece": ("<=", 0.05),  # 0.007-0.010
        "naive_ece": (">=", 0.1),  # 0.23-0.47: the flaw shows even in FAST
        "naive_failures_judged_success": (">", 0.0),  # 0.23-0.62
        "preference_rank_corr": (">=", 0.7),  # 0.85-0.96
        # DPPO on each reward, two iterations: none wrecks the base (seeds 0-4, run minus base: true
        # -0.3..+0.1, flawed -0.1..+0.1, fixed -0.1..+0.1); the hacking shows below.
        "rl_true_success": (">=", Rel("base_success", -0.4)),
        "rl_fixed_success": (">=", Rel("base_success", -0.3)),
        "rl_true_env_steps": (">=", 400), "rl_flawed_env_steps": (">=", 400), "rl_fixed_env_steps": (">=", 400),
        # Even two DPPO iterations show the hacking: the naive model ends episodes it calls successes.
        "rl_flawed_believed_success": (">=", 0.5),  # 0.92-1.0
        "rl_flawed_true_train_success": ("<=", 0.3),  # 0.0
    },
    "06a_reward_models_appendix": {
        "progress_rank_corr_within_successes": (">=", 0.3),  # 0.65-0.85 (measured in lesson 06, seeds 0-4)
        # The pixel detector trains 20 steps in FAST (AUROC 0.26-0.69): no bar.
    },
    "07_world_models": {
        "wm_val_error_first": ("between", (0.02, 0.2)),  # 0.050-0.052 in seeds 0-4
        "wm_val_error_last": ("<=", 0.01),  # 0.003-0.007 after 150 FAST steps: the one-step error falls
        "rank_checkpoints": (">=", 6),  # 7
        "bc_real_success": ("<=", 0.4),  # 0 of 10: MSE-BC drives into the wall
        # Rankings, the improvement loop and planning: FAST's policies are all at 0% real success, so
        # their correlations and rates carry no level (full mode and the README do): no bar.
    },
    "07a_world_models_pixels": {
        # The pixel predictor (seeds 0-3 in lesson 07: open-loop MSE 0.013-0.076, position error 6-8 px at t=5).
        "pixel_open_loop_mse": ("<=", 0.15),
        "pixel_pos_error_px_t5": ("<=", 16.0),
    },
    "08_test_time_scaling": {
        "base_success": ("<=", 0.95),  # the base must leave room (0.30-0.45 in seeds 0-4)
        "verifier_loss_last": ("<=", 4.1),  # InfoNCE falls from ~4.5 (3.46-3.58)
        "heldout_accuracy_mirror": (">=", 0.85),  # 0.95-0.96
        "heldout_accuracy_noise": (">=", 0.7),  # 0.86-0.89
        "heldout_accuracy_speed": (">=", 0.7),  # 0.86-0.93
        # Best of 4 by the verifier beats the base policy's own sample (seeds 0-4, minus base success:
        # hard negatives +0.10..+0.40, 20 negatives +0.15..+0.50). A random choice among the 4 (the
        # control) and the FAST critic (20 rollouts) vary too much across seeds to bar.
        "success_vhard_n4": (">=", Rel("base_success", 0.05)),
        "success_v20_n4": (">=", Rel("base_success", 0.1)),
        "collision_v20_n4": ("<=", Rel("base_collision_rate", -0.1)),  # 0-0.15 vs the base's 0.25-0.6
        "power_law_slope": ("between", (-0.5, -0.1)),  # CoVer's power law: -0.26..-0.30 in FAST, -0.23 full
    },
    "09_sim_to_real": {
        # FAST (30-step replay, CEM 3 x 8), seeds 0-4: error 0.0655 -> 0.023-0.040 rad, latency 1-2 and
        # gain 0.91-1.01 recovered (the "real" arm's truth: gain 0.93, latency 2).
        "sysid_error_nominal": ("between", (0.05, 0.09)),
        "sysid_error_identified": ("<=", Rel("sysid_error_nominal", -0.02)),
        "sysid_latency": ("between", (1, 3)),
        "sysid_gain": ("between", (0.85, 1.05)),
        # The policies train 30 steps in FAST (0% everywhere): no bar; full mode has the numbers.
    },
    "10_deploy": {
        "teleop_success": (">=", 1.0),  # the scripted operator's episode, fumbles included, succeeds
        "teleop_interventions": (">=", 2),  # its jerk and its NaN are caught by the safety layer (5-6 measured)
        "recorded_episodes": ("==", 12),
        "recorded_success": (">=", 0.9),  # 1.0 measured
        # The deployed (pixel) policy reads only what the SO-101 observes (joints, `top` and `wrist`, 64 px):
        # check_policy_matches_robot accepts it on SO101Arm (fake bus and cameras) and refuses a state policy.
        "pixel_policy_matches_real_arm": ("==", True),
        "state_policy_refused": ("==", True),
        "served_chunks": (">=", 3),  # 5 measured in 40 real-time steps of the pixel policy through the server
        # Timing is measured and reported (about 30 ms round trip for the pixel policy, 0.05-1.7 ms jitter at
        # 20 Hz), not gated: these only check that the numbers exist and are finite (benchmarks/robot.py is
        # where speed lives).
        "rtt_p50_ms": ("between", (0.0, 1e4)),
        "jitter_std_ms": ("between", (0.0, 1e4)),
        "adapter_mse_gain_age15": (">=", 0.0),  # the adapter lowers held-out error (0.02-0.17 FAST)
        "adapter_mse_stale_age15": ("<=", 0.5),  # 0.19-0.26: a broken adapter or data path shows here
        # The pixel and state policies train 200 steps in FAST (0-20% success): no bar.
    },
    "11_visuomotor": {
        "frames": (">=", 1000),  # 12 arm_pixels episodes in FAST
        "state_policy_refused": ("==", True),  # a 26-D state policy cannot run on the real arm: named error
        # The shipped top-camera encoder reads the cube's position on the dataset's frames (episodes it
        # never saw in pretraining): a broken encoder, wrong weights or a wrong image layout shows here.
        "cube_error_cm_median": ("<=", 2.0),
        # ... and the PushT encoder the block's pose (2.3 mm median over the whole dataset): the estimate the
        # PushT pixel policy is trained and run on.
        "pusht_pose_error_mm_median": ("<=", 5.0),
        # Policies train seconds in FAST (0-25% success, 4 episodes): no bar; the README has full-mode numbers.
    },
    "12_language_and_steering": {
        # A bag of words cannot tell "3 cm left and 2 cm up" from "2 cm left and 3 cm up"; MiniLM can
        # (SEED 0 and 1: 1.0 vs 0.9988), knows new words, and puts paraphrases nearer than other tasks (0.74 vs 0.67).
        "bow_swap_cosine": ("==", 1.0),
        "minilm_swap_cosine": ("<=", 0.9995),
        "bow_unknown_word_error": ("==", True),
        "minilm_same_task_cos": (">=", Rel("minilm_other_task_cos", 0.03)),
        "point_label_error_px": ("==", 0),  # the point labels are where the pusher is MOTION_STEPS later
        # The student's FiLM and DCT train (SEED 0: flow loss 1.07 -> 0.52, tokens 3.04 -> 2.64) and round-trip.
        "flow_final_loss": ("<=", Rel("flow_first_loss", -0.2)),
        "token_final_loss": ("<=", Rel("token_first_loss", -0.15)),
        "roundtrip_error_s10": ("<=", 0.15),  # 0.115: a quantisation step of 0.1 per coefficient
        "roundtrip_error_s50": ("<=", Rel("roundtrip_error_s10", -0.05)),  # 0.022
        # The shipped policy follows the scripted reasoner's motions (SEED 0 and 1, 10 episodes each: 100%
        # seen, 100% held-out vs 10% told the held-out task sentence; median motion error 0.93 cm; full
        # mode, 100 episodes: 89%, 97% vs 15%, 1.04 cm). FAST trains seconds: the lesson's own policies
        # (flow, tokens, learned reasoner) and CoVer are 0-20%: no bar.
        "shipped_seen_motion": (">=", 0.7),
        # The shipped policy and reasoner need no training in the lesson: told the task sentence (FAST, 10
        # episodes from seed 1000, the same for every SEED): one level 1.0, two levels 0.6 (before DAgger:
        # 0.9 / 0.7; the policy shipped before the observation MLP: 0.41 of 100 in full mode); full mode: README.
        "shipped_seen_task": (">=", 0.6),
        "two_level_seen": (">=", 0.4),
        "heldout_motion": (">=", Rel("heldout_task", 0.3)),
        "motion_error_cm_median": ("<=", 2.0),
        # ms per chunk (flow vs tokens) is printed and in the README, not asserted: speed is not a test.
    },
    "13_memory": {
        # The task hides the cue (identical observations after it whichever cup), and the experts succeed
        # (FAST seeds 0 and 1: 10/10 on Cups, 10/10 on Doors, every second attempt after a failure).
        "cups_hidden_after_cue": ("==", True),
        "cups_expert_success": (">=", 0.95),
        "doors_expert_success": (">=", 0.95),
        "doors_expert_second_attempt": (">=", 0.95),
        # MEM-style memory (the student's write + read) finds the cube where no memory cannot: chance is
        # 1/3 (seeds 0, 1: MEM 1.0, 1.0; no memory 0.0, 0.1; 10 episodes each).
        "cups_mem_success": (">=", 0.7),
        "cups_nomem_success": ("<=", 0.5),
        "doors_mem_success": (">=", 0.6),  # 0.9, 0.8: the memoryless policies 0.0-0.3
        "doors_events_written": (">=", 5),  # 15, 15: the write step saw the recorded failures (~half of 24)
        "cups_mem_ms": ("<=", 50.0),  # 1.0 ms/step measured; 50x slower means a regression
    },
    "14_human_data": {
        # Both scripted bodies solve the human-only tasks (SEED 0 and 1: 6/6 each in FAST, 100/100 in full mode).
        "expert_success_robot": (">=", 0.99),
        "expert_success_human": (">=", 0.99),
        "human_share_in_batch": ("==", 0.5),  # the student's mixer at 0.5/0.5: 128 of 256 windows are human
        "human_frames": ("between", (350, 600)),  # 16 human demos of ~29 steps (SEED 0: 468, SEED 1: 467)
        # Co-training with the student's mixer learns: first-20 vs last-20 step loss, SEED 0 / SEED 1:
        # K=8 robot 0.206->0.117 / 0.193->0.118, K=8 human 0.222->0.129 / 0.218->0.131, K=2 human
        # 0.237->0.134 / 0.251->0.137. Success rates are 0-20% after FAST's 100 steps: no bar.
        "final_loss_k8_robot": ("<=", Rel("first_loss_k8_robot", -0.04)),
        "final_loss_k8_human": ("<=", Rel("first_loss_k8_human", -0.04)),
        "final_loss_k2_human": ("<=", Rel("first_loss_k2_human", -0.04)),
    },
    "15_more_rl": {
        # The student's adjoint-matching loss in the bandit (FAST: 60 steps, 500 samples). SEED 0 / 1: base
        # 0.51 / 0.48; inv_temp 0 leaves it (0.53 / 0.50), inv_temp 3 moves it to 0.97 / 0.90.
        "qam_right_t0": ("<=", Rel("qam_base_right", 0.1)),
        "qam_right_t3": (">=", Rel("qam_base_right", 0.2)),
        # TQL after 120 TD steps: the large plain critic's lowest layer entropy falls below the controlled
        # one's (SEED 0 / 1: 2.14 vs 2.54 / 1.81 vs 2.86 nats).
        "tql_large_plain_entropy": ("<=", Rel("tql_large_control_entropy", -0.2)),
        # RLT's token autoencoder learns the base's features (SEED 0 / 1: 0.96 -> 0.064 / 0.93 -> 0.064); FAST's
        # 400 env steps of RL say nothing about success: no bar on it.
        "rlt_token_loss_last": ("<=", Rel("rlt_token_loss_first", -0.5)),
        "seed_rows": (">=", 9),  # the shipped seed table: three seeds of each method it lists
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



@pytest.mark.parametrize("name", SOLUTION_NAMES)
def test_lesson_lint(name):
    """No result typed into a lesson's prose (print it from its variable), and every check gives a hint."""
    from labkit.teach.lint import scan

    problems = scan(SOLUTIONS / f"{name}.ipynb")
    assert not problems, f"{name}:\n" + "\n".join(f"  cell {i}: {what}" for i, what in problems) + (
        "\n(rule: labkit/teach/lint.py; `python -m labkit.teach.lint solutions/*.ipynb` lists them)")


@pytest.mark.parametrize("name", SOLUTION_NAMES)
def test_solution_cell_ids_follow_positions(name):
    """`labkit grade` puts the solution's tests back into a student copy by cell id, and student ids are
    derived from positions: a solution cell inserted with its own id makes grading fail on that lesson."""
    from labkit.teach.student import cell_id

    nb = nbformat.read(SOLUTIONS / f"{name}.ipynb", as_version=4)
    off = [i for i, c in enumerate(nb.cells) if c.get("id") != cell_id(name, i)]
    assert not off, (f"{name}: cells {off} have ids that are not cell_id('{name}', index); renumber them: "
                     "for i, c in enumerate(nb.cells): c.id = labkit.teach.student.cell_id(name, i)")
