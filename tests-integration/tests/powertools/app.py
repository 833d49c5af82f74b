"""The Python side of the Powertools compatibility test (tests/powertools.rs).

`lambda_handler` stands for a Python Lambda function's handler in `app.py`
(handler setting `app.lambda_handler`), so Powertools names its records
`{AWS_LAMBDA_FUNCTION_NAME}.app.lambda_handler#{hash}`. run.py decorates it with
`@idempotent` and records every run, so a replay is visible as "did not run".
"""

RUNS = []


def lambda_handler(event, context):
    RUNS.append(event)
    return {
        "handled_by": "python",
        "order_id": event.get("order_id"),
        "customer": event.get("customer"),
        "amount": event.get("amount"),
    }
