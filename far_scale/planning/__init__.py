"""Building runs from a recipe: cross-section checks, the one training plan, the model builder, the report.

The layer between ``config`` (a leaf: schema and loading) and what runs (``train``, ``eval``,
``launch``): every derived number is computed here, once per run, and read by every consumer.
"""
