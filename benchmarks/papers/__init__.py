"""One module per paper's decoder, run by ``benchmarks/lm_papers.py`` (see its docstring for the contract)."""
