"""Tools that need torch: prove a Flax port equals its torch original.

* :mod:`.harness` -- the equivalence harness (:func:`check_equivalence`, :func:`assert_equivalent`,
  with :class:`Layout` / :data:`CHANNELS_LAST` and :class:`SGD`), re-exported here;
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
