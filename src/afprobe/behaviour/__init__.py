"""What the model does on the paired prompts, before looking inside: the compliance gap with its intervals."""
