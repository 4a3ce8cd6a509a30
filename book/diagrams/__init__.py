"""The book's diagrams, one module per chapter (`ch02.py` draws chapter 02's), on `style`'s kit.

Each chapter module has a `FIGURES` dict: file name under figures/ -> function returning a
matplotlib Figure. `book/figures.py` (`make figures`) saves them all.
"""
