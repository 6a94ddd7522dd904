"""The training leg: supervised fine-tuning whose output the server loads.

A run leaves a model directory or a LoRA adapter that ``TRIPOD_MODEL`` (and ``TRIPOD_ADAPTER``) serve as they are, so
a trained model needs no conversion step.
"""
