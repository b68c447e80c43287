"""Constitutional AI and RLAIF: a constitution of principles instead of (most) human labels.

- :mod:`~alignloop.cai.constitution`: the YAML file of critique/revision and preference principles.
- :mod:`~alignloop.cai.judges`: the model backends (a local HF model, or an OpenAI-compatible server).
- :mod:`~alignloop.cai.revise`: the supervised stage (sample -> critique -> revision, n rounds).
- :mod:`~alignloop.cai.label`: AI preference labels (soft, clamped, averaged over principles).
- :mod:`~alignloop.cai.pipeline`: the whole pipeline (SL -> SFT -> AI labels -> RM -> PPO) and
  ``ai_rankings`` for the loop's ``label.mode: ai``.

Importing this package imports no torch.
"""
