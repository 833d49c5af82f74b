"""Runs Powertools for Python's idempotent handler (app.lambda_handler) on events.

Reads one JSON job on stdin:
  {"store": {"kind": "dynamodb", "table": str}
          | {"kind": "redis", "url": "redis://host:port", "cluster": bool},
   "function_name": str, "hash_function": "md5",
   "cases": [{"key_expression": str, "validation": str | null, "events": [...],
              "mode": "handle" | "reserve"}]}
and writes one JSON line on stdout: per case, per event,
  {"ran": bool, "response": <handler response or the replayed one, or null>,
   "error": <the name of the exception raised, or null>,
   "key": <Powertools' idempotency key for the event: the record's id or Redis key>}.

Mode "handle" (the default) calls the decorated handler. Mode "reserve" only
saves the in-progress record, as @idempotent does before running the handler
(`save_inprogress` with the context's remaining time), and leaves it there: a
live reservation, as while the handler runs.

DynamoDB is the endpoint in AWS_ENDPOINT_URL (LocalStack), region us-east-1,
test credentials; Redis is Powertools' RedisCachePersistenceLayer (its `redis`
extra) on the given server or cluster, without TLS. Each case gets its own
persistence layer, as Powertools configures a layer once (its key expression)
for its first handler.
"""

import json
import os
import sys
import warnings
from urllib.parse import urlparse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from aws_lambda_powertools.utilities.idempotency import (  # noqa: E402
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


def persistence_layer(store):
    """A new persistence layer on the job's store."""
    if store["kind"] == "dynamodb":
        import boto3
        from aws_lambda_powertools.utilities.idempotency import DynamoDBPersistenceLayer

        client = boto3.client(
            "dynamodb",
            endpoint_url=os.environ.get("AWS_ENDPOINT_URL", "http://127.0.0.1:4566"),
            region_name="us-east-1",
            aws_access_key_id="test",
            aws_secret_access_key="test",
        )
        return DynamoDBPersistenceLayer(table_name=store["table"], boto3_client=client)
    if store["kind"] == "redis":
        from aws_lambda_powertools.utilities.idempotency.persistence.redis import (
            RedisCachePersistenceLayer,
        )

        url = urlparse(store["url"])
        with warnings.catch_warnings():
            # 3.x deprecates the Redis names for their Cache aliases: the same class.
            warnings.simplefilter("ignore", DeprecationWarning)
            return RedisCachePersistenceLayer(
                host=url.hostname,
                port=url.port,
                ssl=False,
                mode="cluster" if store.get("cluster") else "standalone",
            )
    raise ValueError(f"unknown store {store['kind']!r}")


def main():
    job = json.load(sys.stdin)
    os.environ["AWS_LAMBDA_FUNCTION_NAME"] = job["function_name"]
    handler_name = f"{app.lambda_handler.__module__}.{app.lambda_handler.__qualname__}"
    results = []
    for case in job["cases"]:
        layer = persistence_layer(job["store"])
        config = IdempotencyConfig(
            event_key_jmespath=case["key_expression"],
            payload_validation_jmespath=case.get("validation") or "",
            hash_function=job.get("hash_function", "md5"),
            raise_on_no_idempotency_key=True,
        )
        handler = idempotent(app.lambda_handler, persistence_store=layer, config=config)
        layer.configure(config=config, function_name=handler_name)
        outcomes = []
        for event in case["events"]:
            before = len(app.RUNS)
            response, error = None, None
            try:
                if case.get("mode", "handle") == "reserve":
                    remaining = Context().get_remaining_time_in_millis()
                    layer.save_inprogress(data=event, remaining_time_in_millis=remaining)
                else:
                    response = handler(event, Context())
            except Exception as exc:  # noqa: BLE001 - reported to the Rust side
                error = type(exc).__name__
            outcomes.append(
                {
                    "ran": len(app.RUNS) > before,
                    "response": response,
                    "error": error,
                    "key": layer._get_hashed_idempotency_key(data=event),
                }
            )
        results.append(outcomes)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
