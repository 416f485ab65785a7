"""TileLang programs for the MISA / HISA indexers, shipped as `transformers_misa.kernels`.

Nothing here imports TileLang at import time: the package must import on machines without a GPU.
"""
