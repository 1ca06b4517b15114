"""The flags of train_loop.py, in argument groups with each default beside its meaning, and how they are
checked: every bad value stops the run before anything is read or written, in one line with exit code 2.
A resumed run takes its saved flags (refusing a different value for one that decides its results);
--init-from a run's pretrained.pt takes that run's pretraining flags; per-dataset defaults fill the rest.
"""

import argparse
import math
import shlex
import sys
from pathlib import Path

import torch

import families
import introspect
import ltg
import tasks
from run_folder import RunFolder, RunFolderError, read_json, read_run_checkpoint, run_finished


# Flags left unset take these per-dataset values: the paper's for its datasets; for digits, values
# that fit the whole cycle in a minute or two on 2 CPU cores.
RESNET = dict(lr=1e-3, loss="ce", smoothing=0.0, mixup=False, augment="paper", optimizer="adam", drop_path=0.0)
# Steps and guidance scale are the --diffusion family's (families.family_defaults).
PAPER = RESNET | dict(arch="resnet50", pretrain_epochs=100, epochs=100, batch_size=64, synthetic=20.0,
                      guidance_weight=0.1, gen_batch=8, workers=8, diffusion="CompVis/stable-diffusion-v1-4")
# ImageNet-LT: LiVT's recipe (livt.py): an MAE-pretrained ViT-B/16 (--init-from), balanced BCE, AdamW with layer
# decay, RandAugment, mixup/cutmix; lr 8e-3 is LiVT's 1e-3 x global batch 2048 / 256 (256 per GPU on 8 GPUs).
LIVT = dict(arch="vit_base_patch16_224", batch_size=256, lr=8e-3, loss="bal-bce", smoothing=0.1, mixup=True,
            augment="randaugment", optimizer="adamw", drop_path=0.1)
DEFAULTS = {
    "digits": RESNET | dict(arch="cnn", pretrain_epochs=30, epochs=10, batch_size=16, synthetic=6.0, steps=20,
                            guidance_scale=2.0, guidance_weight=0.07, gen_batch=512, workers=0,
                            imbalance=tasks.DIGITS_IMBALANCE,
                            diffusion=str(tasks.DIGITS_UNET)),
    "flowers": PAPER, "cars": PAPER, "caltech101": PAPER, "imagenet-lt": PAPER | LIVT,
    "pets": PAPER | dict(synthetic=30.0),
}
# What --resume may change: where things are and how fast they run, never what the run computes.
CHANGEABLE_ON_RESUME = ("threads", "workers", "device", "download", "data_root", "vlm_url", "llm_url")
# What a run's pretraining depends on: --init-from takes these from the checkpoint it starts from.
PRETRAINING = ("dataset", "imbalance", "class_order", "arch", "head", "head_samples", "pretrain_epochs", "batch_size",
               "lr", "seed", "input_size", "loss", "smoothing", "mixup", "augment", "optimizer", "weight_decay",
               "layer_decay", "warmup_epochs", "min_lr", "drop_path")



def per_dataset(key):
    return "(default: per dataset; digits %s, paper datasets %s)" % (DEFAULTS["digits"][key], PAPER[key])


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default, unless it is None (per-dataset defaults are in the help text)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    def error(self, message):
        """argparse's exit code 2, as one line: every bad value is named with what is accepted."""
        self.exit(2, f"{self.prog}: error: {message}\n")


def get_parser():
    p = Parser(prog="train_loop.py", formatter_class=HelpFormatter,
               description="The paper's cycle: train a predictor with its Epistemic Head on real data, then fine-tune "
                           "it while generating Longtail-Guided data on a schedule, each round guided by the "
                           "predictor as it is then.")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=tasks.DATASETS, default="digits",
                   help="digits runs offline on a CPU; the others are the paper's (torchvision loaders)")
    g.add_argument("--data-root", default="data", help="where the datasets live")
    g.add_argument("--download", action=argparse.BooleanOptionalAction, default=True,
                   help="fetch a torchvision dataset missing from --data-root; --no-download refuses (offline machines)")
    g.add_argument("--imbalance", type=float, help="digits only: the long tail's ratio, most to least common class "
                                                   "(exponential profile) (default: %s)" % tasks.DIGITS_IMBALANCE)
    g.add_argument("--class-order", metavar="SEED|PERMUTATION",
                   help="digits only: which class is how common, most common first: a seed (a random permutation) "
                        "or a permutation such as 9,8,7,6,5,4,3,2,1,0 (default: 0,1,...,9)")
    g.add_argument("--eval-set", action="append", default=[], metavar="NAME=DIR",
                   help="imagenet-lt only: an evaluation-only ImageFolder (ImageNet-V2: folders 0..999; "
                        "ImageNet-A: WordNet-id folders); repeatable")
    g = p.add_argument_group("predictor")
    g.add_argument("--arch", help="'cnn' (small CNN), a torchvision classifier or a timm ViT, by name "
                                  + per_dataset("arch"))
    g.add_argument("--head", choices=ltg.HEADS, default="epinet", help="the Epistemic Head")
    g.add_argument("--head-samples", type=int, default=16, help="K predictions per input")
    g.add_argument("--init-from", metavar="CHECKPOINT",
                   help="a run's pretrained.pt: start after its pretraining, with its pretraining flags and history "
                        "(e.g. arms of a comparison); or an MAE/LiVT checkpoint: the ViT encoder's initial weights")
    g = p.add_argument_group("training")
    g.add_argument("--pretrain-epochs", type=int,
                   help="epochs on real data only, from scratch " + per_dataset("pretrain_epochs"))
    g.add_argument("--epochs", type=int, help="fine-tuning epochs, real + synthetic " + per_dataset("epochs"))
    g.add_argument("--batch-size", type=int, help=per_dataset("batch_size"))
    g.add_argument("--lr", type=float, help="peak learning rate of each phase " + per_dataset("lr"))
    g.add_argument("--seed", type=int, default=0, help="everything random in the run derives from it")
    add_recipe_flags(p)
    add_generation_flags(p)
    g = p.add_argument_group("run")
    g.add_argument("--out", help="run folder (default: runs/<dataset>-w<w>-x<synthetic>-seed<seed>)")
    g.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR with its saved flags")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: the GPU if there is one; a paper dataset without a GPU stops after its plan "
                        "unless --device cpu")
    g.add_argument("--threads", type=int, default=2, help="CPU threads, fixed so reruns are bit-identical")
    g.add_argument("--workers", type=int, help="DataLoader workers " + per_dataset("workers"))
    return p


def add_recipe_flags(p):
    g = p.add_argument_group("recipe (imagenet-lt: LiVT's, see livt.py)")
    g.add_argument("--input-size", type=int, default=224, help="side of the predictor's square input")
    g.add_argument("--loss", choices=("ce", "bal-bce"), help="the predictor's loss: cross entropy, or LiVT's "
                   "balanced BCE (logits shifted by the log prior odds) " + per_dataset("loss"))
    g.add_argument("--smoothing", type=float, help="label smoothing " + per_dataset("smoothing"))
    g.add_argument("--mixup", action=argparse.BooleanOptionalAction,
                   help="mixup 0.8 / cutmix 1.0 on every batch, LiVT's (needs an even --batch-size) " + per_dataset("mixup"))
    g.add_argument("--augment", choices=("paper", "randaugment"), help="RGB augmentation: the paper's (rotation 15, "
                   "crops, flips) or LiVT's (RandAugment m9, random erasing 0.25) " + per_dataset("augment"))
    g.add_argument("--optimizer", choices=("adam", "adamw"), help="adam: Adam, cosine over each phase; adamw: LiVT's "
                   "AdamW with layer-wise lr decay, warmup then cosine " + per_dataset("optimizer"))
    g.add_argument("--weight-decay", type=float, default=0.05, help="adamw only")
    g.add_argument("--layer-decay", type=float, default=0.75, help="adamw only: lr scale per ViT block from the top")
    g.add_argument("--warmup-epochs", type=int, default=5, help="adamw only: linear warmup at the start of each phase")
    g.add_argument("--min-lr", type=float, default=1e-6, help="adamw only: where the cosine ends")
    g.add_argument("--drop-path", type=float, help="stochastic depth of a ViT " + per_dataset("drop_path"))


def add_generation_flags(p):
    g = p.add_argument_group("generation")
    g.add_argument("--diffusion", help="diffusers folder or hub id " + per_dataset("diffusion"))
    g.add_argument("--synthetic", type=float,
                   help="synthetic budget as a multiple of the real training set; 0 = real-only baseline "
                        "(default: 20, pets 30, digits %s)" % DEFAULTS["digits"]["synthetic"])
    g.add_argument("--gen-epochs", help="fine-tuning epochs that start with a generation round, comma-separated; "
                                        "equal shares of the budget (default: every 5 epochs from 0)")
    by_family = "(default: digits %s; else the --diffusion family's, as README's table lists)"
    g.add_argument("--steps", type=int, help="sampler steps " + by_family % DEFAULTS["digits"]["steps"])
    g.add_argument("--guidance-scale", type=float, help="classifier-free guidance, FLUX's guidance embedding "
                                                        + by_family % DEFAULTS["digits"]["guidance_scale"])
    g.add_argument("--resolution", type=int,
                   help="side of the generated images (default: the --diffusion pipeline's native one, e.g. SD 1.4 "
                        "512, SDXL and FLUX 1024)")
    g.add_argument("--gen-batch", type=int, help="images per generation batch " + per_dataset("gen_batch"))
    g = p.add_argument_group("guidance (Algorithm 1)")
    g.add_argument("--guidance-weight", type=float,
                   help="w of Eqn 11; 0 = unguided synthetic baseline " + per_dataset("guidance_weight"))
    g.add_argument("--signal", choices=ltg.SIGNALS, default="total", help="the longtail signal (Eqn 4)")
    g.add_argument("--rescale", action=argparse.BooleanOptionalAction, default=True,
                   help="w is the guidance term's share of |eps| at every step (ltg.Guidance); --no-rescale: w "
                        "multiplies the raw gradient as in Eqn 11")
    g.add_argument("--guide-every", type=int, default=1,
                   help="guide every k-th DDIM step (ltg.Guidance(every=k)); 2 about halves guidance's cost")
    g.add_argument("--guidance-decoder", metavar="PATH_OR_ID",
                   help="a cheaper decoder for the guidance pass only, the family's diffusers AutoencoderTiny: "
                        "madebyollin/taesd (SD 1.x/2.x), taesdxl, taesd3, taef1 (FLUX)")
    g.add_argument("--unguided-share", type=float, default=0.0,
                   help="the share of each round's images generated without guidance (w = 0), the rest with LTG")
    g.add_argument("--label-filter", choices=("none", "judge", "predictor"), default="none",
                   help="train only on the synthetic images whose label, as seen by the judge (digits: an independent "
                        "classifier of generated digits) or by the round's predictor, is the class asked for")
    g = p.add_argument_group("introspection (introspect.py)")
    g.add_argument("--refined-prompts", metavar="FILE",
                   help="JSON {class name: [prompt, ...]} (introspect.py summarise writes it): generate with these "
                        "prompts instead of the class template; classes absent from the file keep the template")
    g.add_argument("--introspect-after", type=int, metavar="ROUND",
                   help="after generation round ROUND, describe the run's hardest images with a VLM, summarise them "
                        "into refined prompts with an LLM and generate the later rounds with them")
    g.add_argument("--vlm", metavar="PATH_OR_ID", help="--introspect-after: a LLaVA-NeXT model (transformers)")
    g.add_argument("--vlm-url", metavar="URL", help="--introspect-after: an OpenAI-compatible endpoint for describing")
    g.add_argument("--llm", metavar="PATH_OR_ID", help="--introspect-after: a chat causal LM (transformers)")
    g.add_argument("--llm-url", metavar="URL", help="--introspect-after: an OpenAI-compatible endpoint for summarising")


_UNSET = object()


def given_flags(argv):
    """The flags (dests) on the command line, told apart from defaults."""
    probe = get_parser()
    probe.set_defaults(**{a.dest: _UNSET for a in probe._actions})
    return {k for k, v in vars(probe.parse_args(argv)).items() if v is not _UNSET}


def inherit(parser, argv, saved, refused, source):
    """The flags with `saved` values as defaults; a flag in `refused` given with another value is refused."""
    parser.set_defaults(**saved)
    args = parser.parse_args(argv)
    for key in sorted(given_flags(argv) & set(refused) & saved.keys()):
        if getattr(args, key) != saved[key]:
            flag = "--" + key.replace("_", "-")
            parser.error(f"{flag} {getattr(args, key)}: {source} has {flag} {saved[key]}; "
                         f"drop {flag} (a run keeps the flags that decide its results)")
    return args


def parse_args(argv=None):
    """The run's flags (parse_flags) and where it goes (--out)."""
    parser, args = parse_flags(argv)
    check_out(parser, args)
    return args


def parse_flags(argv=None):
    """(parser, flags): a resumed run's saved flags, or an --init-from run's pretraining flags, as defaults;
    per-dataset defaults for what is still unset; every value checked."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.resume:
        saved = saved_flags(parser, RunFolder(args.resume).config, "--resume")
        args = inherit(parser, argv, saved, set(saved) - set(CHANGEABLE_ON_RESUME), f"the run in {args.resume}")
        args.out = args.resume
    elif args.init_from:
        state = run_init_checkpoint(parser, args.init_from)
        if state is not None:
            pretraining = {k: v for k, v in state["config"].items() if k in PRETRAINING}
            args = inherit(parser, argv, pretraining, PRETRAINING, f"--init-from {args.init_from}")
    args.command = getattr(args, "command", None) or shlex.join(["python", "train_loop.py", *argv])
    for key, value in DEFAULTS[args.dataset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    check_args(parser, args)
    return parser, args


def saved_flags(parser, path, flag):
    if not path.is_file():
        parser.error(f"{flag} {path.parent}: no run there ({path} is missing)")
    try:
        return read_json(path)
    except RunFolderError as e:
        parser.error(f"{flag} {path.parent}: {e}; restore it or start a new run")


def run_init_checkpoint(parser, path):
    """--init-from's checkpoint if it is a run's, at the end of its pretraining; None for weights (an MAE/LiVT
    checkpoint: checked against the predictor when the run opens)."""
    if not Path(path).is_file():
        parser.error(f"--init-from {path}: no such file (expected a run's pretrained.pt or an MAE checkpoint)")
    state = read_run_checkpoint(path)
    if state is None:
        return None
    if state["epoch"] != state["config"]["pretrain_epochs"] - 1:
        parser.error(f"--init-from {path}: saved after epoch {state['epoch']}, not at the end of pretraining "
                     f"(epoch {state['config']['pretrain_epochs'] - 1}); use the run's pretrained.pt")
    return state


def check_args(parser, args):
    """Refuse bad values before anything is read or written."""
    if not (math.isfinite(args.guidance_weight) and args.guidance_weight >= 0):
        parser.error(f"--guidance-weight {args.guidance_weight}: must be finite and >= 0 (0 = unguided synthetic)")
    if not (math.isfinite(args.synthetic) and args.synthetic >= 0):
        parser.error(f"--synthetic {args.synthetic}: must be >= 0 (0 = real-only baseline)")
    for flag in ("epochs", "batch_size", "steps", "gen_batch", "head_samples", "threads", "guide_every"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be >= 1")
    for flag in ("pretrain_epochs", "workers"):
        if getattr(args, flag) < 0:
            parser.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be >= 0")
    if not tasks.is_architecture(args.arch):
        parser.error(f"--arch {args.arch}: unknown; use 'cnn', a torchvision classifier such as resnet50 "
                     f"(torchvision.models.list_models(module=torchvision.models)) or a timm ViT such as "
                     f"vit_base_patch16_224")
    if args.dataset == "digits" and (args.arch != "cnn" or args.augment != "paper" or args.mixup):
        parser.error("--arch, --augment and --mixup choose how an RGB predictor trains; the digits predictor is "
                     "--arch cnn on 8x8 greyscale images")
    if args.mixup and args.batch_size % 2:
        parser.error(f"--batch-size {args.batch_size}: mixup pairs each batch with itself reversed; use an even size")
    check_profile_args(parser, args)
    if args.eval_set and args.dataset != "imagenet-lt":
        parser.error(f"--eval-set is for --dataset imagenet-lt (ImageNet-V2, ImageNet-A), not {args.dataset}")
    for spec in args.eval_set:
        if "=" not in spec:
            parser.error(f"--eval-set {spec}: expected NAME=DIR, e.g. imagenet-v2=/data/imagenetv2")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible here; use --device cpu (or auto)")
    args.rounds = generation_epochs(parser, args)
    check_introspection_args(parser, args)
    check_generation_args(parser, args)


def check_profile_args(parser, args):
    """--imbalance and --class-order shape the digits' long tail; the paper datasets come with theirs."""
    if args.dataset != "digits":
        for flag in ("imbalance", "class_order"):
            if getattr(args, flag) is not None:
                parser.error(f"--{flag.replace('_', '-')} shapes the digits' long tail; --dataset {args.dataset} "
                             "keeps its own class counts")
        return
    if not (math.isfinite(args.imbalance) and args.imbalance >= 1):
        parser.error(f"--imbalance {args.imbalance}: must be >= 1 (most common / least common class; 1 = balanced)")
    try:
        tasks.class_order(args.class_order, 10)
    except ValueError as e:
        parser.error(f"--class-order {args.class_order}: {e}")


def take_family_defaults(args, pipe):
    """--steps and --guidance-scale left unset take the loaded pipeline family's (families.family_defaults)."""
    steps, scale = families.family_defaults(pipe)
    args.steps = steps if args.steps is None else args.steps
    args.guidance_scale = scale if args.guidance_scale is None else args.guidance_scale


def check_generation_args(parser, args):
    """--resolution is a text-to-image pipeline's; steps and guidance scale left unset are the family's
    (train_loop takes them from the pipeline it loads, families.family_defaults)."""
    if not 0 <= args.unguided_share <= 1:
        parser.error(f"--unguided-share {args.unguided_share}: must lie in 0..1 (the share of each round left unguided)")
    if args.label_filter == "judge" and args.dataset != "digits":
        parser.error(f"--label-filter judge: --dataset {args.dataset} has no judge of generated images (digits has "
                     "one); use --label-filter predictor")
    if args.label_filter != "none" and args.synthetic == 0:
        parser.error(f"--label-filter {args.label_filter} with --synthetic 0: there are no synthetic images to filter")
    if args.resolution is not None and args.dataset == "digits":
        parser.error("--resolution is for a text-to-image --diffusion (a paper dataset); the digits model makes 8x8")
    if args.resolution is not None and (args.resolution < 16 or args.resolution % 16):
        parser.error(f"--resolution {args.resolution}: must be a positive multiple of 16 (e.g. 512, 1024)")


def check_out(parser, args):
    """--out: a folder (or a place for one) holding no other run; by default the next free runs/... name."""
    if args.out is None:
        args.out = str(default_out(parser, args))
    elif Path(args.out).exists() and not Path(args.out).is_dir():
        parser.error(f"--out {args.out}: is a file; name a folder for the run")
    elif not args.resume and RunFolder(args.out).config.exists():
        parser.error(f"--out {args.out} already holds a run: continue it with --resume {args.out} or pick another --out")


def default_out(parser, args):
    """runs/<dataset>-w<w>-x<budget>-seed<seed>, with a -2, -3, ... suffix when that run is finished; an
    unfinished one is to be continued, not silently duplicated."""
    base = Path("runs") / f"{args.dataset}-w{args.guidance_weight:g}-x{args.synthetic:g}-seed{args.seed}"
    out, n = base, 1
    while RunFolder(out).config.exists():
        try:
            finished = run_finished(out)
        except RunFolderError as e:
            parser.error(f"{out}: {e}; continue it with --resume {out} once repaired, or pass --out")
        if not finished:
            parser.error(f"{out} holds an unfinished run with these flags: continue it with --resume {out}, "
                         "or pass --out to start another")
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out


def saved_config(args):
    """config.json: the flags and the command that started the run, without where it is (--out, --resume) and
    what follows from the flags."""
    return {k: v for k, v in vars(args).items() if k not in ("out", "resume", "rounds")}


def check_introspection_args(parser, args):
    """Refined prompts need a text-conditioned generator, and the automatic mode a describer, a writer and
    a later round to use what they write."""
    if args.guidance_decoder and args.dataset == "digits":
        parser.error("--guidance-decoder is for Stable Diffusion (a paper dataset); the digits model decodes nothing")
    wants = args.refined_prompts or args.introspect_after is not None
    if wants and args.dataset == "digits":
        parser.error("--refined-prompts/--introspect-after need a text-conditioned --diffusion (a paper dataset); "
                     "the digits model is class-conditional")
    if args.refined_prompts and args.introspect_after is not None:
        parser.error("--refined-prompts and --introspect-after are exclusive: pick a prompt file or the automatic mode")
    if args.introspect_after is None:
        return
    last = len(args.rounds) - 2
    if not 0 <= args.introspect_after <= last:
        parser.error(f"--introspect-after {args.introspect_after}: must be a round with a later round to use its "
                     f"prompts, 0..{last} (rounds start at epochs {args.rounds})" if last >= 0 else
                     f"--introspect-after {args.introspect_after}: needs at least two generation rounds "
                     f"(--gen-epochs gives {len(args.rounds)})")
    for kind in ("vlm", "llm"):
        try:
            introspect.check_backend(kind, getattr(args, kind), getattr(args, f"{kind}_url"))
        except introspect.IntrospectError as e:
            parser.error(f"--introspect-after: {e}")


def generation_epochs(parser, args):
    """The fine-tuning epochs that open a generation round, sorted."""
    if args.gen_epochs is None:
        return list(range(0, args.epochs, 5)) if args.synthetic > 0 else []
    try:
        epochs = sorted({int(e) for e in args.gen_epochs.split(",") if e.strip()})
    except ValueError:
        parser.error(f"--gen-epochs {args.gen_epochs!r}: expected comma-separated epoch numbers, e.g. 0,5,10")
    if args.synthetic == 0:
        parser.error(f"--gen-epochs {args.gen_epochs!r} with --synthetic 0: a zero budget has no rounds "
                     "(drop --gen-epochs for the real-only baseline)")
    if not epochs:
        parser.error(f"--gen-epochs {args.gen_epochs!r}: empty schedule; give at least one epoch in 0..{args.epochs - 1}")
    if epochs[0] < 0 or epochs[-1] >= args.epochs:
        parser.error(f"--gen-epochs {args.gen_epochs!r}: epochs must lie in 0..{args.epochs - 1} (--epochs {args.epochs})")
    return epochs
