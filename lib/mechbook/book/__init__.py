"""The book's plumbing: chapter results (atomic, with a marker), the across-models tables, figures' style, the CLI."""
