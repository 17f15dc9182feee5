"""Celery settings for Flower, mounted into the mher/flower image as /data/celeryconfig.py.

Flower runs Celery's default app, which imports this module. Its Redis client also hands back
messages left unacknowledged for longer than the visibility timeout, so it must use the
workers' value rather than Celery's default of one hour: with EXPLAINCTL_VISIBILITY_TIMEOUT
above 3600 s, Flower would otherwise requeue a chunk that a worker is still running.
The broker is the workers' EXPLAINCTL_BROKER_URL; keep the default visibility timeout
equal to explainctl's (tests/deploy checks it).
"""

import os

broker_url = os.environ["EXPLAINCTL_BROKER_URL"]
broker_transport_options = {
    "visibility_timeout": int(os.environ.get("EXPLAINCTL_VISIBILITY_TIMEOUT") or 2100),
}
