"""minillm: a small large-language model built from scratch, one chapter at a time.

The public names of each chapter's module are re-exported here, in the order of the book.
"""

from minillm.corpus import EOT, Corpus, CorpusError, Document, load_corpus, stdlib_corpus

__version__ = "0.1.0"

__all__ = ["EOT", "Corpus", "CorpusError", "Document", "load_corpus", "stdlib_corpus"]
