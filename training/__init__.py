"""textgen.training: the offline package that trains character-level recurrent language models.

Importing this package does not import torch; its torch-free modules (corpus, config, errors) need no extra.
The modules that need torch (model, data, train, checkpoint, export) need the ``train`` extra. Bundles are
written to the contract of :mod:`textgen.service.bundle` and :mod:`textgen.service.vocab`, which this package
imports; nothing under ``textgen.service`` but its command line imports this package.
"""
