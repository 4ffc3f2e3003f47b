"""Constants in a captured forward: a NaN constant is one value, as in torch (``nan != nan`` must
not make two captures of one forward look different)."""

import numpy as np
import torch

import jaxbn


class ComparesWithNaN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = torch.nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(x) + (x == float("nan"))


class Outer(torch.nn.Module):
    """The same child called twice with the same NaN constant."""

    def __init__(self):
        super().__init__()
        self.inner = Scaled()

    def forward(self, x):
        return self.inner(x, float("nan")) + self.inner(x, float("nan"))


class Scaled(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = torch.nn.BatchNorm2d(3)

    def forward(self, x, fill: float):
        return self.bn(x) + (x == fill)


def test_a_nan_constant_translates_and_matches_torch():
    for model in (ComparesWithNaN().double(), Outer().double()):
        x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
        module, variables = jaxbn.from_torch(model, x)
        for train in (False, True):
            expected = model.train(train)(x).detach().numpy()
            got = module.apply(variables, x.numpy(), train=train, mutable=["batch_stats"])[0]
            np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=1e-12)


def test_same_capture_is_equality_with_nan_equal_to_itself():
    from jaxbn.translate.ir import Op, Ref, same_capture

    def op(*args):
        return Op("y", "function", "operator.add", args)

    assert same_capture(op(Ref("x"), float("nan")), op(Ref("x"), float("nan")))
    assert not same_capture(op(Ref("x"), float("nan")), op(Ref("x"), 1.0))
    assert not same_capture(op(Ref("x"), float("nan")), op(Ref("x"), -float("nan")))
    assert not same_capture(op(Ref("x"), 1.0), op(Ref("z"), 1.0))
    assert not same_capture(op(Ref("x")), op(("x",)))  # an IR value is never a plain tuple


class BranchesOnTraining(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = torch.nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(x) + (float("nan") if self.training else 1.0)


def test_a_forward_that_differs_by_mode_is_still_refused():
    import pytest

    with pytest.raises(jaxbn.porting.UnsupportedError, match="different operations in train and eval"):
        jaxbn.from_torch(BranchesOnTraining().double(), torch.randn(2, 3, 4, 4, dtype=torch.float64))
