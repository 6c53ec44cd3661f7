"""Drives hangar's gateway with the unmodified fal-client package from PyPI.

Everything fal-specific comes from the environment, as it would for a user moving
their code over: FAL_RUN_HOST and FAL_QUEUE_RUN_HOST point at the gateway, FAL_KEY is
a hangar key and SSL_CERT_FILE trusts the gateway's certificate. The app is
examples/echo-python, deployed as $APP. Prints one line per check; any failed check
raises, so the exit code tells.
"""

import os
import time

import fal_client
from fal_client.client import Completed, FalClientHTTPError, InProgress, Queued

APP = os.environ["APP"]


def check(name, condition, detail=""):
    if not condition:
        raise AssertionError(f"{name}: {detail}")
    print(f"ok {name}")


def wait_for(name, get, done, timeout=60):
    deadline = time.monotonic() + timeout
    while True:
        value = get()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {name}; last: {value!r}")
        time.sleep(0.05)


# run: the sync gateway path, with and without a path under the app.
result = fal_client.run(APP, arguments={"prompt": "a red bicycle"})
check("run", result["json"] == {"prompt": "a red bicycle"} and result["path"] == "/", result)
result = fal_client.run(APP, arguments={"n": 2}, path="/generate")
check("run with a path", result["path"] == "/generate" and result["json"] == {"n": 2}, result)

# submit + status + result.
handle = fal_client.submit(APP, arguments={"n": 3}, path="/generate")
status = handle.status()
check("status right after submit", isinstance(status, (Queued, InProgress, Completed)), status)
result = handle.get()
check("result", result["json"] == {"n": 3} and result["path"] == "/generate", result)
status = fal_client.status(APP, handle.request_id, with_logs=True)
check("completed status", isinstance(status, Completed) and status.error is None, status)
check("completed status has logs", any("handling POST /generate" in l["message"] for l in status.logs), status.logs)
check("completed status has metrics", status.metrics.get("inference_time") is not None, status.metrics)
check("result by request id", fal_client.result(APP, handle.request_id) == result)

# subscribe with logs: the updates show the request in progress with the app's lines.
updates = []
result = fal_client.subscribe(
    APP, arguments={"sleep": 1.5, "tag": "sub"}, with_logs=True, on_queue_update=updates.append, interval=0.1
)
check("subscribe result", result["json"] == {"sleep": 1.5, "tag": "sub"}, result)
in_progress = [u for u in updates if isinstance(u, InProgress)]
check("subscribe saw IN_PROGRESS", in_progress, updates)
messages = [l["message"] for u in in_progress for l in (u.logs or [])]
check("subscribe saw the app's log lines while it ran", any(m.startswith("step") for m in messages), messages)
check("subscribe ended COMPLETED", isinstance(updates[-1], Completed), updates[-1])

# cancel while running: the app is told (POST <path>/cancel with x-fal-request-id)
# and stops; the status says the request was cancelled.
handle = fal_client.submit(APP, arguments={"sleep": 60})
wait_for("IN_PROGRESS", handle.status, lambda s: isinstance(s, InProgress))
handle.cancel()
status = wait_for("COMPLETED", lambda: handle.status(with_logs=True), lambda s: isinstance(s, Completed), timeout=30)
check("cancelled status", status.error_type == "request_cancelled", status)
check("the app was told", any("cancel requested for" in l["message"] for l in status.logs), status.logs)
try:
    handle.get()
    raise AssertionError("the result of a cancelled request should raise")
except FalClientHTTPError as e:
    check("cancelled result raises", e.status_code == 499, e)

# cancel once completed: 400.
try:
    handle.cancel()
    raise AssertionError("cancelling a completed request should raise")
except FalClientHTTPError as e:
    check("cancel after completion is refused", e.status_code == 400 and "already completed" in e.message, e)

# errors carry hangar's message.
try:
    fal_client.submit(APP + "-missing", arguments={})
    raise AssertionError("submitting to a missing app should raise")
except FalClientHTTPError as e:
    check("unknown app", e.status_code == 404 and "not found" in e.message, e)

print("all fal-client checks passed")
