"""stream-cps: always-on customer profile stitching.

The package tree follows the pipeline: ``sources`` -> ``stitching`` -> ``attributes`` ->
``sinks``, with ``db`` (schema, migrations), ``telemetry`` and ``cli`` beside them.
"""

__version__ = "0.1.0"
