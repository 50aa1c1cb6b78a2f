"""bench/ablation.py: the whole plan in a tiny configuration, resume, parallel runs, aggregation."""

import json
import shutil
from pathlib import Path

import pytest

import focusft
import train
from bench import ablation
from evals import analyze

# 4 methods x 1 seed x 2 difficulties; 2 optimizer steps on 8 conversations, 2 held-out ones
TINY = ["--seeds", "1", "--records", "1", "2", "--steps", "2", "--n-train", "8", "--n-heldout", "2",
        "--analyze-samples", "1", "--max-new-tokens", "4", "--jobs", "1"]


def run_ablation(out: Path, *extra) -> list[dict]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(analyze, "analysis_plots", lambda result, out: [])  # per-run PNGs: slow, and not what is tested
        return ablation.main(TINY + ["--out", str(out), *extra], log=lambda *a: None)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("ablation") / "out"
    return out, run_ablation(out)


def results(out: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted((out / "runs").glob("*/result.json"))}


def copy_of(finished, tmp_path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(finished[0], out)
    return out


def test_plan_runs_end_to_end(finished):
    out, rows = finished
    done = results(out)
    assert len(done) == 8 and len(rows) == 8
    assert [(r["records"], r["method"]) for r in rows] == [(n, m) for n in (1, 2) for m in focusft.METHODS]
    for name, r in done.items():
        assert name == f"records-{r['records']}-{r['method']}-seed-1"
        model = out / "runs" / name / "model"
        # the method reached train.py, which trained the two steps asked for
        assert json.loads((model / "focusft.json").read_text())["method"] == r["method"]
        assert r["steps"] == 2 and len((model / "log.jsonl").read_text().splitlines()) == 2
        assert r["heldout_n"] == 2 and 0 <= r["accuracy"] <= 100
        assert 0 < r["sink"] < 100 and 0 < r["tool"] < r["context"] <= 100 and r["s_per_step"] > 0
        # the analysis row is the causal mask's
        analysis = json.loads((out / "runs" / name / "eval" / "analysis" / "analysis.json").read_text())
        assert r["sink"] == pytest.approx(100 * analysis["causal"]["mean_over_layers"]["sink"])
    # one data set per difficulty, shared by every run of that difficulty
    assert sorted(p.name for p in (out / "data").iterdir()) == ["records-1", "records-2"]
    md = (out / "results.md").read_text()
    assert "| 2 | focusft | yes | yes |" in md and md.count("seed-1 |") == 8
    assert len(json.loads((out / "results.json").read_text())["runs"]) == 8


def test_resume_skips_finished_and_redoes_crashed(finished, tmp_path, monkeypatch):
    out = copy_of(finished, tmp_path)
    before = results(out)
    crashed = out / "runs" / "records-2-sft-bidir-seed-1"
    (crashed / "result.json").unlink()  # a run interrupted after training
    (crashed / "stale.txt").write_text("left by the crash")
    executed = []
    real = ablation.execute
    monkeypatch.setattr(ablation, "execute", lambda cfg, run: executed.append(run.name) or real(cfg, run))
    run_ablation(out)
    assert executed == ["records-2-sft-bidir-seed-1"]
    assert not (crashed / "stale.txt").exists()
    after = results(out)
    assert {k: v for k, v in after.items() if k != crashed.name} == \
        {k: v for k, v in before.items() if k != crashed.name}
    # same seed, data and steps: the redone run trains to the same loss
    assert after[crashed.name]["final_loss"] == pytest.approx(before[crashed.name]["final_loss"], rel=1e-5)


def test_failed_run_is_reported_and_redone(finished, tmp_path, monkeypatch):
    out = copy_of(finished, tmp_path)
    victim = out / "runs" / "records-1-focusft-seed-1"
    (victim / "result.json").unlink()

    def boom(cfg):
        raise RuntimeError("simulated crash")

    with monkeypatch.context() as mp:
        mp.setattr(train, "main", boom)
        with pytest.raises(ablation.AblationError, match="1 run.*records-1-focusft-seed-1"):
            run_ablation(out)
    assert not (victim / "result.json").exists()
    assert "simulated crash" in (victim / "log.txt").read_text()
    assert len(json.loads((out / "results.json").read_text())["runs"]) == 7  # the report has the others
    run_ablation(out)
    assert (victim / "result.json").is_file()


def test_other_settings_are_refused(finished, tmp_path):
    out = copy_of(finished, tmp_path)
    with pytest.raises(ablation.AblationError, match="steps: 2, now 3"):
        run_ablation(out, "--steps", "3")


def test_parallel_workers_equal_in_process(finished, tmp_path):
    """--jobs 2 (spawned worker processes, one thread each) trains the same models as --jobs 1."""
    out = tmp_path / "out"
    ablation.main(TINY + ["--records", "1", "--methods", "sft", "focusft", "--jobs", "2", "--out", str(out)],
                  log=lambda *a: None)
    par, seq = results(out), results(finished[0])
    assert sorted(par) == ["records-1-focusft-seed-1", "records-1-sft-seed-1"]
    for name, r in par.items():
        for k in ("final_loss", "accuracy", "sink", "tool"):
            assert r[k] == pytest.approx(seq[name][k], rel=1e-5), (name, k)


def fake(method, records, seed, accuracy, s_per_step=1.0):
    return {"method": method, "records": records, "seed": seed, "accuracy": accuracy, "train_s": 10.0 * s_per_step,
            "s_per_step": s_per_step, "sink": 2.0, "tool": 20.0, "context": 70.0, "steps": 5, "final_loss": 0.1}


def test_aggregation_mean_std_and_table():
    res = [fake("sft", 4, 1, 25.0), fake("sft", 4, 2, 30.0), fake("sft", 4, 3, 35.0),
           fake("focusft", 4, 1, 50.0, 1.0), fake("focusft", 4, 2, 60.0, 2.0), fake("focusft", 4, 3, 70.0, 3.0),
           fake("sft-bidir", 4, 1, 33.0), fake("sft-bidir", 4, 2, 37.0),
           fake("focusft", 16, 1, 40.0)]
    rows = ablation.summarize(res, list(focusft.METHODS), [4, 16])
    assert [(r["records"], r["method"]) for r in rows] == [(4, "sft"), (4, "sft-bidir"), (4, "focusft"), (16, "focusft")]
    # by hand: mean 60, sample variance ((-10)^2 + 0 + 10^2) / 2 = 100, std 10; s/step 2 +- 1
    assert rows[2]["accuracy"] == pytest.approx((60.0, 10.0)) and rows[2]["s_per_step"] == pytest.approx((2.0, 1.0))
    assert rows[0]["accuracy"] == pytest.approx((30.0, 5.0))
    assert rows[1]["accuracy"] == pytest.approx((35.0, 2 ** 0.5 * 2))  # 33, 37: variance (4 + 4) / 1
    assert rows[3]["accuracy"] == (40.0, None) and rows[2]["seeds"] == [1, 2, 3]
    md = ablation.table(rows)
    # step time over the same seed's sft (1 s): 1, 2, 3; none at 16 records (no sft run there)
    assert rows[2]["step_vs_sft"] == pytest.approx((2.0, 1.0)) and rows[3]["step_vs_sft"] == (None, None)
    assert "| 4 | focusft | yes | yes | 60.0 ± 10.0 | 20 ± 10 | 2.00 ± 1.00 | 2.00 ± 1.00 | 2.00 ± 0.00 | 20.0 ± 0.0 " \
           "| 70.0 ± 0.0 | 3 |" in md
    assert "| 16 | focusft | yes | yes | 40.0 | 10 | 1.00 | – | 2.00 | 20.0 | 70.0 | 1 |" in md
    # focusft 60 +- 10 vs sft 30 +- 5: 30 > 15; sft-bidir 35 +- 2.8 vs 30 +- 5: 5 < 7.8
    assert ablation.against_baseline(rows) == [
        "- records 4, sft-bidir - sft: +5.0 points (within the seed spread)",
        "- records 4, focusft - sft: +30.0 points (exceeds the seed spread)"]
