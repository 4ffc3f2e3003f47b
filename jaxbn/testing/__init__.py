"""Tools that need torch: prove a Flax port equals its torch original.

* :mod:`.harness` -- the equivalence harness (:func:`check_equivalence`, :func:`assert_equivalent`),
  re-exported here;
* :mod:`.oracle` -- a real ``torch.nn`` norm module driven with jaxbn's flags (the tests' oracle);
* :mod:`.behaviour` -- the behaviour table ``python -m jaxbn`` prints, observed live.
"""

from .harness import EquivalenceReport, StepComparison, assert_equivalent, check_equivalence

__all__ = ["EquivalenceReport", "StepComparison", "assert_equivalent", "check_equivalence"]
