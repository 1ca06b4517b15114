"""train_loop.py on tiny configs: results, the mined dataset, kill -9 and --resume, two gloo processes,
a damaged or busy run folder, bad flags, and the paper-dataset path offline (download and hub faked).

The cycle runs in subprocesses, as a user runs it (and so its deterministic-algorithm and thread
settings stay out of this process), except where a boundary (the network) must be faked in-process;
flag checks run in-process through `train_loop.main`.
"""

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import introspect
import livt
import run_folder
import tasks
import train_flags
import train_loop
from test_introspect import server  # noqa: F401  (the loopback OpenAI-compatible endpoint)
from tiny_sd import install_in_hub_cache

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--pretrain-epochs", "1", "--epochs", "3", "--batch-size", "64", "--gen-epochs", "0,2", "--synthetic", "0.1",
        "--steps", "4", "--gen-batch", "4", "--threads", "1"]
ENV = os.environ | {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def run_script(*args, cwd, check=True, launcher=(sys.executable,), script=ROOT / "train_loop.py"):
    proc = subprocess.run([*launcher, str(script), *map(str, args)], cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def run_main(main, *args, capsys):
    """main(argv) as a user's command, but in this process (no interpreter start-up): its exit code and stderr."""
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    return subprocess.CompletedProcess(args, code, "", capsys.readouterr().err)


def load_compare():
    spec = importlib.util.spec_from_file_location("compare", ROOT / "bench" / "compare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def one_line_error(proc, *messages):
    """The run failed with exit code 2 and one line on stderr holding every message."""
    err = proc.stderr.strip()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "\n" not in err and "Traceback" not in err, err
    for m in messages:
        assert m in err, err
    return err


def snapshot(folder):
    return {p: p.read_bytes() for p in Path(folder).rglob("*") if p.is_file() and p.name != "lock"}


@pytest.fixture(scope="module")
def foundation(tmp_path_factory):
    """A digits foundation model trained for a few steps: poor images, but the real code path."""
    out = tmp_path_factory.mktemp("foundation")
    run_script("--steps", "3", "--threads", "1", "--out", out, cwd=out, script=ROOT / "assets" / "train_digits_unet.py")
    return out


@pytest.fixture(scope="module")
def reference_run(foundation, tmp_path_factory):
    """An uninterrupted tiny run: the reference for the resumed ones."""
    out = tmp_path_factory.mktemp("reference") / "run"
    run_script(*TINY, "--diffusion", foundation, "--out", out, cwd=out.parent)
    return out


@pytest.fixture
def copy_of_reference(reference_run, tmp_path):
    """A finished run to damage: its own copy."""
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    return run


def test_foundation_retrains_bit_for_bit(foundation, tmp_path):
    run_script("--steps", "3", "--threads", "1", "--out", tmp_path, cwd=tmp_path,
               script=ROOT / "assets" / "train_digits_unet.py")
    for name in ("diffusion_pytorch_model.safetensors", "config.json", "scheduler_config.json"):
        assert (tmp_path / name).read_bytes() == (foundation / name).read_bytes(), name


def test_run_folder_holds_the_results(reference_run):
    metrics = json.loads((reference_run / "metrics.json").read_text())
    assert [(e["phase"], e["phase_epoch"]) for e in metrics["epochs"]] == [("pretrain", 0), ("finetune", 0),
                                                                           ("finetune", 1), ("finetune", 2)]
    counts = metrics["train_counts"]
    # the long-tail field's groups by real training images (> 100, 20-100, < 20), the digits' rarest third, and the
    # weakest third on validation at the end of pretraining
    first = metrics["epochs"][0]
    assert metrics["class_groups"] == dict(many=[c for c in range(10) if counts[c] > 100],
                                           medium=[c for c in range(10) if 20 <= counts[c] <= 100],
                                           few=[c for c in range(10) if counts[c] < 20], tail=[7, 8, 9],
                                           hard=tasks.weakest_classes(first["val_per_class_acc"]))
    assert metrics["class_groups"]["medium"] and metrics["class_groups"]["few"]   # digits' head has < 100 images
    assert "hard_acc" not in first and all("hard_acc" in e for e in metrics["epochs"][1:])
    for e in metrics["epochs"]:  # the validation and shifted sets are evaluated like the test set, every epoch
        for prefix in ("", "val_", "shifted_"):
            assert e[f"{prefix}worst_acc"] == pytest.approx(min(e[f"{prefix}per_class_acc"]), abs=1e-6)
            assert e[f"{prefix}worst_acc"] <= e[f"{prefix}acc"]
    assert 25 <= counts[0] / counts[-1] <= 40, counts                  # imbalance ratio about 30
    budget = metrics["synthetic_budget"]
    assert budget == round(0.1 * sum(counts))
    assert [(r["round"], r["epoch"], r["images"]) for r in metrics["rounds"]] == [(0, 0, budget - budget // 2),
                                                                                 (1, 2, budget // 2)]
    # real and synthetic mixed in every fine-tuning epoch, the synthetic set growing by round
    assert [e["synthetic"] for e in metrics["epochs"]] == [0, budget - budget // 2, budget - budget // 2, budget]
    test_counts = np.bincount(tasks.digits_split()[1][1].numpy(), minlength=10)
    for e in metrics["epochs"]:
        per_class = np.array(e["per_class_acc"])
        for group, classes in metrics["class_groups"].items():   # each group's top-1 over its test images
            if f"{group}_acc" in e:
                expected = (per_class[classes] * test_counts[classes]).sum() / test_counts[classes].sum() if classes else None
                assert e[f"{group}_acc"] == pytest.approx(expected, abs=1e-5), group
        assert e["acc"] == pytest.approx((per_class * test_counts).sum() / test_counts.sum(), abs=1e-5)
    rows = run_folder.read_metadata(reference_run / "synthetic" / "metadata.jsonl")
    assert len(rows) == budget
    for r in rows:
        assert (reference_run / "synthetic" / r["file_name"]).is_file()
        assert r["label"] == r["index"] % 10 and r["w"] == 0.07 and r["prompt"] is None
        assert r["seed"] == train_loop.derive_seed(0, r["round"], r["index"])
    mean = sum(r["signal"] for r in rows if r["round"] == 0) / metrics["rounds"][0]["images"]
    assert metrics["rounds"][0]["mean_signal"] == pytest.approx(mean)
    for name in ("accuracy.png", "rounds/round0.png", "rounds/round1.png", "checkpoint.pt", "pretrained.pt",
                 "config.json", "synthetic/README.md"):
        assert (reference_run / name).is_file(), name
    state = torch.load(reference_run / "checkpoint.pt")
    assert state["epoch"] == 3 and state["num_classes"] == 10 and state["config"]["guidance_weight"] == 0.07
    assert {"optimizer", "schedule", "head", "metrics"} <= state.keys()
    assert not list(reference_run.rglob(".*.tmp")), "a temp file was left behind"
    assert not (reference_run / "generation").exists(), "rank shards are merged and removed"


def test_the_mined_images_load_as_a_dataset(reference_run):
    """synthetic/ as it is: Hugging Face imagefolder with every metadata column, torchvision ImageFolder with
    folder order = label, and a dataset card that counts them."""
    datasets = pytest.importorskip("datasets")
    folder = reference_run / "synthetic"
    rows = {r["file_name"]: r for r in run_folder.read_metadata(folder / "metadata.jsonl")}
    ds = datasets.load_dataset("imagefolder", data_dir=str(folder), split="train")
    assert len(ds) == len(rows)
    columns = {"image", "label", "class_name", "prompt", "seed", "w", "signal", "total", "epistemic", "aleatoric",
               "predicted_label", "round", "index", "guidance_ratio"}
    assert columns <= set(ds.column_names), ds.column_names
    by_index = {(r["round"], r["index"]): r for r in rows.values()}
    for item in ds:
        row = by_index[(item["round"], item["index"])]
        assert item["image"].size == (8, 8) and item["image"].mode == "L"
        for key in columns - {"image"}:
            assert item[key] == pytest.approx(row[key]) if isinstance(row[key], float) else item[key] == row[key], key
        assert item["total"] == pytest.approx(item["epistemic"] + item["aleatoric"], abs=1e-5)
        assert item["signal"] == item["total"]                                  # --signal total
        assert 0 <= item["predicted_label"] < 10 and item["class_name"] == str(item["label"])
    tv = __import__("torchvision").datasets.ImageFolder(str(folder))
    assert len(tv) == len(rows)
    for path, label in tv.samples:
        assert rows[str(Path(path).relative_to(folder))]["label"] == label
    card = (folder / "README.md").read_text()
    counts = np.bincount([r["label"] for r in rows.values()], minlength=10)
    assert card.startswith("---\n") and "task_categories:" in card
    for c in range(10):
        assert f"| {c} | {c} | {counts[c]} |" in card
    assert "python train_loop.py --pretrain-epochs 1" in card and '"guidance_weight": 0.07' in card
    histogram = [line for line in card.splitlines() if line.startswith("| ") and " – " in line]
    assert sum(int(line.split("|")[2]) for line in histogram) == len(rows)


def kill_when(args, cwd, appears, min_count=1):
    """Start the run, SIGKILL it as soon as `appears` (a glob under cwd) matches min_count files."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_loop.py"), *map(str, args)], cwd=cwd, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while len(list(cwd.glob(appears))) < min_count:
        assert proc.poll() is None, f"the run ended before {appears} appeared: {proc.stderr.read()[-2000:]}"
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def test_killed_runs_resume_to_the_same_metrics(foundation, reference_run, tmp_path):
    run = tmp_path / "run"
    args = [*TINY, "--diffusion", foundation]
    kill_when([*args, "--out", run], tmp_path, "run/synthetic/*/r00_*.png")            # mid round 0
    kill_when(["--resume", run], tmp_path, "run/synthetic/metadata.jsonl")             # round 0 merged
    kill_when(["--resume", run], tmp_path, "run/synthetic/*/r01_*.png", min_count=3)   # mid round 1
    run_script("--resume", run, cwd=tmp_path)
    assert json.loads((run / "metrics.json").read_text()) == json.loads((reference_run / "metrics.json").read_text())
    assert ((run / "synthetic" / "metadata.jsonl").read_text()
            == (reference_run / "synthetic" / "metadata.jsonl").read_text())


def test_resume_after_a_kill_between_epochs(foundation, reference_run, tmp_path):
    run = tmp_path / "run"
    kill_when([*TINY, "--diffusion", foundation, "--out", run], tmp_path, "run/checkpoint.pt")
    run_script("--resume", run, cwd=tmp_path)
    assert json.loads((run / "metrics.json").read_text()) == json.loads((reference_run / "metrics.json").read_text())


def test_a_kill_right_after_the_pretraining_checkpoint_still_gives_pretrained_pt(foundation, reference_run, tmp_path):
    """The process dies (os._exit) as soon as the end-of-pretraining checkpoint.pt is on disk."""
    run = tmp_path / "run"
    wrapper = tmp_path / "die_after_checkpoint.py"
    wrapper.write_text(textwrap.dedent("""
        import os, sys
        import run_folder, train_loop
        write = run_folder.write_atomic
        def write_then_die(path, data):
            write(path, data)
            if str(path).endswith("checkpoint.pt"):
                os._exit(137)
        train_loop.write_atomic = write_then_die
        train_loop.main(sys.argv[1:])
    """))
    proc = run_script(*TINY, "--diffusion", foundation, "--out", run, cwd=tmp_path, check=False, script=wrapper)
    assert proc.returncode == 137 and torch.load(run / "checkpoint.pt")["epoch"] == 0
    run_script("--resume", run, cwd=tmp_path)
    mine, reference = (torch.load(r / "pretrained.pt") for r in (run, reference_run))
    assert mine["epoch"] == reference["epoch"] == 0 and mine["metrics"] == reference["metrics"]
    assert all(torch.equal(mine["head"][k], reference["head"][k]) for k in reference["head"])
    assert json.loads((run / "metrics.json").read_text()) == json.loads((reference_run / "metrics.json").read_text())


def test_init_from_a_pretrained_run_ends_as_an_independent_run(foundation, reference_run, tmp_path):
    """--init-from RUN/pretrained.pt: pretraining flags and history come from that run; the rest is this run's."""
    run = tmp_path / "run"
    flags = [*TINY, "--diffusion", foundation, "--out", run]
    one_line_error(run_script(*flags, "--init-from", reference_run / "pretrained.pt", "--seed", "3", cwd=tmp_path,
                              check=False), "--seed 3: --init-from", "has --seed 0")
    assert not run.exists()
    run_script(*flags, "--init-from", reference_run / "pretrained.pt", cwd=tmp_path)
    assert json.loads((run / "metrics.json").read_text()) == json.loads((reference_run / "metrics.json").read_text())
    one_line_error(run_script(*flags[:-2], "--out", tmp_path / "other", "--init-from", reference_run / "checkpoint.pt",
                              cwd=tmp_path, check=False), "not at the end of pretraining")


def test_compare_runs_the_arms_and_reports_paired_differences(foundation, reference_run, tmp_path):
    out = tmp_path / "cmp"
    args = ["--seeds", "1", "--profiles", "30,10@1", "--sweep", "0,0.5", "--budgets", "0.05",
            "--variant", "filter=--label-filter judge", "--out", out, "--", *TINY, "--diffusion", foundation]
    run_script(*args, cwd=tmp_path, script=ROOT / "bench" / "compare.py")
    report = json.loads((out / "comparison.json").read_text())
    assert list(report["profiles"]) == ["r30", "r10-o1"]
    names = ["real", "unguided", "ltg", "w0.5", "unguided-x0.05", "ltg-x0.05", "ltg+filter"]
    assert list(report["pooled"]) == names and all(list(p["arms"]) == names for p in report["profiles"].values())
    assert report["accuracies"][:7] == ["acc", "medium_acc", "few_acc", "tail_acc", "hard_acc", "worst_acc",
                                        "shifted_acc"] and "val_acc" in report["accuracies"]
    # an arm started from a sibling's pretrained predictor (--init-from) ends exactly as an independent run
    assert (json.loads((out / "r30" / "ltg" / "seed0" / "metrics.json").read_text())
            == json.loads((reference_run / "metrics.json").read_text()))
    config = json.loads((out / "r10-o1" / "ltg+filter" / "seed0" / "config.json").read_text())
    assert config["init_from"].endswith("r10-o1/real/seed0/pretrained.pt") and config["label_filter"] == "judge"
    assert (config["imbalance"], config["class_order"]) == (10, "1")
    counts = report["profiles"]["r10-o1"]["train_counts"]
    assert counts[tasks.class_order("1", 10)[0]] == max(counts) and max(counts) / min(counts) == pytest.approx(10, rel=.3)
    pooled = report["pooled"]
    for name, arm in pooled.items():
        assert arm["acc"]["n"] == 2 and len(arm["per_seed"]) == 2
        assert (arm["signal"] is None) == (name == "real")
    ltg_arm, unguided, filtered = pooled["ltg"], pooled["unguided"], pooled["ltg+filter"]
    d = [a["hard_acc"] - b["hard_acc"] for a, b in zip(ltg_arm["per_seed"], unguided["per_seed"])]
    assert ltg_arm["minus_unguided"]["hard_acc"]["mean"] == pytest.approx(sum(d) / 2)
    assert ltg_arm["minus_unguided"]["hard_acc"]["se"] == pytest.approx(abs(d[0] - d[1]) / 2)
    assert "minus_unguided" in pooled["ltg-x0.05"] and "minus_unguided" not in unguided
    assert "minus_ltg" in filtered and "minus_ltg" not in ltg_arm
    assert 0.0 < ltg_arm["guidance_ratio"]["mean"] and unguided["guidance_ratio"]["mean"] == 0.0
    # the filtered arm trains on exactly the images the judge recognises
    assert filtered["kept"]["mean"] == pytest.approx(filtered["judge_acc"]["mean"]) and ltg_arm["kept"]["mean"] == 1
    assert report["chosen_on_validation"] == load_compare().chosen_on_validation(report["profiles"], pooled, 0.1)
    for name in ("comparison.md", "comparison.png", "per_class.png", "rarest.png", "sweep.png", "budgets.png"):
        assert (out / name).is_file(), name
    markdown = (out / "comparison.md").read_text()
    assert "| ltg | 0.07 | x0.1 |" in markdown and "| arm | w | synthetic | overall | medium-shot |" in markdown
    assert "### Profile r10-o1" in markdown and "minus LTG" in markdown
    before = {p: p.stat().st_mtime_ns for p in out.rglob("checkpoint.pt")}
    run_script(*args, cwd=tmp_path, script=ROOT / "bench" / "compare.py")  # everything is done: nothing is trained again
    assert {p: p.stat().st_mtime_ns for p in out.rglob("checkpoint.pt")} == before


def test_an_option_replaces_ltg_only_if_it_wins_on_validation_in_every_profile():
    compare = load_compare()
    def arm(w, val, flags=""):  # two profiles x two seeds of validation top-1
        runs = [dict(val_acc=v) for v in val]
        return dict(w=w, synthetic=6.0, flags=flags, val_acc=dict(mean=sum(val) / 4), per_seed=runs)
    ltg = [0.90, 0.91, 0.92, 0.93]
    pooled = dict(unguided=arm(0, [0.8] * 4), ltg=arm(0.07, ltg),
                  steady=arm(0.07, [v + 0.01 for v in ltg], "x"),                   # +1 pp on every seed: wins
                  noisy=arm(0.07, [v + d for v, d in zip(ltg, (0.04, -0.03, 0.04, -0.03))], "y"),   # within its SE
                  one_sided=arm(0.07, [v + d for v, d in zip(ltg, (0.03, 0.03, -0.001, -0.001))], "z"))  # loses one
    profiles = {p: dict(arms={n: dict(a, per_seed=a["per_seed"][2 * i:2 * i + 2]) for n, a in pooled.items()})
                for i, p in enumerate(("r30", "r10"))}
    assert compare.chosen_on_validation(profiles, pooled, 6.0) == "steady"
    del pooled["steady"]
    assert compare.chosen_on_validation(profiles, pooled, 6.0) == "ltg"


@pytest.mark.parametrize("flags, message", [
    (["--sweep", "0,-1"], "--sweep '0,-1': expected comma-separated numbers >= 0"),
    (["--seeds", "0"], "--seeds 0: must be >= 1"),
    (["--", "--seed", "3"], "--seed is set per arm by compare.py"),
    (["--profiles", "30,x"], "--profiles '30,x': 'x' is not RATIO or RATIO@SEED"),
    (["--profiles", "30", "--", "--dataset", "flowers"], "--profiles shapes the digits' long tail"),
    (["--variant", "Bad=--x"], "--variant 'Bad=--x': expected NAME=\"FLAGS\""),
    (["--variant", "mix=--unguided-share 2"], "--unguided-share 2.0: must lie in 0..1"),
    (["--", "--guidance-weight", "-1"], "--guidance-weight -1.0: must be finite and >= 0"),
])
def test_compare_refuses_bad_flags_in_one_line(flags, message, tmp_path, capsys):
    proc = run_main(load_compare().main, "--out", tmp_path / "cmp", *flags, capsys=capsys)
    one_line_error(proc, message)
    assert list(tmp_path.iterdir()) == []


def test_two_gloo_processes_share_generation(foundation, tmp_path):
    run = tmp_path / "run"
    run_script(*TINY, "--diffusion", foundation, "--out", run, cwd=tmp_path,
               launcher=(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"))
    metrics = json.loads((run / "metrics.json").read_text())
    rows = run_folder.read_metadata(run / "synthetic" / "metadata.jsonl")
    for r in metrics["rounds"]:
        indices = [x["index"] for x in rows if x["round"] == r["round"]]
        assert sorted(indices) == list(range(r["images"])), "missing or duplicate images"
    assert sum(r["images"] for r in metrics["rounds"]) == metrics["synthetic_budget"] == len(rows)
    assert len(list((run / "synthetic").glob("*/*.png"))) == len(rows)
    assert not (run / "generation").exists()
    assert len(metrics["epochs"]) == 4


# --- a damaged or busy run folder: one line, exit 2, nothing changed ---

def drop_lines(path, keep):
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[i] for i in keep(len(lines))))


@pytest.mark.parametrize("damage, message", [
    (lambda run: drop_lines(run / "synthetic" / "metadata.jsonl", lambda n: range(n - 3)),
     "round 1 made"),                                                                     # whole lines lost
    (lambda run: (run / "synthetic" / "metadata.jsonl").write_text(
        (run / "synthetic" / "metadata.jsonl").read_text()[:-40]), "metadata.jsonl:"),   # cut mid-line
    (lambda run: next((run / "synthetic").glob("*/r01_*.png")).unlink(), "which is missing from"),
    (lambda run: (run / "checkpoint.pt").write_bytes(b""), "checkpoint.pt is damaged"),
    (lambda run: (run / "checkpoint.pt").write_bytes((run / "checkpoint.pt").read_bytes()[:5000]),
     "checkpoint.pt is damaged"),
    (lambda run: (run / "config.json").write_text((run / "config.json").read_text()[:100]), "config.json is damaged"),
])
def test_a_damaged_run_fails_to_resume_in_one_line(copy_of_reference, damage, message, capsys, torch_settings):
    damage(copy_of_reference)
    before = snapshot(copy_of_reference)
    one_line_error(run_main(train_loop.main, "--resume", copy_of_reference, capsys=capsys), message)
    assert snapshot(copy_of_reference) == before


def test_resume_clears_temporary_files_and_allows_speed_flags(copy_of_reference, capsys, torch_settings):
    leftovers = [copy_of_reference / ".checkpoint.pt.4242.tmp", copy_of_reference / "synthetic" / "000-0" / ".x.png.7.tmp"]
    for path in leftovers:
        path.write_bytes(b"half")
    metrics = (copy_of_reference / "metrics.json").read_text()
    assert run_main(train_loop.main, "--resume", copy_of_reference, "--threads", "2", "--workers", "0",
                    capsys=capsys).returncode == 0
    assert not any(p.exists() for p in leftovers)
    assert (copy_of_reference / "metrics.json").read_text() == metrics


def test_resume_refuses_flags_that_change_the_run(copy_of_reference, capsys):
    config = (copy_of_reference / "config.json").read_text()
    err = one_line_error(run_main(train_loop.main, "--resume", copy_of_reference, "--guidance-weight", "0.5", capsys=capsys),
                         "--guidance-weight 0.5", "has --guidance-weight 0.07")
    assert "drop --guidance-weight" in err
    assert (copy_of_reference / "config.json").read_text() == config


def test_a_second_process_on_a_run_stops_naming_the_holder(copy_of_reference, tmp_path):
    holder = run_folder.take_lock(run_folder.RunFolder(copy_of_reference))
    try:
        one_line_error(run_script("--resume", copy_of_reference, cwd=tmp_path, check=False),
                       "is in use by pid", f"pid {os.getpid()}")
    finally:
        holder.close()


def test_the_default_command_after_a_kill_points_to_resume(foundation, tmp_path):
    kill_when([*TINY, "--diffusion", foundation, "--epochs", "2", "--gen-epochs", "0"], tmp_path,
              "runs/*/checkpoint.pt")
    proc = run_script(*TINY, "--diffusion", foundation, "--epochs", "2", "--gen-epochs", "0", cwd=tmp_path, check=False)
    one_line_error(proc, "holds an unfinished run", "--resume runs/digits-w0.07-x0.1-seed0")
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["digits-w0.07-x0.1-seed0"]


def test_ctrl_c_prints_one_line(foundation, tmp_path):
    # SIGINT at its default in the child, as in a terminal: a suite started in the background (`cmd &`) inherits it
    # ignored, and Python then installs no KeyboardInterrupt handler
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_loop.py"), *TINY, "--diffusion", foundation,
                             "--out", tmp_path / "run"], cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while not (tmp_path / "run" / "config.json").exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == f"train_loop.py: interrupted; continue with --resume {tmp_path / 'run'}", err
    assert "Traceback" not in err


def test_a_full_disk_is_one_line(monkeypatch):
    def no_space(*args):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(run_folder.RunFolderError, match="cannot write .*metrics.json: No space left on device"):
        run_folder.write_json(Path("/tmp") / "ltg-full" / "metrics.json", {})
    assert not list((Path("/tmp") / "ltg-full").glob(".*.tmp"))


def test_files_are_written_whole_with_the_umasks_mode(tmp_path):
    old = os.umask(0o022)
    try:
        run_folder.write_json(tmp_path / "new" / "metrics.json", {"acc": 0.5})
    finally:
        os.umask(old)
    assert json.loads((tmp_path / "new" / "metrics.json").read_text()) == {"acc": 0.5}
    assert (tmp_path / "new" / "metrics.json").stat().st_mode & 0o777 == 0o644
    assert [p.name for p in (tmp_path / "new").iterdir()] == ["metrics.json"]


# --- flags: bad values give one line naming the value and what is accepted, exit 2, nothing written ---

@pytest.mark.parametrize("flags, message", [
    (["--guidance-weight", "-1"], "--guidance-weight -1.0: must be finite and >= 0"),
    (["--dataset", "mnist"], ["invalid choice: 'mnist'", "digits", "flowers", "caltech101", "imagenet-lt"]),
    (["--signal", "entropy"], ["invalid choice: 'entropy'", "total", "epistemic", "aleatoric"]),
    (["--gen-epochs", ","], "--gen-epochs ',': empty schedule"),
    (["--synthetic", "0", "--gen-epochs", "0,5"], "with --synthetic 0: a zero budget has no rounds"),
    (["--epochs", "4", "--gen-epochs", "0,4"], "epochs must lie in 0..3"),
    (["--synthetic", "-2"], "--synthetic -2.0: must be >= 0"),
    (["--arch", "resnet51"], ["--arch resnet51: unknown; use 'cnn', a torchvision classifier", "timm ViT"]),
    (["--arch", "resnet18"], "the digits predictor is --arch cnn"),
    (["--dataset", "flowers", "--mixup", "--batch-size", "3"], "--batch-size 3: mixup pairs each batch"),
    (["--dataset", "imagenet-lt", "--loss", "focal"], ["invalid choice: 'focal'", "ce", "bal-bce"]),
    (["--dataset", "flowers", "--data-root", "{tmp}/empty", "--no-download"],
     ["empty/flowers-102 (--no-download)", "drop --no-download", "https://www.robots.ox.ac.uk/"]),
    (["--dataset", "imagenet-lt", "--data-root", "{tmp}/empty"], "ImageNet_LT_train.txt"),
    (["--refined-prompts", "p.json"], "need a text-conditioned --diffusion"),
    (["--dataset", "flowers", "--introspect-after", "0", "--vlm-url", "http://x"], "exactly one of --llm"),
    (["--dataset", "flowers", "--introspect-after", "19", "--vlm", "v", "--llm", "l"], "must be a round with a later"),
    (["--dataset", "flowers", "--introspect-after", "0", "--refined-prompts", "p.json"], "are exclusive"),
    (["--guide-every", "0"], "--guide-every 0: must be >= 1"),
    (["--guidance-decoder", "taesd"], "--guidance-decoder is for Stable Diffusion"),
    (["--diffusion", "{tmp}/empty"], ["--diffusion", "cannot load it", "assets/train_digits_unet.py"]),
    (["--diffusion", "nobody/no-such-model"], ["--diffusion nobody/no-such-model: not a local folder",
                                               "https://huggingface.co/nobody/no-such-model",
                                               "pass --diffusion /path/to/a/local/copy"]),
    (["--init-from", "{tmp}/empty/pretrained.pt"], "--init-from {tmp}/empty/pretrained.pt: no such file"),
    (["--resume", "{tmp}/empty"], "no run there"),
    (["--imbalance", "0.5"], "--imbalance 0.5: must be >= 1"),
    (["--class-order", "1,2,3"], ["--class-order 1,2,3: expected a seed", "a permutation of 0..9"]),
    (["--dataset", "flowers", "--imbalance", "10"], "--imbalance shapes the digits' long tail"),
    (["--dataset", "flowers", "--class-order", "1"], "--class-order shapes the digits' long tail"),
    (["--unguided-share", "1.5"], "--unguided-share 1.5: must lie in 0..1"),
    (["--dataset", "flowers", "--label-filter", "judge"], "has no judge of generated images"),
    (["--synthetic", "0", "--label-filter", "predictor"], "there are no synthetic images to filter"),
])
def test_bad_flags_fail_in_one_line_and_write_nothing(flags, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_:
        train_loop.main([f.format(tmp=tmp_path) for f in flags] + ["--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    messages = [message] if isinstance(message, str) else message
    assert all(m.format(tmp=tmp_path) in err for m in messages), err
    assert err.strip().count("\n") == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"], "something was written"


def test_out_must_be_a_folder_that_can_be_written(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as exit_:
        train_loop.main(["--out", str(tmp_path / "file")])
    assert exit_.value.code == 2 and "is a file; name a folder" in capsys.readouterr().err
    with pytest.raises(run_folder.RunFolderError, match="cannot create the run folder .*file/run"):
        run_folder.take_lock(run_folder.RunFolder(tmp_path / "file" / "run"))


def test_an_unwritable_out_is_one_line(capsys, torch_settings):
    proc = run_main(train_loop.main, "--out", "/proc/ltg-cannot-be-here/run", "--synthetic", "0", "--pretrain-epochs", "0",
                    "--epochs", "1", "--threads", "1", capsys=capsys)
    err = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "cannot create the run folder /proc/ltg-cannot-be-here/run" in err, proc.stderr


def test_unguided_share_and_label_filter(foundation, tmp_path):
    """--unguided-share: the first share of every round is made with w = 0; --label-filter predictor: fine-tuning
    sees only the synthetic images whose round predictor's label is the class asked for."""
    run = tmp_path / "run"
    run_script(*TINY, "--diffusion", foundation, "--unguided-share", "0.5", "--label-filter", "predictor",
               "--out", run, cwd=tmp_path)
    metrics = json.loads((run / "metrics.json").read_text())
    rows = run_folder.read_metadata(run / "synthetic" / "metadata.jsonl")
    for r in metrics["rounds"]:
        mine = [row for row in rows if row["round"] == r["round"]]
        unguided = round(0.5 * r["images"])
        assert [row["w"] for row in mine] == [0.0] * unguided + [0.07] * (r["images"] - unguided)
        assert all(row["guidance_ratio"] == 0 for row in mine[:unguided])
    agree = [sum(row["predicted_label"] == row["label"] for row in rows if row["round"] <= r) for r in (0, 0, 1)]
    assert [e["synthetic"] for e in metrics["epochs"][1:]] == agree


def test_resume_refuses_a_checkpoint_with_another_class_count(copy_of_reference, capsys, torch_settings):
    state = torch.load(copy_of_reference / "checkpoint.pt")
    torch.save(state | {"num_classes": 5}, copy_of_reference / "checkpoint.pt")
    one_line_error(run_main(train_loop.main, "--resume", copy_of_reference, capsys=capsys),
                   "has 5 classes but --dataset digits has 10")


def test_class_groups_follow_the_shot_thresholds():
    labels = [0] * 101 + [1] * 100 + [2] * 20 + [3] * 19 + [4] * 1
    assert tasks.class_groups(labels, 6) == dict(many=[0], medium=[1, 2], few=[3, 4, 5])
    assert tasks.class_groups(labels, 6, rarest_third=True)["tail"] == [4, 5]
    correct, count = np.array([3, 0, 1, 0, 0, 0]), np.array([4, 2, 2, 0, 0, 0])
    assert tasks.split_accuracy(correct, count, dict(many=[0], medium=[1, 2], few=[3, 4, 5])) == dict(
        acc=0.5, many_acc=0.75, medium_acc=0.25, few_acc=None, worst_acc=0.0)


def test_default_schedule_and_budget_shares():
    args = train_flags.parse_args(["--out", "x"])
    assert args.dataset == "digits" and args.rounds == list(range(0, args.epochs, 5)) and args.download
    args = train_flags.parse_args(["--dataset", "pets", "--epochs", "100", "--out", "x"])
    assert args.synthetic == 30 and args.rounds == list(range(0, 100, 5)) and args.arch == "resnet50"
    assert train_flags.parse_args(["--synthetic", "0", "--out", "x"]).rounds == []
    assert train_loop.round_sizes(10, 3) == [4, 3, 3]
    assert len({train_loop.derive_seed(0, r, i) for r in range(3) for i in range(1000)}) == 3000
    assert train_loop.derive_seed(1, 2, 3) == train_loop.derive_seed(1, 2, 3) != train_loop.derive_seed(2, 2, 3)


# --- the paper's datasets, offline: Stable Diffusion rounds, the download and the hub faked at their boundary ---

FLOWERS = ["pink primrose", "sweet pea", "tiger lily"]


def sd_round_setup(tiny_sd_path, *flags):
    """A flowers-like task with three classes, a tiny pipeline (SD-1.x-shaped unless another is given) and a
    resnet18 head, as open_run sets them up."""
    args = train_flags.parse_args(["--dataset", "flowers", "--arch", "resnet18", "--head-samples", "4", "--steps", "2",
                                  "--gen-batch", "2", "--diffusion", str(tiny_sd_path), "--out", "x", *map(str, flags)])
    train_tf, _ = tasks.paper_transforms()
    task = tasks.Task(FLOWERS, None, None, {}, [0, 1, 2], train_tf, "RGB", tasks.PROMPTS["flowers"])
    torch.manual_seed(0)
    head = tasks.build_head(args, len(FLOWERS), 3)
    diffusion = tasks.load_diffusion(args, torch.device("cpu"))
    train_flags.take_family_defaults(args, diffusion[0])
    return args, task, head, diffusion


def test_stable_diffusion_round_prompts_each_class(tiny_sd_path, tmp_path):
    """A paper-dataset round on the tiny SD-shaped pipeline: prompts from the class names, RGB PNGs in class
    folders, the predictor (a torchvision classifier by name) seeing 224 px inputs."""
    args, task, head, diffusion = sd_round_setup(tiny_sd_path)
    folder = run_folder.RunFolder(tmp_path)
    rows = train_loop.generate_round(args, task, diffusion, head, folder, 0, 5)
    assert [(r["index"], r["label"], r["prompt"]) for r in rows] == [
        (i, i % 3, f"a photo of a {FLOWERS[i % 3]}, a type of flower.") for i in range(5)]
    assert rows[2]["file_name"] == "002-tiger_lily/r00_000002.png"
    with Image.open(tmp_path / "synthetic" / rows[0]["file_name"]) as im:
        assert im.mode == "RGB" and im.size == (64, 64)
    run_folder.plot_round(folder, rows, task)
    assert (tmp_path / "rounds" / "round0.png").is_file()


@pytest.mark.parametrize("family, scale", [("sd2-v", 7.5), ("sdxl", 5.0), ("sd3", 3.5), ("flux", 3.5)])
def test_a_round_on_each_family(tiny_models, tmp_path, family, scale):
    """--diffusion takes a folder of any supported family; the guidance scale left unset is the family's, and
    --resolution sets the image side (the tiny transformers' native size differs from the pipelines' default)."""
    args, task, head, diffusion = sd_round_setup(tiny_models.pipeline(family), "--resolution", 64)
    assert args.guidance_scale == scale and args.steps == 2
    rows = train_loop.generate_round(args, task, diffusion, head, run_folder.RunFolder(tmp_path), 0, 3)
    assert [r["label"] for r in rows] == [0, 1, 2] and all(r["guidance_ratio"] > 0 for r in rows)
    for r in rows:
        with Image.open(tmp_path / "synthetic" / r["file_name"]) as im:
            assert im.mode == "RGB" and im.size == (64, 64)


def test_a_mismatched_guidance_decoder_stops_the_run_in_one_line(tiny_models):
    with pytest.raises(tasks.TaskError, match="^--guidance-decoder .*: the guidance decoder reads 16 latent channels "
                                              "but the pipeline's VAE has 4: take the family's tiny autoencoder"):
        sd_round_setup(tiny_models.pipeline("sdxl"), "--guidance-decoder", tiny_models.decoder("flux"))


def test_another_familys_tiny_decoder_stops_the_run_before_it_is_loaded(tiny_models):
    with pytest.raises(tasks.TaskError, match="^--guidance-decoder madebyollin/taesd3: decodes SD 3.x latents, not "
                                              "FLUX.1's: take madebyollin/taef1$"):
        sd_round_setup(tiny_models.pipeline("flux"), "--guidance-decoder", "madebyollin/taesd3")


def test_guidance_decoder_and_every_kth_step_reach_the_sampler(tiny_sd_path, tmp_path):
    """--guidance-decoder loads a diffusers AutoencoderTiny for the guidance pass; --guide-every 2 halves the
    guided steps (one guidance ratio per guided step in the batch's median)."""
    from diffusers import AutoencoderTiny
    AutoencoderTiny(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                    latent_channels=4).save_pretrained(tmp_path / "taesd")
    args, task, head, diffusion = sd_round_setup(tiny_sd_path, "--guidance-decoder", tmp_path / "taesd",
                                                 "--guide-every", "2", "--steps", "4")
    assert isinstance(diffusion[2], AutoencoderTiny)
    seen = []
    original = diffusion[2].decode
    diffusion[2].decode = lambda z, *a, **k: seen.append(z.shape) or original(z, *a, **k)
    rows = train_loop.generate_round(args, task, diffusion, head, run_folder.RunFolder(tmp_path), 0, 2)
    assert len(seen) == 2, "the tiny decoder decodes once per guided step: steps 0 and 2 of 4"
    assert all(r["guidance_ratio"] > 0 for r in rows)


def test_refined_prompts_file_replaces_the_template_for_its_classes(tiny_sd_path, tmp_path):
    refined = ["A photo of sweet pea that is blue.", "A photo of sweet pea at night."]
    (tmp_path / "prompts.json").write_text(json.dumps({"sweet pea": refined}))
    args, task, head, diffusion = sd_round_setup(tiny_sd_path, "--refined-prompts", tmp_path / "prompts.json")
    rows = train_loop.generate_round(args, task, diffusion, head, run_folder.RunFolder(tmp_path), 0, 6)
    template = "a photo of a {}, a type of flower."
    assert [r["prompt"] for r in rows] == [template.format("pink primrose"), refined[0], template.format("tiger lily"),
                                           template.format("pink primrose"), refined[1], template.format("tiger lily")]


def test_introspection_after_a_round_refines_the_next_rounds_prompts(tiny_sd_path, server, tmp_path):
    args, task, head, diffusion = sd_round_setup(tiny_sd_path, "--epochs", "2", "--gen-epochs", "0,1",
                                                 "--introspect-after", "0", "--vlm-url", server.url,
                                                 "--llm-url", server.url)
    folder = run_folder.RunFolder(tmp_path)
    first = train_loop.generate_round(args, task, diffusion, head, folder, 0, 3)
    introspect.introspect_run(tmp_path, vlm_url=server.url, llm_url=server.url, class_names=task.classes)
    second = train_loop.generate_round(args, task, diffusion, head, folder, 1, 3)
    assert all(r["prompt"].endswith("a type of flower.") for r in first)
    for r in second:
        assert r["prompt"].startswith(f"A photo of {r['class_name']} that"), r["prompt"]
    assert (folder.introspection / "report.md").is_file() and (folder.introspection / "contact_sheet.png").is_file()
    assert len(introspect.read_log(folder.introspection / "descriptions.jsonl")) == 3
    assert not list(folder.synthetic.glob("introspection")), "synthetic/ stays a dataset"


def fake_flowers_download(monkeypatch, urls, images=12, size=40):
    """torchvision's Flowers102 download, faked at its boundary: the archive's images and the two .mat files
    appear where torchvision extracts them (classes 1-3, train ids 1-6, test ids 7-12) and pass its integrity
    check as the real files would; the URLs asked for are recorded."""
    import scipy.io
    import torchvision.datasets.flowers102 as flowers102

    def archive(url, download_root, md5=None, **kwargs):
        urls.append(url)
        jpg = Path(download_root) / "jpg"
        jpg.mkdir(parents=True)
        rng = np.random.default_rng(0)
        for i in range(1, images + 1):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(jpg / f"image_{i:05d}.jpg")

    def url_file(url, root, filename=None, md5=None, **kwargs):
        urls.append(url)
        name = os.path.basename(url)
        data = ({"labels": np.array([1 + i % 3 for i in range(images)])} if name == "imagelabels.mat" else
                {"trnid": np.arange(1, 7), "valid": np.arange(1, 7), "tstid": np.arange(7, images + 1)})
        scipy.io.savemat(Path(root) / name, data)

    monkeypatch.setattr(flowers102, "download_and_extract_archive", archive)
    monkeypatch.setattr(flowers102, "download_url", url_file)
    monkeypatch.setattr(flowers102, "check_integrity", lambda path, md5=None: os.path.isfile(path))  # not the real md5s


@pytest.fixture
def offline_hub(tiny_sd_path, tmp_path, monkeypatch):
    """A Hugging Face cache holding the tiny pipeline as CompVis/stable-diffusion-v1-4, and no network."""
    cache = install_in_hub_cache(tiny_sd_path, tmp_path / "hub", "CompVis/stable-diffusion-v1-4")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def torch_settings():
    """train_loop.main run in-process changes torch's thread count and determinism: restore them."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


PAPER_TINY = ["--dataset", "flowers", "--arch", "resnet18", "--head-samples", "2", "--pretrain-epochs", "1",
              "--epochs", "1", "--synthetic", "0.5", "--steps", "2", "--gen-batch", "3", "--workers", "0",
              "--threads", "1"]


def test_flowers_as_typed_downloads_loads_the_hub_default_and_stops_without_a_gpu(
        offline_hub, monkeypatch, tmp_path, capsys, torch_settings):
    """`python train_loop.py --dataset flowers` on a machine without a GPU: the data is downloaded (from
    torchvision's URLs), the generator comes from its default hub id, the plan and its estimate are printed,
    and the run stops there (exit 2) without writing a run folder."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    urls = []
    fake_flowers_download(monkeypatch, urls)
    with pytest.raises(SystemExit) as exit_:
        train_loop.main(PAPER_TINY)
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert "no GPU here: this run would take about" in err and "pass --device cpu" in err
    assert urls[0] == tasks.DOWNLOADS["flowers"][0] and len(urls) == 3
    assert "plan: flowers, 102 classes, 6 real training images" in err
    assert "generation rounds at fine-tuning epochs [0]" in err
    assert "CompVis/stable-diffusion-v1-4" in err and "estimate on cpu x 1:" in err
    assert not (tmp_path / "runs").exists()
    # with --device cpu the same command runs the cycle: data already there, no second download
    train_loop.main([*PAPER_TINY, "--device", "cpu"])
    run = tmp_path / "runs" / "flowers-w0.1-x0.5-seed0"
    metrics = json.loads((run / "metrics.json").read_text())
    assert len(metrics["epochs"]) == 2 and metrics["rounds"][0]["images"] == 3 and len(urls) == 3
    assert 0 <= metrics["epochs"][0]["val_acc"] <= 1 and "hard" in metrics["class_groups"]  # Flowers102's val split
    rows = run_folder.read_metadata(run / "synthetic" / "metadata.jsonl")
    assert metrics["classes"][0] == "pink primrose" and len(metrics["classes"]) == 102
    assert [r["prompt"] for r in rows] == [f"a photo of a {c}, a type of flower." for c in metrics["classes"][:3]]


def test_an_offline_download_is_one_line_and_leaves_no_folder(monkeypatch, tmp_path, capsys):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr("urllib.request.urlopen", offline)
    with pytest.raises(SystemExit) as exit_:
        train_loop.main(["--dataset", "flowers", "--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "run")])
    message = capsys.readouterr().err.strip()
    assert exit_.value.code == 2
    for part in ("could not download Flowers102 from https://www.robots.ox.ac.uk/~vgg/data/flowers/102/102flowers.tgz",
                 str(tmp_path / "data" / "flowers-102"), "Temporary failure in name resolution", "--no-download",
                 "--data-root"):
        assert part in message, message
    assert "\n" not in message
    assert list(tmp_path.iterdir()) == [], "the failed download left something behind"


def test_the_cycle_on_a_flux_folder(tiny_models, monkeypatch, tmp_path, torch_settings):
    """The whole cycle with --diffusion a FLUX.1 folder: its guidance scale is recorded in config.json."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fake_flowers_download(monkeypatch, [])
    train_loop.main([*PAPER_TINY, "--device", "cpu", "--diffusion", tiny_models.pipeline("flux"), "--resolution", "64",
                     "--out", "run"])
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert len(metrics["epochs"]) == 2 and metrics["rounds"][0]["images"] == 3
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config["guidance_scale"], config["steps"], config["resolution"]) == (3.5, 2, 64)
    assert len(run_folder.read_metadata(tmp_path / "run" / "synthetic" / "metadata.jsonl")) == 3


# --- ImageNet-LT with LiVT's recipe, offline: a tiny ImageNet-LT-shaped folder, a tiny timm ViT, an MAE checkpoint ---

WNIDS = ("n01440764", "n01443537", "n01484850")  # tench, goldfish, great white shark: ImageNet labels 0, 1, 2


def jpeg(path, rng, size=8):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)


def tiny_imagenet_lt(root, counts=(101, 20, 5), test_per_class=2, classes=1000):
    """ImageNet_LT_{train,test,val}.txt over <split>/<wnid>/*.JPEG with a many-, a medium- and a few-shot class (test
    and validation images of those three) and one image of every other class, and two evaluation-only folders: ImageNet-V2's
    layout (folders by label) and ImageNet-A's (by WordNet id, a subset of the classes)."""
    rng = np.random.default_rng(0)
    lines = {"train": [], "test": [], "val": []}
    wnids = [*WNIDS, *(f"n9{c:07d}" for c in range(len(WNIDS), classes))]
    for label, wnid in enumerate(wnids):
        for split, k in (("train", counts[label] if label < len(counts) else 1),
                         ("test", test_per_class if label < len(counts) else 0), ("val", int(label < len(counts)))):
            for i in range(k):
                jpeg(root / split / wnid / f"{i}.JPEG", rng)
                lines[split].append(f"{split}/{wnid}/{i}.JPEG {label}")
    for split, rows in lines.items():
        (root / f"ImageNet_LT_{split}.txt").write_text("\n".join(rows) + "\n")
    for label in range(3):
        jpeg(root / "v2" / str(label) / "a.jpeg", rng)
    for wnid in WNIDS[1:]:
        jpeg(root / "a" / wnid / "a.jpeg", rng)
    return root


@pytest.fixture
def tiny_vit(monkeypatch):
    """A ViT-shaped timm model small enough for a test, registered under a name as timm's own are."""
    timm = pytest.importorskip("timm")
    from timm.models.vision_transformer import VisionTransformer

    def vit_ltg_test(pretrained=False, pretrained_cfg=None, pretrained_cfg_overlay=None, cache_dir=None, **kwargs):
        return VisionTransformer(**dict(patch_size=8, embed_dim=32, depth=2, num_heads=2) | kwargs)
    monkeypatch.setitem(timm.models._registry._model_entrypoints, "vit_ltg_test", vit_ltg_test)
    monkeypatch.setattr(livt, "is_timm_arch", lambda name: name == "vit_ltg_test" or timm.is_model(name))
    return vit_ltg_test


def mae_checkpoint(path, vit):
    """An MAE pretraining checkpoint's layout: the encoder (with its final norm), the decoder and mask token,
    and the run's argparse.Namespace."""
    encoder = vit(img_size=32, global_pool="token").state_dict()
    decoder = {"mask_token": torch.zeros(1, 1, 16), "decoder_embed.weight": torch.randn(16, 32)}
    torch.save({"model": encoder | decoder, "args": __import__("argparse").Namespace(model="mae_vit_tiny")}, path)
    return encoder


def test_imagenet_lt_with_the_livt_recipe_end_to_end(tiny_vit, tiny_sd_path, tmp_path, capsys, torch_settings):
    root = tiny_imagenet_lt(tmp_path / "imagenet-lt")
    encoder = mae_checkpoint(tmp_path / "mae.pth", tiny_vit)
    run = tmp_path / "run"
    proc = run_main(train_loop.main, "--dataset", "imagenet-lt", "--data-root", root, "--arch", "vit_ltg_test",
                    "--input-size", "32", "--init-from", tmp_path / "mae.pth", "--eval-set", f"imagenet-v2={root / 'v2'}",
                    "--eval-set", f"imagenet-a={root / 'a'}", "--pretrain-epochs", "1", "--epochs", "1",
                    "--batch-size", "16", "--synthetic", "0.03", "--steps", "2", "--gen-batch", "4", "--head-samples", "2",
                    "--diffusion", tiny_sd_path, "--workers", "0", "--threads", "1", "--device", "cpu", "--out", run,
                    capsys=capsys)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--init-from" in proc.stderr and "loaded" in proc.stderr
    config = json.loads((run / "config.json").read_text())
    assert (config["loss"], config["optimizer"], config["mixup"], config["augment"]) == ("bal-bce", "adamw", True,
                                                                                         "randaugment")
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["train_counts"][:3] == [101, 20, 5] and len(metrics["classes"]) == 1000
    assert metrics["class_groups"]["many"] == [0] and metrics["class_groups"]["medium"] == [1]
    assert metrics["class_groups"]["few"] == list(range(2, 1000)) and "tail" not in metrics["class_groups"]
    for e in metrics["epochs"]:
        for prefix in ("", "val_", "imagenet-v2_", "imagenet-a_"):  # ImageNet_LT_val.txt, when present, is evaluated
            for key in ("acc", "many_acc", "medium_acc", "few_acc"):
                value = e[prefix + key]
                assert value is None if (prefix, key) == ("imagenet-a_", "many_acc") else 0 <= value <= 1, prefix + key
    assert metrics["class_groups"]["hard"] == tasks.weakest_classes(metrics["epochs"][0]["val_per_class_acc"])
    rows = run_folder.read_metadata(run / "synthetic" / "metadata.jsonl")
    assert len(rows) == metrics["synthetic_budget"] == round(0.03 * sum(metrics["train_counts"]))
    assert [r["prompt"] for r in rows[:4]] == ["a photo of a tench.", "a photo of a goldfish.",
                                               "a photo of a great white shark.", "a photo of a tiger shark."]
    state = torch.load(run / "pretrained.pt")
    assert state["head"]["predictor.patch_embed.proj.weight"].shape == encoder["patch_embed.proj.weight"].shape


def test_a_timm_name_that_is_not_a_vit_is_one_line():
    args = __import__("argparse").Namespace(arch="resnet18d", input_size=32, drop_path=0.0)
    with pytest.raises(tasks.TaskError, match="--arch resnet18d is .*not a VisionTransformer"):
        tasks.build_predictor(args, 10, 3)


def test_imagenet_a_is_scored_over_its_own_classes(tmp_path):
    """ImageNet-A covers 200 of the 1,000 classes: the argmax is over those logits only."""
    root = tiny_imagenet_lt(tmp_path / "imagenet-lt", counts=(1, 1, 1), test_per_class=1)
    folder = tasks.ImageNetFolder(root / "a", dict(zip(WNIDS, range(3))), tasks.paper_transforms(16)[1])
    assert folder.label_subset == [1, 2]
    assert tasks.ImageNetFolder(root / "v2", dict(zip(WNIDS, range(3))), tasks.paper_transforms(16)[1]).label_subset is None

    class Prefers(torch.nn.Module):  # logits 3 > 2 > 1 for classes 0, 2, 1: outside the subset, class 0 would win
        def forward(self, x):
            return torch.tensor([[3.0, 1.0, 2.0]]).expand(len(x), 3)
    correct, count = tasks.evaluate(Prefers(), folder, 3, torch.device("cpu"), subset=folder.label_subset)
    assert count.tolist() == [0, 1, 1] and correct.tolist() == [0, 0, 1]
    correct, _ = tasks.evaluate(Prefers(), folder, 3, torch.device("cpu"))
    assert correct.tolist() == [0, 0, 0]


def test_an_mae_checkpoint_that_does_not_fit_is_one_line(tiny_vit, tmp_path, capsys, torch_settings):
    root = tiny_imagenet_lt(tmp_path / "imagenet-lt", counts=(2, 2, 2), test_per_class=1)
    torch.save({"model": {"cls_token": torch.zeros(1, 1, 48)}}, tmp_path / "wide.pth")
    proc = run_main(train_loop.main, "--dataset", "imagenet-lt", "--data-root", root, "--arch", "vit_ltg_test",
                    "--input-size", "32", "--init-from", tmp_path / "wide.pth", "--synthetic", "0", "--device", "cpu",
                    "--out", tmp_path / "run", capsys=capsys)
    one_line_error(proc, "wide.pth", "cls_token", "[1, 1, 48]", "[1, 1, 32]")
    assert not (tmp_path / "run").exists()
