"""Backends (shipped as ``mmcompile.targets``): each target lowers a stage of the plan to an
executable. Target modules import the core; the core never imports them."""
