"""The LiVT recipe (livt.py): Bal-BCE against its formula, the ViT under the Epistemic Head, MAE checkpoints
loaded or refused in one line, layer-decayed AdamW and its schedule, the augmentation. A tiny ViT throughout."""

import argparse
import math

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st
from PIL import Image
from timm.data.auto_augment import RandAugment
from torch import nn

import livt
import ltg

TINY = dict(input_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)  # a 4x4 patch grid
ARCH, CLASSES = "vit_base_patch16_224", 5


def tiny_vit(seed=0, classes=CLASSES, **changes):
    torch.manual_seed(seed)
    return livt.create_vit(ARCH, classes, **(TINY | changes))


def reference_balanced_bce(logits, target, counts, tau):
    """Bal-BCE written out: sum over classes of BCE(z + tau * log(pi / (1 - pi)), y), averaged over the batch."""
    pi = np.asarray(counts, float) / np.sum(counts)
    total = 0.0
    for row, y_row in zip(np.asarray(logits, float), np.asarray(target, float)):
        for z, y, p in zip(row, y_row, pi):
            s = 1 / (1 + math.exp(-(z + tau * (math.log(p) - math.log(1 - p)))))
            total -= y * math.log(s) + (1 - y) * math.log(1 - s)
    return total / len(logits)


def smoothed(labels, classes, smoothing):
    off = smoothing / classes
    return [[1 - smoothing + off if c == y else off for c in range(classes)] for y in labels]


# ---------------------------------------------------------------------------------------------
# Bal-BCE: properties.
# ---------------------------------------------------------------------------------------------

cases = st.tuples(st.integers(0, 2**31 - 1), st.integers(1, 4), st.integers(2, 6),
                  st.sampled_from([0.0, 0.1, 0.3]), st.sampled_from([0.5, 1.0, 2.0]))


@given(cases)
def test_balanced_bce_is_the_formula_with_labels_and_smoothing(case):
    seed, B, C, smoothing, tau = case
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(B, C, generator=g, dtype=torch.float64)
    labels = torch.randint(C, (B,), generator=g)
    counts = torch.randint(1, 50, (C,), generator=g).tolist()
    loss = livt.balanced_bce(logits, labels, counts, smoothing=smoothing, tau=tau)
    want = reference_balanced_bce(logits, smoothed(labels.tolist(), C, smoothing), counts, tau)
    assert loss.dtype == torch.float64 and loss.ndim == 0
    assert loss.item() == pytest.approx(want, rel=1e-12)


@given(cases)
def test_balanced_bce_uses_soft_targets_as_given(case):
    seed, B, C, _, tau = case
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(B, C, generator=g, dtype=torch.float64)
    target = torch.rand(B, C, generator=g, dtype=torch.float64).softmax(-1)
    counts = torch.randint(1, 50, (C,), generator=g).tolist()
    loss = livt.balanced_bce(logits, target, counts, smoothing=0.3, tau=tau)  # smoothing: labels only
    assert loss.item() == pytest.approx(reference_balanced_bce(logits, target, counts, tau), rel=1e-12)


def test_balanced_bce_gradient_matches_finite_differences():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    soft = torch.rand(3, 4, generator=g, dtype=torch.float64).softmax(-1)
    counts = [40, 10, 5, 1]
    assert torch.autograd.gradcheck(lambda x: livt.balanced_bce(x, torch.tensor([0, 3, 1]), counts, 0.1), (logits,))
    assert torch.autograd.gradcheck(lambda x: livt.balanced_bce(x, soft, counts), (logits,))


@pytest.mark.parametrize("C", [2, 5, 1000])
def test_uniform_counts_shift_every_logit_by_log_one_over_c_minus_1(C):
    assert torch.allclose(livt.prior_log_odds([7] * C), torch.full((C,), math.log(1 / (C - 1)), dtype=torch.float64))
    logits = torch.randn(4, C, dtype=torch.float64, generator=torch.Generator().manual_seed(C))
    labels = torch.arange(4) % C
    one_hot = torch.nn.functional.one_hot(labels, C).double()
    want = C * torch.nn.functional.binary_cross_entropy_with_logits(logits + math.log(1 / (C - 1)), one_hot)
    assert torch.allclose(livt.balanced_bce(logits, labels, [7] * C), want, rtol=1e-12)


def test_prior_bias_raises_frequent_classes_logits():
    counts = [500, 100, 20, 4]
    bias = livt.prior_log_odds(counts)
    assert (bias.diff() < 0).all()                    # more images, larger shift
    assert bias[0] > 0 > bias[-1]                      # pi = 0.8 > 1/2: up; pi < 1/2: down
    # the shift makes the frequent class look already likely, so its own label costs less than a rare one's
    zero = torch.zeros(1, 4, dtype=torch.float64)
    assert livt.balanced_bce(zero, torch.tensor([0]), counts) < livt.balanced_bce(zero, torch.tensor([3]), counts)


def test_balanced_bce_refuses_bad_counts_and_targets_in_one_line():
    logits = torch.zeros(2, 3)
    for counts in ([1, 0, 2], [5]):
        with pytest.raises(ValueError, match="class_counts") as e:
            livt.balanced_bce(logits, torch.tensor([0, 1]), counts)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="soft targets"):
        livt.balanced_bce(logits, torch.zeros(2, 4), [1, 2, 3])


def test_balanced_bce_keeps_the_bias_exact_under_bf16_logits():
    logits = torch.zeros(2, 3, dtype=torch.bfloat16)
    loss = livt.balanced_bce(logits, torch.tensor([0, 2]), [1000, 10, 1])
    want = livt.balanced_bce(logits.float(), torch.tensor([0, 2]), [1000, 10, 1])
    assert loss.dtype == torch.float32 and loss.item() == want.item()


# ---------------------------------------------------------------------------------------------
# The model under the Epistemic Head.
# ---------------------------------------------------------------------------------------------

def test_vit_gives_class_logits_and_its_head_is_the_last_linear():
    model = tiny_vit()
    assert model(torch.randn(3, 3, 32, 32)).shape == (3, CLASSES)
    assert ltg.last_linear(model) is model.head
    assert model.global_pool == "avg"
    assert isinstance(model.fc_norm, nn.LayerNorm) and isinstance(model.norm, nn.Identity)


def test_epistemic_head_sits_on_the_pooled_pre_logits_features():
    model = tiny_vit().eval()
    head = ltg.EpistemicHead(model, num_samples=4).eval()
    x = torch.randn(3, 3, 32, 32)
    h, mu = head.features_and_logits(x)
    assert h.shape == (3, TINY["embed_dim"]) and mu.shape == (3, CLASSES)
    assert torch.allclose(h, model.forward_head(model.forward_features(x), pre_logits=True))
    assert head(x).shape == (4, 3, CLASSES)


def test_arch_names():
    assert livt.is_timm_arch(ARCH) and livt.is_timm_arch("vit_base_patch16_224.mae")
    assert not livt.is_timm_arch("no_such_vit")
    with pytest.raises(ValueError, match="not a VisionTransformer"):
        livt.create_vit("resnet18", CLASSES)
    with pytest.raises(ValueError, match="no model 'no_such_vit'"):
        livt.create_vit("no_such_vit", CLASSES)


# ---------------------------------------------------------------------------------------------
# MAE checkpoints.
# ---------------------------------------------------------------------------------------------

class Foreign:
    """A class no checkpoint may make us unpickle."""


def encoder_state(seed=1, **changes):
    """The encoder tensors of a tiny MAE ViT: the model's keys without fc_norm/head, plus MAE's final norm."""
    state = {k: v for k, v in tiny_vit(seed, **changes).state_dict().items() if not k.startswith(("fc_norm", "head"))}
    dim = state["cls_token"].shape[-1]
    return state | {"norm.weight": torch.rand(dim), "norm.bias": torch.rand(dim)}


def mae_checkpoint(path, state):
    """The official MAE layout: encoder + decoder keys under "model", and argparse args, epoch, optimizer."""
    dim = state["cls_token"].shape[-1]
    decoder = {"mask_token": torch.randn(1, 1, 16), "decoder_embed.weight": torch.randn(16, dim),
               "decoder_pos_embed": torch.randn(1, 17, 16), "decoder_blocks.0.norm1.weight": torch.ones(16),
               "decoder_norm.weight": torch.ones(16), "decoder_pred.weight": torch.randn(8 * 8 * 3, 16)}
    torch.save({"model": state | decoder, "epoch": 799, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]},
                "args": argparse.Namespace(model="mae_vit_base_patch16", mask_ratio=0.75, input_size=32,
                                           norm_pix_loss=True, betas=(0.9, 0.95), resume="")}, path)
    return path


def test_mae_checkpoint_loads_the_encoder_and_leaves_fc_norm_and_head_fresh(tmp_path):
    state = encoder_state()
    model = tiny_vit(seed=0)
    summary = livt.load_encoder(model, mae_checkpoint(tmp_path / "mae.pth", state))
    for key in ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.1.attn.qkv.weight",
                "blocks.1.mlp.fc2.bias"):
        assert torch.equal(model.state_dict()[key], state[key]), key
    assert len(summary.loaded) == len(state) - 2 and summary.resampled is None
    assert {"mask_token", "norm.weight", "decoder_embed.weight", "decoder_pred.weight"} <= set(summary.ignored)
    assert sorted(summary.fresh) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert torch.equal(model.fc_norm.weight, torch.ones(32)) and torch.equal(model.fc_norm.bias, torch.zeros(32))
    assert torch.equal(model.head.bias, torch.zeros(CLASSES)) and 0 < model.head.weight.std() < 1e-4
    assert "\n" not in str(summary) and "decoder_blocks" in str(summary)


def test_bare_state_dict_loads_too(tmp_path):
    state = encoder_state()
    torch.save(state, tmp_path / "bare.pth")
    model = tiny_vit(seed=0)
    livt.load_encoder(model, tmp_path / "bare.pth")
    assert torch.equal(model.blocks[0].attn.proj.weight, state["blocks.0.attn.proj.weight"])


def test_checkpoint_of_another_width_names_the_first_misfit_in_one_line(tmp_path):
    path = mae_checkpoint(tmp_path / "wide.pth", encoder_state(embed_dim=48))
    with pytest.raises(livt.CheckpointMismatch) as e:
        livt.load_encoder(tiny_vit(), path)
    message = str(e.value)
    assert "\n" not in message and str(path) in message
    assert "cls_token is [1, 1, 48] in the checkpoint but [1, 1, 32] in the model" in message
    assert f"--arch {ARCH} (embed_dim 32, depth 2, patch 8)" in message


def test_checkpoint_missing_a_block_is_refused(tmp_path):
    path = mae_checkpoint(tmp_path / "shallow.pth", encoder_state(depth=1))
    with pytest.raises(livt.CheckpointMismatch, match=r"blocks\.1\.norm1\.weight is missing \(model: \[32\]\)"):
        livt.load_encoder(tiny_vit(), path)


def test_unreadable_files_are_one_line(tmp_path):
    whole = mae_checkpoint(tmp_path / "whole.pth", encoder_state()).read_bytes()
    (tmp_path / "cut.pth").write_bytes(whole[:len(whole) // 2])
    torch.save({"model": encoder_state(), "extra": Foreign()}, tmp_path / "foreign.pth")
    for name in ("cut.pth", "foreign.pth", "absent.pth"):
        with pytest.raises(livt.CheckpointMismatch, match="cannot read it") as e:
            livt.load_encoder(tiny_vit(), tmp_path / name)
        assert "\n" not in str(e.value) and name in str(e.value)


def test_pos_embed_is_resampled_when_only_the_grid_differs(tmp_path):
    state = encoder_state()                                    # 32 px, 4x4 patches
    model = tiny_vit(input_size=48)                            # 48 px, 6x6 patches
    summary = livt.load_encoder(model, mae_checkpoint(tmp_path / "mae.pth", state))
    assert summary.resampled == ((4, 4), (6, 6)) and model.pos_embed.shape == (1, 37, 32)
    assert torch.equal(model.pos_embed[:, :1], state["pos_embed"][:, :1])   # the cls position is kept as is
    assert torch.equal(model.blocks[1].mlp.fc1.weight, state["blocks.1.mlp.fc1.weight"])


def test_load_head_takes_a_fine_tuned_head(tmp_path):
    fine_tuned = tiny_vit(seed=3)
    torch.save({"model": fine_tuned.state_dict()}, tmp_path / "livt.pth")
    model = tiny_vit(seed=0)
    livt.load_encoder(model, tmp_path / "livt.pth", load_head=True)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fine_tuned.state_dict().values()))
    with pytest.raises(livt.CheckpointMismatch, match=r"head\.weight is \[5, 32\] in the checkpoint but \[7, 32\]"):
        livt.load_encoder(tiny_vit(classes=7), tmp_path / "livt.pth", load_head=True)
    livt.load_encoder(tiny_vit(classes=7), tmp_path / "livt.pth")             # without it, another head is ignored


# ---------------------------------------------------------------------------------------------
# Optimiser and schedule.
# ---------------------------------------------------------------------------------------------

class Wrapper(nn.Module):
    """What the integrating code optimises: Learner(EpistemicHead(vit)), a ViT inside a module with more parameters."""

    def __init__(self, vit):
        super().__init__()
        self.head = ltg.EpistemicHead(vit, num_samples=4)


def lr_of(opt, param):
    (group,) = [g for g in opt.param_groups if any(p is param for p in g["params"])]
    return group["lr"]


def test_layer_decay_scales_each_depth():
    model, lr, ld, depth = tiny_vit(), 1e-3, 0.75, TINY["depth"]
    opt = livt.optimizer(model, lr, layer_decay=ld)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.9, 0.999)
    assert lr_of(opt, model.head.weight) == pytest.approx(lr) == lr_of(opt, model.fc_norm.weight)
    assert lr_of(opt, model.blocks[depth - 1].attn.qkv.weight) == pytest.approx(lr * ld)
    assert lr_of(opt, model.blocks[0].attn.qkv.weight) == pytest.approx(lr * ld ** depth)
    for stem in (model.patch_embed.proj.weight, model.cls_token, model.pos_embed):
        assert lr_of(opt, stem) == pytest.approx(lr * ld ** (depth + 1))
    decay = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(model.head.weight) in decay and id(model.head.bias) not in decay and id(model.pos_embed) not in decay


def test_wrapper_parameters_are_each_optimised_once():
    vit = tiny_vit()
    wrapper = Wrapper(vit)
    opt = livt.optimizer(wrapper, 1e-3)
    seen = [id(p) for g in opt.param_groups for p in g["params"]]
    trainable = [p for p in wrapper.parameters() if p.requires_grad]
    assert len(seen) == len(set(seen)) == len(trainable) and set(seen) == {id(p) for p in trainable}
    assert not any(id(p) in set(seen) for p in wrapper.head.prior.parameters())      # the fixed prior stays fixed
    for p in wrapper.head.learnable.parameters():                                     # the head's MLP at the base lr
        assert lr_of(opt, p) == pytest.approx(1e-3)


def lrs_over(epochs, opt, sched):
    out = []
    for _ in range(epochs):
        out.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    return np.array(out)


def test_warmup_cosine_rises_to_each_groups_peak_then_falls_to_min_lr():
    lr, warmup, epochs, min_lr = 8e-3, 5, 20, 1e-6
    opt = livt.optimizer(tiny_vit(), lr)
    scales = np.array([g["lr_scale"] for g in opt.param_groups])
    lrs = lrs_over(epochs, opt, livt.warmup_cosine(opt, epochs, warmup, min_lr))
    factor = lrs / (lr * scales)
    assert np.allclose(factor, factor[:, :1])                              # every epoch keeps the layer-decay ratios
    assert np.allclose(lrs[0], lr * scales / warmup)                       # epoch 0 at peak / warmup
    assert np.allclose(lrs[warmup - 1], lr * scales)                       # the end of warmup reaches the peak
    assert np.allclose(lrs[-1], min_lr * scales)                           # the last epoch at min_lr (scaled)
    peak = lrs[:, -1]
    assert (np.diff(peak[:warmup]) > 0).all() and (np.diff(peak[warmup - 1:]) < 0).all()


def test_schedule_resumes_from_its_state_dict():
    torch.manual_seed(0)
    opt = livt.optimizer(tiny_vit(), 1e-3)
    sched = livt.warmup_cosine(opt, epochs=12, warmup_epochs=3)
    straight = lrs_over(12, opt, sched)

    opt = livt.optimizer(tiny_vit(), 1e-3)
    sched = livt.warmup_cosine(opt, epochs=12, warmup_epochs=3)
    first = lrs_over(5, opt, sched)
    saved = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}
    opt = livt.optimizer(tiny_vit(), 1e-3)                               # a fresh process: build, then load
    sched = livt.warmup_cosine(opt, epochs=12, warmup_epochs=3)
    opt.load_state_dict(saved["optimizer"])
    sched.load_state_dict(saved["scheduler"])
    assert np.array_equal(np.concatenate([first, lrs_over(7, opt, sched)]), straight)


# ---------------------------------------------------------------------------------------------
# Data, and one step of the whole recipe.
# ---------------------------------------------------------------------------------------------

def test_transforms_give_normalised_square_tensors():
    train, test = livt.transforms(input_size=32)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (45, 60, 3), dtype=np.uint8), "RGB")
    for tf in (train, test):
        x = tf(image)
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert torch.equal(test(image), test(image)) and test(image).min() < 0 < test(image).max()


def test_mixup_gives_soft_targets_summing_to_one():
    mix = livt.mixup(CLASSES, smoothing=0.1)
    x, target = mix(torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 3, 4, 0]))
    assert x.shape == (6, 3, 32, 32) and target.shape == (6, CLASSES)
    assert torch.allclose(target.sum(1), torch.ones(6)) and (target >= 0.1 / CLASSES - 1e-6).all()


def test_one_recipe_step_trains_predictor_and_head():
    torch.manual_seed(0)
    wrapper = Wrapper(tiny_vit())
    opt = livt.optimizer(wrapper, livt.scaled_lr(4))
    sched = livt.warmup_cosine(opt, epochs=3, warmup_epochs=1)
    x, target = livt.mixup(CLASSES)(torch.randn(4, 3, 32, 32), torch.tensor([0, 0, 1, 4]))
    h, mu = wrapper.head.features_and_logits(x)
    loss = livt.balanced_bce(mu, target, [50, 20, 10, 5, 2]) + wrapper.head.loss(h, mu, target.argmax(1))
    before = [p.detach().clone() for p in (wrapper.head.predictor.patch_embed.proj.weight,
                                           wrapper.head.learnable.mlp[0].weight)]
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    assert torch.isfinite(loss)
    assert all(not torch.equal(b, p) for b, p in zip(before, (wrapper.head.predictor.patch_embed.proj.weight,
                                                                wrapper.head.learnable.mlp[0].weight)))


def test_randaugment_posterizes_at_the_top_magnitude_without_failing():
    """m9 with magnitude noise reaches 10, where timm's increasing posterize asks Pillow for 0 bits."""
    train, _ = livt.transforms(16)
    augment = next(t for t in train.transforms if isinstance(t, RandAugment))
    posterize = next(op for op in augment.ops if op.name == "PosterizeIncreasing")
    assert posterize.level_fn(10.0, posterize.hparams) == (1,) and posterize.level_fn(5.0, posterize.hparams) == (2,)
    posterize.prob, posterize.magnitude, posterize.magnitude_std = 1.0, 10.0, 0.0
    image = Image.fromarray(np.full((16, 16, 3), 200, np.uint8))
    assert np.asarray(posterize(image)).max() == 128
