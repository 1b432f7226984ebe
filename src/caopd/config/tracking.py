"""Where stages log: the MLflow tracking server, its artifact root and the pipeline run they belong to."""

from __future__ import annotations

import urllib.parse

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Identities on an authenticated MLflow server (caopd.tracking.identity; the chart's Secrets and its bootstrap job).
# The server app: MLflow's basic-auth app plus caopd's registry rules (caopd.tracking.server_app).
AUTH_APP_NAME = "caopd-auth"
CHAMPION, CHALLENGER = "champion", "challenger"  # the registry's aliases: in production, and next in line
PROTECTED_ALIASES = (CHAMPION,)  # moved only by an identity with MANAGE on the registered model
# A version's tag per promotion decision: caopd.promotion.<alias> (the registration's own is caopd.gate).
DECISION_TAG_PREFIX = "caopd.promotion."
# A folder holding the files `username` and `password`: a mounted Secret of type kubernetes.io/basic-auth. The
# client reads it when $MLFLOW_TRACKING_USERNAME / $MLFLOW_TRACKING_PASSWORD (or $MLFLOW_TRACKING_TOKEN) are unset.
CREDENTIALS_DIR_ENV = "CAOPD_MLFLOW_CREDENTIALS"
USERNAME_ENV, PASSWORD_ENV, TOKEN_ENV = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"
# The Secret (keys `username`, `password`) of the pipeline identity: the compiled pipeline gives it to every task's
# pod as the two variables above (optional: a cluster without it runs unauthenticated), and the chart names it.
PIPELINE_CREDENTIALS_SECRET = "caopd-mlflow-pipeline"
PIPELINE_SECRET_ENV = {USERNAME_ENV: f"{PIPELINE_CREDENTIALS_SECRET}/username",
                       PASSWORD_ENV: f"{PIPELINE_CREDENTIALS_SECRET}/password"}


class TrackingConfig(BaseModel):
    # A refused value is not echoed: a tracking URI may carry a password.
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    tracking_uri: str = Field("", description="MLflow tracking URI; empty = $MLFLOW_TRACKING_URI, else SQLite in "
                              "the local folder")
    experiment: str = Field("caopd", description="experiment name (ignored when $MLFLOW_EXPERIMENT_ID is set)")
    pipeline_run_id: str = Field("", description="the pipeline run the stages belong to (the KFP run id); empty "
                                 "= a new id")
    artifact_root: str = Field("", description="s3://BUCKET/PREFIX: a new experiment keeps its artifacts there and "
                               "registered weights are uploaded there with boto3 ($MLFLOW_S3_ENDPOINT_URL for a "
                               "non-AWS endpoint); empty = the server's default")
    connect_timeout_s: float = Field(30.0, gt=0.0, le=600.0, description="give up on an unreachable server after")

    @field_validator("tracking_uri")
    @classmethod
    def _no_credentials(cls, value: str) -> str:
        parts = urllib.parse.urlsplit(value)
        if parts.username is not None or parts.password is not None:
            raise ValueError(f"the tracking URI must not carry credentials (they would reach parameters and logs): "
                             f"give them as ${USERNAME_ENV} and ${PASSWORD_ENV}, or a folder in ${CREDENTIALS_DIR_ENV}")
        return value
