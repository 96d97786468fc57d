"""The Serve application, for Ray's own tools:

    serve run serve.app:app store=out/demo            # embedded or RAY_ADDRESS cluster
    serve deploy configs/serve.yaml                   # a running cluster (autoscaling from the file)

`app` is an application builder: Serve calls it with the `args` (key=value on the command line,
`args:` in the YAML), which are the fields of rayft.config.ServeConfig.
"""

from rayft.serving.server import build


def app(args: dict):
    return build(args)
