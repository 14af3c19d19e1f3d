"""Backbones: one module per framework (`--framework`), each a `base.Framework`; `registry` finds
them by name and builds them."""
