"""The evidence: does Longtail-Guided data help a predictor more than the same amount of unguided
synthetic data, across imbalance profiles, under shift, with every setting chosen on validation? Runs
train_loop.py's cycle in arms that differ only in w, the synthetic budget or an option, over seeds and
imbalance profiles, and reports paired differences.

    python bench/compare.py --seeds 10                                      # real only, unguided, LTG
    python bench/compare.py --seeds 5 --profiles 30,100@1,10@2 \
        --variant judge-filter="--label-filter judge"                        # 3 profiles, plus an option
    python bench/compare.py --seeds 5 --sweep 0.03,0.15 --budgets 2         # a w sweep and a data-efficiency curve
    python bench/compare.py --seeds 3 --out runs/flowers-compare -- --dataset flowers --data-root data

A profile (digits) is an imbalance ratio and a class order: `100@1` is --imbalance 100 --class-order 1.
Flags after `--` (or any this script does not know) go to every arm's train_loop.py; the LTG arm uses their
--guidance-weight and every arm their --synthetic budget; a --variant NAME="FLAGS" arm is LTG with FLAGS.
Each arm is a train_loop.py run in OUT/<profile>/<arm>/seed<s>: killed ones resume, finished ones are
skipped, and the arms of one profile and seed start from the first arm's pretrained predictor
(train_loop.py --init-from). OUT gets comparison.{md,json,png}, per_class.png, rarest.png, and sweep.png and
budgets.png with --sweep and --budgets. For digits, a judge (tasks.digits_judge) reports which share of each
arm's images shows its intended class. Choices are read off the validation columns, never the test ones.
"""

import argparse
import datetime
import math
import os
import platform
import re
import shlex
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # train_loop.py and its modules
import tasks  # noqa: E402
import train_flags  # noqa: E402
import train_loop  # noqa: E402
from run_folder import (RunFolder, plt, read_json, read_metadata, run_finished,  # noqa: E402
                        write_atomic, write_figure, write_json)


class Arm(NamedTuple):
    w: float
    synthetic: float
    flags: tuple = ()   # extra train_loop.py flags (a --variant)


class Profile(NamedTuple):
    name: str
    flags: argparse.Namespace   # every arm's train_loop.py flags in this profile


def parse_args(argv=None):
    p = train_flags.Parser(prog="compare.py", description=__doc__.split("\n\n")[0], allow_abbrev=False,
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per arm")
    p.add_argument("--profiles", metavar="R[@ORDER],...",
                   help="digits: imbalance profiles, each a ratio and optionally a --class-order seed, e.g. "
                        "30,100@1,10@2 (default: the one the flags after -- give)")
    p.add_argument("--sweep", metavar="W,W,...", help="also one arm per guidance weight, and sweep.png")
    p.add_argument("--budgets", metavar="X,X,...", help="also unguided and LTG arms at these synthetic budgets, "
                                                          "and budgets.png")
    p.add_argument("--variant", action="append", default=[], metavar='NAME="FLAGS"',
                   help="also an LTG arm ltg+NAME with these train_loop.py flags, e.g. "
                        'judge-filter="--label-filter judge"; repeatable')
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
    args.variants = {name: tuple(flags) for name, flags in map(lambda v: variant(p, rest, v), args.variant)}
    args.profiles = profiles(p, rest, base, args.profiles)
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


def variant(parser, rest, spec):
    """--variant NAME="FLAGS" -> (NAME, [flags]), the flags checked by train_loop.py's parser."""
    name, _, flags = spec.partition("=")
    if not re.fullmatch(r"[a-z0-9][a-z0-9.-]*", name) or not flags.strip():
        parser.error(f"--variant {spec!r}: expected NAME=\"FLAGS\" with a lower-case NAME, e.g. "
                     'judge-filter="--label-filter judge"')
    argv = shlex.split(flags)
    train_flags.parse_flags(rest + argv)
    return name, argv


def profile_name(flags):
    """The folder of a profile's arms: r<imbalance>[-o<class order>] for digits, the dataset's name otherwise."""
    if flags.dataset != "digits":
        return flags.dataset
    order = "" if flags.class_order is None else "-o" + flags.class_order.replace(",", "-")
    return f"r{flags.imbalance:g}{order}"


def profiles(parser, rest, base, text):
    """--profiles '30,100@1' -> [Profile], each the flags after -- with that --imbalance and --class-order."""
    if text is None:
        return [Profile(profile_name(base), base)]
    if base.dataset != "digits":
        parser.error(f"--profiles shapes the digits' long tail; --dataset {base.dataset} keeps its own class counts")
    found = []
    for spec in text.split(","):
        if not re.fullmatch(r"\d+(\.\d+)?(@\d+)?", spec.strip()):
            parser.error(f"--profiles {text!r}: {spec!r} is not RATIO or RATIO@SEED (e.g. 30 or 100@1)")
        ratio, _, order = spec.strip().partition("@")
        flags = train_flags.parse_flags(rest + ["--imbalance", ratio] + (["--class-order", order] if order else []))[1]
        found.append(Profile(profile_name(flags), flags))
    return found


def evidence_arms(args, base):
    """{arm name: Arm}, each Arm once."""
    w, x = base.guidance_weight, base.synthetic
    arms = {"real": Arm(0.0, 0.0), "unguided": Arm(0.0, x), "ltg": Arm(w, x)}
    arms |= {f"w{v:g}": Arm(v, x) for v in args.sweep}
    arms |= {f"{name}-x{b:g}": Arm(v, b) for b in args.budgets for name, v in (("unguided", 0.0), ("ltg", w))}
    arms |= {f"ltg+{name}": Arm(w, x, flags) for name, flags in args.variants.items()}
    unique = {}
    for name, arm in arms.items():
        unique.setdefault(arm, name)
    return {name: arm for arm, name in unique.items()}


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


def arm_argv(base, run, arm, seed):
    """One arm's train_loop.py flags: resumed where it started, else from a sibling's pretrained predictor
    when one exists (pretraining depends on the profile and the seed only)."""
    if RunFolder(run).config.exists():
        return ["--resume", str(run)]
    flags = argparse.Namespace(**vars(base))
    flags.guidance_weight, flags.synthetic, flags.seed, flags.out = arm.w, arm.synthetic, seed, None
    flags.gen_epochs = base.gen_epochs if arm.synthetic > 0 else None  # the real-only arm has no rounds
    argv = to_argv(flags) + list(arm.flags) + ["--out", str(run)]
    pretrained = sorted(run.parent.parent.glob(f"*/seed{seed}/pretrained.pt"))
    return argv + (["--init-from", str(pretrained[0])] if pretrained and base.pretrain_epochs > 0 else [])


def main(argv=None):
    args, base = parse_args(argv)
    arms = evidence_arms(args, base)
    judge = tasks.digits_judge() if base.dataset == "digits" else None
    results = {}
    for profile in args.profiles:
        for name, arm in arms.items():
            for seed in range(args.seeds):
                run = args.out / profile.name / name / f"seed{seed}"
                if not run_finished(run):
                    print(f"compare: {profile.name}, arm {name} (w {arm.w:g}, synthetic x{arm.synthetic:g}"
                          f"{', ' + shlex.join(arm.flags) if arm.flags else ''}), seed {seed} -> {run}")
                    train_loop.main(arm_argv(profile.flags, run, arm, seed))
                results.setdefault(profile.name, {}).setdefault(name, []).append(run_summary(run, judge))
    report = evidence_report(args, base, arms, results)
    if judge:
        task = tasks.digits_task()
        report["judge_acc"] = {name: accuracy(judge, dataset) for name, dataset in
                               (("test", task.test), ("shifted", task.evals["shifted"]), ("val", task.val))}
    write_reports(args, arms, report)


def write_reports(args, arms, report):
    out = args.out
    write_json(out / "comparison.json", report)
    write_atomic(out / "comparison.md", evidence_markdown(report).encode())
    plot_comparison(out / "comparison.png", report)
    plot_per_class(out / "per_class.png", report)
    written = ["comparison.json", "comparison.png", "per_class.png"]
    if report["dataset"] == "digits":
        plot_rarest(out / "rarest.png", out, report, args.profiles)
        written.append("rarest.png")
    if args.sweep:
        first = args.profiles[0].name
        plot_sweep(out / "sweep.png", out / first,
                   [n for n, a in arms.items() if a.synthetic == report["synthetic"] and a.w > 0 and not a.flags]
                   + ["unguided"], arms)
        written.append("sweep.png")
    if args.budgets:
        plot_budgets(out / "budgets.png", report)
        written.append("budgets.png")
    print(f"done: {out}/comparison.md (and {', '.join(written)})")


def accuracy(predictor, dataset, num_classes=10):
    correct, count = tasks.evaluate(predictor, dataset, num_classes, torch.device("cpu"))
    return float(correct.sum() / count.sum())


def judge_accuracy(judge, folder, rows):
    """The share of a run's generated digits (all of them, filtered or not) that the judge assigns to the class
    they were made for."""
    if not rows:
        return None
    _, test_tf = tasks.digits_transforms()
    return accuracy(judge, tasks.Images([folder.synthetic / r["file_name"] for r in rows], [r["label"] for r in rows],
                                        test_tf, "L"))


def run_summary(run, judge):
    """A finished run's last-epoch accuracies (test, shifted, validation), per-class test top-1, and what it
    generated: mean signal and guidance ratio, the judge's accuracy, the share of images it trained on."""
    folder = RunFolder(run)
    metrics = read_json(folder.metrics)
    last = metrics["epochs"][-1]
    rows = read_metadata(folder.metadata)
    mean = lambda key: float(np.mean([r[key] for r in rows])) if rows else None  # noqa: E731
    scores = {k: v for k, v in last.items() if is_accuracy(k)}
    return dict(scores, signal=mean("signal"), guidance_ratio=mean("guidance_ratio"),
                judge_acc=judge_accuracy(judge, folder, rows) if judge else None,
                kept=last["synthetic"] / len(rows) if rows else None, per_class_acc=last["per_class_acc"],
                train_counts=metrics["train_counts"], class_groups=metrics["class_groups"])


SUMMARY_STATS = ("signal", "guidance_ratio", "judge_acc", "kept")


def is_accuracy(key):
    """A metrics.json top-1 figure of a set or group ('acc', 'val_acc', 'shifted_few_acc', ...), not a list."""
    return key == "acc" or key.endswith("_acc") and not key.endswith("per_class_acc")


def accuracy_keys(runs):
    """The accuracies every run has: test (overall, per group of classes, worst class), then shifted, then val."""
    keys = [k for k in runs[0] if is_accuracy(k) and k not in SUMMARY_STATS]
    keys = [k for k in keys if all(r.get(k) is not None for r in runs)]
    return sorted(keys, key=lambda k: (k.startswith("val_"), k.startswith("shifted_")))


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


def arm_rows(arms, results, keys):
    """Per arm: mean and std of every accuracy and statistic over its runs, its runs, and its paired differences
    (guided arms minus the unguided arm of their budget; variants also minus LTG)."""
    rows = {}
    for name, runs in results.items():
        arm = arms[name]
        rows[name] = dict(w=arm.w, synthetic=arm.synthetic, flags=shlex.join(arm.flags),
                          **{k: mean_std([r[k] for r in runs]) for k in (*keys, *SUMMARY_STATS)}, per_seed=runs)
    unguided = {a.synthetic: n for n, a in arms.items() if a.w == 0 and not a.flags}
    for name, row in rows.items():
        refs = dict(minus_unguided=unguided.get(row["synthetic"]) if row["w"] > 0 else None,
                    minus_ltg="ltg" if arms[name].flags else None)
        for key, ref in refs.items():
            if ref in rows:
                row[key] = {k: paired([r[k] for r in row["per_seed"]], [r[k] for r in rows[ref]["per_seed"]])
                            for k in keys}
    return rows


def chosen_on_validation(profiles, pooled, synthetic):
    """The rule that picks LTG's settings, on validation only: a guided arm at the main budget (another w, a
    variant) replaces "ltg" if its validation top-1 minus LTG's, paired over every profile and seed, is more than
    one standard error above zero and no profile's mean difference is negative; the best such arm, else "ltg"."""
    def val_minus_ltg(rows, name):
        return paired([r["val_acc"] for r in rows[name]["per_seed"]], [r["val_acc"] for r in rows["ltg"]["per_seed"]])
    if pooled.get("ltg", {}).get("val_acc") is None:
        return None
    gains = {}
    for name, row in pooled.items():
        if name == "ltg" or row["w"] == 0 or row["synthetic"] != synthetic:
            continue
        d = val_minus_ltg(pooled, name)
        if d["mean"] > d["se"] and all(val_minus_ltg(p["arms"], name)["mean"] >= 0 for p in profiles.values()):
            gains[name] = d["mean"]
    return max(gains, key=gains.get) if gains else "ltg"


def evidence_report(args, base, arms, results):
    everything = [r for by_arm in results.values() for runs in by_arm.values() for r in runs]
    keys = accuracy_keys(everything)
    profiles = {}
    for profile, by_arm in results.items():
        rows = arm_rows(arms, by_arm, keys)
        first = next(iter(by_arm.values()))[0]
        profiles[profile] = dict(train_counts=first["train_counts"], class_groups=first["class_groups"], arms=rows)
    pooled = arm_rows(arms, {name: [r for by_arm in results.values() for r in by_arm[name]] for name in arms}, keys)
    return dict(dataset=base.dataset, accuracies=keys, seeds=args.seeds, guidance_weight=base.guidance_weight,
                rescale=base.rescale, synthetic=base.synthetic, schedule=base.rounds, epochs=base.epochs,
                pretrain_epochs=base.pretrain_epochs, signal=base.signal,
                command=shlex.join(["python", "bench/compare.py", *sys.argv[1:]]),
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
                machine=f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
                profiles=profiles, pooled=pooled,
                chosen_on_validation=chosen_on_validation(profiles, pooled, base.synthetic))


SHORT = dict(acc="overall", many="many-shot", medium="medium-shot", few="few-shot", tail="tail", hard="hard",
             worst="worst class")


def label(key):
    """'shifted_few_acc' -> 'shifted: few-shot' (the groups' rules are in the report's first paragraph)."""
    name = key.removesuffix("_acc")
    prefix = next((p for p in ("shifted", "val") if name == p or name.startswith(p + "_")), None)
    text = SHORT[name.removeprefix(prefix or "").removeprefix("_") or "acc"]
    return f"{'validation' if prefix == 'val' else prefix}: {text}" if prefix else text


def table_keys(keys):
    """The columns of the markdown tables: every test accuracy, the shifted overall, tail and worst, the validation
    overall (the rest is in comparison.json)."""
    shown = {"shifted_acc", "shifted_tail_acc", "shifted_hard_acc", "shifted_worst_acc", "val_acc"}
    return [k for k in keys if not k.startswith(("shifted_", "val_")) or k in shown]


def arms_markdown(title, rows, keys, seeds):
    pct = lambda s: "–" if s is None else f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}"  # noqa: E731
    num = lambda s, f=".3f": "–" if s is None else format(s["mean"], f)  # noqa: E731
    diff = lambda d: f"{100 * d['mean']:+.1f} ± {100 * d['se']:.1f}"  # noqa: E731
    lines = [f"### {title}", "", f"Mean ± std over {seeds}:", "",
             "| arm | w | synthetic | " + " | ".join(map(label, keys)) + " | mean signal | guidance ratio | judge acc | "
             "kept |", "| --- " * (len(keys) + 7) + "|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['w']:g} | x{r['synthetic']:g} | " + " | ".join(pct(r[k]) for k in keys)
                     + f" | {num(r['signal'])} | {num(r['guidance_ratio'])} | {pct(r['judge_acc'])} | "
                       f"{pct(r['kept'])} |")
    for ref, what in (("minus_unguided", "minus unguided"), ("minus_ltg", "minus LTG")):
        diffs = [(name, r[ref]) for name, r in rows.items() if ref in r]
        if diffs:
            lines += ["", f"Paired differences, {what} (same seed, budget and schedule), mean ± standard error, "
                      "percentage points:", "", "| arm | " + " | ".join(map(label, keys)) + " |",
                      "| --- " * (len(keys) + 1) + "|"]
            lines += [f"| {name} | " + " | ".join(diff(d[k]) for k in keys) + " |" for name, d in diffs]
    return lines + [""]


def evidence_markdown(report):
    keys = table_keys(report["accuracies"])
    lines = [f"# Longtail Guidance vs unguided synthetic data: {report['dataset']}", "",
             f"Measured {report['date']} on {report['machine']}. {report['seeds']} seeds per arm and profile; top-1 "
             f"accuracy (%) after {report['pretrain_epochs']} real-only and {report['epochs']} fine-tuning epochs, "
             "on the test set, its shifted copy and the validation set; class groups by their real training images "
             "(many-shot > 100, medium-shot 20-100, few-shot < 20; tail: the rarest third; hard: the weakest third "
             "on validation at the end of pretraining; worst: the weakest class). Synthetic budget as a multiple of "
             "the real (long-tailed) training set; generation rounds at fine-tuning epochs "
             f"{report['schedule']}. Signal: {report['signal']}"
             f"{', w rescaled (w = guidance share of |eps|)' if report['rescale'] else ''}. Kept: the share of "
             "generated images trained on (a label filter drops the rest). Judge acc: the share of generated images "
             "a classifier trained on the balanced training pool assigns to their intended class"
             + (" (its own top-1: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in report["judge_acc"].items()) + ")"
                if "judge_acc" in report else "") + ".", "", f"Command: `{report['command']}`", ""]
    if report["chosen_on_validation"]:
        lines += [f"Chosen on validation: **{report['chosen_on_validation']}** (another w or option replaces LTG's "
                  "settings only if its validation top-1 minus LTG's, paired over profiles and seeds, is more than one "
                  "standard error above zero and negative on no profile).", ""]
    profiles = report["profiles"]
    if len(profiles) > 1:
        lines += arms_markdown(f"All {len(profiles)} profiles pooled (paired over profile and seed)", report["pooled"],
                               keys, f"{len(profiles)} profiles × {report['seeds']} seeds")
    for name, profile in profiles.items():
        groups = ", ".join(f"{g} {c}" for g, c in profile["class_groups"].items() if c)
        lines += arms_markdown(f"Profile {name}: real training images per class {profile['train_counts']}; {groups}",
                               profile["arms"], keys, f"{report['seeds']} seeds")
    lines += ["Guidance ratio: |w sqrt(1 - abar) grad| / |eps| at the median guided step.", ""]
    return "\n".join(lines)


def plot_comparison(path, report):
    """Test top-1 of every arm, overall and per group of classes, one panel per profile."""
    profiles = report["profiles"]
    keys = [k for k in report["accuracies"] if not k.startswith(("shifted_", "val_"))] + ["shifted_acc"]
    names = list(next(iter(profiles.values()))["arms"])
    fig, axes = plt.subplots(1, len(profiles), figsize=(max(6, 1.2 * len(names)) * len(profiles), 4), squeeze=False)
    x, width = np.arange(len(names)), 0.8 / len(keys)
    for ax, (profile, data) in zip(axes[0], profiles.items()):
        for k, key in enumerate(keys):
            stats = [data["arms"][n][key] for n in names]
            ax.bar(x + (k - (len(keys) - 1) / 2) * width, [100 * s["mean"] for s in stats], width,
                   yerr=[100 * s["std"] for s in stats], capsize=2, label=label(key))
        ax.set_xticks(x, names, rotation=30, ha="right")
        ax.set(ylabel="top-1 (%), mean ± std over seeds", ylim=(0, 100), title=f"{report['dataset']} {profile}")
    axes[0, -1].legend(loc="lower right", fontsize=7)
    write_figure(path, fig)


def plot_per_class(path, report, arms=("real", "unguided", "ltg")):
    """Per-class test top-1 of real only, unguided and LTG (mean ± standard error over seeds), classes from the
    most to the least common, one panel per profile: where the synthetic data went."""
    profiles = report["profiles"]
    fig, axes = plt.subplots(len(profiles), 1, figsize=(8, 3.4 * len(profiles)), squeeze=False)
    for ax, (profile, data) in zip(axes[:, 0], profiles.items()):
        counts = np.array(data["train_counts"])
        order = np.argsort(-counts, kind="stable")
        hard = set(data["class_groups"].get("hard", []))
        shown = [a for a in arms if a in data["arms"]]
        for i, name in enumerate(shown):
            accs = 100 * np.array([r["per_class_acc"] for r in data["arms"][name]["per_seed"]])[:, order]
            se = accs.std(0, ddof=1) / np.sqrt(len(accs)) if len(accs) > 1 else np.zeros(len(order))
            ax.bar(np.arange(len(order)) + (i - (len(shown) - 1) / 2) * 0.8 / len(shown), accs.mean(0),
                   0.8 / len(shown), yerr=se, capsize=2, label=name)
        ax.set_xticks(np.arange(len(order)), [f"{c}{'*' if c in hard else ''}\n{counts[c]}" for c in order], fontsize=7)
        ax.set(ylim=(0, 100), ylabel="test top-1 (%)", title=f"{profile}: class (* hard) and its real training images")
    axes[0, 0].legend(loc="lower left", fontsize=7)
    fig.tight_layout()
    write_figure(path, fig)


def read_digit(path):
    """A generated digit's PNG -> [1, 8, 8] in [0, 1]."""
    with Image.open(path) as im:
        return torch.tensor(np.asarray(im) / 255, dtype=torch.float32)[None]


def plot_rarest(path, out, report, profiles, classes=3, images=6, seed=0):
    """Digits: the three rarest classes of each profile, its real training images, then the images each generating
    arm made for them (seed 0, round 0; title: the longtail signal, red where the judge disagrees with the class)."""
    names = [n for n, r in report["pooled"].items() if r["synthetic"] == report["synthetic"] > 0]
    rows_per_profile = 1 + len(names)
    fig, axes = plt.subplots(rows_per_profile * len(profiles), classes * images, squeeze=False,
                             figsize=(0.6 * classes * images, 0.75 * rows_per_profile * len(profiles)))
    for p, profile in enumerate(profiles):
        task = tasks.digits_task(profile.flags.imbalance, tasks.class_order(profile.flags.class_order, 10))
        labels = torch.tensor(task.train_labels)
        rarest = np.argsort(np.bincount(task.train_labels, minlength=10), kind="stable")[:classes][::-1]
        top = p * rows_per_profile
        for c_i, c in enumerate(rarest):
            for j, image in enumerate(task.train.images[labels == int(c)][:images]):
                axes[top, c_i * images + j].imshow(image[0].numpy(), cmap="gray", vmin=0, vmax=1)
            axes[top, c_i * images].set_title(f"{profile.name} class {c}: real ({int((labels == int(c)).sum())})",
                                              fontsize=6, loc="left")
        for a_i, name in enumerate(names):
            folder = RunFolder(out / profile.name / name / f"seed{seed}")
            rows = [r for r in read_metadata(folder.metadata) if r["round"] == 0]
            axes[top + 1 + a_i, 0].set_ylabel(name, fontsize=6)
            for c_i, c in enumerate(rarest):
                mine = [r for r in rows if r["label"] == c][:images]
                pixels = torch.stack([read_digit(folder.synthetic / r["file_name"]) for r in mine])  # [n, 1, 8, 8]
                for j, (r, guess) in enumerate(zip(mine, train_loop.judge_labels(task, pixels))):
                    ax = axes[top + 1 + a_i, c_i * images + j]
                    ax.imshow(pixels[j, 0].numpy(), cmap="gray", vmin=0, vmax=1)
                    ax.set_title(f"{r['signal']:.2f}", fontsize=5, color="black" if guess == c else "red")
    for ax in axes.flat:
        ax.set(xticks=[], yticks=[])
        for spine in ax.spines.values():
            spine.set_visible(False)
    fig.suptitle("rarest classes: real training images, then each arm's generated images (seed 0, round 0; title: "
                 "longtail signal, red: the judge disagrees)", fontsize=7)
    write_figure(path, fig)


def plot_sweep(path, out, names, arms, seed=0, images=8):
    """Figure 1 of the paper: the same round-0 samples (same seed and predictor) at each w, one column per w."""
    names = sorted(names, key=lambda n: arms[n].w)
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
        axes[0, col].set_title(f"w={arms[name].w:g}\n" + axes[0, col].get_title(), fontsize=8)
    fig.suptitle("the same samples at each guidance weight (title: longtail signal)", fontsize=9)
    write_figure(path, fig)


def plot_budgets(path, report):
    """Data efficiency: test top-1 of unguided and LTG data at each synthetic budget, mean ± std over every profile
    and seed."""
    arms = report["pooled"]
    fig, ax = plt.subplots(figsize=(6, 4))
    tail = "tail_acc" if "tail_acc" in report["accuracies"] else "few_acc"
    for kind, w_zero in (("unguided", True), ("LTG", False)):
        rows = sorted((r for r in arms.values() if r["synthetic"] > 0 and (r["w"] == 0) == w_zero and not r["flags"]
                       and (w_zero or r["w"] == report["guidance_weight"])), key=lambda r: r["synthetic"])
        for key, style in (("acc", "-"), (tail, "--")):
            ax.errorbar([r["synthetic"] for r in rows], [100 * r[key]["mean"] for r in rows],
                        [100 * r[key]["std"] for r in rows], ls=style, marker="o", capsize=3,
                        label=f"{kind} {label(key)}")
    budgets = sorted({r["synthetic"] for r in arms.values() if r["synthetic"] > 0})
    ax.set(xscale="log", xlabel="synthetic budget (x the real training set)", ylabel="test top-1 (%), mean ± std",
           title="data efficiency")
    ax.set_xticks(budgets, [f"x{b:g}" for b in budgets], minor=False)
    ax.minorticks_off()
    ax.legend()
    write_figure(path, fig)


if __name__ == "__main__":
    main()
