"""Serve's queueing for the rayft deployment: a burst larger than a batch waits in the replica's own
queue (which the batcher drains between tokens), not in Serve's router, which holds requests over
max_ongoing_requests and retries each with backoff while the replica may sit idle. Measured with
benchmarks/serve_load.py --burst 500. No Ray started here."""

from pathlib import Path

import yaml

from rayft.config import ServeConfig, load_serve_config
from rayft.serving.server import AdapterServer

REPO = Path(__file__).resolve().parents[1]
BURST = 500  # requests at once that one replica must take without Serve's retry loop


def _shipped():
    """(where, ServeConfig, deployment options) of every Serve config the repository ships."""
    cfg, options = load_serve_config(REPO / "configs" / "serve.yaml")
    yield "configs/serve.yaml", cfg, options
    for doc in yaml.safe_load_all((REPO / "k8s" / "rayservice.yaml").read_text()):
        if doc and doc.get("kind") == "RayService":
            app = yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"][0]
            yield "k8s/rayservice.yaml", ServeConfig.model_validate(app["args"]), app["deployments"][0]


def test_every_shipped_deployment_takes_a_burst_into_the_replica_queue():
    default = AdapterServer.max_ongoing_requests
    assert default >= BURST
    seen = set()
    for where, cfg, options in _shipped():
        seen.add(where)
        ongoing = options.get("max_ongoing_requests", default)
        assert ongoing >= max(BURST, 8 * cfg.max_batch), f"{where}: max_ongoing_requests {ongoing}"
        queued = options.get("max_queued_requests", AdapterServer.max_queued_requests)
        assert queued == -1 or queued >= ongoing, f"{where}: max_queued_requests {queued} refuses a burst early"
    assert seen == {"configs/serve.yaml", "k8s/rayservice.yaml"}
