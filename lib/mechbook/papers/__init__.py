"""One package per paper: its prompts and data, its experiments, its figures and its reported numbers.

- :mod:`mechbook.papers.vector_arithmetic`: Merullo, Eickhoff & Pavlick (2024), *Language Models
  Implement Simple Word2Vec-style Vector Arithmetic* (chapters a1-a6).
- :mod:`mechbook.papers.seqcont`: Lan, Torr & Barez (2024), *Towards Interpretable Sequence
  Continuation: Analyzing Shared Circuits in Large Language Models* (chapters b1-b6).
"""
