"""Powertools Logger (structured JSON), Metrics (EMF) and Tracer, shared by both functions.

Log records are events: a snake_case name and fields (DESIGN §11).
"""

from __future__ import annotations

from aws_lambda_powertools import Logger, Metrics, Tracer

SERVICE = "content-retry"
NAMESPACE = "ContentRetry"

logger = Logger(service=SERVICE)
metrics = Metrics(namespace=NAMESPACE, service=SERVICE)
tracer = Tracer(service=SERVICE)
