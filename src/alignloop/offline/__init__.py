"""Learning from a fixed dataset, with no sampling during training: DPO, IPO and conservative DPO
(``dpo.py``; ``alignloop.dpo`` is kept as its old import path) and ILQL (``ilql.py``).
"""
