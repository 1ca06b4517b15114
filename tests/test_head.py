"""The Epistemic Head: K logits per input from one forward pass, and it never changes the predictor."""

import pytest
import torch
import torchvision
from torch import nn

import ltg


def small_cnn(classes=10):
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                         nn.Linear(8 * 16, 32), nn.ReLU(), nn.Linear(32, classes))


PREDICTORS = {
    "small_cnn": small_cnn,
    "resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    "mobilenet_v3_small": lambda: torchvision.models.mobilenet_v3_small(num_classes=10),
}


def images(batch=3, size=32, seed=0):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ltg.HEADS)
@pytest.mark.parametrize("name", PREDICTORS)
def test_head_gives_k_logits_per_input(name, kind):
    torch.manual_seed(0)
    head = ltg.EpistemicHead(PREDICTORS[name](), num_samples=5, kind=kind).eval()
    logits = head(images())
    assert logits.shape == (5, 3, 10)
    assert torch.isfinite(logits).all()
    assert not torch.allclose(logits[0], logits[1]), "members must differ"


@pytest.mark.parametrize("kind", ltg.HEADS)
@pytest.mark.parametrize("name", PREDICTORS)
def test_head_loss_reaches_only_the_head(name, kind):
    torch.manual_seed(0)
    predictor = PREDICTORS[name]().eval()
    x, y = images(), torch.tensor([1, 2, 3])
    before = predictor(x).detach()
    head = ltg.EpistemicHead(predictor, num_samples=4, kind=kind)
    head.predictor.eval()
    optimizer = torch.optim.SGD(head.parameters(), lr=0.5)
    for _ in range(3):
        optimizer.zero_grad()
        head.loss(*head.features_and_logits(x), y).backward()
        assert all(p.grad is None for p in predictor.parameters()), "the head's loss reached the predictor"
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in head.named_parameters()
                   if not n.startswith("predictor."))
        optimizer.step()
    torch.testing.assert_close(predictor(x), before, rtol=0, atol=0)
    torch.testing.assert_close(head.features_and_logits(x)[1], before, rtol=0, atol=0)


def test_epinet_prior_is_fixed_and_learnable_part_trains():
    head = ltg.EpistemicHead(small_cnn(), num_samples=4)
    x, y = images(), torch.tensor([0, 1, 2])
    head.loss(*head.features_and_logits(x), y).backward()
    assert all(p.grad is None and not p.requires_grad for p in head.prior.parameters())
    assert all(p.grad is not None for p in head.learnable.parameters())


def test_eval_indices_are_fixed_train_indices_are_fresh():
    head = ltg.EpistemicHead(small_cnn(), num_samples=4)
    x = images()
    head.eval()
    torch.testing.assert_close(head(x), head(x), rtol=0, atol=0)
    head.train()
    assert not torch.allclose(head(x), head(x))


def test_signal_is_differentiable_in_the_input():
    head = ltg.EpistemicHead(small_cnn(), num_samples=4).eval()
    x = images().requires_grad_()
    grad, = torch.autograd.grad(ltg.longtail_signal(head(x)).sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_head_refuses_bad_configuration():
    with pytest.raises(ValueError, match="unknown head 'bayes'"):
        ltg.EpistemicHead(small_cnn(), kind="bayes")
    with pytest.raises(ValueError, match="num_samples"):
        ltg.EpistemicHead(small_cnn(), num_samples=0)
    with pytest.raises(ValueError, match="no nn.Linear"):
        ltg.EpistemicHead(nn.Sequential(nn.Conv2d(3, 10, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten()))
