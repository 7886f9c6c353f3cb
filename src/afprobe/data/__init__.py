"""What goes into the model: query sets, the prompt text, paired tier prompts and contrast sets."""
