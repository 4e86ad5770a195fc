"""Fine-tuning of the four VideoLLaMA3 stages and the streaming format (later issue; shares ``model.layout``)."""
