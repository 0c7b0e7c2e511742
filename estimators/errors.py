"""Exceptions raised by estimators when the data cannot support an estimate.

The pipeline records the message per comparison/outcome, so messages say what was wrong in words
a reader of the result store understands (e.g. "no events among the treated").
"""


class EstimationError(ValueError):
    """The data cannot support the requested estimate (empty arm, no events, separation...)."""
