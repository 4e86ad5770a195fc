"""Fine-tuning VideoLLaMA3 (its four stages and the streaming format) on transformers' Trainer.

``training.data`` renders samples with the live session's own layout and preprocessing;
``training.trainer`` runs the stages. Imports ``model`` only.
"""
