"""Glue for other frameworks (optional extras), imported by name so `import amptrain` stays light.

- `amptrain.integrations.lightning`: `AmpMonitor`, a Lightning callback that logs the effective
  precision, the loss scale, skipped steps and scale growth/back-off through the trainer's own
  loggers; and `lightning_precision`, amptrain's precision names in Lightning's spelling.

The W&B sink is `amptrain.metrics.wandb_sink.WandbSink`, beside the other sinks.
"""

from __future__ import annotations
