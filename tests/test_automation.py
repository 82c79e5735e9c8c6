"""Downstream automation waits for upstream's blocking checks (declarative automation,
evaluated on a real instance)."""

import pytest
from dagster import (
    AssetCheckEvaluation,
    AssetCheckSeverity,
    AssetKey,
    AssetMaterialization,
    evaluate_automation_conditions,
    instance_for_test,
)

from geoiso_dagster.definitions import defs
from geoiso_dagster.defs.checks import CHECKS_BY_ASSET, ROW_COUNT

KEY = "c.gpkg"


@pytest.mark.parametrize("check_passed", [True, False])
def test_reprojected_follows_raw_only_when_its_blocking_checks_passed(check_passed, data_root):
    with instance_for_test() as instance:
        instance.add_dynamic_partitions("source_files", [KEY])
        first = evaluate_automation_conditions(defs=defs, instance=instance)
        assert first.total_requested == 0

        instance.report_runless_asset_event(AssetMaterialization("raw_features", partition=KEY))
        for check_name in CHECKS_BY_ASSET["raw_features"]:
            instance.report_runless_asset_event(
                AssetCheckEvaluation(
                    asset_key=AssetKey("raw_features"),
                    check_name=check_name,
                    passed=check_passed or check_name != ROW_COUNT,
                    severity=AssetCheckSeverity.ERROR,
                    blocking=True,
                    partition=KEY,
                )
            )
        second = evaluate_automation_conditions(defs=defs, instance=instance, cursor=first.cursor)
        requested = second.get_requested_partitions(AssetKey("reprojected_features"))
        assert requested == ({KEY} if check_passed else set())
        assert second.get_requested_partitions(AssetKey("dissolved_regions")) == set()
