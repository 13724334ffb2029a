"""CLI sub-commands, one module each; see ``nvila_quant.cli``."""
