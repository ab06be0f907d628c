"""Ingest adapters: MLLMU-Bench and CLEAR, as published on the Hugging Face Hub, into the
internal layout. One module per dataset (``mllmu``, ``clear``: each documents what it relies
on and where that was checked); ``common`` holds what both read with."""
from vkd.data.ingest import clear, mllmu  # noqa: F401  (fill the registry)
