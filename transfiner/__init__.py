"""The ``transfiner`` command, above the packages it brings together (``model``, ``export``,
``service``); ``python -m transfiner`` runs it where the console script is not installed."""
