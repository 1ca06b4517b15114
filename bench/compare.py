"""The evidence: does Longtail-Guided data help a predictor more than the same amount of unguided
synthetic data? Runs train_loop.py's cycle in arms that differ only in w and the synthetic budget,
over seeds, and reports paired differences.

    python bench/compare.py --seeds 10                                     # real only, unguided, LTG
    python bench/compare.py --seeds 5 --sweep 0.03,0.15,0.3 --budgets 1,2  # plus a w sweep and budgets
    python bench/compare.py --seeds 3 --out runs/flowers-compare -- --dataset flowers --data-root data

Flags after `--` (or any this script does not know) go to every arm's train_loop.py; the LTG arm uses
their --guidance-weight and every arm their --synthetic budget. Each arm is a train_loop.py run in
OUT/<arm>/seed<s>: killed ones resume, finished ones are skipped, and the arms of one seed start from
the first arm's pretrained predictor (train_loop.py --init-from). OUT gets comparison.{md,json,png},
and sweep.png and budgets.png with --sweep and --budgets. For digits, a judge (a classifier trained on
the balanced train split) reports which share of each arm's images shows its intended class.
"""

import argparse
import datetime
import math
import os
import platform
import shlex
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # train_loop.py and its modules
import tasks  # noqa: E402
import train_flags  # noqa: E402
import train_loop  # noqa: E402
from run_folder import (GROUP_LABELS, RunFolder, plt, read_json, read_metadata, run_finished,  # noqa: E402
                        write_atomic, write_figure, write_json, write_with)


def parse_args(argv=None):
    p = train_flags.Parser(prog="compare.py", description=__doc__.split("\n\n")[0], allow_abbrev=False,
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per arm")
    p.add_argument("--sweep", metavar="W,W,...", help="also one arm per guidance weight, and sweep.png")
    p.add_argument("--budgets", metavar="X,X,...", help="also unguided and LTG arms at these synthetic budgets, "
                                                          "and budgets.png")
    p.add_argument("--out", help="where the arms and the reports go (default: runs/<dataset>-compare)")
    args, rest = p.parse_known_args(argv)
    if args.seeds < 1:
        p.error(f"--seeds {args.seeds}: must be >= 1")
    args.sweep, args.budgets = number_list(p, "--sweep", args.sweep), number_list(p, "--budgets", args.budgets)
    rest = [a for a in rest if a != "--"]
    for flag in ("--out", "--resume", "--seed", "--init-from"):
        if any(a == flag or a.startswith(flag + "=") for a in rest):
            p.error(f"{flag} is set per arm by compare.py; leave it out")
    base = train_flags.parse_flags(rest)[1]
    args.out = Path(args.out or f"runs/{base.dataset}-compare")
    return args, base


def number_list(parser, flag, text):
    """'0,0.1,0.3' -> [0.0, 0.1, 0.3]: finite, >= 0, at least one."""
    if text is None:
        return []
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(v) and v >= 0 for v in values):
        parser.error(f"{flag} {text!r}: expected comma-separated numbers >= 0, e.g. 0,0.1,0.3")
    return values


def evidence_arms(args, base):
    """{arm name: (w, synthetic budget)}, each (w, budget) once."""
    w, x = base.guidance_weight, base.synthetic
    arms = {"real": (0.0, 0.0), "unguided": (0.0, x), "ltg": (w, x)}
    arms |= {f"w{v:g}": (v, x) for v in args.sweep}
    arms |= {f"{name}-x{b:g}": (v, b) for b in args.budgets for name, v in (("unguided", 0.0), ("ltg", w))}
    unique = {}
    for name, key in arms.items():
        unique.setdefault(key, name)
    return {name: key for key, name in unique.items()}


def to_argv(args):
    """train_loop.py flags that reproduce a flags namespace (those that differ from the parser's defaults)."""
    argv = []
    for action in train_flags.get_parser()._actions:
        value = getattr(args, action.dest, None)
        if not action.option_strings or action.dest == "help" or value == action.default:
            continue
        flag = action.option_strings[0]
        if isinstance(action, argparse.BooleanOptionalAction):
            argv.append(flag if value else "--no-" + flag[2:])
        else:
            argv += [a for v in (value if isinstance(value, list) else [value]) for a in (flag, str(v))]
    return argv


def arm_argv(base, run, w, budget, seed):
    """One arm's train_loop.py flags: resumed where it started, else from a sibling's pretrained predictor
    when one exists (pretraining depends on the seed only)."""
    if RunFolder(run).config.exists():
        return ["--resume", str(run)]
    flags = argparse.Namespace(**vars(base))
    flags.guidance_weight, flags.synthetic, flags.seed, flags.out = w, budget, seed, None
    flags.gen_epochs = base.gen_epochs if budget > 0 else None  # the real-only arm has no rounds
    argv = to_argv(flags) + ["--out", str(run)]
    pretrained = sorted(run.parent.parent.glob(f"*/seed{seed}/pretrained.pt"))
    return argv + (["--init-from", str(pretrained[0])] if pretrained and base.pretrain_epochs > 0 else [])


def main(argv=None):
    args, base = parse_args(argv)
    arms = evidence_arms(args, base)
    task = tasks.digits_task() if base.dataset == "digits" else None
    judge = train_judge(args.out, task, base.seed) if task else None
    results = {}
    for name, (w, budget) in arms.items():
        for seed in range(args.seeds):
            run = args.out / name / f"seed{seed}"
            if not run_finished(run):
                print(f"compare: arm {name} (w {w:g}, synthetic x{budget:g}), seed {seed} -> {run}")
                train_loop.main(arm_argv(base, run, w, budget, seed))
            results.setdefault(name, []).append(run_summary(run, judge, task))
    report = evidence_report(args, base, arms, results)
    if judge:
        report["judge_test_acc"] = float(accuracy(judge, task.test, len(task.classes)))
    write_reports(args, arms, report)


def write_reports(args, arms, report):
    out = args.out
    write_json(out / "comparison.json", report)
    write_atomic(out / "comparison.md", evidence_markdown(report).encode())
    plot_comparison(out / "comparison.png", report)
    if args.sweep:
        plot_sweep(out / "sweep.png", out, [n for n, (w, b) in arms.items() if b == report["synthetic"] and n != "real"],
                   arms)
    if args.budgets:
        plot_budgets(out / "budgets.png", report)
    print(f"done: {out}/comparison.md (and comparison.json, comparison.png"
          + (", sweep.png" if args.sweep else "") + (", budgets.png" if args.budgets else "") + ")")


def train_judge(out, task, seed, epochs=30):
    """A classifier trained on the balanced train split (digits only), with the predictor's augmentation: its
    accuracy on generated images says whether they still show their class. Cached in OUT/judge.pt."""
    path = out / "judge.pt"
    judge = tasks.small_cnn(10)
    if path.exists():
        judge.load_state_dict(torch.load(path))
        return judge.eval()
    torch.manual_seed(seed)
    (x, y), _ = tasks.digits_split()
    optimizer = torch.optim.Adam(judge.parameters(), lr=1e-3)
    for _ in tqdm(range(epochs), desc="judge", leave=False):
        for i in torch.randperm(len(y)).split(64):
            tasks.fit_step(optimizer, F.cross_entropy(judge(torch.stack([task.train_tf(im) for im in x[i]])), y[i]))
    write_with(path, lambda f: torch.save(judge.state_dict(), f))
    return judge.eval()


def accuracy(predictor, dataset, num_classes):
    correct, count = tasks.evaluate(predictor, dataset, num_classes, torch.device("cpu"))
    return correct.sum() / count.sum()


def judge_accuracy(judge, task, folder, rows):
    """The share of a run's generated images that the judge assigns to the class they were made for."""
    if not rows:
        return None
    images = tasks.Images([folder.synthetic / r["file_name"] for r in rows], [r["label"] for r in rows],
                          task.test.transform, task.mode)
    return float(accuracy(judge, images, len(task.classes)))


def run_summary(run, judge, task):
    """Final accuracies and what the run generated."""
    folder = RunFolder(run)
    metrics = read_json(folder.metrics)
    last = metrics["epochs"][-1]
    rows = read_metadata(folder.metadata)
    mean = lambda key: float(np.mean([r[key] for r in rows])) if rows else None  # noqa: E731
    return dict(acc=last["acc"], **{f"{g}_acc": last[f"{g}_acc"] for g in metrics["class_groups"]},
                signal=mean("signal"), guidance_ratio=mean("guidance_ratio"),
                judge_acc=judge_accuracy(judge, task, folder, rows) if judge else None)


def accuracy_keys(runs):
    """The accuracies every run has: overall, then per group of classes (many/medium/few-shot, tail)."""
    keys = [k for k in runs[0] if k == "acc" or k.endswith("_acc") and k != "judge_acc"]
    return [k for k in keys if all(r[k] is not None for r in runs)]


def mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return dict(mean=float(np.mean(values)), std=float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
                n=len(values))


def paired(a, b):
    """Mean and standard error of a - b over seeds (same seed, same budget and schedule)."""
    d = np.array([x - y for x, y in zip(a, b)])
    return dict(mean=float(d.mean()), se=float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan"),
                n=len(d))


def evidence_report(args, base, arms, results):
    arm_rows = {}
    for name, runs in results.items():
        w, budget = arms[name]
        arm_rows[name] = dict(w=w, synthetic=budget, **{k: mean_std([r[k] for r in runs]) for k in runs[0]},
                              per_seed=runs)
    keys = accuracy_keys([r for runs in results.values() for r in runs])
    unguided = {b: n for n, (w, b) in arms.items() if w == 0}  # the unguided arm of each budget
    for name, row in arm_rows.items():
        ref = unguided.get(row["synthetic"])
        if row["w"] > 0 and ref:
            row["minus_unguided"] = {k: paired([r[k] for r in row["per_seed"]],
                                               [r[k] for r in arm_rows[ref]["per_seed"]]) for k in keys}
    return dict(dataset=base.dataset, accuracies=keys, seeds=args.seeds, guidance_weight=base.guidance_weight,
                rescale=base.rescale, synthetic=base.synthetic, schedule=base.rounds, epochs=base.epochs,
                pretrain_epochs=base.pretrain_epochs, signal=base.signal,
                command=shlex.join(["python", "bench/compare.py", *sys.argv[1:]]),
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
                machine=f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}", arms=arm_rows)


def label(key):
    return "overall" if key == "acc" else GROUP_LABELS[key.removesuffix("_acc")]


def evidence_markdown(report):
    pct = lambda s: "–" if s is None else f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}"  # noqa: E731
    num = lambda s, f=".3f": "–" if s is None else format(s["mean"], f)  # noqa: E731
    diff = lambda d: f"{100 * d['mean']:+.1f} ± {100 * d['se']:.1f}"  # noqa: E731
    keys = report["accuracies"]
    lines = [f"# Longtail Guidance vs unguided synthetic data: {report['dataset']}", "",
             f"Measured {report['date']} on {report['machine']}. {report['seeds']} seeds per arm; test top-1 accuracy "
             f"(%) after {report['pretrain_epochs']} real-only and {report['epochs']} fine-tuning epochs, mean ± std "
             "over seeds; class groups by their real training images (many-shot > 100, medium-shot 20-100, few-shot "
             "< 20; tail: the rarest third). Synthetic budget as a multiple of the real (long-tailed) training set; "
             f"generation rounds at fine-tuning epochs {report['schedule']}. "
             f"Signal: {report['signal']}{', w rescaled (w = guidance share of |eps|)' if report['rescale'] else ''}.",
             "", f"Command: `{report['command']}`", "",
             "| arm | w | synthetic | " + " | ".join(map(label, keys)) + " | mean signal | guidance ratio | judge acc |",
             "| --- " * (len(keys) + 6) + "|"]
    for name, r in report["arms"].items():
        lines.append(f"| {name} | {r['w']:g} | x{r['synthetic']:g} | " + " | ".join(pct(r[k]) for k in keys)
                     + f" | {num(r['signal'])} | {num(r['guidance_ratio'])} | {pct(r['judge_acc'])} |")
    lines += ["", "Guided minus unguided, paired by seed (same seed, budget and schedule), mean ± standard error, "
              "percentage points:", "", "| arm | " + " | ".join(map(label, keys)) + " |", "| --- " * (len(keys) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(diff(r["minus_unguided"][k]) for k in keys) + " |"
              for name, r in report["arms"].items() if "minus_unguided" in r]
    lines += ["", "Guidance ratio: |w sqrt(1 - abar) grad| / |eps| at the median guided step. Judge acc: the share of "
              "generated images a classifier trained on the balanced train split assigns to their intended class"
              + (f" (its own test accuracy: {100 * report['judge_test_acc']:.1f}%)." if "judge_test_acc" in report
                 else "."), ""]
    return "\n".join(lines)


def plot_comparison(path, report):
    names = list(report["arms"])
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(names)), 4))
    x, keys = np.arange(len(names)), report["accuracies"]
    width = 0.8 / len(keys)
    for k, key in enumerate(keys):
        stats = [report["arms"][n][key] for n in names]
        ax.bar(x + (k - (len(keys) - 1) / 2) * width, [100 * s["mean"] for s in stats], width,
               yerr=[100 * s["std"] for s in stats], capsize=2, label=label(key))
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set(ylabel="test top-1 (%), mean ± std over seeds", ylim=(0, 100),
           title=f"{report['dataset']}: real only vs unguided vs LTG ({report['seeds']} seeds)")
    ax.legend(loc="lower right")
    write_figure(path, fig)


def plot_sweep(path, out, names, arms, seed=0, images=8):
    """Figure 1 of the paper: the same round-0 samples (same seed and predictor) at each w, one column per w."""
    names = sorted(names, key=lambda n: arms[n][0])
    fig, axes = plt.subplots(images, len(names), figsize=(1.3 * len(names), 1.3 * images), squeeze=False)
    for col, name in enumerate(names):
        folder = RunFolder(out / name / f"seed{seed}")
        rows = {r["index"]: r for r in read_metadata(folder.metadata) if r["round"] == 0}
        for row in range(images):
            ax = axes[row, col]
            ax.axis("off")
            if row in rows:
                with Image.open(folder.synthetic / rows[row]["file_name"]) as im:
                    ax.imshow(np.asarray(im), cmap="gray")
                ax.set_title(f"{rows[row]['signal']:.2f}", fontsize=7)
        axes[0, col].set_title(f"w={arms[name][0]:g}\n" + axes[0, col].get_title(), fontsize=8)
    fig.suptitle("the same samples at each guidance weight (title: longtail signal)", fontsize=9)
    write_figure(path, fig)


def plot_budgets(path, report):
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, w_zero in (("unguided", True), ("LTG", False)):
        rows = sorted((r for r in report["arms"].values() if r["synthetic"] > 0 and (r["w"] == 0) == w_zero
                       and (w_zero or r["w"] == report["guidance_weight"])), key=lambda r: r["synthetic"])
        for key, style in zip(("acc", report["accuracies"][-1]), ("-", "--")):
            ax.errorbar([r["synthetic"] for r in rows], [100 * r[key]["mean"] for r in rows],
                        [100 * r[key]["std"] for r in rows], ls=style, marker="o", capsize=3,
                        label=f"{kind} {label(key)}")
    budgets = sorted({r["synthetic"] for r in report["arms"].values() if r["synthetic"] > 0})
    ax.set(xscale="log", xlabel="synthetic budget (x the real training set)", ylabel="test top-1 (%)",
           title="data efficiency")
    ax.set_xticks(budgets, [f"x{b:g}" for b in budgets], minor=False)
    ax.minorticks_off()
    ax.legend()
    write_figure(path, fig)


if __name__ == "__main__":
    main()
