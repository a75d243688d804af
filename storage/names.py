"""Names the store gives its own files and folders (see the layout in :mod:`storage.store`)."""

COMMIT = "v2v.commit"
TMP = ".tmp"
TRASH = ".trash"
QUARANTINE = ".quarantine"
LEASES = ".leases"
JOBS = "jobs"
INDEX = "index"
RESERVED = frozenset({TMP, TRASH, QUARANTINE, LEASES, JOBS, INDEX})
