"""Training data: sample files, their rendering in the live session's token layout, and the dataset."""
