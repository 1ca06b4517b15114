"""A train_loop.py run folder: where each file lives, how files are written, and the mined dataset in it.

    RUN/
      config.json                  the run's flags (--resume reads them back)
      metrics.json                 per epoch and per generation round
      accuracy.png                 accuracy over epochs, generation rounds marked
      checkpoint.pt                the last finished epoch: predictor and head, optimiser, schedule, metrics, flags
      pretrained.pt                the same at the end of real-only pretraining (--init-from starts other runs here)
      lock                         held by the process working on the run; names it
      rounds/round<r>.png          each round's images sorted by longtail signal
      generation/rank<k>.jsonl     a round's rows per rank, until the round is merged into metadata.jsonl
      introspection/               introspect.py's logs, refined prompts and report
      synthetic/                   the mined images, a dataset that loads as it is:
        README.md                    its dataset card
        metadata.jsonl               one row per image, keyed by file_name (Hugging Face imagefolder)
        <label>-<class>/r<round>_<index>.png   one folder per class, sorted by label (torchvision ImageFolder)

Here too: the columns of metadata.jsonl (metadata_rows), its one reader (read_metadata), the
checks a resumed run makes of its folder, its figures and the dataset card. Every file is written
whole: into a temporary file beside it, flushed to disk, then renamed over the old one, so a kill at
any moment leaves the old file or the new one. introspect.py uses the same reader and writer.
"""

import errno
import fcntl
import io
import json
import math
import os
import re
import socket
import time
from pathlib import Path

import matplotlib
import numpy as np
import torch
from PIL import Image

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)


class RunFolderError(ValueError):
    """A damaged, busy or unwritable run folder. The message is one line, meant for the user."""


class RunFolder:
    def __init__(self, root):
        self.root = Path(root)
        self.config = self.root / "config.json"
        self.metrics = self.root / "metrics.json"
        self.accuracy_plot = self.root / "accuracy.png"
        self.checkpoint = self.root / "checkpoint.pt"
        self.pretrained = self.root / "pretrained.pt"
        self.lock = self.root / "lock"
        self.generation = self.root / "generation"
        self.introspection = self.root / "introspection"
        self.synthetic = self.root / "synthetic"
        self.metadata = self.synthetic / "metadata.jsonl"
        self.card = self.synthetic / "README.md"

    def round_plot(self, rnd):
        return self.root / "rounds" / f"round{rnd}.png"

    def shard(self, rank):
        return self.generation / f"rank{rank}.jsonl"


def introspection_paths(path):
    """(the folder holding metadata.jsonl and its images, the folder for introspect.py's files) of a
    train_loop.py run folder (RUN/synthetic, RUN/introspection) or of any image folder with a
    metadata.jsonl (FOLDER, FOLDER/introspection)."""
    path = Path(path)
    run = RunFolder(path)
    if not (path / "metadata.jsonl").exists() and run.metadata.exists():
        return run.synthetic, run.introspection
    return path, path / "introspection"


def class_folder(label, name, num_classes):
    """'<label>-<name>': zero-padded so that sorted folder names (torchvision's ImageFolder order) follow labels."""
    width = max(3, len(str(num_classes - 1)))
    return f"{label:0{width}d}-{re.sub(r'[^A-Za-z0-9.+-]+', '_', name).strip('_')}"


def round_prefix(rnd):
    """What the file names of round rnd's images start with."""
    return f"r{rnd:02d}_"


def image_file(label, name, num_classes, rnd, index):
    """An image's file_name, relative to synthetic/."""
    return f"{class_folder(label, name, num_classes)}/{round_prefix(rnd)}{index:06d}.png"


def metadata_rows(out, classes, w, rnd, indices, labels, prompts, seeds):
    """The metadata.jsonl rows of a generated batch (an ltg.LTGOutput), one per image."""
    ratio = float(np.median(out.guidance_ratio)) if out.guidance_ratio else 0.0  # at the batch's median step
    return [dict(file_name=image_file(labels[k], classes[labels[k]], len(classes), rnd, i), label=labels[k],
                 class_name=classes[labels[k]], prompt=prompts[k], seed=seeds[k], w=w, signal=out.signal[k].item(),
                 **{kind: value[k].item() for kind, value in out.signals.items()},
                 predicted_label=out.label[k].item(), round=rnd, index=i, guidance_ratio=ratio)
            for k, i in enumerate(indices)]


def generated_rows(folder):
    """All rows generated so far, by (round, index): the merged metadata and any rank shards not merged yet."""
    rows = read_metadata(folder.metadata)
    for shard in sorted(folder.generation.glob("rank*.jsonl")):
        rows += read_metadata(shard)
    return sorted({(r["round"], r["index"]): r for r in rows}.values(), key=lambda r: (r["round"], r["index"]))


# ---------------------------------------------------------------------------------------------
# Writing: whole files only.
# ---------------------------------------------------------------------------------------------

def write_atomic(path, data):
    """Write bytes through a temporary file and os.replace: readers, and a kill at any moment, see the
    old file or the new one, never half. Creates the folder; the file gets the umask's mode."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise RunFolderError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)


def write_with(path, write):
    """`write(f)` into a buffer, then write_atomic."""
    buffer = io.BytesIO()
    write(buffer)
    write_atomic(path, buffer.getvalue())


def write_json(path, obj):
    write_atomic(path, (json.dumps(obj, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))


def write_jsonl(path, rows):
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8"))


def checkpoint_bytes(state):
    """torch.save's bytes, to be written once to each file that holds them."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def write_png(path, image):
    """image [C, H, W] in [0, 1] -> an 8-bit PNG (grey for C = 1)."""
    pixels = (image * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()      # [H, W, C]
    pil = Image.fromarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels)
    write_with(path, lambda f: pil.save(f, format="PNG"))


def write_figure(path, fig):
    write_with(path, lambda f: fig.savefig(f, format="png", dpi=100, bbox_inches="tight"))
    plt.close(fig)


def remove_temporary_files(root):
    """The temporary files of writes that a kill interrupted (safe only while holding the run's lock)."""
    for tmp in Path(root).rglob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def take_lock(folder):
    """Hold folder.lock until the process exits (the kernel releases it, also after a kill -9); a
    second process on the same run gets a RunFolderError naming the holder."""
    try:
        folder.root.mkdir(parents=True, exist_ok=True)
        handle = open(folder.lock, "a+")
    except OSError as e:
        raise RunFolderError(f"cannot create the run folder {folder.root}: {e.strerror or e}") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        raise RunFolderError(f"{folder.root} is in use by {holder}; wait for it or stop it first") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
    return handle


# ---------------------------------------------------------------------------------------------
# Reading.
# ---------------------------------------------------------------------------------------------

def read_json(path):
    """A JSON file that must be whole: a truncated or hand-damaged one is a RunFolderError."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except ValueError as e:
        raise RunFolderError(f"{path} is damaged (not valid JSON: {e})") from None


def read_checkpoint(path, device="cpu"):
    """A checkpoint written by train_loop.py; a truncated, empty or foreign file is a RunFolderError."""
    try:
        state = torch.load(path, map_location=device)
    except Exception as e:  # torch reports a damaged archive with many exception types
        raise RunFolderError(f"{path} is damaged or not a train_loop.py checkpoint "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'empty'})") from None
    if not isinstance(state, dict) or not {"epoch", "head", "metrics", "config"} <= state.keys():
        raise RunFolderError(f"{path} is not a train_loop.py checkpoint (expected a run's checkpoint.pt or pretrained.pt)")
    return state


def read_run_checkpoint(path, device="cpu"):
    """read_checkpoint, or None where the file is no train_loop.py checkpoint (e.g. an MAE checkpoint's weights)."""
    try:
        return read_checkpoint(path, device)
    except RunFolderError:
        return None


def read_metadata(path, class_names=None):
    """The rows of a metadata.jsonl ([] if absent), each checked: "file_name" a relative path, "label" a
    class index, "signal" a finite number, "class_name" a name (from class_names where a row lacks it)."""
    path = Path(path)
    if not path.exists():
        return []
    rows, seen = [], set()
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                row = _metadata_row(line, f"{path}:{lineno}", class_names)
                if row["file_name"] in seen:
                    raise RunFolderError(f"{path}:{lineno}: image {row['file_name']!r} is listed twice")
                seen.add(row["file_name"])
                rows.append(row)
    return rows


def clip(text, n=120):
    """text on one line, at most n characters: for error messages."""
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[:n - 3] + "..."


def _metadata_row(line, where, class_names):
    try:
        row = json.loads(line)
    except ValueError:
        raise RunFolderError(f"{where}: not a JSON object (a damaged line): {clip(line)}") from None
    if not isinstance(row, dict):
        raise RunFolderError(f"{where}: not a JSON object: {clip(line)}")
    file, label, signal = row.get("file_name"), row.get("label"), row.get("signal")
    if not isinstance(file, str) or not file or os.path.isabs(file):
        raise RunFolderError(f"{where}: \"file_name\" is {file!r}; expected a path relative to the folder")
    if not isinstance(label, int) or isinstance(label, bool) or label < 0:
        raise RunFolderError(f"{where}: \"label\" is {label!r}; expected a class index (int >= 0)")
    if not isinstance(signal, (int, float)) or isinstance(signal, bool) or not math.isfinite(signal):
        raise RunFolderError(f"{where}: \"signal\" is {signal!r}; expected a finite number")
    name = row.get("class_name")
    if name is None:
        if class_names is None:
            raise RunFolderError(f"{where}: no \"class_name\"; pass the class names (--class-names FILE)")
        if label >= len(class_names):
            raise RunFolderError(f"{where}: label {label} is out of range for {len(class_names)} class names")
        name = class_names[label]
    elif not isinstance(name, str) or not name.strip():
        raise RunFolderError(f"{where}: \"class_name\" is {name!r}; expected a non-empty string")
    elif class_names is not None and label < len(class_names) and class_names[label] != name:
        raise RunFolderError(f"{where}: class_name {name!r} but the class names give {class_names[label]!r} "
                             f"for label {label}")
    return {**row, "class_name": name, "signal": float(signal)}


def check_generated_data(folder, rounds):
    """A resumed run trains on exactly what it recorded: every listed image on disk, and per recorded round as
    many metadata rows and PNGs as the round made."""
    rows = read_metadata(folder.metadata)
    for row in rows:
        if not (folder.synthetic / row["file_name"]).is_file():
            raise RunFolderError(f"{folder.metadata} lists {row['file_name']}, which is missing from {folder.synthetic}; "
                                 "restore it or start a new run")
    for r in rounds:
        listed = sum(row["round"] == r["round"] for row in rows)
        on_disk = len(list(folder.synthetic.glob(f"*/{round_prefix(r['round'])}*.png")))
        if listed != r["images"] or on_disk != r["images"]:
            raise RunFolderError(f"round {r['round']} made {r['images']} images, but {folder.metadata} lists {listed} and "
                                 f"{on_disk} are on disk: the generated data changed; restore it or start a new run")


def run_finished(path):
    """Whether the run in `path` has trained all its epochs."""
    folder = RunFolder(path)
    if not folder.metrics.exists():
        return False
    config = read_json(folder.config)
    return len(read_json(folder.metrics)["epochs"]) == config["pretrain_epochs"] + config["epochs"]


# ---------------------------------------------------------------------------------------------
# Figures.
# ---------------------------------------------------------------------------------------------

def plot_round(folder, rows, task, limit=64):
    """rounds/round<r>.png: a grid of the round's images sorted by longtail signal (highest first), with
    their class and the predictor's label; at most `limit` images, evenly spaced along the ranking."""
    ranked = sorted(rows, key=lambda r: -r["signal"])
    shown = [ranked[i] for i in np.linspace(0, len(ranked) - 1, min(limit, len(ranked))).round().astype(int)]
    cols = min(8, len(shown))
    lines = math.ceil(len(shown) / cols)
    fig, axes = plt.subplots(lines, cols, figsize=(1.6 * cols, 1.9 * lines), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    name = lambda c: task.classes[c][:12]  # noqa: E731
    for ax, r in zip(axes.flat, shown):
        with Image.open(folder.synthetic / r["file_name"]) as im:
            ax.imshow(np.asarray(im), cmap="gray" if task.mode == "L" else None, vmin=0, vmax=255)
        ax.set_title(f"{name(r['label'])} -> {name(r['predicted_label'])}\n{r['signal']:.3f}", fontsize=7,
                     color="black" if r["label"] == r["predicted_label"] else "red")
    fig.suptitle(f"round {rows[0]['round']}: class -> predictor's label, longtail signal (sorted)", fontsize=9)
    write_figure(folder.round_plot(rows[0]["round"]), fig)


GROUP_LABELS = dict(many="many-shot (> 100 images)", medium="medium-shot (20-100)", few="few-shot (< 20)",
                    tail="tail (rarest third)", hard="hard (weakest third on val. before fine-tuning)")


def plot_accuracy(path, metrics):
    epochs = metrics["epochs"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([e["acc"] for e in epochs], label="overall")
    for group, classes in metrics["class_groups"].items():
        if classes:
            ax.plot([np.nan if e.get(f"{group}_acc") is None else e[f"{group}_acc"] for e in epochs],
                    label=f"{GROUP_LABELS[group]}, {len(classes)} classes")
    pretrain = sum(e["phase"] == "pretrain" for e in epochs)
    for r in metrics["rounds"]:
        ax.axvline(pretrain + r["epoch"] - 0.5, color="gray", ls=":", lw=1)
    if pretrain:
        ax.axvline(pretrain - 0.5, color="black", ls="--", lw=1, label="fine-tuning starts")
    ax.set(xlabel="epoch (dotted: generation rounds)", ylabel="test top-1 accuracy", ylim=(0, 1))
    ax.legend(loc="lower right")
    write_figure(path, fig)


# ---------------------------------------------------------------------------------------------
# The dataset card: synthetic/README.md, so the mined images can be shared and regenerated exactly.
# ---------------------------------------------------------------------------------------------

def signal_histogram(values, bins=10, width=40):
    """A text histogram (markdown table rows) of the longtail signal."""
    counts, edges = np.histogram(values, bins=bins)
    return [f"| {lo:.3f} – {hi:.3f} | {n} | {'#' * round(width * n / max(1, counts.max()))} |"
            for lo, hi, n in zip(edges[:-1], edges[1:], counts)]


def dataset_card(rows, classes, config, command, generator, predictor):
    """The dataset card of a run's synthetic/ folder (markdown with the Hugging Face YAML header)."""
    counts = np.bincount([r["label"] for r in rows], minlength=len(classes)) if rows else np.zeros(len(classes), int)
    rounds = sorted({r["round"] for r in rows})
    lines = ["---", "task_categories:", "- image-classification", "tags:", "- synthetic", "- longtail-guidance",
             "---", "", f"# Longtail-Guided synthetic images: {config['dataset']}", "",
             f"{len(rows)} images from {len(rounds)} generation round(s), made by `train_loop.py` (ltg, a reference "
             "implementation of Longtail Guidance, Hayden et al., ICML 2025): a diffusion model guided, at every "
             "denoising step, towards images that raise the predictor's longtail signal (the uncertainty of its "
             "Epistemic Head). Each round was guided by the predictor as it was then.", "",
             "## Load", "", "```python", "import datasets, torchvision",
             'ds = datasets.load_dataset("imagefolder", data_dir="THIS_FOLDER", split="train")   # + metadata columns',
             'tv = torchvision.datasets.ImageFolder("THIS_FOLDER")                            # folder order = label',
             "```", "", "## Columns (metadata.jsonl)", "",
             "file_name, label (the class asked for), class_name, prompt (null for a class-conditional model), seed "
             "(of the image's initial noise), w (guidance weight), signal (the longtail signal the run guided on: "
             f"{config['signal']}), total / epistemic / aleatoric (Eqn 4, of the final image, by the predictor of "
             "its round), predicted_label (that predictor's top-1), round, index, guidance_ratio; judge_label (with "
             "--label-filter judge: an independent classifier's top-1; with a label filter, fine-tuning used only the "
             "images whose judge_label or predicted_label is their label).", "",
             "## How it was made", "", f"- generator: `{generator}`", f"- predictor: `{predictor}`",
             f"- command: `{command}`", "- flags (config.json):", "", "```json",
             json.dumps(config, indent=1, ensure_ascii=False), "```", "",
             "Rerunning the command with these flags regenerates the same images (fixed seeds per image).", "",
             "## Images per class", "", "| label | class | images |", "| --- | --- | --- |",
             *[f"| {c} | {name} | {n} |" for c, (name, n) in enumerate(zip(classes, counts.tolist()))], "",
             f"## Longtail signal ({config['signal']})", "", "| signal | images | |", "| --- | --- | --- |",
             *(signal_histogram([r["signal"] for r in rows]) if rows else []), ""]
    return "\n".join(lines)
