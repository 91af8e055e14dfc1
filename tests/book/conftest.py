"""The lock check first: a pytest session that collects it runs it before anything else and stops if it fails.

Every other test, and nbval's re-execution of the chapters, means something only on the locked versions
(requirements.lock); a venv that differs would spend the whole run testing another environment. Ordered last
among the collection hooks, so that it also goes ahead of the chapter mechbook.book.nbval_tolerance puts first.
"""

from __future__ import annotations

import pytest

LOCK_TEST = "tests/book/test_environment.py::test_the_venv_is_the_lock"


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session, config, items) -> None:
    first = [item for item in items if item.nodeid.endswith(LOCK_TEST)]
    if first:
        items[:] = first + [item for item in items if item not in first]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed and item.nodeid.endswith(LOCK_TEST):
        item.session.shouldstop = f"{report.longreprtext.strip().splitlines()[-1]}"
    return report
