"""stylestream: per-user visual style learned from photo streams, used to personalize image generation.

The code lives in the repository's top-level folders, installed as subpackages of this one:
schemas/ (event and table contracts), streams/ (Kafka broker, topics, clients), models/ (model
loading), transforms/ (Beam PTransforms and the pure functions under them), pipelines/ (runnable
pipelines), serving/ (generation worker), analytics/ (style history and drift), privacy/ (erasure receipts,
audit, released vectors), cli/ (the `stylestream` command).
"""

__version__ = "0.1.0"
