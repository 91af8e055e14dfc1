"""What mechbook keeps on disk beside the core: the cache of dequantized models and the Hugging Face hub.

``cache``: where models are cached, each folder's manifest of sizes and sha256s, and
building a folder so that it appears whole or not at all. ``hub``: the local Hugging
Face cache and the hub behind it. ``quiet``: silence for the libraries that read models.
Nothing here knows a model format, a paper or a chapter: :mod:`mechbook.core.loading`
fills the cache and reads from it.
"""
