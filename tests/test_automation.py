"""Downstream automation waits for upstream's blocking checks (declarative automation,
evaluated on a real instance)."""

import pytest
from dagster import (
    AssetCheckEvaluation,
    AssetCheckSeverity,
    AssetKey,
    AssetMaterialization,
    AssetRecordsFilter,
    evaluate_automation_conditions,
    instance_for_test,
)
from dagster._core.definitions.asset_checks.asset_check_evaluation import (
    AssetCheckEvaluationTargetMaterializationData,  # public constructor args, private path
)

from geoiso_dagster.definitions import defs
from geoiso_dagster.defs.checks import CHECK

KEY = "c.gpkg"


@pytest.mark.parametrize("check_passed", [True, False])
def test_reprojected_follows_raw_only_when_its_blocking_checks_passed(check_passed, data_root):
    with instance_for_test() as instance:
        instance.add_dynamic_partitions("source_files", [KEY])
        first = evaluate_automation_conditions(defs=defs, instance=instance)
        assert first.total_requested == 0

        instance.report_runless_asset_event(AssetMaterialization("raw_features", partition=KEY))
        (record,) = instance.fetch_materializations(
            AssetRecordsFilter(asset_key=AssetKey("raw_features"), asset_partitions=[KEY]), limit=1
        ).records
        target = AssetCheckEvaluationTargetMaterializationData(
            storage_id=record.storage_id, run_id=record.run_id, timestamp=record.timestamp
        )
        instance.report_runless_asset_event(
            AssetCheckEvaluation(
                asset_key=AssetKey("raw_features"),
                check_name=CHECK,
                passed=check_passed,
                severity=AssetCheckSeverity.ERROR,
                blocking=True,
                partition=KEY,
                target_materialization_data=target,
            )
        )
        second = evaluate_automation_conditions(defs=defs, instance=instance, cursor=first.cursor)
        expected = {KEY} if check_passed else set()
        # Passed: reprojected is requested, and dissolved with it in the same tick (its own
        # upstream will be requested, and checks "will be requested" count as passing).
        for downstream in ("reprojected_features", "dissolved_regions"):
            assert second.get_requested_partitions(AssetKey(downstream)) == expected, downstream
