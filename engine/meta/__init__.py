"""Open Images metadata: download a release's files (``download``), and what reads them."""
