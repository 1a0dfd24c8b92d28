"""Settings for the whole test suite."""

from __future__ import annotations

import os

from hypothesis import settings

# The property tests draw a fixed sequence of examples by default, so that a CI run cannot fail
# on an example that no earlier run saw; HYPOTHESIS_PROFILE=explore draws new ones each run.
settings.register_profile("fixed", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fixed"))
