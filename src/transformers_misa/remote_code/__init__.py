"""Templates of the custom-code files `save_patched` writes next to a checkpoint (not imported by the package).

The UPPER_CASE names (MISA_BASE_CONFIG, MISA_CONFIG, MISA_BASE_MODEL, MISA_MODEL, MISA_MODEL_TYPE) are replaced with
the family's classes by `transformers_misa.hub.render_remote_code`; the same two templates serve every family.
"""
