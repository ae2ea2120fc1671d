"""Embedded demo model of FASC: a small Llama trained on an invented world.

The world (``fasc.demo.world``) is generated deterministically, so the facts
the model stores are known exactly. See ``fasc/demo/README.md``.
"""
