"""Shared test settings: one torch thread per test (the tiny models gain nothing from a second, and on a
2-core machine shared with other processes one is faster and steadier), and which planted lab mistakes
`make test` runs."""

import re
from collections import Counter

import pytest
import torch

torch.set_num_threads(1)

PLANTED = re.compile(r"test_lab_\d\d\.py::test_a_planted_mistake_is_caught_with_a_hint\[")
QUICK_EVERY = 4  # make test plants every fourth mistake of each lab; make test-slow plants the others


@pytest.hookimpl(tryfirst=True)  # before -m deselects the slow ones
def pytest_collection_modifyitems(config, items):
    """The labs' ~370 planted mistakes took 80 of make test's ~220 s on 2 shared cores: `make test` runs the
    first of every four in each lab's list (a sample of every lab), `make test-slow` the rest."""
    seen = Counter()
    for item in items:
        if PLANTED.search(item.nodeid):
            module = item.nodeid.split("::")[0]
            if seen[module] % QUICK_EVERY:
                item.add_marker(pytest.mark.slow)
            seen[module] += 1
