"""Training of the bundled default models (scikit-learn digits): tokenizers, then transformers.

Training-only code lives here; the networks are the inference modules of models/var and
models/llamagen, and checkpoints are written in the published key layouts those loaders read.
"""
