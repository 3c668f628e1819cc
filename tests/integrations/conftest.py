"""Pytest set-up for the integration tests."""

import pytest

# The multi-process tests share their assertions through the _ddp helper module: rewrite its
# asserts too, so a failure shows the values compared.
pytest.register_assert_rewrite("_ddp")
