"""Paper B: Lan, Torr & Barez (2024), shared circuits of sequence continuation (chapters b1-b7)."""
