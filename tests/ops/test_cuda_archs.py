import pytest

from qbert.ops._cuda import parse_archs, runs_on


def test_parse_archs():
    assert parse_archs("8.0;9.0a") == [(8, 0, False), (9, 0, True)]
    assert parse_archs("") == []


@pytest.mark.parametrize("archs,capability,runs", [
    ("8.0;9.0a", (8, 0), True),
    ("8.0;9.0a", (8, 6), True),    # sm_80 machine code runs on every later 8.x
    ("8.0;9.0a", (8, 9), True),
    ("8.0;9.0a", (9, 0), True),
    ("8.0;9.0a", (10, 0), False),  # no PTX is embedded: a new major version has no code to run
    ("8.0;9.0a", (12, 0), False),
    ("8.6", (8, 0), False),        # code for a newer minor does not run on an older one
    ("9.0a", (9, 1), False),       # an arch-specific target runs on exactly that capability
    ("", (8, 0), False),
])
def test_runs_on(archs, capability, runs):
    assert runs_on(archs, capability) is runs
