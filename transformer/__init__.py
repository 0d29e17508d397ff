"""The Transformer of "Attention Is All You Need" (Vaswani et al., 2017) and a translation pipeline.

`transformer.model` holds the reusable modules; the other modules of this package train, decode and
evaluate translation models with them.
"""
