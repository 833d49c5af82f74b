"""Runs Powertools for Python's idempotent handler (app.lambda_handler) on events.

Reads one JSON job on stdin:
  {"table": str, "function_name": str, "hash_function": "md5",
   "cases": [{"key_expression": str, "validation": str | null, "events": [...]}]}
and writes one JSON line on stdout: per case, per event,
  {"ran": bool, "response": <handler response or the replayed one>}.

DynamoDB is the endpoint in AWS_ENDPOINT_URL (LocalStack), region us-east-1,
test credentials. Each case gets its own persistence layer, as Powertools
configures a layer once (its key expression) for its first handler.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import boto3  # noqa: E402
from aws_lambda_powertools.utilities.idempotency import (  # noqa: E402
    DynamoDBPersistenceLayer,
    IdempotencyConfig,
    idempotent,
)

import app  # noqa: E402


class Context:
    """The part of a Lambda context Powertools reads."""

    function_name = "python-test"
    aws_request_id = "req"

    def get_remaining_time_in_millis(self):
        return 60_000


def main():
    job = json.load(sys.stdin)
    os.environ["AWS_LAMBDA_FUNCTION_NAME"] = job["function_name"]
    client = boto3.client(
        "dynamodb",
        endpoint_url=os.environ.get("AWS_ENDPOINT_URL", "http://127.0.0.1:4566"),
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    )
    results = []
    for case in job["cases"]:
        layer = DynamoDBPersistenceLayer(table_name=job["table"], boto3_client=client)
        config = IdempotencyConfig(
            event_key_jmespath=case["key_expression"],
            payload_validation_jmespath=case.get("validation") or "",
            hash_function=job.get("hash_function", "md5"),
            raise_on_no_idempotency_key=True,
        )
        handler = idempotent(app.lambda_handler, persistence_store=layer, config=config)
        outcomes = []
        for event in case["events"]:
            before = len(app.RUNS)
            response = handler(event, Context())
            outcomes.append({"ran": len(app.RUNS) > before, "response": response})
        results.append(outcomes)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
