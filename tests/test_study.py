"""The seed table lesson 15 reads (results/rl_seeds.jsonl) and the command that rebuilds its rows."""

import json
import shlex

import pytest

from labkit.eval import wilson_interval
from labkit.rl import study

ROWS = [json.loads(line) for line in study.RESULTS.read_text().splitlines() if line.strip()]


def test_every_row_is_a_100_episode_result_with_its_own_wilson_interval():
    assert ROWS, f"{study.RESULTS} is empty"
    for r in ROWS:
        k = round(r["success"] * r["episodes"])
        assert r["episodes"] == 100 and abs(k - r["success"] * 100) < 1e-6, r["label"]
        assert r["ci"] == pytest.approx(list(wilson_interval(k, 100)), abs=1e-6), r["label"]
        assert r["method"] in study.METHODS and r["base"] == study.METHODS[r["method"]][0], r["label"]
        assert r["config"]["seed"] == r["seed"], r["label"]


def test_rows_of_one_label_share_base_and_budget_and_differ_in_seed():
    groups = {}
    for r in ROWS:
        groups.setdefault(r["label"], []).append(r)
    for label, rows in groups.items():
        assert len({r["seed"] for r in rows}) == len(rows), f"{label}: a seed twice"
        if rows[0]["base"] != "flow-seeded":  # lesson 05's recipe trains each seed its own base
            assert len({r["base_success"] for r in rows}) == 1, f"{label}: bases differ"
        assert max(r["env_steps"] for r in rows) <= 1.1 * min(r["env_steps"] for r in rows), f"{label}: budgets differ"


def test_each_rows_command_parses_to_its_method_seed_and_config(monkeypatch):
    seen = []
    monkeypatch.setattr(study, "run", lambda *a: seen.append(a) or {})
    monkeypatch.setattr(study.torch, "set_num_threads", lambda n: None)
    for r in ROWS:
        argv = shlex.split(r["command"])[3:]  # after "python -m labkit.rl.study"
        assert study.main(argv) == 0
        method, seed, env_steps, config, label = seen[-1][:5]
        assert (method, seed) == (r["method"], r["seed"])
        assert label in (None, r["label"]), f"the command would write label {label!r}, the row has {r['label']!r}"
        assert {**study.METHODS[method][3], **config, "seed": seed} == r["config"], r["label"]


def test_bad_input_is_named(capsys):
    with pytest.raises(ValueError, match="unknown method 'sac'"):
        study.run("sac", 0, out=None)
    with pytest.raises(ValueError, match="unknown base 'diffusion'"):
        study.base_policy("diffusion", 0)
    with pytest.raises(SystemExit):
        study.main(["rlt", "--config", "{beta: 0"])
    assert "--config is not JSON" in capsys.readouterr().err


def test_table_has_one_line_per_label_with_each_seed_and_the_count_above_the_base(tmp_path, capsys):
    def row(label, seed, success, lo):
        return {"label": label, "task": "labkit/Detour-v0", "seed": seed, "env_steps": 4000, "base_success": 0.5,
                "base_ci": [0.4, 0.6], "success": success, "ci": [lo, min(1.0, success + 0.1)], "train_minutes": 1.0}
    path = tmp_path / "rows.jsonl"
    rows = [row("A", 1, 0.9, 0.82), row("A", 0, 0.3, 0.22), row("B", 0, 0.5, 0.4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert study.main(["--table", "--out", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4  # header, rule, A, B
    a = lines[2]
    assert a.index("s0 30%") < a.index("s1 90%"), "seeds in order"
    assert "| 60% (30-90%) |" in a and "| 1 of 2 |" in a  # mean (min-max); only seed 1's interval clears the base's (40-60%)
    assert "| 0 of 1 |" in lines[3]
