"""Smoke test of bench/bench_sampler.py: its quick CPU mode runs at the tiny size and writes a
consistent JSON. Timings on a shared CPU are noise; the test checks that every number is there,
finite and positive, that the accounting adds up, and the facts that do not depend on timing
(how many steps each image guided, which decoder the guidance pass ran)."""

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import bench_sampler  # noqa: E402

OPTIONS = ("baseline", "tiny_decoder+every2")
BATCHES = (1, 2)
STEPS = 2  # --quick: 2-step images


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "sampler.json"
    cmd = [sys.executable, os.path.join(ROOT, "bench", "bench_sampler.py"), "--device", "cpu", "--size", "tiny",
           "--quick", "--options", ",".join(OPTIONS), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Targets" in proc.stdout
    with open(out) as f:
        return json.load(f)


def positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_meta(results):
    meta = results["meta"]
    assert meta["device"] == "cpu" and meta["size"] == "tiny" and meta["quick"]
    assert meta["threads"] == 1 and meta["steps"] == STEPS and meta["batch_sizes"] == list(BATCHES)
    assert meta["options"] == list(OPTIONS)


def test_one_row_per_option_and_batch(results):
    rows = results["results"]
    assert [(r["option"], r["batch"]) for r in rows] == [(o, b) for o in OPTIONS for b in BATCHES]
    assert not any(r.get("oom") for r in rows)


def test_times_are_finite_positive_and_add_up(results):
    for r in results["results"]:
        assert list(r["parts"]) == list(bench_sampler.PARTS)
        assert all(positive(p["ms"]) for p in r["parts"].values()), r["parts"]
        for key in ("sum_of_parts_ms", "ltg_step_ms", "whole_over_parts"):
            assert positive(r[key]), (key, r[key])
        for mode in ("unguided", "ltg"):
            m = r[mode]
            assert positive(m["step"]["ms"]) and positive(m["image"]["ms"]) and positive(m["images_per_s"])
            assert m["images_per_s"] == pytest.approx(r["batch"] / m["image"]["ms"] * 1e3)
            assert m["peak_gib"] is None  # CPU: no GPU memory
        assert r["sum_of_parts_ms"] == pytest.approx(sum(p["ms"] for p in r["parts"].values()))
        assert r["ltg_step_ms"] == r["ltg"]["step"]["ms"]
        assert r["other_ms"] == pytest.approx(r["ltg_step_ms"] - r["sum_of_parts_ms"])
        assert r["whole_over_parts"] == pytest.approx(r["ltg_step_ms"] / r["sum_of_parts_ms"])
        assert r["ltg_over_unguided_image"] == pytest.approx(r["ltg"]["image"]["ms"] / r["unguided"]["image"]["ms"])


def test_images_guide_the_steps_their_option_says(results):
    for r in results["results"]:
        assert r["unguided"]["guided_steps"] == 0
        every = 2 if "every2" in r["option"] else 1
        assert r["ltg"]["guided_steps"] == len(range(0, STEPS, every)), r["option"]


def test_counts(results):
    counts = results["counts"]
    assert list(counts) == list(OPTIONS)
    for option, parts in counts.items():
        assert list(parts) == list(bench_sampler.PARTS)
        for part in ("network", "decode_forward", "predictor_forward_backward", "decode_backward"):
            assert positive(parts[part]["gflop"]), (option, part)
            assert positive(parts[part]["traffic_mb"]), (option, part)
        assert parts["decode_forward"]["saved_mb"] > 0            # the guidance decode keeps its graph
        assert parts["network"]["saved_mb"] == 0                 # the UNet runs without one
    base, tiny = counts["baseline"], counts["tiny_decoder+every2"]
    assert tiny["network"]["gflop"] == pytest.approx(base["network"]["gflop"])           # the same UNet
    assert tiny["decode_forward"]["gflop"] != pytest.approx(base["decode_forward"]["gflop"])  # another decoder


def test_targets_listed(results):
    names = {t["target"].split(" <=")[0] for t in results["targets"]}
    assert names == {"full-fidelity LTG step / sum of parts", "fastest mode image / unguided image",
                     f"bf16 guided batch {bench_sampler.BF16_BATCH} peak GiB"}
    baseline = {r["batch"]: r["whole_over_parts"] for r in results["results"] if r["option"] == "baseline"}
    for t in results["targets"]:
        if t["target"].startswith("full-fidelity"):
            assert t["value"] == baseline[t["batch"]]
            assert t["passed"] == (t["value"] <= bench_sampler.MAX_WHOLE_OVER_PARTS)
        if t["target"].startswith("bf16"):
            assert t["passed"] is None  # not measured on a CPU


def test_targets_judge_their_thresholds():
    def row(option, whole_over_parts, image_ratio):
        return dict(option=option, batch=1, whole_over_parts=whole_over_parts, ltg_over_unguided_image=image_ratio)

    rows = [row("baseline", 1.2, 3.0), row("tiny_decoder", 1.0, 1.7), row("tiny_decoder+every2", 1.0, 1.4)]
    by_name = {t["target"].split(" <=")[0]: t for t in bench_sampler.targets(rows, bench_sampler.torch.device("cpu"))}
    assert by_name["full-fidelity LTG step / sum of parts"]["passed"] is False
    fastest = by_name["fastest mode image / unguided image"]
    assert fastest["option"] == "tiny_decoder+every2" and fastest["passed"] is True


def test_unknown_option_is_refused():
    with pytest.raises(SystemExit):
        bench_sampler.parse_args(["--options", "baseline,bf17"])


# --- model families at native resolution (--size sdxl,sd35,flux): counts on the meta device ---

# Parameters of each published network: the hub checkpoints' counts (SD 3.5 Large: its model card's 8.1B).
PUBLISHED_PARAMETERS = {"sd14": 859_520_964, "sdxl": 2_567_463_684, "sd35": 8.1e9, "flux": 11_901_408_320}


@pytest.mark.parametrize("size", list(PUBLISHED_PARAMETERS))
def test_family_networks_are_the_published_architectures(size):
    """A layer too many or too few (SD 3.5: one block is 2.6% of it) would miss these counts."""
    architecture = bench_sampler.FAMILY_SIZES[size]
    pipe = bench_sampler.family_pipeline(architecture, bench_sampler.torch.device("meta"))
    network = getattr(pipe, bench_sampler.network_name(architecture.pipeline))
    count = sum(p.numel() for p in network.parameters())
    assert count == pytest.approx(PUBLISHED_PARAMETERS[size], rel=0.01 if size == "sd35" else 0)


FAMILY_OPTIONS = ("baseline", "tiny_decoder+every2")


@pytest.fixture(scope="module")
def flux_counts(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "families.json"
    cmd = [sys.executable, os.path.join(ROOT, "bench", "bench_sampler.py"), "--device", "cpu", "--size", "flux",
           "--options", ",".join(FAMILY_OPTIONS), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "counts only, on the meta device" in proc.stdout and "LTG/unguided" in proc.stdout
    with open(out) as f:
        return json.load(f)


def test_flux_counts_at_native_resolution(flux_counts):
    assert flux_counts["meta"]["count_only"] and flux_counts["results"] == []
    flux = flux_counts["families"]["flux"]
    assert (flux["resolution"], flux["latent"], flux["cfg"], flux["steps"]) == (1024, [4096, 64], False, 28)
    base, cheap = (flux["options"][o] for o in FAMILY_OPTIONS)
    assert (base["guided_steps"], cheap["guided_steps"]) == (27, 13)          # never at sigma = 1
    assert base["parts"]["network"]["gflop"] == cheap["parts"]["network"]["gflop"] > 0
    assert base["parts"]["decode_forward"]["gflop"] > 10 * cheap["parts"]["decode_forward"]["gflop"] > 0
    assert flux["final_decode"]["gflop"] == pytest.approx(base["parts"]["decode_forward"]["gflop"])  # the full VAE
    for option in (base, cheap):
        parts = option["parts"]
        unguided = flux["steps"] * parts["network"]["gflop"] + flux["final_decode"]["gflop"]
        added = sum(parts[p]["gflop"] for p in bench_sampler.GUIDANCE_PARTS) * option["guided_steps"]
        assert option["ltg_over_unguided"] == pytest.approx((unguided + added) / unguided)
    assert 1 < cheap["ltg_over_unguided"] < base["ltg_over_unguided"]


def test_family_sizes_are_refused_with_what_is_accepted(capsys):
    with pytest.raises(SystemExit):
        bench_sampler.parse_args(["--size", "sdxl,kandinsky"])
    assert "kandinsky is not a model family; choose from sd14, sdxl, sd35, flux" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_sampler.parse_args(["--size", "flux", "--options", "bf16"])
    assert "the model families take baseline or tiny_decoder, checkpoint_decoder, every2" in capsys.readouterr().err


@pytest.mark.parametrize("family", ["sd14", "sd3"])
def test_the_step_rows_time_guided_steps_only(tiny_models, family):
    """A step row is the sampler's loop over LOOP_STEPS steps, each guided: rectified flow's first step (sigma = 1)
    is never guided, so it must not be in the loop a row divides by LOOP_STEPS."""
    pipe = tiny_models.loader(lambda _, path: bench_sampler.ltg.load_pipeline(path))(family)
    head = bench_sampler.epistemic_head("resnet18", bench_sampler.torch.device("cpu"))
    case = bench_sampler.Case(pipe, head, None, frozenset(), 1, 2, 32, None)
    _, skipped, ratios = case.step(case.guidance)()
    assert len(ratios) == bench_sampler.LOOP_STEPS and skipped.tolist() == [0]
