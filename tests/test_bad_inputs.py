"""The bad-input corpus through real worker processes, step by step."""

from pathlib import Path

import geopandas
import pytest
import shapely

from geoiso_dagster.defs.resources import TASK_MODULE
from geoiso_dagster.errors import BadInputError
from geoiso_dagster.pool import PoolSettings, WorkerPool
from tests.bad_inputs.corpus import CASES, Case

STEPS = ("ingest", "reproject", "dissolve")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """The data root of the corpus: every case's files live under it (the jail)."""
    return tmp_path_factory.mktemp("corpus_root").resolve()


@pytest.fixture(scope="module")
def pool(root):
    with WorkerPool(
        PoolSettings(task_module=TASK_MODULE, max_workers=2, data_root=str(root))
    ) as pool:
        yield pool


def test_the_corpus_is_big_enough_and_documented():
    assert len(CASES) >= 30
    readme = (Path(__file__).parent / "bad_inputs" / "README.md").read_text()
    for case in CASES:
        assert f"`{case.name}`" in readme, f"{case.name} is not in bad_inputs/README.md"


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_case(case: Case, pool, root):
    source_dir, out_dir = root / case.name / "in", root / case.name / "out"
    source_dir.mkdir(parents=True)
    out_dir.mkdir()
    current = str(case.build(source_dir))
    kwargs = {
        "ingest": {},
        "reproject": {"target_crs": case.target_crs},
        "dissolve": {"dissolve_by": case.dissolve_by},
    }
    for step in STEPS:
        output = out_dir / f"{step}.parquet"
        if step == case.fails_at:
            with pytest.raises(BadInputError) as info:
                pool.run(step, source=current, output=str(output), **kwargs[step])
            assert info.value.path == current, "the failure must name the file it is about"
            assert case.cause in info.value.cause
            assert not output.exists(), "a failed step must not leave an output"
            break
        result = pool.run(step, source=current, output=str(output), **kwargs[step])
        written = geopandas.read_parquet(output)
        assert len(written) == result.facts["rows"]
        current = str(output)
    else:
        assert case.fails_at is None, f"expected a failure at {case.fails_at}"
        dissolved = geopandas.read_parquet(current)
        assert shapely.is_valid(dissolved.geometry.values).all()
        assert not shapely.is_empty(dissolved.geometry.values).any()
        if case.verify:
            case.verify(dissolved)
    assert sorted(p.name for p in out_dir.iterdir() if p.name.startswith(".")) == []
