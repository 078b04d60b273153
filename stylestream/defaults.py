"""The defaults an operator can change, defined once (importable without loading any model or
pipeline library, so the command line can show them in --help at no cost)."""

HALF_LIFE_DAYS = 365.0  # a photo taken one half-life later weighs twice as much
MIN_HALF_LIFE_DAYS = 40.0  # 2 ** (age / half-life) must stay finite in float64 for photos up to ~2100
MAX_EVENTS_PER_PARTITION = 2000  # per ingestion cycle: bounds its memory and duration
TINY_CLIP = "stylestream-tiny-clip"  # the bundled embedding model (models/configs/clip/, trained: models/trained/)
