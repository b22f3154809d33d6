"""Alias: `fastfilm.precision` is `fastfilm.core.precision` (moved there, issue 25), the same module object.

For code outside the package (users, tests, bench); nothing inside fastfilm imports this path (tests/test_layers.py).
"""

import sys

from fastfilm.core import precision

sys.modules[__name__] = precision
