"""Table artifacts show a missing, None or NaN value as "-", like the HTML report."""

from __future__ import annotations

import json


def test_table_artifact_shows_missing_values_as_a_dash(prefect_api):
    import pandas as pd
    from integral_superposition.tasks.ui import artifact_key, table
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    @flow
    def publish() -> None:
        df = pd.DataFrame(
            {"metric": ["fvu", "cos_sim", "norm_ratio"], "value": [0.25, float("nan"), None]}
        )
        table("metrics-missing", df, "metrics with missing values")

    publish()
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[artifact_key("metrics-missing")])
            )
        )
    assert arts, "no table artifact"
    rows = arts[0].data if isinstance(arts[0].data, list) else json.loads(arts[0].data)
    assert [r["value"] for r in rows] == [0.25, "-", "-"]
