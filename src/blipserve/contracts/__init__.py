"""The wire formats blipserve speaks, side by side, with no HTTP in them.

- :mod:`blipserve.contracts.catalog`: the Azure ML model catalog's scoring contract
  (pandas "split" rows in, ``[{"text": ...}]`` out);
- :mod:`blipserve.contracts.openai`: OpenAI's chat completions, one image a request;
- :mod:`blipserve.contracts.open_inference`: KServe's Open Inference Protocol (v2), image
  and text tensors in, text (and score) tensors out, JSON or binary.
"""
