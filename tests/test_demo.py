"""The embedded default end to end at a tiny scale: corpus, base, stages 1->2->3, evaluation."""

import json

import numpy as np
from safetensors.numpy import load_file

from clara_jax.demo import format_results, run_demo


def test_demo_runs_all_stages_and_reports(tmp_path):
    lines = []
    result = run_demo(str(tmp_path), scale=0.02, n_eval=8, log=lines.append)
    for stage in ("stage1", "stage2", "stage3"):
        rows = [r for r in map(json.loads, open(tmp_path / stage / "metrics.jsonl")) if "train/loss" in r]
        assert rows and all(np.isfinite(r["train/loss"]) for r in rows)
        assert (tmp_path / stage / "loss.png").exists()
    assert (tmp_path / "base" / "model.safetensors").exists()
    saved = json.load(open(tmp_path / "demo_results.json"))
    for when in ("before", "after_stage2", "after"):
        for key in ("recall@1", "recall@5", "em", "f1", "acc"):
            assert 0.0 <= saved[when][key] <= 1.0
    assert saved["chance"]["recall@5"] == 5 / 20 and set(saved["after_stage2"]) == set(saved["after"])
    for when in ("after_stage2", "after"):  # the reader check: answers with and without the gold
        assert 0.0 <= saved[when]["em_with_gold"] <= 1.0 and 0.0 <= saved[when]["em_without_gold"] <= 1.0
    table = format_results(result)
    assert "Recall@1" in table and "answer EM" in table and "chance" in table
    assert "answer EM, no gold among the 5" in table
    # stage 3 is scored on the dev people (never the eval ones) as it trains, from its first step
    dev = [r for r in map(json.loads, open(tmp_path / "stage3" / "metrics.jsonl")) if "dev/recall@1" in r]
    assert [r["step"] for r in dev] == [0, 1, 2] and all(0 <= r["dev/recall@1"] <= 1 for r in dev)
    # every stage is evaluated as it trains, on records derived from the dev split: its own loss, and
    # in stages 2-3 the answers; the curves are in the plots and the best step in the results
    for stage, dev_file in (("stage1", "stage1_dev"), ("stage2", "stage2_dev"), ("stage3", "dev_with_pos")):
        assert json.load(open(tmp_path / stage / "config.json"))["data"]["eval"].endswith(
            f"/{dev_file}.jsonl"
        )
        evals = [r for r in map(json.loads, open(tmp_path / stage / "metrics.jsonl")) if "eval/loss" in r]
        assert [r["step"] for r in evals] == [0, 1, 2], stage
        assert all(np.isfinite(r["eval/loss"]) and r["eval/best_step"] in (0, 1, 2) for r in evals)
        answered = stage != "stage1"
        assert all(("eval/em" in r) == answered for r in evals), stage
        assert all(0 <= r[f"eval/{k}"] <= 1 for r in evals if answered for k in ("em", "f1", "cover_em"))
        assert (tmp_path / stage / "answers.png").exists() == answered
        assert saved["best"][stage]["step"] == evals[-1]["eval/best_step"]
    assert (
        saved["best"]["stage3"]["metric"] == "dev/recall@1"
        and saved["best"]["stage1"]["metric"] == "eval/loss"
    )
    # stage 3 started from stage 2, which started from stage 1
    meta3 = json.load(open(tmp_path / "stage3" / "config.json"))
    assert meta3["init_from"].endswith("stage2")
    # the <MEM*> rows train in stage 1 only: stage 2 holds them and passes them on to stage 3
    rows = [
        load_file(str(tmp_path / s / "model" / "embed_rows.safetensors"))["rows"]
        for s in ("stage1", "stage2", "stage3")
    ]
    assert rows[0].any() and all(np.array_equal(rows[0], r) for r in rows[1:])
