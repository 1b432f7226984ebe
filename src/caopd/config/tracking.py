"""Where stages log: the MLflow tracking server, its artifact root and the pipeline run they belong to."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class TrackingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tracking_uri: str = Field("", description="MLflow tracking URI; empty = $MLFLOW_TRACKING_URI, else SQLite in "
                              "the local folder")
    experiment: str = Field("caopd", description="experiment name (ignored when $MLFLOW_EXPERIMENT_ID is set)")
    pipeline_run_id: str = Field("", description="the pipeline run the stages belong to (the KFP run id); empty "
                                 "= a new id")
    artifact_root: str = Field("", description="s3://BUCKET/PREFIX: a new experiment keeps its artifacts there and "
                               "registered weights are uploaded there with boto3 ($MLFLOW_S3_ENDPOINT_URL for a "
                               "non-AWS endpoint); empty = the server's default")
    connect_timeout_s: float = Field(30.0, gt=0.0, le=600.0, description="give up on an unreachable server after")

