"""The course toolbox: load a model, apply a fine-tuning method, data, training, evaluation, plots."""
