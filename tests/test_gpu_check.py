"""``vl3live gpu-check``: the CPU smoke runs every part of the command (so it cannot rot where CI has no
GPU) and fills every section with figures of the right kind; the parts only a GPU can run carry the gpu
marker."""

import json
import numbers
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vl3live", "gpu-check", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def _num(d: dict, *keys: str, positive: bool = True) -> None:
    for k in keys:
        v = d[k]
        assert isinstance(v, numbers.Real) and not isinstance(v, bool), f"{k}: {v!r} is not a number"
        assert v == v and (v > 0 if positive else v >= 0), f"{k}: {v!r}"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("gpu-check") / "report.json"
    r = _run("--cpu-smoke", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(out.read_text()), r.stderr


def test_cpu_smoke_fills_every_section_with_figures(smoke):
    data, stderr = smoke
    assert data["mode"] == "cpu-smoke" and data["errors"] == {} and data["skipped"] == []
    env = data["environment"]
    assert isinstance(env["torch"], str) and isinstance(env["transformers"], str)
    assert set(env["flash_varlen"]["keywords"]) == {"cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"}
    assert env["flash_varlen"]["all_named"] is True  # the installed transformers names each one
    tiny = data["models"]["tiny"]
    assert tiny["attention"]["engine_step"] in ("flex", "segments", "masked", "varlen")

    one = tiny["single_session"]
    _num(one, "ingest_ms_p50", "ingest_ms_p99", "peak_rss_mb")
    assert one["ingest_ms_p99"] >= one["ingest_ms_p50"]
    assert [p["frames"] for p in one["points"]] == [2, 4]
    for p in one["points"]:
        _num(p, "ttft_ms", "ttft_stock_ms", "decode_tok_s", "decode_tok_s_stock", "ttft_ratio", "decode_ratio")
    assert one["points"][1]["prompt_tokens"] > one["points"][0]["prompt_tokens"]
    full = one["full_budget"]
    _num(full, "ttft_ms", "ingest_evicting_ms_p50", "evicted_frames")
    assert full["cache_len_at_question"] <= full["budget_tokens"]

    calls = tiny["one_call_attention"]  # on a GPU: paged against segments; here flex
    assert calls["path"] == "flex" and calls["reference"] == "segments"
    assert [r["sessions"] for r in calls["runs"]] == [1, 2, 4]
    for r in calls["runs"]:
        _num(r["step_ms"], "flex", "segments")
        assert r["greedy_equal"] and r["max_abs_logit_diff"] <= 1e-4  # fp32: the same attention, one call

    many = tiny["many_sessions"]
    assert [r["sessions"] for r in many["runs"]] == [1, 2, 4]
    for r in many["runs"]:
        _num(r, "decode_step_ms", "answer_tok_s", "answer_tok_s_wall", "busy_share", "kernels_per_step",
             "launches_per_step", "frame_step_ms_8")
        assert r["busy_share"] <= 1.0
    # answer tokens/s is N tokens per all-decode step (timings themselves are the bench's, not a test's)
    for r in many["runs"]:
        assert r["answer_tok_s"] == pytest.approx(r["sessions"] * 1e3 / r["decode_step_ms"], rel=0.01)
    for r in many["streaming"]:
        _num(r, "frame_latency_ms_p50", "frame_latency_ms_p99", "frames_processed")
        assert r["frame_latency_ms_p99"] >= r["frame_latency_ms_p50"]

    fid = tiny["fidelity"]
    # fp32 on a CPU: the streamed, packed and re-rotated paths equal the offline ones to rounding
    assert fid["streamed_vs_offline"]["argmax_equal"] and fid["streamed_vs_offline"]["max_abs"] <= 1e-4
    assert fid["batched_vs_alone"]["argmax_equal"] and fid["batched_vs_alone"]["max_abs"] <= 1e-4
    ev = fid["eviction"]
    assert ev["evictions"] == 40 and ev["cache_len"] <= ev["budget_tokens"]
    for part in (ev["no_eviction"], ev["after"]):
        _num(part, "key_rel_err", "value_max_abs", "logits_max_abs", positive=False)
        assert part["key_rel_err"] <= 1e-5 and part["value_max_abs"] == 0.0
    for case in fid["resize"].values():
        _num(case, "max_grey_diff", "mean_grey_diff", positive=False)

    mem = tiny["memory"]
    _num(mem["pool"], "tokens", "gib", "bytes_per_token", "sessions_at_budget")
    oom = mem["oom"]
    assert oom["mode"] == "injected" and oom["oom_raised"]
    assert oom["others_went_on"] and oom["victim_recovered"] and oom["engine_alive"]
    # the table printed as it went: one row per figure, the last one the report's path
    assert "streamed vs offline logits" in stderr and "report in" in stderr.splitlines()[-1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_without_cuda_it_refuses_in_one_line(tmp_path):
    r = _run("--out", str(tmp_path / "x.json"), timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "no CUDA device" in r.stderr and "--cpu-smoke" in r.stderr
    assert not (tmp_path / "x.json").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_real_out_of_memory_stays_in_its_session_on_cuda():
    """On CUDA the victim's 4K frame runs out of memory for real; the tiny model in bf16 keeps it quick."""
    from model import load_model
    from vl3live.gpu_check import GpuCheckConfig, make_plan
    from vl3live.gpu_probes import batched_vs_alone, oom_in_one_session

    lm = load_model("tiny", device="cuda", dtype="bfloat16")
    plan = make_plan(GpuCheckConfig(quick=True))
    oom = oom_in_one_session(lm, plan)
    assert oom["mode"] == "real" and oom["oom_raised"], oom
    assert oom["others_went_on"] and oom["victim_recovered"], oom
    assert batched_vs_alone(lm, plan)["argmax_equal"]


def test_quick_halves_the_plan_and_keeps_to_the_2b():
    from vl3live.gpu_check import GpuCheckConfig, make_plan

    full, quick = make_plan(GpuCheckConfig()), make_plan(GpuCheckConfig(quick=True))
    assert full.models == ("random-2b", "random-7b") and quick.models == ("random-2b",)
    assert (full.ttft_frames, full.budget_tokens, full.decode_tokens, full.evictions) == ((60, 180), 16384, 128, 40)
    assert quick.seconds == full.seconds / 2 and max(quick.ttft_frames) == max(full.ttft_frames) // 2
    assert quick.budget_tokens == full.budget_tokens // 2 and quick.decode_tokens == full.decode_tokens // 2
    assert max(quick.sessions) == max(full.sessions) // 2 and quick.evictions == full.evictions // 2
    assert make_plan(GpuCheckConfig(quick=True, seconds=100)).seconds == 100


def test_past_the_time_limit_nothing_new_starts_and_the_report_says_so(tmp_path):
    out = tmp_path / "report.json"
    r = _run("--cpu-smoke", "--seconds", "0.01", "--out", str(out), timeout=120)
    data = json.loads(out.read_text())
    assert r.returncode == 0 and data["skipped"] == ["tiny"] and data["models"] == {}
    assert isinstance(data["environment"]["torch"], str)  # what ran before the limit is in the report
    assert "time limit reached" in r.stderr
