"""The benchmark scripts run and print their final JSON line (small sizes; figures are not checked)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parent.parent / "bench"


def final_json(script: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=600,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_style_quality_bench_runs():
    r = final_json("style_quality.py", "--users-per-look", "2", "--photos", "6", "--mixed-users", "2")
    assert r["single_look_users"] == 12 and 0 <= r["nn_accuracy"] <= 1 and 0 <= r["facet_purity"] <= 1


@pytest.mark.slow
@pytest.mark.parametrize("jpeg_device", ["none", "cpu"])  # Pillow on every core; the batched decoder
def test_decode_embed_bench_runs(jpeg_device):
    r = final_json("decode_embed.py", "--photos", "2", "--n", "4", "--batch", "2", "--clip-model",
                   "stylestream-tiny-clip", "--jpeg-device", jpeg_device)
    assert {"photos_per_s", "model_only_per_s", "ratio", "originals", "decode_only_per_s", "decode_scaling"} <= set(r)
    assert r["jpeg_device"] == jpeg_device and r["originals"]["decode_only_per_s"] > 0


@pytest.mark.slow
def test_crash_torture_short_run_is_identical_to_an_uninterrupted_one(broker_engine):
    r = final_json("crash_torture.py", "--events", "1200", "--users", "30", "--kills", "2", "--broker-kills", "1",
                   "--max-events-per-partition", "60", "--kill-window", "3", "6", "--broker", broker_engine)
    assert r["kills"] >= 1 and r["broker"] == broker_engine, r
    assert r["broker_kills"] == (1 if broker_engine == "kafka" else 0), r  # Tansu would come back empty
    [seed] = r["seeds"].values()
    assert r["all_identical"] and seed["identical"] and seed["mismatches"] == 0, r
    if broker_engine == "kafka":  # Tansu has no transactions: a kill may publish a cycle again
        assert seed["duplicate_outputs"] == 0, r


@pytest.mark.slow
def test_ingest_bench_runs(broker_engine):
    r = final_json("ingest.py", "--users", "10", "--photos", "3", "--rate", "5", "--duration", "4", "--warmup", "1",
                   "--broker", broker_engine)
    assert {"events_per_s", "overhead_ratio", "latency_p50_s", "latency_p99_s", "rss_growth"} <= set(r)
    assert r["contribution_events_per_s"] > 0, r


@pytest.mark.slow
def test_serve_bench_runs(broker_engine):
    r = final_json("serve.py", "--batch", "2", "--reps", "1", "--rate", "2", "--duration", "2",
                   "--broker", broker_engine)
    assert r["batch"] == 2 and r["mixed_user_ips"] > 0 and r["mixed_lora_ips"] > 0 and r["latency_p50_s"] > 0


@pytest.mark.slow
def test_drift_bench_runs():
    r = final_json("drift.py", "--users", "300", "--versions", "12", "--window-days", "5", "--repeats", "1")
    assert r["rows"] == 3600 and {"topn_query_s", "topn_scan_s", "timeline_query_s", "pandas_topn_s"} <= set(r)
    assert r["snapshots_mb"] > 0  # compaction's in-force snapshots of the 11 closed days


@pytest.mark.slow
def test_personalization_bench_runs():
    r = final_json("personalization.py", "--photos", "6", "--prompts", "1", "--seeds", "1", "--reps", "1",
                   "--steps", "4", "--classifier-images", "200", "--classifier-steps", "20")
    assert r["people"] == 6 and r["chance"] == round(1 / 6, 4) and r["content_chance"] == 0.125
    assert set(r["variants"]) == {"none", "ip_adapter", "hyper_lora", "both"}
    for v in r["variants"].values():
        assert len(v["strength_sweep"]) == 5 and v["images_per_s"] > 0 and v["cost_ratio"] > 0
        assert 0 <= v["retrieval_accuracy"] <= 1 and -1 <= v["feature_correlation"] <= 1
        for at in (v, v["steps_4"]):
            assert 0 <= at["content_accuracy"] <= 1 and 0 <= at["leakage_prompt_wins"] <= 1
    assert 0 <= r["facet_choice_accuracy"] <= 1 and 0 <= r["classifier_held_out_accuracy"] <= 1


@pytest.mark.slow
def test_video_bench_runs():
    r = final_json("video.py", "--photos", "4", "--prompts", "1", "--frames", "3", "--steps", "2", "--reps", "1")
    assert (r["people"], r["frames"], r["steps"], r["clips"]) == (6, 3, 2, 6)
    assert 0 <= r["frame_retrieval_accuracy"] <= 1 and r["cost_per_frame_ratio"] > 0
    assert r["flicker"]["independent"] > 0 and r["warp_error_ratio"] >= 0 and r["flicker_ratio"] >= 0


@pytest.mark.slow
def test_train_step_bench_runs():
    r = final_json("train_step.py", "--config", "tiny", "--batch", "2", "--steps", "1")
    assert r["config"] == "tiny" and r["seconds_per_step"] > 0 and r["ratio"] > 0 and r["trainable_params_m"] > 0


@pytest.mark.slow
def test_state_bytes_bench_runs():
    r = final_json("state_bytes.py", "--photos", "60", "--dim", "16")
    kinds = {row["event"]: row for row in r["per_event"]}
    assert set(kinds) == {"upload", "delete", "toggle-photo", "toggle-album", "toggle-user", "first publish"}
    # An upload touches one photo's entry: less than the earlier layout's whole-library cell.
    assert kinds["upload"]["read_after"] < kinds["upload"]["read_before"]


@pytest.mark.slow
def test_streaming_bench_runs():
    r = final_json("streaming.py", "--events", "300", "--users", "8", "--rate", "2", "--duration", "3",
                   "--flink-parallelism", "2")
    local, prism, flink = r["runners"]
    assert (local["runner"], prism["runner"], flink["runner"]) == ("local", "prism", "flink")
    assert [run["parallelism"] for run in r["runners"]] == [1, 1, 2]
    for run in (prism, flink):
        assert run["identical_to_local"] and run["forgotten_clean"] and run["history_identical"], r
    assert local["forgotten_clean"] and local["history_identical"]
    assert prism["latency_samples"] == local["latency_samples"] == flink["latency_samples"] == 6


@pytest.mark.slow
def test_privacy_utility_bench_runs():
    r = final_json("privacy_utility.py", "--users-per-look", "2", "--photos", "6", "--epsilons", "1", "64",
                   "--trials", "2")
    assert [row["epsilon"] for row in r["rows"]] == ["no noise", 1, 64], r
    assert all(0 <= row["nn_accuracy"] <= 1 for row in r["rows"]) and r["sensitivity_median"] > 0


@pytest.mark.slow
def test_api_latency_bench_runs(broker_engine):
    r = final_json("api_latency.py", "--requests", "3", "--broker", broker_engine)
    assert r["direct"]["median_ms"] > 0 and r["api"]["median_ms"] > 0 and r["ratio_median"] > 0, r


@pytest.mark.slow
def test_scale_bench_runs_at_its_smallest_size_and_measures_again_on_a_kept_state(tmp_path):
    r = final_json("scale.py", "--sizes", "1000", "--photos", "5", "--dir", str(tmp_path), "--keep")
    size = r["sizes"]["1000"]
    for figure in ("update_p50_s", "update_p99_s", "cycle_s", "state_bytes_per_person", "rss_mb", "forget_rewrite_s",
                   "resume_s"):
        assert size[figure] > 0, (figure, size)
    assert size["update_p50_s"] <= size["update_p99_s"] and r["growth_1k_to_1m"] is None
    assert size["grow_runs"] == 1 and (tmp_path / "grown-1000x5" / "growing.json").exists()
    again = final_json("scale.py", "--sizes", "1000", "--photos", "5", "--dir", str(tmp_path))["sizes"]["1000"]
    assert again["grow_runs"] == 1 and again["state_bytes"] == size["state_bytes"], again  # not grown again
    assert again["grow_s"] == size["grow_s"] and again["forget_rewrite_s"] > 0
    assert (tmp_path / "grown-1000x5" / "growing.json").exists()  # kept, though this run did not ask


def test_a_stopped_growth_goes_on_where_it_stopped(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # what importing the bench sets, undone after the test
    import scale

    monkeypatch.setattr(scale, "PEOPLE_PER_CYCLE", 10)
    real_cycle, cycles = scale.Driver.cycle, []

    def counted(driver, batches, events):
        if len(cycles) == 1:
            raise KeyboardInterrupt  # the first run stops in its second cycle
        cycles.append(len(batches))
        return real_cycle(driver, batches, events)

    monkeypatch.setattr(scale.Driver, "cycle", counted)
    with pytest.raises(KeyboardInterrupt):
        scale.grow(tmp_path, 25, 2)
    cycles.append("stopped")
    progress = scale.grow(tmp_path, 25, 2)
    assert progress["complete"] and progress["runs"] == 2 and not progress["keep"]
    assert cycles == [10, "stopped", 10, 5]  # the second run starts with the people the first did not grow
    with scale.Store(scale.StateLayout(tmp_path).db) as store:
        assert store.next_cycle() == 4
        assert store.db.execute("SELECT count(*), max(version) FROM user_stats").fetchone() == (25, 1)
        assert store.db.execute("SELECT count(*) FROM contributions").fetchone()[0] == 25 * 2
    assert scale.grow(tmp_path, 25, 2, keep=True)["runs"] == 2  # complete: not grown again, now kept
