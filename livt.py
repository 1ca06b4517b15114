"""The LiVT recipe (Xu et al., "Learning Imbalanced Data with Vision Transformers", CVPR 2023) that the
paper trains its ImageNet-LT predictor with: a ViT from MAE pretraining, fine-tuned for 100 epochs with
a balanced binary cross entropy (Bal-BCE). LiVT's released settings for ViT-B/16 at 224 px:

    model      ViT-B/16, global average pooling of the patch tokens (MAE's fc_norm), drop_path 0.1;
               the encoder from an MAE checkpoint, fc_norm and head fresh (head ~ trunc_normal std 2e-5)
    optimiser  AdamW, betas (0.9, 0.999), weight decay 0.05, lr = 1e-3 * batch / 256 (2048 -> 8e-3),
               layer-wise lr decay 0.75, 5 warmup epochs, cosine to 1e-6, 100 epochs
    data       RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25 ("pixel"), bicubic;
               mixup 0.8 / cutmix 1.0 (prob 1, switch 0.5, per batch), label smoothing 0.1
    loss       Bal-BCE:  C * mean BCE-with-logits(x + tau * log(pi / (1 - pi)), y),  pi = class prior, tau = 1;
               at test time the raw logits x are the prediction

timm builds the model, the augmentation, mixup and the layer-decayed parameter groups; this file holds
the loss, checkpoint loading and the schedule, and the glue between them.
"""

import argparse
import math
from dataclasses import dataclass, field

import timm
import torch
import torch.nn.functional as F
from timm.data import Mixup, create_transform
from timm.data.auto_augment import RandAugment
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from timm.optim import create_optimizer_v2, param_groups_layer_decay
from torch import nn

import ltg

# LiVT's fine-tuning settings (vit_base_224).
DROP_PATH, WEIGHT_DECAY, LAYER_DECAY, BETAS = 0.1, 0.05, 0.75, (0.9, 0.999)
BASE_LR, BASE_BATCH = 1e-3, 256              # lr = BASE_LR * effective batch / BASE_BATCH
EPOCHS, WARMUP_EPOCHS, MIN_LR = 100, 5, 1e-6
RAND_AUGMENT, RE_PROB, RE_MODE, SMOOTHING = "rand-m9-mstd0.5-inc1", 0.25, "pixel", 0.1
MIXUP_ALPHA, CUTMIX_ALPHA, MIX_PROB, SWITCH_PROB = 0.8, 1.0, 1.0, 0.5
EVAL_CROP_PCT = 224 / 256                    # resize to 256, center crop 224
FRESH = ("fc_norm.", "head.")                # started fresh by fine-tuning, never taken from an MAE checkpoint


class CheckpointMismatch(ValueError):
    """A checkpoint that cannot be read or does not fit the model: one line naming the path and the first misfit."""


# ---------------------------------------------------------------------------------------------
# The model: a timm VisionTransformer with global average pooling, its classifier the last nn.Linear.
# ---------------------------------------------------------------------------------------------

def is_timm_arch(name):
    """Whether timm can build `name` (with or without a pretrained tag such as '.mae').
    Many torchvision names (resnet50, ...) are timm models too: ask torchvision first where both apply."""
    return timm.is_model(name)


def create_vit(arch, num_classes, input_size=224, drop_path=DROP_PATH, **overrides):
    """A timm VisionTransformer `arch` from scratch with MAE-style global pooling: the mean of the patch tokens
    through fc_norm, then the head [B, num_classes]. `overrides` go to timm.create_model (e.g. embed_dim, depth)."""
    if not is_timm_arch(arch):
        raise ValueError(f"livt: timm has no model {arch!r} (timm.list_models('vit_*') lists the ViTs)")
    overrides.setdefault("img_size", input_size)
    try:
        model = timm.create_model(arch, pretrained=False, num_classes=num_classes, global_pool="avg",
                                  drop_path_rate=drop_path, **overrides)
    except TypeError as e:  # a model class without img_size, global_pool="avg", ...: not a ViT
        raise ValueError(f"livt: --arch {arch} is not a VisionTransformer timm can build ({e})") from None
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"livt: --arch {arch} is a timm {type(model).__name__}, not a VisionTransformer")
    if ltg.last_linear(model) is not model.head:  # the Epistemic Head reads h from the last nn.Linear's input
        raise ValueError(f"livt: the last nn.Linear of {arch} is not its classifier head")
    return model


def find_vit(model):
    """The VisionTransformer in `model` (itself, or inside a wrapper such as Learner(EpistemicHead(vit)))."""
    vit = next((m for m in model.modules() if isinstance(m, VisionTransformer)), None)
    if vit is None:
        raise ValueError(f"livt: {type(model).__name__} holds no timm VisionTransformer")
    return vit


def init_fresh(vit):
    """fc_norm and head as MAE's fine-tuning starts them: LayerNorm (1, 0), head ~ trunc_normal(std 2e-5), bias 0."""
    with torch.no_grad():
        nn.init.ones_(vit.fc_norm.weight)
        nn.init.zeros_(vit.fc_norm.bias)
        nn.init.trunc_normal_(vit.head.weight, std=2e-5)
        nn.init.zeros_(vit.head.bias)


# ---------------------------------------------------------------------------------------------
# MAE / LiVT checkpoints: {"model": state_dict, "args": Namespace, ...} or a bare state_dict.
# ---------------------------------------------------------------------------------------------

@dataclass
class Loaded:
    """What load_encoder did: model keys loaded, checkpoint keys ignored, model keys left fresh, pos_embed resampled."""
    path: str
    loaded: list = field(default_factory=list)
    ignored: list = field(default_factory=list)
    fresh: list = field(default_factory=list)
    resampled: tuple | None = None          # (old grid, new grid) when pos_embed was interpolated

    def __str__(self):
        ignored = sorted({k.split(".")[0] for k in self.ignored})
        fresh = sorted({k.split(".")[0] for k in self.fresh})
        resampled = f"; pos_embed resampled {self.resampled[0]} -> {self.resampled[1]}" if self.resampled else ""
        return (f"{self.path}: loaded {len(self.loaded)} encoder tensors, ignored {len(self.ignored)} "
                f"({', '.join(ignored) or 'none'}), fresh {', '.join(fresh) or 'none'}{resampled}")


def read_checkpoint(path):
    """The state_dict in a torch file, read with weights_only=True (argparse.Namespace is the one class allowed)."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, foreign pickled classes, missing
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointMismatch(f"{path}: cannot read it as a torch checkpoint ({reason})") from None
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointMismatch(f"{path}: holds no state_dict (neither {{'model': state_dict}} nor a bare one)")
    return obj


def describe(vit):
    """The checkpoint a model wants, for error messages."""
    arch = getattr(vit, "pretrained_cfg", {}).get("architecture", type(vit).__name__)
    return (f"an MAE encoder checkpoint for --arch {arch} (embed_dim {vit.embed_dim}, depth {len(vit.blocks)}, "
            f"patch {vit.patch_embed.patch_size[0]})")


def fit_pos_embed(pos_embed, vit):
    """The checkpoint's pos_embed on the model's patch grid (timm's bicubic resample) when only the grid differs,
    as MAE's fine-tuning does; (tensor, (old grid, new grid) or None). Anything else is returned unchanged."""
    want = vit.pos_embed.shape
    prefix, grid = vit.num_prefix_tokens, list(vit.patch_embed.grid_size)
    old = pos_embed.shape[1] - prefix
    side = math.isqrt(max(old, 0))
    if (pos_embed.shape == want or pos_embed.ndim != 3 or pos_embed.shape[2] != want[2]
            or old <= 0 or side * side != old):
        return pos_embed, None
    resampled = resample_abs_pos_embed(pos_embed, grid, old_size=[side, side], num_prefix_tokens=prefix)
    return resampled, ((side, side), tuple(grid))


def load_encoder(model, path, load_head=False):
    """Load an MAE (or LiVT) checkpoint's encoder into the ViT in `model`; returns a Loaded summary.

    Every encoder tensor of the model (all but fc_norm.*, head.*) must be in the checkpoint with the same name
    and shape; pos_embed is resampled (bicubic) when only the patch grid differs. Checkpoint keys the model does
    not have (decoder_*, mask_token, norm.* under global pooling) are ignored, and so are fc_norm.* and head.*:
    fc_norm and head start fresh as MAE's fine-tuning starts them. load_head=True loads them too (a LiVT
    fine-tuned checkpoint of the same classes), and then they must fit as well.
    Raises CheckpointMismatch (one line) for a file torch cannot read or a checkpoint that does not fit.
    """
    vit = find_vit(model)
    state = read_checkpoint(path)
    wanted = vit.state_dict()
    summary = Loaded(str(path))
    if "pos_embed" in state and "pos_embed" in wanted:
        state["pos_embed"], summary.resampled = fit_pos_embed(state["pos_embed"], vit)
    take = {}
    for key, tensor in wanted.items():
        if key.startswith(FRESH) and not load_head:
            summary.fresh.append(key)
            continue
        if key not in state:
            raise CheckpointMismatch(f"{path}: {key} is missing (model: {list(tensor.shape)}); "
                                     f"expected {describe(vit)}")
        if state[key].shape != tensor.shape:
            raise CheckpointMismatch(f"{path}: {key} is {list(state[key].shape)} in the checkpoint but "
                                     f"{list(tensor.shape)} in the model; expected {describe(vit)}")
        take[key] = state[key]
    summary.loaded = list(take)
    summary.ignored = [k for k in state if k not in take]
    vit.load_state_dict(take, strict=False)
    if not load_head:
        init_fresh(vit)
    return summary


# ---------------------------------------------------------------------------------------------
# Bal-BCE: BCE on logits shifted by the log prior odds.
# ---------------------------------------------------------------------------------------------

def prior_log_odds(class_counts):
    """log(pi) - log(1 - pi) per class [C] in float64, pi = counts / total: the Bal-BCE logit bias at tau = 1."""
    counts = torch.as_tensor(class_counts, dtype=torch.float64)
    if counts.ndim != 1 or len(counts) < 2 or not bool((counts > 0).all()):
        raise ValueError("livt: class_counts must list at least 2 classes, each with at least one training image")
    prior = counts / counts.sum()
    return prior.log() - torch.log1p(-prior)


def smoothed_one_hot(labels, num_classes, smoothing, dtype=torch.float32):
    """timm's label smoothing: off = smoothing / C, on = 1 - smoothing + off; [B, C]."""
    off = smoothing / num_classes
    target = torch.full((len(labels), num_classes), off, dtype=dtype, device=labels.device)
    return target.scatter_(1, labels[:, None], 1 - smoothing + off)


def balanced_bce(logits, target, class_counts, smoothing=0.0, tau=1.0):
    """LiVT's Bal-BCE: C * mean BCE-with-logits(logits + tau * log(pi / (1 - pi)), target), a scalar.

    target: int labels [B] (one-hot with label smoothing `smoothing`) or soft targets [B, C] (mixup's, used as
    given). The shift is computed in at least float32 (a bf16 logit would round the bias)."""
    num_classes, dtype = logits.shape[-1], torch.promote_types(logits.dtype, torch.float32)
    if target.ndim == 1 and not target.is_floating_point():
        target = smoothed_one_hot(target, num_classes, smoothing, dtype)
    elif target.shape != logits.shape:
        raise ValueError(f"livt: target must be labels [B] or soft targets {list(logits.shape)}, "
                         f"got {list(target.shape)}")
    bias = tau * prior_log_odds(class_counts).to(logits.device, dtype)
    x = logits.to(dtype) + bias
    return num_classes * F.binary_cross_entropy_with_logits(x, target.to(x.device, dtype))


# ---------------------------------------------------------------------------------------------
# Data: timm's ImageNet transforms with LiVT's augmentation, and mixup/cutmix.
# ---------------------------------------------------------------------------------------------

def transforms(input_size=224):
    """(train, test) transforms, PIL RGB image -> normalised float tensor [3, S, S]. Train: random resized crop,
    flip, RandAugment m9, random erasing 0.25 (per-pixel noise), bicubic. Test: resize to S / 0.875, center crop S."""
    common = dict(input_size=input_size, interpolation="bicubic", mean=ltg.IMAGENET_MEAN, std=ltg.IMAGENET_STD)
    train = create_transform(is_training=True, auto_augment=RAND_AUGMENT, color_jitter=None, re_prob=RE_PROB,
                             re_mode=RE_MODE, re_count=1, **common)
    for augment in (t for t in train.transforms if isinstance(t, RandAugment)):
        keep_a_bit_when_posterizing(augment)
    test = create_transform(is_training=False, crop_pct=EVAL_CROP_PCT, **common)
    return train, test


def keep_a_bit_when_posterizing(augment):
    """timm's increasing posterize keeps 4 - int(4 m / 10) bits, 0 at magnitude 10 (which m9 with noise reaches),
    and Pillow >= 11 refuses 0 bits (older Pillow made the image black). Keep at least 1 bit instead."""
    for op in augment.ops:
        if op.name == "PosterizeIncreasing":
            level_fn = op.level_fn
            op.level_fn = lambda level, hparams, level_fn=level_fn: (max(1, level_fn(level, hparams)[0]),)


def mixup(num_classes, smoothing=SMOOTHING):
    """timm's Mixup with LiVT's settings: (x [B, 3, H, W], labels [B]) -> (mixed x, soft targets [B, C]).
    One lambda per batch (mode "batch"), so B must be even."""
    return Mixup(mixup_alpha=MIXUP_ALPHA, cutmix_alpha=CUTMIX_ALPHA, prob=MIX_PROB, switch_prob=SWITCH_PROB,
                 mode="batch", label_smoothing=smoothing, num_classes=num_classes)


# ---------------------------------------------------------------------------------------------
# Optimisation: AdamW with layer-wise lr decay, warmup then cosine.
# ---------------------------------------------------------------------------------------------

def scaled_lr(batch_size, base_lr=BASE_LR):
    """LiVT's (and MAE's) linear scaling rule: base_lr * effective batch / 256."""
    return base_lr * batch_size / BASE_BATCH


def param_groups(model, weight_decay=WEIGHT_DECAY, layer_decay=LAYER_DECAY):
    """Parameter groups of `model`, each with its lr_scale: the ViT's from timm's param_groups_layer_decay (the
    patch embedding, cls token and pos_embed at layer_decay^(depth + 1), block i at layer_decay^(depth - i),
    fc_norm and head at 1; no weight decay on 1-D tensors and pos_embed/cls_token), and every other trainable
    parameter of a wrapper (an Epistemic Head's MLP) at lr_scale 1 in two more groups, the same weight-decay rule."""
    vit = find_vit(model)
    groups = param_groups_layer_decay(vit, weight_decay, no_weight_decay_list=vit.no_weight_decay(),
                                      layer_decay=layer_decay)
    in_vit = {id(p) for p in vit.parameters()}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in in_vit]
    for decay, params in ((weight_decay, [p for p in others if p.ndim > 1]), (0.0, [p for p in others if p.ndim <= 1])):
        if params:
            groups.append(dict(params=params, lr_scale=1.0, weight_decay=decay))
    return groups


def optimizer(model, lr, weight_decay=WEIGHT_DECAY, layer_decay=LAYER_DECAY, betas=BETAS):
    """AdamW (timm's create_optimizer_v2) over `model` (a ViT or a wrapper holding one) with layer-wise lr decay:
    each group's lr is lr * its lr_scale from the start (torch schedulers then scale every group alike)."""
    groups = param_groups(model, weight_decay, layer_decay)
    for group in groups:
        group["lr"] = lr * group["lr_scale"]
    return create_optimizer_v2(groups, opt="adamw", lr=lr, weight_decay=weight_decay, betas=betas)


def warmup_cosine_factor(epoch, epochs, warmup_epochs, floor):
    """MAE's lr schedule as a factor of the peak, read at the end of epoch `epoch` (0-based, t = epoch + 1):
    t / warmup while t < warmup, then floor + (1 - floor) * (1 + cos(pi * (t - warmup) / (epochs - warmup))) / 2."""
    t = epoch + 1
    if t < warmup_epochs:
        return t / warmup_epochs
    progress = min(1.0, (t - warmup_epochs) / max(1, epochs - warmup_epochs))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_cosine(optimizer, epochs=EPOCHS, warmup_epochs=WARMUP_EPOCHS, min_lr=MIN_LR):
    """An epoch-stepped LambdaLR (call .step() after each epoch): epoch 0 runs at peak / warmup_epochs, the last
    warmup epoch at the peak, the last epoch at min_lr; each group's peak is its own lr (layer decay kept) and its
    floor min_lr * its lr_scale, as MAE's per-iteration schedule does. LiVT steps per iteration; stepping per epoch
    is our choice (the schedule is MAE's, sampled at each epoch's end). Resume with state_dict/load_state_dict."""
    def factor(group):
        peak = group.get("initial_lr", group["lr"])
        floor = min_lr * group.get("lr_scale", 1.0) / peak if peak > 0 else 0.0
        return lambda epoch: warmup_cosine_factor(epoch, epochs, warmup_epochs, floor)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, [factor(g) for g in optimizer.param_groups])
