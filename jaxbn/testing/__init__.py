"""Tools that need torch: prove a Flax port equals its torch original.

* :mod:`.harness` -- the equivalence harness (:func:`check_equivalence`, :func:`assert_equivalent`,
  with :class:`Layout` / :data:`CHANNELS_LAST` and :class:`SGD`), re-exported here;
* :mod:`.audit` -- a hand-written twin's norm layers vs the torch model's, by name
  (settings, per-layer mode, feature axis, ``flax.linen.BatchNorm``'s biased variance);
* :mod:`.modes` -- which mode each torch norm layer runs in (frozen layers included);
* :mod:`.oracle` -- a real ``torch.nn`` norm module driven with jaxbn's flags (the tests' oracle);
* :mod:`.behaviour` -- the behaviour table ``python -m jaxbn`` prints, observed live.
"""

from .harness import (
    CHANNELS_LAST,
    SGD,
    EquivalenceReport,
    Layout,
    StepComparison,
    assert_equivalent,
    check_equivalence,
    to_channels_first,
    to_channels_last,
)

__all__ = [
    "CHANNELS_LAST",
    "SGD",
    "EquivalenceReport",
    "Layout",
    "StepComparison",
    "assert_equivalent",
    "check_equivalence",
    "to_channels_first",
    "to_channels_last",
]
