"""Structured outputs in the engine core: grammar backends (xgrammar, guidance, outlines) behind
one matcher protocol (`grammar`), the choice of backend per request (`backend_selection`), and
the manager that compiles grammars and fills each step's token bitmask (`manager`).
"""
