"""The built-in demo models and the script that trains them.

``models/demo`` (BLIP captioning) and ``models/demo-vqa`` (BLIP-2 with a small OPT
language model: captions and ``Question: ... Answer:`` prompts) are tiny models trained
from scratch on :mod:`blipserve.finetune.scenes`; they know nothing but those scenes.
:mod:`blipserve.demo.train_models` reproduces them with :mod:`blipserve.finetune`, which
knows nothing of this package.
"""
