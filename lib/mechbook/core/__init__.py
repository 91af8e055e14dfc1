"""The engine the chapters share: loading, hook names, runs, decoding, interventions, patching, circuits.

Nothing in ``mechbook.core`` knows a paper or a chapter; the papers' code in
``mechbook.papers`` imports only the names its modules export.
"""
