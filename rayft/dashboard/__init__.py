"""The rayft dashboard: one page of the cluster's jobs, their curves, replicas and events, with
cancel, priority and a playground for served adapters.

    source.py   the page's data and actions, through the controller actor (what the CLI uses)
    app.py      the HTTP app (FastAPI): the page, its JSON API, and the guards in front of them
    static/     the page itself: HTML, CSS and plain JavaScript (its own SVG charts; nothing from
                a CDN, so it works offline)
    grafana/    a Grafana dashboard of the gauges the controller exports

`rayft dashboard` serves it on 127.0.0.1; the Serve app mounts it at /dashboard when it serves a
cluster's storage root.
"""
