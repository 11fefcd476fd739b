"""The built-in demo models and the synthetic scenes they were trained on.

``models/demo`` (BLIP captioning) and ``models/demo-vqa`` (BLIP-2 with a small OPT
language model: captions and ``Question: ... Answer:`` prompts) are tiny models trained
from scratch on :mod:`blipserve.demo.scenes`; they know nothing but those scenes.
"""
