"""Paper A: Merullo, Eickhoff & Pavlick (2024), word2vec-style vector arithmetic in the FFN updates (chapters a1-a6)."""
