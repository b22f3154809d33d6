"""Alias: `fastfilm.errors` is `fastfilm.core.errors` (moved there, issue 25), the same module object.

For code outside the package (users, tests, bench); nothing inside fastfilm imports this path (tests/test_layers.py).
"""

import sys

from fastfilm.core import errors

sys.modules[__name__] = errors
