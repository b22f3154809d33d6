"""Alias: `fastfilm.config` is `fastfilm.core.config` (moved there, issue 25), the same module object.

For code outside the package (users, tests, bench); nothing inside fastfilm imports this path (tests/test_layers.py).
"""

import sys

from fastfilm.core import config

sys.modules[__name__] = config
