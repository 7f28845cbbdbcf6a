"""Every shipped benchmark suite expands, at every size, into cells whose specs validate."""

from pathlib import Path

import pytest

from statelab.bench import expand, load_suite
from statelab.spec import validate_spec

SUITES = sorted((Path(__file__).resolve().parents[1] / "configs" / "bench").glob("*.yaml"))


@pytest.mark.parametrize("path", SUITES, ids=[p.stem for p in SUITES])
def test_shipped_suite_validates_at_every_size(path):
    suite, root = load_suite(path)
    for size in suite.sizes or [None]:
        cells = expand(suite, root, size)
        assert cells
        for cell in cells:
            validate_spec(cell.spec)


def test_every_core_task_is_in_the_smoke_suite():
    from statelab.plugins import get_registry

    suite, _ = load_suite(Path(__file__).resolve().parents[1] / "configs" / "bench" / "smoke.yaml")
    core = {n for n in get_registry().names("task") if get_registry().get("task", n).distribution == "statelab-core"}
    assert core == {t.kind for t in suite.tasks}
