"""The ``lifealign-lite`` command line (installed as ``lifealign_lite.cli``)."""
