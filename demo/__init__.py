"""The end-to-end demo: the top layer, composing the core, live twins (`actors`) and sweeps."""
