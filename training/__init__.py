"""textgen.training: the offline package that trains character-level recurrent language models.

Importing this package does not import torch; its torch-free modules (corpus, vocab, errors) serve the
runtime too. The modules that need torch (model, data, train, checkpoint, export) need the ``train`` extra.
"""
