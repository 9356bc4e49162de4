"""Powertools Logger (structured JSON), Metrics (EMF) and Tracer, shared by both functions.

Log records are events: a snake_case name and fields (DESIGN §11).
"""

from __future__ import annotations

from aws_lambda_powertools import Logger, Metrics, Tracer

SERVICE = "content-retry"
NAMESPACE = "ContentRetry"

logger = Logger(service=SERVICE)
metrics = Metrics(namespace=NAMESPACE, service=SERVICE)
# Only botocore is patched: its calls (SQS, Bedrock) become subsegments of their
# own. The judge, the sweep, each save and each LLM call are traced by hand,
# where they are named; patching every library X-Ray knows (its default)
# imports each one at cold start and traces every SQL statement besides.
tracer = Tracer(service=SERVICE, patch_modules=("botocore",))
