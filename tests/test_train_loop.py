"""train_loop.py on tiny configs: results, kill -9 and --resume, two gloo processes, bad flags.

The cycle runs in subprocesses, as a user runs it (and so its deterministic-algorithm and thread
settings stay out of this process); flag checks run in-process through `train_loop.main`.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import introspect
import train_loop
from test_introspect import server  # noqa: F401  (the loopback OpenAI-compatible endpoint)

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--pretrain-epochs", "1", "--epochs", "3", "--batch-size", "64", "--gen-epochs", "0,2", "--synthetic", "0.1",
        "--steps", "4", "--gen-batch", "4", "--threads", "1"]


def run_script(*args, cwd, check=True, launcher=(sys.executable,)):
    env = os.environ | {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([*launcher, str(ROOT / "train_loop.py"), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def foundation(tmp_path_factory):
    """A digits foundation model trained for a few steps: poor images, but the real code path."""
    out = tmp_path_factory.mktemp("foundation")
    run_script("--train-foundation", "--foundation-steps", "3", "--threads", "1", "--out", out, cwd=out)
    return out


@pytest.fixture(scope="module")
def reference_run(foundation, tmp_path_factory):
    """An uninterrupted tiny run: the reference for the resumed ones."""
    out = tmp_path_factory.mktemp("reference") / "run"
    run_script(*TINY, "--diffusion", foundation, "--out", out, cwd=out.parent)
    return out


def test_foundation_retrains_bit_for_bit(foundation, tmp_path):
    run_script("--train-foundation", "--foundation-steps", "3", "--threads", "1", "--out", tmp_path, cwd=tmp_path)
    for name in ("diffusion_pytorch_model.safetensors", "config.json", "scheduler_config.json"):
        assert (tmp_path / name).read_bytes() == (foundation / name).read_bytes(), name


def test_run_folder_holds_the_results(reference_run):
    metrics = json.loads((reference_run / "metrics.json").read_text())
    assert [(e["phase"], e["phase_epoch"]) for e in metrics["epochs"]] == [("pretrain", 0), ("finetune", 0),
                                                                           ("finetune", 1), ("finetune", 2)]
    assert metrics["tail_classes"] == [7, 8, 9]
    counts = metrics["train_counts"]
    assert 25 <= counts[0] / counts[-1] <= 40, counts                  # imbalance ratio about 30
    budget = metrics["synthetic_budget"]
    assert budget == round(0.1 * sum(counts))
    assert [(r["round"], r["epoch"], r["images"]) for r in metrics["rounds"]] == [(0, 0, budget - budget // 2),
                                                                                 (1, 2, budget // 2)]
    # real and synthetic mixed in every fine-tuning epoch, the synthetic set growing by round
    assert [e["synthetic"] for e in metrics["epochs"]] == [0, budget - budget // 2, budget - budget // 2, budget]
    for e in metrics["epochs"]:
        assert 0 <= e["tail_acc"] <= 1 and 0 <= e["acc"] <= 1 and len(e["per_class_acc"]) == 10
    rows = [json.loads(line) for line in (reference_run / "synthetic" / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == budget
    for r in rows:
        assert (reference_run / "synthetic" / r["file"]).is_file()
        assert r["class"] == r["index"] % 10 and r["w"] == 0.07 and r["prompt"] is None
        assert r["seed"] == train_loop.derive_seed(0, r["round"], r["index"])
    mean = sum(r["signal"] for r in rows if r["round"] == 0) / metrics["rounds"][0]["images"]
    assert metrics["rounds"][0]["mean_signal"] == pytest.approx(mean)
    for name in ("accuracy.png", "rounds/round0.png", "rounds/round1.png", "checkpoint.pt", "config.json"):
        assert (reference_run / name).is_file(), name
    state = torch.load(reference_run / "checkpoint.pt")
    assert state["epoch"] == 3 and state["num_classes"] == 10
    assert {"optimizer", "schedule", "head", "metrics"} <= state.keys()
    assert not list(reference_run.rglob("*.tmp")), "a temp file was left behind"


def kill_when(args, cwd, appears, min_count=1):
    """Start the run, SIGKILL it as soon as `appears` (a glob under the run folder) matches min_count files."""
    env = os.environ | {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_loop.py"), *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while len(list(cwd.glob(appears))) < min_count:
        assert proc.poll() is None, f"the run ended before {appears} appeared: {proc.stderr.read()[-2000:]}"
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def test_compare_runs_the_arms_and_reports_paired_differences(foundation, reference_run, tmp_path):
    out = tmp_path / "cmp"
    args = [*TINY, "--diffusion", foundation, "--compare", "--seeds", "2", "--sweep", "0,0.5", "--budgets", "0.05",
            "--out", out]
    run_script(*args, cwd=tmp_path)
    report = json.loads((out / "comparison.json").read_text())
    assert list(report["arms"]) == ["real", "unguided", "ltg", "w0.5", "unguided-x0.05", "ltg-x0.05"]
    # an arm started from a sibling's pretrained predictor ends exactly as an independent run
    assert (json.loads((out / "ltg" / "seed0" / "metrics.json").read_text())
            == json.loads((reference_run / "metrics.json").read_text()))
    for name, arm in report["arms"].items():
        assert arm["acc"]["n"] == 2 and len(arm["per_seed"]) == 2
        assert (arm["signal"] is None) == (name == "real")
    ltg_arm, unguided = report["arms"]["ltg"], report["arms"]["unguided"]
    d = [a["tail_acc"] - b["tail_acc"] for a, b in zip(ltg_arm["per_seed"], unguided["per_seed"])]
    assert ltg_arm["minus_unguided"]["tail_acc"]["mean"] == pytest.approx(sum(d) / 2)
    assert ltg_arm["minus_unguided"]["tail_acc"]["se"] == pytest.approx(abs(d[0] - d[1]) / 2)
    assert "minus_unguided" in report["arms"]["ltg-x0.05"] and "minus_unguided" not in unguided
    assert 0.0 < ltg_arm["guidance_ratio"]["mean"] and unguided["guidance_ratio"]["mean"] == 0.0
    assert 0.0 <= ltg_arm["judge_acc"]["mean"] <= 1.0
    for name in ("comparison.md", "comparison.png", "sweep.png", "budgets.png", "judge.pt"):
        assert (out / name).is_file(), name
    assert "| ltg | 0.07 | x0.1 |" in (out / "comparison.md").read_text()
    before = {p: p.stat().st_mtime_ns for p in out.rglob("checkpoint.pt")}
    run_script(*args, cwd=tmp_path)  # everything is done: nothing is trained again
    assert {p: p.stat().st_mtime_ns for p in out.rglob("checkpoint.pt")} == before


def test_killed_runs_resume_to_the_same_metrics(foundation, reference_run, tmp_path):
    run = tmp_path / "run"
    args = [*TINY, "--diffusion", foundation]
    kill_when([*args, "--out", run], tmp_path, "run/synthetic/r00_*.png")             # mid round 0
    kill_when(["--resume", run], tmp_path, "run/synthetic/manifest.jsonl")             # round 0 merged
    kill_when(["--resume", run], tmp_path, "run/synthetic/r01_*.png", min_count=3)     # mid round 1
    run_script("--resume", run, cwd=tmp_path)
    assert json.loads((run / "metrics.json").read_text()) == json.loads((reference_run / "metrics.json").read_text())
    assert ((run / "synthetic" / "manifest.jsonl").read_text()
            == (reference_run / "synthetic" / "manifest.jsonl").read_text())


def test_resume_after_a_kill_between_epochs(foundation, reference_run, tmp_path):
    run = tmp_path / "run"
    kill_when([*TINY, "--diffusion", foundation, "--out", run], tmp_path, "run/checkpoint.pt")
    run_script("--resume", run, cwd=tmp_path)
    assert json.loads((run / "metrics.json").read_text()) == json.loads((reference_run / "metrics.json").read_text())


def test_two_gloo_processes_share_generation(foundation, tmp_path):
    run = tmp_path / "run"
    run_script(*TINY, "--diffusion", foundation, "--out", run, cwd=tmp_path,
               launcher=(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"))
    metrics = json.loads((run / "metrics.json").read_text())
    rows = [json.loads(line) for line in (run / "synthetic" / "manifest.jsonl").read_text().splitlines()]
    for r in metrics["rounds"]:
        indices = [x["index"] for x in rows if x["round"] == r["round"]]
        assert sorted(indices) == list(range(r["images"])), "missing or duplicate images"
    assert sum(r["images"] for r in metrics["rounds"]) == metrics["synthetic_budget"] == len(rows)
    assert len({x["file"] for x in rows}) == len(rows)
    assert len(list((run / "synthetic").glob("*.png"))) == len(rows)
    assert not list((run / "synthetic").glob("manifest.rank*.jsonl"))
    assert len(metrics["epochs"]) == 4


# --- flags: bad values give one line naming the value and what is accepted, exit 2, nothing written ---

@pytest.mark.parametrize("flags, message", [
    (["--guidance-weight", "-1"], "--guidance-weight -1.0: must be finite and >= 0"),
    (["--dataset", "mnist"], ["invalid choice: 'mnist'", "digits", "flowers", "caltech101", "imagenet-lt"]),
    (["--signal", "entropy"], ["invalid choice: 'entropy'", "total", "epistemic", "aleatoric"]),
    (["--gen-epochs", ","], "--gen-epochs ',': empty schedule"),
    (["--synthetic", "0", "--gen-epochs", "0,5"], "with --synthetic 0: a zero budget has no rounds"),
    (["--epochs", "4", "--gen-epochs", "0,4"], "epochs must lie in 0..3"),
    (["--synthetic", "-2"], "--synthetic -2.0: must be >= 0"),
    (["--arch", "resnet51"], "--arch resnet51: unknown; use 'cnn' or a torchvision classifier"),
    (["--dataset", "flowers", "--data-root", "{tmp}/empty"], "pass --download to fetch it"),
    (["--dataset", "imagenet-lt", "--data-root", "{tmp}/empty"], "ImageNet_LT_train.txt"),
    (["--refined-prompts", "p.json"], "need a text-conditioned --diffusion"),
    (["--dataset", "flowers", "--introspect-after", "0", "--vlm-url", "http://x"], "exactly one of --llm"),
    (["--dataset", "flowers", "--introspect-after", "19", "--vlm", "v", "--llm", "l"], "must be a round with a later"),
    (["--dataset", "flowers", "--introspect-after", "0", "--refined-prompts", "p.json"], "are exclusive"),
    (["--sweep", "0,0.1"], "are arms of --compare"),
    (["--guide-every", "0"], "--guide-every 0: must be >= 1"),
    (["--guidance-decoder", "taesd"], "--guidance-decoder is for Stable Diffusion"),
    (["--compare", "--sweep", "0,-1"], "--sweep '0,-1': expected comma-separated numbers >= 0"),
    (["--compare", "--seeds", "0"], "--seeds 0: must be >= 1"),
])
def test_bad_flags_fail_in_one_line_and_write_nothing(flags, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_:
        train_loop.main([f.format(tmp=tmp_path) for f in flags] + ["--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert all(m in err for m in ([message] if isinstance(message, str) else message)), err
    assert err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"], "something was written"


def test_missing_flowers_names_the_path(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_loop.main(["--dataset", "flowers", "--data-root", str(tmp_path), "--out", str(tmp_path / "run")])
    assert str(tmp_path.resolve()) in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_resume_refuses_a_checkpoint_with_another_class_count(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"dataset": "digits", "synthetic": 0.0}))
    torch.save({"num_classes": 5, "epoch": 0}, run / "checkpoint.pt")
    before = {p: p.read_bytes() for p in run.iterdir()}
    with pytest.raises(SystemExit) as exit_:
        train_loop.main(["--resume", str(run)])
    assert exit_.value.code == 2
    assert "checkpoint has 5 classes but --dataset digits has 10" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in run.iterdir()} == before


def test_default_schedule_and_budget_shares():
    _, args = train_loop.parse_args([])
    assert args.dataset == "digits" and args.rounds == list(range(0, args.epochs, 5))
    _, args = train_loop.parse_args(["--dataset", "pets", "--epochs", "100"])
    assert args.synthetic == 30 and args.rounds == list(range(0, 100, 5)) and args.arch == "resnet50"
    _, args = train_loop.parse_args(["--synthetic", "0"])
    assert args.rounds == []
    assert train_loop.round_sizes(10, 3) == [4, 3, 3]
    assert len({train_loop.derive_seed(0, r, i) for r in range(3) for i in range(1000)}) == 3000
    assert train_loop.derive_seed(1, 2, 3) == train_loop.derive_seed(1, 2, 3) != train_loop.derive_seed(2, 2, 3)


def test_stable_diffusion_round_prompts_each_class(tiny_sd_path, tmp_path):
    """A paper-dataset round on the tiny SD-shaped pipeline: prompts from the class names, RGB PNGs, the
    predictor (a torchvision classifier by name) seeing 224 px inputs."""
    _, args = train_loop.parse_args(["--dataset", "flowers", "--arch", "resnet18", "--head-samples", "4",
                                     "--steps", "2", "--gen-batch", "2", "--diffusion", str(tiny_sd_path)])
    classes = ["pink primrose", "sweet pea", "tiger lily"]
    train_tf, _ = train_loop.paper_transforms()
    task = train_loop.Task(classes, None, None, {}, [0, 1, 2], train_tf, "RGB", train_loop.PROMPTS["flowers"])
    torch.manual_seed(0)
    head = train_loop.build_head(args, len(classes), 3)
    diffusion = train_loop.load_diffusion(args, torch.device("cpu"))
    rows = train_loop.generate_round(args, task, diffusion, head, tmp_path, 0, 5, rank=0, world=1)
    assert [(r["index"], r["class"], r["prompt"]) for r in rows] == [
        (i, i % 3, f"a photo of a {classes[i % 3]}, a type of flower.") for i in range(5)]
    with Image.open(tmp_path / "synthetic" / rows[0]["file"]) as im:
        assert im.mode == "RGB" and im.size == (64, 64)
    train_loop.plot_round(tmp_path, rows, task)
    assert (tmp_path / "rounds" / "round0.png").is_file()


def sd_round_setup(tiny_sd_path, *flags):
    """A flowers-like task with three classes, the tiny SD-shaped pipeline and a resnet18 head."""
    _, args = train_loop.parse_args(["--dataset", "flowers", "--arch", "resnet18", "--head-samples", "4", "--steps",
                                     "2", "--gen-batch", "2", "--diffusion", str(tiny_sd_path), *map(str, flags)])
    classes = ["pink primrose", "sweet pea", "tiger lily"]
    train_tf, _ = train_loop.paper_transforms()
    task = train_loop.Task(classes, None, None, {}, [0, 1, 2], train_tf, "RGB", train_loop.PROMPTS["flowers"])
    torch.manual_seed(0)
    head = train_loop.build_head(args, len(classes), 3)
    return args, task, head, train_loop.load_diffusion(args, torch.device("cpu"))


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
    rows = train_loop.generate_round(args, task, diffusion, head, tmp_path, 0, 2, rank=0, world=1)
    assert len(seen) == 2, "the tiny decoder decodes once per guided step: steps 0 and 2 of 4"
    assert all(r["guidance_ratio"] > 0 for r in rows)


def test_refined_prompts_file_replaces_the_template_for_its_classes(tiny_sd_path, tmp_path):
    refined = ["A photo of sweet pea that is blue.", "A photo of sweet pea at night."]
    (tmp_path / "prompts.json").write_text(json.dumps({"sweet pea": refined}))
    args, task, head, diffusion = sd_round_setup(tiny_sd_path, "--refined-prompts", tmp_path / "prompts.json")
    rows = train_loop.generate_round(args, task, diffusion, head, tmp_path, 0, 6, rank=0, world=1)
    template = "a photo of a {}, a type of flower."
    assert [r["prompt"] for r in rows] == [template.format("pink primrose"), refined[0], template.format("tiger lily"),
                                           template.format("pink primrose"), refined[1], template.format("tiger lily")]


def test_introspection_after_a_round_refines_the_next_rounds_prompts(tiny_sd_path, server, tmp_path):
    args, task, head, diffusion = sd_round_setup(tiny_sd_path, "--epochs", "2", "--gen-epochs", "0,1",
                                                 "--introspect-after", "0", "--vlm-url", server.url,
                                                 "--llm-url", server.url)
    first = train_loop.generate_round(args, task, diffusion, head, tmp_path, 0, 3, rank=0, world=1)
    train_loop.introspect_round(args, task, tmp_path)
    second = train_loop.generate_round(args, task, diffusion, head, tmp_path, 1, 3, rank=0, world=1)
    assert all(r["prompt"].endswith("a type of flower.") for r in first)
    for r in second:
        assert r["prompt"].startswith(f"A photo of {r['class_name']} that"), r["prompt"]
    folder = train_loop.introspection_dir(tmp_path)
    assert (folder / "report.md").is_file() and (folder / "contact_sheet.png").is_file()
    assert len(introspect.read_log(folder / "descriptions.jsonl")) == 3


def test_files_are_written_whole_with_the_umasks_mode(tmp_path):
    old = os.umask(0o022)
    try:
        train_loop.write_json(tmp_path / "new" / "metrics.json", {"acc": 0.5})
    finally:
        os.umask(old)
    assert json.loads((tmp_path / "new" / "metrics.json").read_text()) == {"acc": 0.5}
    assert (tmp_path / "new" / "metrics.json").stat().st_mode & 0o777 == 0o644
    assert [p.name for p in (tmp_path / "new").iterdir()] == ["metrics.json"]
