"""TileLang programs for the MISA / HISA indexers, shipped as `transformers_misa.kernels`.

Nothing here imports TileLang at import time: the package must import on machines without a GPU.
"""

if __name__ == "kernels":  # this folder imported as a top-level package: a source checkout's root is on sys.path
    # (`python -m pytest`, a REPL started there). It would shadow the Hub's `kernels` library, which transformers
    # imports where it is installed: hand the import over to that library. Without it, this empty package stands in
    # and transformers, finding no `kernels` distribution, does not use it.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _elsewhere = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != _checkout]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is not None:
        _library = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _library  # what `import kernels` hands back once this file has run
        _spec.loader.exec_module(_library)
